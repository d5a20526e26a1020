"""SessionManager: holds the one session, refreshes it ahead of expiry, owns single flight.

The proxy reads :attr:`SessionManager.current` (a plain attribute holding an immutable
:class:`Credentials` snapshot) and calls :meth:`SessionManager.credentials` only when that
snapshot is missing or expired. Every login or refresh, whoever asks for it (the background
loop, a request that found no token, an upstream 401, an operator), runs as one shared task:
however many callers wait, the identity provider sees one call.

Session continuity (what keeps X-Session-ID):
* a refresh with the refresh token, or a re-issue with the credentials while the token is still
  valid (grants without refresh tokens), continues the session;
* a login after the session expired, was logged out, or had its refresh token rejected
  (``invalid_grant``) starts a new session with a new id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sidecar.clock import Clock
from sidecar.config import Refresh
from sidecar.errors import IdentityError, NoSessionError, OAuthError, StoreError
from sidecar.identity import IdentityProvider
from sidecar.metrics import Metrics
from sidecar.refresh import backoff_delay, refresh_at
from sidecar.store import SessionRecord, SessionStore
from sidecar.tokens import Token

if TYPE_CHECKING:
    from sidecar.shared import SharedSession

log = logging.getLogger(__name__)


class State(StrEnum):
    """What /session and `sidecar status` report."""

    NONE = "NONE"  # no session yet (starting, or the provider has been unreachable so far)
    VALID = "VALID"
    EXPIRED = "EXPIRED"  # the token expired with no replacement; requests get 503
    LOGGED_OUT = "LOGGED_OUT"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the proxy needs for one request, precomputed once per token."""

    token: Token
    authorization: str
    session_id: str
    activity_id: str
    #: when requests stop using it: the token's expiry less the expiry margin
    expires_at: float

    def __repr__(self) -> str:
        return f"Credentials(session_id={self.session_id}, token={self.token!r})"


