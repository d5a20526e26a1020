"""Renewing the session at its identity provider, and revoking it there at logout.

Session continuity (what keeps X-Session-ID):
* a refresh with the refresh token, or a re-issue with the credentials while the token is still
  valid (grants without refresh tokens), continues the session;
* a login after the session expired, was logged out, or had its refresh token rejected
  (``invalid_grant``) starts a new session with a new id; so does a login after a refresh failed
  in the second half of the refresh lead (:func:`sidecar.session.timing.login_instead`): a refresh
  endpoint that is down cannot let the token run out while the login endpoint works.

Every outcome is counted and logged; a failure schedules the next attempt with backoff
(:meth:`sidecar.session.schedule.RefreshSchedule.failed`).
:class:`~sidecar.session.manager.SessionManager` runs each renewal as its one login/refresh in
flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.errors import IdentityError, OAuthError
from sidecar.session.persist import SessionPersistence
from sidecar.session.schedule import RefreshSchedule
from sidecar.session.timing import login_instead
from sidecar.tokens import SessionRecord, Token

if TYPE_CHECKING:
    from sidecar.session.manager import SessionManager
    from sidecar.tokens import Credentials

# the session's events, under the session's logger name whichever module emits them
log = logging.getLogger("sidecar.session")


class Renewer:
    """Calls ``manager``'s identity provider; ``install`` makes each new record the session."""

    def __init__(
        self,
        manager: SessionManager,
        schedule: RefreshSchedule,
        persistence: SessionPersistence,
        install: Callable[[SessionRecord], Credentials],
    ) -> None:
        self._manager = manager
        self._schedule = schedule
        self._persist = persistence
        self._install = install

    async def renew(self, trigger: str) -> Credentials:
        """Refresh (or re-issue, or log in); the caller holds single flight, and the shared lock
        when the store is shared."""
        manager = self._manager
        record = manager.record
        now = manager.clock.time()
        if self._schedule.stale_identity:
            record = None  # the session belongs to the identity the config replaced
        if record is not None and (record.token.refresh_token or record.token.is_valid(now)):
            refreshable = record.token.refresh_token is not None
            identity = manager.identity
            try:
                # without a refresh token, a re-issue with the credentials continues the session
                token = await (identity.refresh(record.token) if refreshable else identity.login())
            except IdentityError as exc:
                self._count_refresh_failure(exc)
                fatal = isinstance(exc, OAuthError) and exc.error in OAuthError.FATAL_FOR_REFRESH
                if not refreshable:  # the re-issue was a login already
                    self._schedule.failed(exc, "session.refresh_failed")
                    raise
                if fatal:
                    log.warning(
                        "session.refresh_rejected",
                        extra={"session_id": record.session_id, "reason": exc.reason},
                    )
                elif self._near_expiry(record.token):
                    log.warning(
                        "session.refresh_given_up",
                        extra={"session_id": record.session_id, "reason": exc.reason},
                    )
                else:
                    self._schedule.failed(exc, "session.refresh_failed")
                    raise
            else:
                return self._refreshed(record, token, trigger)
        return await self._login(trigger)

    def _near_expiry(self, token: Token) -> bool:
        """True when a refresh that failed should be followed by a login (see login_instead)."""
        now = self._manager.clock.time()  # the refresh may have taken a while
        creds = self._manager.current
        usable_until = creds.expires_at if creds is not None else now
        return login_instead(token, usable_until, now, self._manager.rules)

    async def _login(self, trigger: str) -> Credentials:
        manager = self._manager
        metrics = manager.metrics
        try:
            token = await manager.identity.login()
        except IdentityError as exc:
            metrics.logins.labels(result="failure").inc()
            metrics.login_failures.labels(reason=exc.reason).inc()
            self._schedule.failed(exc, "session.login_failed")
            raise
        now = manager.clock.time()
        record = SessionRecord(
            identity=manager.identity.fingerprint,
            session_id=str(uuid.uuid4()),
            activity_id=str(uuid.uuid4()),
            token=token,
            created_at=now,
            last_refreshed_at=now,
        )
        manager.login_count += 1
        metrics.logins.labels(result="success").inc()
        metrics.session_started.set(now)
        creds = self._install(record)
        _log_renewed("session.created", record, trigger)
        await self._persist.save(record)
        return creds

    def _refreshed(self, record: SessionRecord, token: Token, trigger: str) -> Credentials:
        now = self._manager.clock.time()
        record = dataclasses.replace(
            record, token=token, last_refreshed_at=now, refresh_count=record.refresh_count + 1
        )
        self._manager.metrics.refreshes.labels(result="success", reason=trigger).inc()
        creds = self._install(record)
        _log_renewed("session.refreshed", record, trigger)
        # persisted in the background: callers waiting for the token need not wait for the disk
        self._persist.save_soon(record)
        return creds

    def _count_refresh_failure(self, exc: IdentityError) -> None:
        self._manager.refresh_failures += 1
        self._manager.metrics.refreshes.labels(result="failure", reason=exc.reason).inc()

    async def revoke(self, token: Token) -> None:
        """Revoke ``token`` at the provider. A failure, or taking longer than the manager's
        ``logout_timeout`` real seconds, is logged and given up."""
        timeout = self._manager.logout_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._manager.identity.logout(token)
        except IdentityError as exc:
            log.warning("session.logout_failed", extra={"error": str(exc), "reason": exc.reason})
        except TimeoutError:
            log.warning(
                "session.logout_failed",
                extra={
                    "error": f"revocation did not finish within {timeout}s",
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
