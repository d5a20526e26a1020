"""Session stores: where a session is kept so that it survives a restart.

Every store speaks the same protocol and passes the same conformance tests. What is stored is a
:class:`SessionRecord`; its ``version`` guards against reading a format this build does not know.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.errors import StoreUnreadable
from sidecar.tokens import Token

if TYPE_CHECKING:
    from sidecar.store.crypto import Sealer

#: the record format this build writes; a record with a newer version is refused, not misread
RECORD_VERSION = 1


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One identity's session: the token and the metadata the seeds ask us to keep."""

    identity: str
    session_id: str
    activity_id: str
    token: Token
    created_at: float
    last_refreshed_at: float | None = None
    last_api_call_at: float | None = None
    refresh_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "identity": self.identity,
            "session_id": self.session_id,
            "activity_id": self.activity_id,
            "token": self.token.to_dict(),
            "created_at": self.created_at,
            "last_refreshed_at": self.last_refreshed_at,
            "last_api_call_at": self.last_api_call_at,
            "refresh_count": self.refresh_count,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any) -> SessionRecord:
        """Parse stored data; raises StoreUnreadable naming what is wrong."""
        if not isinstance(data, dict):
            raise StoreUnreadable("session record is not a JSON object")
        version = data.get("version")
        if not isinstance(version, int):
            raise StoreUnreadable("session record has no version")
        if version > RECORD_VERSION:
            raise StoreUnreadable(
                f"session record version {version} is newer than this sidecar understands "
                f"({RECORD_VERSION}); refusing to misread it"
            )
        try:
            return cls(
                identity=str(data["identity"]),
                session_id=str(data["session_id"]),
                activity_id=str(data["activity_id"]),
                token=Token.from_dict(data["token"]),
                created_at=float(data["created_at"]),
                last_refreshed_at=_opt_float(data.get("last_refreshed_at")),
                last_api_call_at=_opt_float(data.get("last_api_call_at")),
                refresh_count=int(data.get("refresh_count", 0)),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreUnreadable(
                f"session record is malformed: {type(exc).__name__}: {exc}"
            ) from exc


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


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
