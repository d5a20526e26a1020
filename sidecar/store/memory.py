"""The memory store: the session lives only as long as the process."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from sidecar.store import SessionRecord

if TYPE_CHECKING:
    from sidecar.store.crypto import Sealer


class MemoryStore:
    """Keeps the last saved record in memory (the default for tests and the demo).

    It keeps the record's serialised form, as the other stores do, not the object: a record's
    mutable parts (``extra``, the token's ``fields``) changed after the save do not change what
    is stored, and a load reads and checks the record as a file or Redis load does.
    """

    kind = "memory"
    shared = False

    def __init__(self) -> None:
        self._stored: str | None = None

    async def load(self) -> SessionRecord | None:
        return None if self._stored is None else SessionRecord.from_dict(json.loads(self._stored))

    async def save(self, record: SessionRecord) -> None:
        self._stored = json.dumps(record.to_dict())

    async def clear(self) -> None:
        self._stored = None

    def use_sealer(self, sealer: Sealer | None) -> None:
        """Nothing is kept at rest here, so nothing is sealed."""

    async def aclose(self) -> None:
        return None
