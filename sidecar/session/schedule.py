"""The session's refresh schedule and the background loop that keeps it.

When the next login or refresh is due: ahead of expiry (:func:`sidecar.session.timing.refresh_at`,
with jitter) and, after a failure, not before the backoff
(:func:`sidecar.session.timing.backoff_delay`) has passed. The loop sleeps only on the injected
Clock, and wakes early whenever the session changes.
:class:`~sidecar.session.manager.SessionManager` owns the session; the loop only asks it to renew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sidecar.errors import IdentityError
from sidecar.session.timing import backoff_delay, refresh_at
from sidecar.tokens import Token

if TYPE_CHECKING:
    from sidecar.session.manager import SessionManager
    from sidecar.tokens import Credentials

# the session's events, under the session's logger name whichever module emits them
log = logging.getLogger("sidecar.session")


class RefreshSchedule:
    """When ``manager`` renews next, and the loop that renews it then."""

    def __init__(self, manager: SessionManager, rng: random.Random | None = None) -> None:
        self._manager = manager
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        #: when the current token is refreshed ahead of its expiry
        self.refresh_at = math.inf
        #: set when a reloaded config named another identity: the next renewal is a login
        self.stale_identity = False
        #: failed logins or refreshes in a row, the next attempt's earliest time, the last error
        self.failures = 0
        self.next_attempt_at = 0.0
        self.last_error: str | None = None
        self._expired_noted = False
        self._wake = asyncio.Event()

    def installed(self, token: Token) -> None:
        """``token`` is the session's now: forget past failures and plan its refresh."""
        self.stale_identity = False
        self.failures = 0
        self.next_attempt_at = 0.0
        self.last_error = None
        self._expired_noted = False
        self.plan(token)

    def plan(self, token: Token) -> None:
        """Plan the refresh of ``token`` under the manager's refresh rules."""
        self.refresh_at = refresh_at(token, self._manager.rules, self._rng)

    def identity_changed(self) -> None:
        """A reloaded config named another identity: a login is due at once."""
        self.stale_identity = True
        self.failures = 0
        self.next_attempt_at = 0.0

    def failed(self, exc: IdentityError, event: str) -> None:
        """Schedule the next attempt with backoff after a failed login or refresh."""
        retry_after = getattr(exc, "retry_after", None)
        now = self._manager.clock.time()
        creds = self._manager.current
        usable_for = creds.expires_at - now if creds is not None else None
        retry = self._manager.rules.retry
        delay = backoff_delay(self.failures, retry, self._rng, retry_after, usable_for)
        self.failures += 1
        self.next_attempt_at = now + delay
        self.last_error = str(exc)
        log.warning(
            event,
            extra={
                "error": str(exc),
                "reason": exc.reason,
                "attempt": self.failures,
                "retry_in": round(delay, 2),
            },
        )

    def wake(self) -> None:
        """The session changed: the loop looks again at once."""
        self._wake.set()

    def due(self) -> bool:
        """True when the current token should be renewed now (or there is none)."""
        record = self._manager.record
        creds = self._manager.current
        now = self._manager.clock.time()
        return (
            record is None
            or self.stale_identity
            or now >= self.refresh_at
            or creds is None
            or not creds.usable_at(now)
        )

    async def run(self, renew: Callable[[str], asyncio.Task[Credentials]]) -> None:
        """Refresh ahead of expiry; after failures, retry with backoff until a token is had.

        ``renew(trigger)`` is the manager's single flight: it joins a login or refresh in flight
        or starts one.
        """
        while True:
            try:
                await self._step(renew)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("session.loop_error")
                await self._manager.clock.sleep(self._manager.rules.retry.initial)

    async def _step(self, renew: Callable[[str], asyncio.Task[Credentials]]) -> None:
        manager = self._manager
        now = manager.clock.time()
        record = manager.record
        creds = manager.current
        # requests stop using the token at its expiry less the margin: that is when it expires
        usable_until = creds.expires_at if creds is not None else math.inf
        expiry_wake = usable_until if usable_until > now else math.inf
        expired = creds is not None and not creds.usable_at(now)
        if record is not None and expired and not self._expired_noted:
            self._expired_noted = True
            manager.update_gauges()
            log.warning(
                "session.expired",
                extra={"session_id": record.session_id, "last_error": self.last_error},
            )
        if manager.logged_out:
            await self._wait(None)
        elif now < self.next_attempt_at:
            await self._wait(min(self.next_attempt_at, expiry_wake) - now)
        elif record is not None and not self.due():
            await self._wait(min(self.refresh_at, expiry_wake, record.token.expires_at) - now)
        else:
            if record is None:
                trigger = "startup"
            elif self.stale_identity:
                trigger = "reload"
            else:
                trigger = "proactive" if not expired else "expired"
            with contextlib.suppress(IdentityError):
                await asyncio.shield(renew(trigger))

    async def _wait(self, delay: float | None) -> None:
        """Sleep ``delay`` seconds of the injected clock, or until something changes the session."""
        if self._wake.is_set():
            self._wake.clear()
            return
        waiter = asyncio.ensure_future(self._wake.wait())
        tasks: set[asyncio.Future[Any]] = {waiter}
        if delay is not None:
            tasks.add(asyncio.ensure_future(self._manager.clock.sleep(delay)))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            self._wake.clear()
