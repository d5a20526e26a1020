"""The memory store: the session lives only as long as the process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sidecar.store import SessionRecord

if TYPE_CHECKING:
    from sidecar.store.crypto import Sealer


class MemoryStore:
    """Keeps the last saved record in memory (the default for tests and the demo)."""

    kind = "memory"
    shared = False

    def __init__(self) -> None:
        self._record: SessionRecord | None = None

    async def load(self) -> SessionRecord | None:
        return self._record

    async def save(self, record: SessionRecord) -> None:
        self._record = record

    async def clear(self) -> None:
        self._record = None

    def use_sealer(self, sealer: Sealer | None) -> None:
        """Nothing is kept at rest here, so nothing is sealed."""

    async def aclose(self) -> None:
        return None
