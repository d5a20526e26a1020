"""Renewing the session at its identity provider, and revoking it there at logout.

Session continuity (what keeps X-Session-ID):
* a refresh with the refresh token, or a re-issue with the credentials while the token is still
  valid (grants without refresh tokens), continues the session;
* a login after the session expired, was logged out, or had its refresh token rejected
  (``invalid_grant``) starts a new session with a new id; so does a login after a refresh failed
  in the second half of the refresh lead (:func:`sidecar.session.timing.login_instead`): a refresh
  endpoint that is down cannot let the token run out while the login endpoint works.

The :class:`Renewer` holds no session: it is given the record to go on from and returns the next
one (or raises); :class:`~sidecar.session.manager.SessionManager` runs each renewal as its one
login/refresh in flight, and installs and persists what it returns. Every outcome is counted and
logged; a failure schedules the next attempt with backoff
(:meth:`sidecar.session.schedule.RefreshSchedule.failed`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from dataclasses import dataclass

from sidecar.clock import Clock
from sidecar.config.models import Refresh
from sidecar.errors import IdentityError, OAuthError
from sidecar.identity import IdentityProvider
from sidecar.metrics import Metrics
from sidecar.session.schedule import RefreshSchedule
from sidecar.session.timing import login_instead
from sidecar.tokens import Credentials, SessionRecord, Token

# the session's events, under the session's logger name whichever module emits them
log = logging.getLogger("sidecar.session")


@dataclass(frozen=True, slots=True)
class Renewal:
    """The record a renewal produced: a new session (``created``, a login: written to the store
    before anyone is answered) or the same session with a new token (written in the background)."""

    record: SessionRecord
    created: bool


class Renewer:
    """Renews at the identity provider; counts outcomes in ``metrics``, failures in ``schedule``."""

    def __init__(self, clock: Clock, metrics: Metrics, schedule: RefreshSchedule) -> None:
        self._clock = clock
        self._metrics = metrics
        self._schedule = schedule
        #: successful logins, failed refreshes (for /session)
        self.logins = 0
        self.refresh_failures = 0

    async def renew(
        self,
        identity: IdentityProvider,
        rules: Refresh,
        record: SessionRecord | None,
        current: Credentials | None,
        trigger: str,
    ) -> Renewal:
        """Refresh ``record`` (or re-issue, or log in) with ``identity``; ``current`` is the
        snapshot requests use now. The caller holds single flight, and the shared lock when the
        store is shared. Raises IdentityError when no new token was had."""
        now = self._clock.time()
        if record is not None and record.token.renewable_at(now):
            refreshable = record.token.refresh_token is not None
            try:
                # without a refresh token, a re-issue with the credentials continues the session
                token = await (identity.refresh(record.token) if refreshable else identity.login())
            except IdentityError as exc:
                self.refresh_failures += 1
                self._metrics.refresh_failed(exc.reason)
                fatal = isinstance(exc, OAuthError) and exc.error in OAuthError.FATAL_FOR_REFRESH
                if not refreshable:  # the re-issue was a login already
                    self._failed(exc, "session.refresh_failed", current)
                    raise
                if fatal:
                    log.warning(
                        "session.refresh_rejected",
                        extra={"session_id": record.session_id, "reason": exc.reason},
                    )
                elif self._near_expiry(record.token, current, rules):
                    log.warning(
                        "session.refresh_given_up",
                        extra={"session_id": record.session_id, "reason": exc.reason},
                    )
                else:
                    self._failed(exc, "session.refresh_failed", current)
                    raise
            else:
                return self._refreshed(record, token, trigger)
        return await self._login(identity, current, trigger)

    def _near_expiry(self, token: Token, current: Credentials | None, rules: Refresh) -> bool:
        """True when a refresh that failed should be followed by a login (see login_instead)."""
        now = self._clock.time()  # the refresh may have taken a while
        usable_until = current.expires_at if current is not None else now
        return login_instead(token, usable_until, now, rules)

    def _failed(self, exc: IdentityError, event: str, current: Credentials | None) -> None:
        self._schedule.failed(exc, event, self._clock.time(), current)

    async def _login(
        self, identity: IdentityProvider, current: Credentials | None, trigger: str
    ) -> Renewal:
        try:
            token = await identity.login()
        except IdentityError as exc:
            self._metrics.login_failed(exc.reason)
            self._failed(exc, "session.login_failed", current)
            raise
        now = self._clock.time()
        record = SessionRecord(
            identity=identity.fingerprint,
            session_id=str(uuid.uuid4()),
            activity_id=str(uuid.uuid4()),
            token=token,
            created_at=now,
            last_refreshed_at=now,
        )
        self.logins += 1
        self._metrics.logged_in()
        _log_renewed("session.created", record, trigger)
        return Renewal(record, created=True)

    def _refreshed(self, record: SessionRecord, token: Token, trigger: str) -> Renewal:
        now = self._clock.time()
        record = dataclasses.replace(
            record, token=token, last_refreshed_at=now, refresh_count=record.refresh_count + 1
        )
        self._metrics.session_refreshed(trigger)
        _log_renewed("session.refreshed", record, trigger)
        return Renewal(record, created=False)


async def revoke(identity: IdentityProvider, token: Token, within: float) -> None:
    """Revoke ``token`` at ``identity``. A failure, or taking longer than ``within`` real seconds,
    is logged and given up."""
    try:
        async with asyncio.timeout(within):
            await identity.logout(token)
    except IdentityError as exc:
        log.warning("session.logout_failed", extra={"error": str(exc), "reason": exc.reason})
    except TimeoutError:
        log.warning(
            "session.logout_failed",
            extra={
                "error": f"revocation did not finish within {within}s",
                "reason": "timeout",
            },
        )


def _log_renewed(event: str, record: SessionRecord, trigger: str) -> None:
    """Log a new session (``session.created``) or a refreshed one (``session.refreshed``)."""
    token = record.token
    log.info(
        event,
        extra={
            "session_id": record.session_id,
            "trigger": trigger,
            "expires_in": round(token.lifetime, 1),
            "token": token.fingerprint,
        },
    )