class SessionManager:
    """One identity's session: login, proactive and reactive refresh, logout, persistence."""

    def __init__(
        self,
        identity: IdentityProvider,
        store: SessionStore,
        clock: Clock,
        metrics: Metrics,
        rules: Refresh,
        *,
        rng: random.Random | None = None,
        on_change: Callable[[Credentials | None], None] | None = None,
        shared: SharedSession | None = None,
        logout_timeout: float = 5.0,
    ) -> None:
        self.identity = identity
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.rules = rules
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._on_change = on_change
        #: real seconds the provider gets to revoke at logout, so a hanging revocation endpoint
        #: cannot hold up a shutdown (a bound on I/O, not a schedule: hence not the Clock)
        self.logout_timeout = logout_timeout
        #: the snapshot requests use; replaced whole, never mutated
        self.current: Credentials | None = None
        self.last_api_call_at: float | None = None
        self._record: SessionRecord | None = None
        self._refresh_at = math.inf
        self._inflight: asyncio.Task[Credentials] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._logged_out = False
        #: set when a reloaded config named another identity: the next renewal is a login
        self._stale_identity = False
        self._expired_noted = False
        self._failures = 0
        self._next_attempt_at = 0.0
        self._last_error: str | None = None
        self._last_reactive_at = -math.inf
        self._saves: set[asyncio.Task[None]] = set()
        #: set when the store is shared: the coordination of renewals between processes
        self._shared = shared
        self._watch_task: asyncio.Task[None] | None = None
        #: the fencing token of the shared lock while this process holds it
        self.fence: int | None = None
        self.login_count = 0
        self.refresh_failures = 0

    def notify(self, callback: Callable[[Credentials | None], None]) -> None:
        """Call ``callback`` with the new credentials (or None) whenever they change."""
        self._on_change = callback

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Restore a stored session when there is a usable one, then start the refresh loop."""
        await self._restore()
        loop = asyncio.get_running_loop()
        if self._shared is not None:
            self._watch_task = loop.create_task(self._shared.watch(self), name="session-watch")
        self._loop_task = loop.create_task(self._run(), name="session-refresh")

    async def stop(self) -> None:
        """Stop refreshing and persist the session (with its last-call time)."""
        for task in (self._watch_task, self._loop_task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, IdentityError):
                    await task
        self._loop_task = None
        await self.flush_saves()
        # a shared record may already hold a peer's newer token: only a private one is rewritten
        if self._record is not None and not self.store.shared:
            await self._save(
                dataclasses.replace(self._record, last_api_call_at=self.last_api_call_at)
            )

    async def _restore(self) -> None:
        try:
            record = await self.store.load()
        except StoreError as exc:
            log.warning(
                "session.store_unreadable", extra={"error": str(exc), "store": self.store.kind}
            )
            return
        if record is None:
            return
        now = self.clock.time()
        if record.identity != self.identity.fingerprint:
            log.info(
                "session.store_ignored", extra={"why": "stored session belongs to another identity"}
            )
            return
        if not record.token.is_valid(now) and record.token.refresh_token is None:
            log.info(
                "session.store_ignored",
                extra={"why": "stored token expired and cannot be refreshed"},
            )
            return
        self.last_api_call_at = record.last_api_call_at
        self._install(record)
        log.info(
            "session.restored",
            extra={
                "session_id": record.session_id,
                "expires_in": round(record.token.expires_at - now, 1),
                "store": self.store.kind,
            },
        )

    # ----------------------------------------------------------------- request path

    def usable(self) -> Credentials | None:
        """The current credentials when they have not expired."""
        creds = self.current
        if creds is not None and self.clock.time() < creds.expires_at:
            return creds
        return None

    async def credentials(self) -> Credentials:
        """Credentials for one request: the snapshot, or wait for the one login/refresh in flight.

        Never waits while the current token is valid. Raises NoSessionError (HTTP 503) when no valid
        token can be had: logged out, or the provider failing and a retry not yet due.
        """
        now = self.clock.time()
        self.last_api_call_at = now
        creds = self.current
        if creds is not None and now < creds.expires_at:
            return creds
        if self._logged_out:
            raise NoSessionError(
                "the session was logged out; POST /session/refresh to log in again"
            )
        task = self._inflight
        if task is None:
            if now < self._next_attempt_at:
                raise NoSessionError(
                    f"no valid token ({self._last_error}); next attempt in "
                    f"{self._next_attempt_at - now:.1f}s"
                )
            task = self._renew("request")
        try:
            return await asyncio.shield(task)
        except IdentityError as exc:
            raise NoSessionError(f"no valid token: {exc}") from exc

    async def reactive_refresh(self, used: Credentials) -> Credentials | None:
        """An upstream answered 401 to ``used``: get (at most) one new token for all such callers.

        Returns the credentials to replay with, or None when the caller should get the 401.
        """
        now = self.clock.time()
        current = self.current
        if current is not None and current is not used and now < current.expires_at:
            return current  # someone else already replaced the rejected token
        if self._logged_out:
            return None
        task = self._inflight
        if task is None:
            if now - self._last_reactive_at < self.rules.reactive_min_interval:
                return None
            self._last_reactive_at = now
            self.metrics.reactive_refreshes.inc()
            log.warning(
                "session.token_rejected",
                extra={"session_id": used.session_id, "token": used.token.fingerprint},
            )
            task = self._renew("reactive")
        try:
            return await asyncio.shield(task)
        except IdentityError:
            return None

    # ----------------------------------------------------------------- operator actions

    async def force_refresh(self) -> Credentials:
        """POST /session/refresh: refresh (or log in) now, even after a logout."""
        self._logged_out = False
        self._next_attempt_at = 0.0
        task = self._inflight or self._renew("manual")
        try:
            return await asyncio.shield(task)
        except IdentityError as exc:
            raise NoSessionError(f"refresh failed: {exc}") from exc

    async def logout(self) -> None:
        """End the session: revoke at the provider, clear memory and store.

        A failing revocation, or one that takes longer than ``logout_timeout`` real seconds, is
        logged and given up: the session is cleared locally either way.
        """
        self._logged_out = True
        task = self._inflight
        if task is not None:
            with contextlib.suppress(IdentityError):
                await asyncio.shield(task)
        record = self._record
        self._record = None
        self._set_current(None)
        if record is not None:
            try:
                async with asyncio.timeout(self.logout_timeout):
                    await self.identity.logout(record.token)
            except IdentityError as exc:
                log.warning(
                    "session.logout_failed", extra={"error": str(exc), "reason": exc.reason}
                )
            except TimeoutError:
                log.warning(
                    "session.logout_failed",
                    extra={
                        "error": f"revocation did not finish within {self.logout_timeout}s",
                        "reason": "timeout",
                    },
                )
        try:
            await self.store.clear()
        except StoreError as exc:
            log.error("session.store_failed", extra={"error": str(exc)})
        if record is not None:
            log.info("session.terminated", extra={"session_id": record.session_id})
        self._wake.set()

    def drop(self, why: str) -> None:
        """End this process's copy of the session without calling the provider (a peer logged
        out); POST /session/refresh, or a peer's next login, starts a new one."""
        record = self._record
        self._logged_out = True
        self._record = None
        self._set_current(None)
        if record is not None:
            log.info("session.terminated", extra={"session_id": record.session_id, "why": why})
        self._wake.set()

    async def reconfigure(
        self, identity: IdentityProvider, rules: Refresh, store: SessionStore | None = None
    ) -> IdentityProvider:
        """Use a reloaded configuration's identity provider and refresh rules; returns the old
        provider (for the caller to close).

        Same identity (fingerprint): the session goes on, and the new provider is used from the
        next refresh or login. Another identity: a new session is started at once with a login;
        until it succeeds, requests keep the old token while it is valid, and it is never
        refreshed with the new identity. ``store`` replaces the store (keyed by identity).
        """
        task = self._inflight
        if task is not None:  # a call with the old provider finishes first
            with contextlib.suppress(IdentityError):
                await asyncio.shield(task)
        old = self.identity
        changed = identity.fingerprint != old.fingerprint
        self.identity = identity
        self.rules = rules
        if store is not None:
            self.store = store
        if changed:
            self._stale_identity = True
            self._failures = 0
            self._next_attempt_at = 0.0
            log.info(
                "session.identity_changed",
                extra={"session_id": self._record.session_id if self._record else None},
            )
            if not self._logged_out:
                self._renew("reload")
        elif self._record is not None:
            self._refresh_at = refresh_at(self._record.token, rules, self._rng)
        self._wake.set()
        return old

    # ----------------------------------------------------------------- single flight

    def _renew(self, trigger: str) -> asyncio.Task[Credentials]:
        """The one login/refresh task; started here only when none is in flight."""
        task = self._inflight
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._do_renew(trigger), name="session-renew"
            )
            self._inflight = task
            task.add_done_callback(self._renew_done)
        return task

    def _renew_done(self, task: asyncio.Task[Credentials]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here; waiters re-raise their own copy
        self._wake.set()

    async def _do_renew(self, trigger: str) -> Credentials:
        if self._shared is not None:
            return await self._shared.renew(self, trigger)
        return await self.renew_with_identity(trigger)

    async def renew_with_identity(self, trigger: str) -> Credentials:
        """Refresh (or re-issue, or log in) with the identity provider; the caller holds single
        flight, and the shared lock when the store is shared."""
        record = self._record
        now = self.clock.time()
        if self._stale_identity:
            record = None  # the session belongs to the identity the config replaced
        if record is not None and (record.token.refresh_token or record.token.is_valid(now)):
            refreshable = record.token.refresh_token is not None
            try:
                # without a refresh token, a re-issue with the credentials continues the session
                token = await (
                    self.identity.refresh(record.token) if refreshable else self.identity.login()
                )
            except IdentityError as exc:
                self._count_refresh_failure(exc)
                fatal = isinstance(exc, OAuthError) and exc.error in OAuthError.FATAL_FOR_REFRESH
                if not (refreshable and fatal):
                    self._failed(exc, "session.refresh_failed")
                    raise
                log.warning(
                    "session.refresh_rejected",
                    extra={"session_id": record.session_id, "reason": exc.reason},
                )
            else:
                return self._refreshed(record, token, trigger)
        return await self._login(trigger)

    async def _login(self, trigger: str) -> Credentials:
        try:
            token = await self.identity.login()
        except IdentityError as exc:
            self.metrics.logins.labels(result="failure").inc()
            self.metrics.login_failures.labels(reason=exc.reason).inc()
            self._failed(exc, "session.login_failed")
            raise
        now = self.clock.time()
        record = SessionRecord(
            identity=self.identity.fingerprint,
            session_id=str(uuid.uuid4()),
            activity_id=str(uuid.uuid4()),
            token=token,
            created_at=now,
            last_refreshed_at=now,
        )
        self.login_count += 1
        self.metrics.logins.labels(result="success").inc()
        self.metrics.session_started.set(now)
        creds = self._install(record)
        log.info(
            "session.created",
            extra={
                "session_id": record.session_id,
                "trigger": trigger,
                "expires_in": round(token.lifetime, 1),
                "token": token.fingerprint,
            },
        )
        await self._save(record)
        return creds

    def _refreshed(self, record: SessionRecord, token: Token, trigger: str) -> Credentials:
        now = self.clock.time()
        record = dataclasses.replace(
            record, token=token, last_refreshed_at=now, refresh_count=record.refresh_count + 1
        )
        self.metrics.refreshes.labels(result="success", reason=trigger).inc()
        creds = self._install(record)
        log.info(
            "session.refreshed",
            extra={
                "session_id": record.session_id,
                "trigger": trigger,
                "expires_in": round(token.lifetime, 1),
                "token": token.fingerprint,
            },
        )
        # persisted in the background: callers waiting for the token need not wait for the disk
        save = asyncio.get_running_loop().create_task(self._save(record))
        self._saves.add(save)
        save.add_done_callback(self._saves.discard)
        return creds

    def _install(self, record: SessionRecord) -> Credentials:
        """Make ``record`` the session: snapshot for requests, schedule, gauges."""
        self._record = record
        self._logged_out = False
        self._stale_identity = False
        self._failures = 0
        self._next_attempt_at = 0.0
        self._last_error = None
        self._expired_noted = False
        token = record.token
        self._refresh_at = refresh_at(token, self.rules, self._rng)
        creds = Credentials(
            token=token,
            authorization=f"Bearer {token.access_token}",
            session_id=record.session_id,
            activity_id=record.activity_id,
            expires_at=token.expires_at - self._margin(token),
        )
        self._set_current(creds)
        self.metrics.session_started.set(record.created_at)
        self.metrics.last_refresh_success.set(record.last_refreshed_at or record.created_at)
        self._wake.set()
        return creds

    def _margin(self, token: Token) -> float:
        return min(self.rules.expiry_margin, 0.1 * token.lifetime)

    def _set_current(self, creds: Credentials | None) -> None:
        self.current = creds
        self.update_gauges()
        if self._on_change is not None:
            self._on_change(creds)

    def _count_refresh_failure(self, exc: IdentityError) -> None:
        self.refresh_failures += 1
        self.metrics.refreshes.labels(result="failure", reason=exc.reason).inc()

    def _failed(self, exc: IdentityError, event: str) -> None:
        """Schedule the next attempt with backoff after a failed login or refresh."""
        retry_after = getattr(exc, "retry_after", None)
        now = self.clock.time()
        creds = self.current
        usable_for = creds.expires_at - now if creds is not None else None
        delay = backoff_delay(self._failures, self.rules.retry, self._rng, retry_after, usable_for)
        self._failures += 1
        self._next_attempt_at = now + delay
        self._last_error = str(exc)
        log.warning(
            event,
            extra={
                "error": str(exc),
                "reason": exc.reason,
                "attempt": self._failures,
                "retry_in": round(delay, 2),
            },
        )

    async def flush_saves(self) -> None:
        """Wait for background saves to finish."""
        if self._saves:
            await asyncio.gather(*self._saves)

    def due(self) -> bool:
        """True when the current token should be renewed now (or there is none)."""
        record = self._record
        now = self.clock.time()
        return (
            record is None
            or self._stale_identity
            or now >= self._refresh_at
            or not record.token.is_valid(now)
        )

    def adopt(self, record: SessionRecord | None) -> Credentials | None:
        """Install a record another process wrote, when it is newer than ours and usable."""
        if record is None or record.identity != self.identity.fingerprint:
            return None
        ours = self._record
        if ours is not None and record.token.obtained_at <= ours.token.obtained_at:
            return None
        if not record.token.is_valid(self.clock.time()) and record.token.refresh_token is None:
            return None
        creds = self._install(record)
        log.info(
            "session.adopted",
            extra={"session_id": record.session_id, "token": record.token.fingerprint},
        )
        return creds

    @property
    def record(self) -> SessionRecord | None:
        """The current session record (holds secrets: for stores only)."""
        return self._record

    async def _save(self, record: SessionRecord) -> None:
        try:
            if self.fence is not None:
                shared: Any = self.store
                if not await shared.save_fenced(record, self.fence):
                    log.warning("session.store_fenced_out", extra={"fence": self.fence})
                return
            await self.store.save(record)
        except StoreError as exc:
            log.error("session.store_failed", extra={"error": str(exc)})

    # ----------------------------------------------------------------- background loop

    async def _run(self) -> None:
        """Refresh ahead of expiry; after failures, retry with backoff until a token is had."""
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("session.loop_error")
                await self.clock.sleep(self.rules.retry.initial)

    async def _step(self) -> None:
        now = self.clock.time()
        record = self._record
        creds = self.current
        # requests stop using the token at its expiry less the margin: that is when it expires
        usable_until = creds.expires_at if creds is not None else math.inf
        expiry_wake = usable_until if usable_until > now else math.inf
        if record is not None and now >= usable_until and not self._expired_noted:
            self._expired_noted = True
            self.update_gauges()
            log.warning(
                "session.expired",
                extra={"session_id": record.session_id, "last_error": self._last_error},
            )
        if self._logged_out:
            await self._wait(None)
        elif now < self._next_attempt_at:
            await self._wait(min(self._next_attempt_at, expiry_wake) - now)
        elif record is not None and not self.due():
            await self._wait(min(self._refresh_at, expiry_wake, record.token.expires_at) - now)
        else:
            if record is None:
                trigger = "startup"
            elif self._stale_identity:
                trigger = "reload"
            else:
                trigger = "proactive" if record.token.is_valid(now) else "expired"
            with contextlib.suppress(IdentityError):
                await asyncio.shield(self._renew(trigger))

    async def _wait(self, delay: float | None) -> None:
        """Sleep ``delay`` seconds of the injected clock, or until something changes the session."""
        if self._wake.is_set():
            self._wake.clear()
            return
        waiter = asyncio.ensure_future(self._wake.wait())
        tasks: set[asyncio.Future[Any]] = {waiter}
        if delay is not None:
            tasks.add(asyncio.ensure_future(self.clock.sleep(delay)))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            self._wake.clear()

    # ----------------------------------------------------------------- observation

    def state(self) -> State:
        if self._logged_out:
            return State.LOGGED_OUT
        record = self._record
        if record is None:
            return State.NONE
        # valid while requests may use it (the expiry margin included), as /readyz must say
        return State.VALID if self.usable() is not None else State.EXPIRED

    def update_gauges(self) -> None:
        """Bring the session gauges up to date (validity changes with time, not only on events)."""
        creds = self.current
        valid = creds is not None and self.clock.time() < creds.expires_at
        self.metrics.session_valid.set(1 if valid else 0)
        record = self._record
        self.metrics.token_expiry.set(record.token.expires_at if record is not None else 0)

    def summary(self) -> dict[str, Any]:
        """A redacted summary for /session: state, expiry, ages, counts. Never a token."""
        now = self.clock.time()
        record = self._record
        out: dict[str, Any] = {
            "state": self.state().value,
            "store": self.store.kind,
            "refresh_in_progress": self._inflight is not None,
            "logins": self.login_count,
            "refresh_failures": self.refresh_failures,
            "consecutive_failures": self._failures,
            "last_error": self._last_error,
            "next_attempt_in": round(max(0.0, self._next_attempt_at - now), 3)
            if self._failures
            else None,
            "last_api_call_at": self.last_api_call_at,
            "last_api_call_ago": _ago(now, self.last_api_call_at),
        }
        if record is not None:
            token = record.token
            out.update(
                session_id=record.session_id,
                activity_id=record.activity_id,
                token_fingerprint=token.fingerprint,
                refreshable=token.refresh_token is not None,
                expires_at=token.expires_at,
                expires_in=round(token.expires_at - now, 3),
                next_refresh_in=round(max(0.0, self._refresh_at - now), 3),
                created_at=record.created_at,
                age=round(now - record.created_at, 3),
                last_refreshed_at=record.last_refreshed_at,
                last_refreshed_ago=_ago(now, record.last_refreshed_at),
                refresh_count=record.refresh_count,
                # names and counts only: field values and cookies stay out of /session
                session_fields=sorted(token.fields),
                cookies=len(token.cookies),
            )
        return out


def _ago(now: float, then: float | None) -> float | None:
    return None if then is None else round(now - then, 3)
