"""Coordination of one session between processes that share a store (Redis).

Exactly one process renews at a time: it takes the store's leased lock, re-reads the shared
record (a peer may have just renewed), and only then calls the identity provider, writing the
result with its fencing token before releasing the lock. The others wait for that result and
adopt it; if the holder dies, its lease runs out and another takes over. Every process also
watches the record (pub/sub, with polling as fallback) and adopts newer tokens as they appear.

When the store is unreachable, each process renews on its own and keeps serving; once the store
answers again, the newest record wins.

:class:`SharedSession` holds no session: it wraps the session's ``renew(fence)`` callable, reads
the session's record through ``held()`` and calls back with the records it reads (``adopt``,
which says whether it installed one) or with a peer's logout (``drop``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable

from sidecar.clock import Clock
from sidecar.errors import StoreError, StoreUnreadable
from sidecar.store import SharedStore
from sidecar.tokens import SessionRecord

log = logging.getLogger("sidecar.session")

#: seconds between looks at the shared record while a peer holds the lock
PEER_POLL = 0.05

#: the session's record now (None without a session)
Held = Callable[[], SessionRecord | None]
#: offer a record read from the store; True when the session installed it (newer and usable)
Adopt = Callable[[SessionRecord | None], bool]


class SharedSession:
    """Leader election per renewal, and adoption of peers' tokens."""

    def __init__(
        self, store: SharedStore, lease: float, poll_interval: float, clock: Clock
    ) -> None:
        self.store = store
        self.lease = lease
        self.poll_interval = poll_interval
        self.clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._store_down = False
        #: the last unreadable-record problem logged (logged again only when it changes)
        self._unreadable = ""

    async def renew(
        self, renew: Callable[[int | None], Awaitable[object]], held: Held, adopt: Adopt
    ) -> None:
        """Renew once for every process: lead the renewal (``renew(fence)``, with the lock's
        fencing token), or wait for the peer who does and ``adopt`` its record. With the store
        unreachable, ``renew(None)``: this process renews on its own.

        "A peer renewed" means the session record became newer than the one we had when this
        renewal was asked for, whichever way it arrived (this wait, or the watcher).
        """
        before = held()
        try:
            fence = await self._lead_or_follow(held, adopt, before)
        except StoreError as exc:
            self._note_down(exc)
            await renew(None)
            return
        if fence is None:
            return  # a peer renewed
        try:
            with contextlib.suppress(StoreError):
                adopt(await self.store.load())
            if not _newer(held(), before):  # else a peer renewed between our decision and the lock
                await renew(fence)
        finally:
            await self.release()

    async def release(self) -> None:
        """Give the renewal lock back if this process holds it (the store checks the owner)."""
        try:
            await self.store.unlock(self.owner)
        except StoreError as exc:
            self._note_down(exc)  # the lease expires on its own

    async def _lead_or_follow(
        self, held: Held, adopt: Adopt, before: SessionRecord | None
    ) -> int | None:
        """The fencing token when we lead; None when a peer renewed.

        While a peer holds the lock we look for its result and retry the lock; a holder that
        died frees it when its lease runs out, and one of the waiters takes over.
        """
        while True:
            fence = await self.store.try_lock(self.owner, self.lease)
            if fence is not None:
                return fence
            await self.clock.sleep(PEER_POLL)
            try:
                adopt(await self.store.load())
            except StoreUnreadable as exc:  # not a peer's result we could use: wait for the lock
                self._note_unreadable(exc)
            if _newer(held(), before):
                return None

    async def watch(self, held: Held, adopt: Adopt, drop: Callable[[str], None]) -> None:
        """Adopt peers' newer records; after an outage, publish ours if it is the newest.

        A record that disappears while the store stayed reachable was logged out by a peer: this
        process ends its copy too (``drop``, without revoking again). After an outage, a missing
        or older record is replaced by ours instead (Redis may have restarted empty).
        """
        while True:
            try:
                # closed as soon as the loop ends, whichever way: a generator left open would
                # keep its subscription (a Redis connection) until the garbage collector came
                async with contextlib.aclosing(self.store.changes(self.poll_interval)) as changes:
                    async for _ in changes:
                        stored = await self.store.load()
                        self._unreadable = ""
                        recovered = self._note_up()
                        if adopt(stored):
                            continue
                        ours = held()
                        if recovered:
                            await self._reconcile(ours, stored)
                        elif stored is None and ours is not None:
                            drop("a peer logged the session out")
            except StoreUnreadable as exc:
                # the store is up: what it holds cannot be read (corrupt, or sealed with a key
                # this process does not have); our session goes on, and the next change is read
                self._note_up()
                self._note_unreadable(exc)
                await self.clock.sleep(self.poll_interval)
            except StoreError as exc:
                self._note_down(exc)
                await self.clock.sleep(self.poll_interval)

    async def _reconcile(self, ours: SessionRecord | None, stored: SessionRecord | None) -> None:
        if ours is None:
            return
        if ours.newer_than(stored):
            await self.store.save(ours)
            log.info("session.store_reconciled", extra={"session_id": ours.session_id})

    def _note_unreadable(self, exc: StoreUnreadable) -> None:
        """Log an unreadable shared record once, until it changes to another problem."""
        if str(exc) != self._unreadable:
            self._unreadable = str(exc)
            log.warning(
                "session.store_unreadable", extra={"error": str(exc), "store": self.store.kind}
            )

    def _note_down(self, exc: StoreError) -> None:
        if not self._store_down:
            self._store_down = True
            log.warning("session.store_unavailable", extra={"error": str(exc)})

    def _note_up(self) -> bool:
        """Record that the store answers; True when it had been unavailable."""
        if self._store_down:
            self._store_down = False
            log.info("session.store_available")
            return True
        return False


def _newer(record: SessionRecord | None, than: SessionRecord | None) -> bool:
    return record is not None and record.newer_than(than)
