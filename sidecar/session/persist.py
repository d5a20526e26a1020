"""The session's persistence: the stored record read back at start, and each new one written.

:class:`SessionPersistence` holds no session: it is given the store (whichever the session holds
by then) and the records, and returns what it read. A stored record is taken back only when the
configured identity can go on with it (:meth:`sidecar.tokens.SessionRecord.unusable_because`).
A login's record is written before the login answers, a refresh's in the background, both fenced
while the process holds the shared lock; at stop, a private record is written once more with its
last-call time. A store that fails is logged, never raised: the session goes on in memory.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from sidecar.errors import StoreError
from sidecar.store import SessionStore, SharedStore
from sidecar.tokens import SessionRecord

if TYPE_CHECKING:
    from sidecar.store.crypto import Sealer

# the session's events, under the session's logger name whichever module emits them
log = logging.getLogger("sidecar.session")


class SessionPersistence:
    """Reads and writes session records; keeps the background writes until they finish."""

    def __init__(self) -> None:
        self._saves: set[asyncio.Task[bool]] = set()

    async def restore(self, store: SessionStore, identity: str, now: float) -> SessionRecord | None:
        """The record in ``store`` when ``identity`` (a fingerprint) can go on with it at ``now``.

        A record of another identity, or an expired one without a refresh token, is ignored (and
        the reason logged); an unreadable store is logged and treated as empty.
        """
        try:
            record = await store.load()
        except StoreError as exc:
            log.warning("session.store_unreadable", extra={"error": str(exc), "store": store.kind})
            return None
        if record is None:
            return None
        why = record.unusable_because(identity, now)
        if why is not None:
            log.info("session.store_ignored", extra={"why": why})
            return None
        log.info(
            "session.restored",
            extra={
                "session_id": record.session_id,
                "expires_in": round(record.token.expires_at - now, 1),
                "store": store.kind,
            },
        )
        return record

    async def save(
        self, store: SessionStore, record: SessionRecord, fence: int | None = None
    ) -> bool:
        """Write ``record``; with a ``fence`` (the shared lock's), only if no later holder of the
        lock has written since. False when it was not written (logged, never raised)."""
        try:
            if fence is not None:
                if not await cast(SharedStore, store).save_fenced(record, fence):
                    log.warning("session.store_fenced_out", extra={"fence": fence})
                    return False
                return True
            await store.save(record)
        except StoreError as exc:
            log.error("session.store_failed", extra={"error": str(exc)})
            return False
        return True

    def save_soon(
        self, store: SessionStore, record: SessionRecord, fence: int | None = None
    ) -> None:
        """Write ``record`` in the background: callers waiting for the token need not wait for
        the disk. :meth:`flush` waits for it."""
        save = asyncio.get_running_loop().create_task(self.save(store, record, fence))
        self._saves.add(save)
        save.add_done_callback(self._saves.discard)

    async def flush(self) -> None:
        """Wait for background saves to finish; a waiter cancelled here (a renewal cancelled by
        the stop) leaves the saves running, and the stop waits for them again."""
        if self._saves:
            await asyncio.wait(self._saves)

    async def clear(self, store: SessionStore) -> None:
        """Remove the stored record (at logout)."""
        try:
            await store.clear()
        except StoreError as exc:
            log.error("session.store_failed", extra={"error": str(exc)})

    async def use_sealer(
        self,
        store: SessionStore,
        sealer: Sealer | None,
        running: Sealer | None,
        record: SessionRecord | None,
    ) -> bool:
        """New encryption keys for ``store`` (a reload); False when they could not be applied
        and ``running`` stays. A file store gets ``record`` (the session's now) again at once,
        sealed with them (when that write fails, the keys stay as they were, and the next reload
        tries again); a shared store is written with them at the next refresh."""
        store.use_sealer(sealer)
        resealed = store.kind == "file" and record is not None
        if resealed and record is not None and not await self.save(store, record):
            store.use_sealer(running)
            log.error(
                "session.encryption_keys_unchanged",
                extra={"why": "the session could not be written with the new key"},
            )
            return False
        log.info(
            "session.encryption_keys_changed",
            extra={"encrypted": sealer is not None, "resealed": resealed},
        )
        return True
