"""The session's refresh schedule: a state machine over plain values, and the loop's alarm.

:class:`RefreshSchedule` holds no session and reads no clock. It is told the refresh rules, each
token installed and each failure (with the time and the credentials then current), and answers
when the next login or refresh is due: ahead of expiry
(:func:`sidecar.session.timing.refresh_at`, with jitter) and, after a failure, not before the
backoff (:func:`sidecar.session.timing.backoff_delay`) has passed. :meth:`RefreshSchedule.step`
says what the background loop does next; :class:`Wakeup` is the loop's sleep on the injected
Clock, cut short whenever the session changes. :class:`~sidecar.session.manager.SessionManager`
runs the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from dataclasses import dataclass
from typing import Any

from sidecar.clock import Clock
from sidecar.config.models import Refresh
from sidecar.errors import IdentityError
from sidecar.session.timing import backoff_delay, refresh_at
from sidecar.tokens import Credentials, Token

# the session's events, under the session's logger name whichever module emits them
log = logging.getLogger("sidecar.session")


@dataclass(frozen=True, slots=True)
class Step:
    """What the refresh loop does next: renew now (``trigger`` set) or wait ``wait`` seconds
    (None: until woken)."""

    trigger: str | None = None
    wait: float | None = None
    #: the current token has just stopped being usable: announced once per token
    expired: bool = False


class RefreshSchedule:
    """When the session renews next, under ``rules``."""

    def __init__(self, rules: Refresh, rng: random.Random | None = None) -> None:
        #: the refresh rules in force (a reload replaces them)
        self.rules = rules
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

    def installed(self, token: Token) -> None:
        """``token`` is the session's now: forget past failures and plan its refresh."""
        self.stale_identity = False
        self.failures = 0
        self.next_attempt_at = 0.0
        self.last_error = None
        self._expired_noted = False
        self.plan(token)

    def plan(self, token: Token) -> None:
        """Plan the refresh of ``token`` under the refresh rules."""
        self.refresh_at = refresh_at(token, self.rules, self._rng)

    def identity_changed(self) -> None:
        """A reloaded config named another identity: a login is due at once."""
        self.stale_identity = True
        self.failures = 0
        self.next_attempt_at = 0.0

    def retry_now(self) -> None:
        """An operator asked for a renewal: the next attempt may start at once (the failures in
        a row are still counted)."""
        self.next_attempt_at = 0.0

    def failed(
        self, exc: IdentityError, event: str, now: float, current: Credentials | None
    ) -> None:
        """A login or refresh failed at ``now`` while ``current`` was the session's snapshot:
        schedule the next attempt with backoff, and log ``event``."""
        retry_after = getattr(exc, "retry_after", None)
        usable_for = current.expires_at - now if current is not None else None
        delay = backoff_delay(self.failures, self.rules.retry, self._rng, retry_after, usable_for)
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

    def due(self, now: float, current: Credentials | None) -> bool:
        """True when ``current`` (the session's snapshot, None without a session) should be
        renewed at ``now``."""
        return (
            current is None
            or self.stale_identity
            or now >= self.refresh_at
            or not current.usable_at(now)
        )

    def step(self, now: float, current: Credentials | None, logged_out: bool) -> Step:
        """What the refresh loop does at ``now``, the session's snapshot being ``current``:
        refresh ahead of expiry; after failures, retry with backoff until a token is had; wake
        when the token stops being usable; after a logout, wait to be woken."""
        # requests stop using the token at its expiry less the margin: that is when it expires
        expired = current is not None and not current.usable_at(now)
        announce = expired and not self._expired_noted
        if announce:
            self._expired_noted = True
        expiry_wake = current.expires_at if current is not None and not expired else math.inf
        if logged_out:
            return Step(wait=None, expired=announce)
        if now < self.next_attempt_at:
            return Step(wait=min(self.next_attempt_at, expiry_wake) - now, expired=announce)
        if current is not None and not self.due(now, current):
            until = min(self.refresh_at, expiry_wake, current.token.expires_at)
            return Step(wait=until - now, expired=announce)
        if current is None:
            trigger = "startup"
        elif self.stale_identity:
            trigger = "reload"
        else:
            trigger = "expired" if expired else "proactive"
        return Step(trigger=trigger, expired=announce)


class Wakeup:
    """The refresh loop's sleep on ``clock``, cut short by :meth:`set` (the session changed)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._event = asyncio.Event()

    def set(self) -> None:
        """The session changed: the loop looks again at once."""
        self._event.set()

    async def wait(self, delay: float | None) -> None:
        """Sleep ``delay`` seconds of the clock (None: no limit), or until :meth:`set`."""
        if self._event.is_set():
            self._event.clear()
            return
        waiter = asyncio.ensure_future(self._event.wait())
        tasks: set[asyncio.Future[Any]] = {waiter}
        if delay is not None:
            tasks.add(asyncio.ensure_future(self._clock.sleep(delay)))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            self._event.clear()
