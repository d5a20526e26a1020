"""The session's persistence: the stored record read back at start, and each new one written.

A stored record is taken back only when the configured identity can go on with it. A login waits
for its record to be written, a refresh writes in the background, both fenced while this process
holds the shared lock; at stop, a private record is written once more with its last-call time. A
store that fails is logged, never raised: the session goes on in memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sidecar.errors import StoreError
from sidecar.tokens import SessionRecord

if TYPE_CHECKING:
    from sidecar.session.manager import SessionManager
    from sidecar.store.crypto import Sealer
    from sidecar.tokens import Credentials

# the session's events, under the session's logger name whichever module emits them
log = logging.getLogger("sidecar.session")


class SessionPersistence:
    """Reads and writes ``manager``'s record in ``manager.store`` (whichever store it holds by
    then), fenced while ``manager.fence`` is set; ``install`` makes a restored record the
    session."""

    def __init__(
        self, manager: SessionManager, install: Callable[[SessionRecord], Credentials]
    ) -> None:
        self._manager = manager
        self._install = install
        self._saves: set[asyncio.Task[bool]] = set()

    async def restore(self) -> None:
        """Install the stored session when the manager's identity can go on with it.

        A record of another identity, or an expired one without a refresh token, is ignored (and
        the reason logged); an unreadable store is logged and treated as empty.
        """
        manager = self._manager
        try:
            record = await manager.store.load()
        except StoreError as exc:
            log.warning(
                "session.store_unreadable", extra={"error": str(exc), "store": manager.store.kind}
            )
            return
        if record is None:
            return
        now = manager.clock.time()
        why = record.unusable_because(manager.identity.fingerprint, now)
        if why is not None:
            log.info("session.store_ignored", extra={"why": why})
            return
        manager.last_api_call_at = record.last_api_call_at
        self._install(record)
        log.info(
            "session.restored",
            extra={
                "session_id": record.session_id,
                "expires_in": round(record.token.expires_at - now, 1),
                "store": manager.store.kind,
            },
        )

    async def save(self, record: SessionRecord) -> bool:
        """Write ``record``; while the manager holds a fence, only if no later holder of the
        shared lock has written since. False when it was not written (logged, never raised)."""
        manager = self._manager
        try:
            if manager.fence is not None:
                shared: Any = manager.store
                if not await shared.save_fenced(record, manager.fence):
                    log.warning("session.store_fenced_out", extra={"fence": manager.fence})
                    return False
                return True
            await manager.store.save(record)
        except StoreError as exc:
            log.error("session.store_failed", extra={"error": str(exc)})
            return False
        return True

    def save_soon(self, record: SessionRecord) -> None:
        """Write ``record`` in the background: callers waiting for the token need not wait for
        the disk. :meth:`flush` waits for it."""
        save = asyncio.get_running_loop().create_task(self.save(record))
        self._saves.add(save)
        save.add_done_callback(self._saves.discard)

    async def flush(self) -> None:
        """Wait for background saves to finish; a waiter cancelled here (a renewal cancelled by
        the stop) leaves the saves running, and the stop waits for them again."""
        if self._saves:
            await asyncio.wait(self._saves)

    async def save_at_stop(self) -> None:
        """Wait for background saves, then write the record again with its last-call time."""
        await self.flush()
        manager = self._manager
        record = manager.record
        # a shared record may already hold a peer's newer token: only a private one is rewritten
        if record is not None and not manager.store.shared:
            await self.save(dataclasses.replace(record, last_api_call_at=manager.last_api_call_at))

    async def clear(self) -> None:
        """Remove the stored record (at logout)."""
        try:
            await self._manager.store.clear()
        except StoreError as exc:
            log.error("session.store_failed", extra={"error": str(exc)})

    async def use_sealer(self, sealer: Sealer | None, running: Sealer | None) -> bool:
        """New encryption keys for the store (a reload); False when they could not be applied
        and ``running`` stays. A file store gets the current record again at once, sealed with
        them (when that write fails, the keys stay as they were, and the next reload tries again);
        a shared store is written with them at the next refresh."""
        manager = self._manager
        store = manager.store
        record = manager.record
        store.use_sealer(sealer)
        resealed = store.kind == "file" and record is not None
        if resealed and record is not None and not await self.save(record):
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
