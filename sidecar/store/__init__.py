"""Session stores: where a session is kept so that it survives a restart.

Every store speaks the same protocol and passes the same conformance tests. What is stored is a
:class:`sidecar.tokens.SessionRecord` (a value every role shares, hence kept with the tokens); its
``version`` guards against reading a format this build does not know.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Protocol

from sidecar.tokens import SessionRecord

if TYPE_CHECKING:
    from sidecar.store.crypto import Sealer

__all__ = ["SessionRecord", "SessionStore", "SharedStore"]


class SessionStore(Protocol):
    """Load, save and clear one identity's session record."""

    kind: str
    #: True when other processes share the record (see :class:`SharedStore`)
    shared: bool

    async def load(self) -> SessionRecord | None:
        """The stored record, or None when there is none. Raises StoreUnreadable when what is
        stored cannot be read, StoreError when the store itself cannot be reached."""

    async def save(self, record: SessionRecord) -> None:
        """Replace the stored record atomically."""

    async def clear(self) -> None:
        """Remove the stored record."""

    def use_sealer(self, sealer: Sealer | None) -> None:
        """Encrypt what is written from now on with ``sealer`` (None: not at all), and open
        with its keys."""

    async def aclose(self) -> None:
        """Release resources."""


class SharedStore(SessionStore, Protocol):
    """A store several sidecar processes share: a leased lock with fencing, and change events.

    Exactly one process renews at a time: it holds the lock (``try_lock`` returns a fencing token
    that grows with every acquisition) and writes with ``save_fenced``, which refuses a write whose
    token is older than the last one written, so a process that lost its lease while paused cannot
    overwrite a newer session.
    """

    async def try_lock(self, owner: str, lease: float) -> int | None:
        """Take the renewal lock for ``lease`` seconds; the fencing token, or None when held."""

    async def unlock(self, owner: str) -> None:
        """Release the lock if ``owner`` still holds it."""

    async def save_fenced(self, record: SessionRecord, fence: int) -> bool:
        """Write ``record`` unless a newer fencing token has written since; True when written."""

    async def check_sealer(self, sealer: Sealer | None) -> None:
        """Raise ConfigError when ``sealer`` cannot open the record stored now: the peers, and
        this process until its next write, still read it."""

    def changes(self, interval: float) -> AsyncGenerator[None, None]:
        """Yield when another process may have changed the record, and at least every
        ``interval`` seconds (polling fallback)."""
