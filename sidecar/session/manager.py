"""SessionManager: holds the one session, refreshes it ahead of expiry, owns single flight.

The proxy reads :attr:`SessionManager.current` (a plain attribute holding an immutable
:class:`Credentials` snapshot) and calls :meth:`SessionManager.credentials` only when that
snapshot is missing or expired. Every login or refresh, whoever asks for it (the background
loop, a request that found no token, an upstream 401, an operator), runs as one shared task:
however many callers wait, the identity provider sees one call.

The manager holds the session, owns single flight and runs the refresh loop; its parts, one
module each, hold no manager: they are given plain values and return them. The schedule says when
to renew (:mod:`sidecar.session.schedule`); the renewer calls the identity provider and returns
the next record (:mod:`sidecar.session.renew`), which the manager installs and persists
(:mod:`sidecar.session.persist`); the /session summary is made from a snapshot
(:mod:`sidecar.session.report`); between replicas, the coordinator wraps the manager's renewal and
calls back with the records it reads (:mod:`sidecar.session.shared`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sidecar.clock import Clock
from sidecar.config.models import Refresh
from sidecar.cookies import store_cookies
from sidecar.errors import IdentityError, IdentityUnavailable, NoSessionError
from sidecar.identity import IdentityProvider
from sidecar.metrics import Metrics
from sidecar.session.persist import SessionPersistence
from sidecar.session.renew import Renewer, revoke
from sidecar.session.report import Snapshot, summarize
from sidecar.session.schedule import RefreshSchedule, Wakeup
from sidecar.store import SessionStore
from sidecar.tokens import Credentials, SessionRecord, Token

if TYPE_CHECKING:
    from sidecar.session.shared import SharedSession
    from sidecar.session.sink import TokenSink
    from sidecar.store.crypto import Sealer

log = logging.getLogger("sidecar.session")


class State(StrEnum):
    """What /session and `sidecar status` report."""

    NONE = "NONE"  # no session yet (starting, or the provider has been unreachable so far)
    VALID = "VALID"
    EXPIRED = "EXPIRED"  # the token expired with no replacement; requests get 503
    LOGGED_OUT = "LOGGED_OUT"


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
        sink: TokenSink | None = None,
    ) -> None:
        self.identity = identity
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self._on_change = on_change
        #: real seconds the provider gets to revoke at logout, so a hanging revocation endpoint
        #: cannot hold up a shutdown (a bound on I/O, not a schedule: hence not the Clock)
        self.logout_timeout = logout_timeout
        #: the snapshot requests use; replaced whole, never mutated
        self.current: Credentials | None = None
        self.last_api_call_at: float | None = None
        self._record: SessionRecord | None = None
        self._inflight: asyncio.Task[Credentials] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._logged_out = False
        self._last_reactive_at = -math.inf
        #: the schedule (refresh moment, backoff), the loop's alarm, the renewals, the store
        self._schedule = RefreshSchedule(rules, rng)
        self._wakeup = Wakeup(clock)
        self._renewer = Renewer(clock, metrics, self._schedule)
        self._persist = SessionPersistence()
        #: set when the store is shared: the coordination of renewals between processes
        self._shared = shared
        self._watch_task: asyncio.Task[None] | None = None
        #: session.token_sink: every new token is written to a file, removed at logout
        self.sink = sink

    @property
    def rules(self) -> Refresh:
        """The refresh rules in force (a reload replaces them)."""
        return self._schedule.rules

    @property
    def login_count(self) -> int:
        """Successful logins since start."""
        return self._renewer.logins

    @property
    def refresh_failures(self) -> int:
        """Failed refreshes since start."""
        return self._renewer.refresh_failures

    def notify(self, callback: Callable[[Credentials | None], None]) -> None:
        """Call ``callback`` with the new credentials (or None) whenever they change."""
        self._on_change = callback

    @property
    def logged_out(self) -> bool:
        """True after a logout (ours or a peer's), until a session is installed again or an
        operator refreshes (POST /session/refresh)."""
        return self._logged_out

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Restore a stored session when there is a usable one, then start the refresh loop."""
        now = self.clock.time()
        record = await self._persist.restore(self.store, self.identity.fingerprint, now)
        if record is not None:
            self.last_api_call_at = record.last_api_call_at
            self._install(record)
        loop = asyncio.get_running_loop()
        if self._shared is not None:
            watch = self._shared.watch(self._held, self._adopted, self.drop)
            self._watch_task = loop.create_task(watch, name="session-watch")
        self._loop_task = loop.create_task(self._keep_fresh(), name="session-refresh")

    async def stop(self) -> None:
        """Stop refreshing and persist the session (with its last-call time)."""
        for task in (self._watch_task, self._loop_task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, IdentityError):
                    await task
        self._loop_task = None
        await self._persist.flush()
        record = self._record
        # a shared record may already hold a peer's newer token: only a private one is rewritten
        if record is not None and not self.store.shared:
            last_call = dataclasses.replace(record, last_api_call_at=self.last_api_call_at)
            await self._persist.save(self.store, last_call)
        if self._shared is not None:
            # a renewal cancelled above may have stopped before giving the lock back: peers
            # must not wait out the lease for a replica that is leaving
            await self._shared.release()
        if self.sink is not None:
            await self.sink.flush()

    # ----------------------------------------------------------------- request path

    def usable(self) -> Credentials | None:
        """The current credentials when they have not expired."""
        creds = self.current
        if creds is not None and creds.usable_at(self.clock.time()):
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
        if creds is not None and creds.usable_at(now):
            return creds
        if self._logged_out:
            raise NoSessionError(
                "the session was logged out; POST /session/refresh to log in again"
            )
        task = self._inflight
        if task is None:
            next_attempt_at = self._schedule.next_attempt_at
            if now < next_attempt_at:
                raise NoSessionError(
                    f"no valid token ({self._schedule.last_error}); next attempt in "
                    f"{next_attempt_at - now:.1f}s"
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
        if current is not None and current is not used and current.usable_at(now):
            return current  # someone else already replaced the rejected token
        if self._logged_out:
            return None
        task = self._inflight
        if task is None:
            if now - self._last_reactive_at < self.rules.reactive_min_interval:
                return None
            self._last_reactive_at = now
            self.metrics.token_rejected()
            log.warning(
                "session.token_rejected",
                extra={"session_id": used.session_id, "token": used.token.fingerprint},
            )
            task = self._renew("reactive")
        try:
            return await asyncio.shield(task)
        except IdentityError:
            return None

    def capture_cookies(self, set_cookies: Sequence[str], host: str, path: str) -> None:
        """upstream.capture_cookies: an upstream answer's ``Set-Cookie`` values (from ``host``,
        for a request to ``path``) update the session's jar by the rules of RFC 6265
        (:func:`sidecar.cookies.store_cookies`). A changed jar is a new snapshot for requests,
        persisted with the session; the token, its expiry and the schedule stay as they were.

        A shared store is not written here: a replica still on an older token would overwrite a
        peer's newer one, so the captured cookies stay in this process until the next renewal."""
        record = self._record
        creds = self.current
        if record is None or creds is None:
            return
        token = record.token
        jar = store_cookies(token.cookies, set_cookies, host, path, self.clock.time())
        if jar == token.cookies:
            return
        token = dataclasses.replace(token, cookies=jar)
        record = dataclasses.replace(record, token=token)
        self._record = record
        self._set_current(dataclasses.replace(creds, token=token))
        log.debug("session.cookies_captured", extra={"session_id": record.session_id})
        if not self.store.shared:
            self._persist.save_soon(self.store, record)

    # ----------------------------------------------------------------- operator actions

    async def force_refresh(self) -> Credentials:
        """POST /session/refresh: refresh (or log in) now, even after a logout."""
        self._logged_out = False
        self._schedule.retry_now()
        held = self._record
        joined = self._inflight
        try:
            creds = await asyncio.shield(joined or self._renew("manual"))
            newer = self._record is not None and self._record.newer_than(held)
            if joined is not None and self._inflight is None and not newer:
                # the renewal we joined was asked for before this call and ended without a newer
                # token (a follower that found the record it waited for): the operator asked for
                # a token newer than the one held when they asked
                creds = await asyncio.shield(self._renew("manual"))
            return creds
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
        record = self._forget()
        if record is not None:
            await revoke(self.identity, record.token, self.logout_timeout)
        await self._persist.clear(self.store)
        if self.sink is not None:
            await self.sink.remove()
        if record is not None:
            log.info("session.terminated", extra={"session_id": record.session_id})
        self._wakeup.set()

    def drop(self, why: str) -> None:
        """End this process's copy of the session without calling the provider (a peer logged
        out); POST /session/refresh, or a peer's next login, starts a new one."""
        record = self._forget()
        if self.sink is not None:
            self.sink.discard()
        if record is not None:
            log.info("session.terminated", extra={"session_id": record.session_id, "why": why})
        self._wakeup.set()

    def _forget(self) -> SessionRecord | None:
        """Logged out: no record, no credentials for requests; returns the record that was."""
        record = self._record
        self._logged_out = True
        self._record = None
        self._set_current(None)
        return record

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
        self._schedule.rules = rules
        if store is not None:
            self.store = store
        if changed:
            self._schedule.identity_changed()
            log.info(
                "session.identity_changed",
                extra={"session_id": self._record.session_id if self._record else None},
            )
            if not self._logged_out:
                self._renew("reload")
        elif self._record is not None:
            self._schedule.plan(self._record.token)
        self._wakeup.set()
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
        self._wakeup.set()

    async def _do_renew(self, trigger: str) -> Credentials:
        shared = self._shared
        if shared is None:
            return await self._renew_with_identity(trigger, None)

        async def renew(fence: int | None) -> None:
            try:
                await self._renew_with_identity(trigger, fence)
            finally:
                if fence is not None:  # the lock is given back once the record is written
                    await self._persist.flush()

        await shared.renew(renew, self._held, self._adopted)
        creds = self.current
        if creds is None:  # a peer's logout arrived while the lock was given back
            raise IdentityUnavailable("the session ended during its renewal", reason="ended")
        return creds

    async def _renew_with_identity(self, trigger: str, fence: int | None) -> Credentials:
        """Refresh (or re-issue, or log in) with the identity provider, install the record and
        write it (fenced with ``fence``, the shared lock's); the caller holds single flight, and
        the shared lock when the store is shared."""
        # a stale identity: the session belongs to the identity the config replaced, a login is next
        record = None if self._schedule.stale_identity else self._record
        renewal = await self._renewer.renew(
            self.identity, self.rules, record, self.current, trigger
        )
        creds = self._install(renewal.record)
        if renewal.created:
            await self._persist.save(self.store, renewal.record, fence)
        else:
            # persisted in the background: callers waiting for the token need not wait for the disk
            self._persist.save_soon(self.store, renewal.record, fence)
        return creds

    def _install(self, record: SessionRecord) -> Credentials:
        """Make ``record`` the session: snapshot for requests, schedule, gauges."""
        self._record = record
        self._logged_out = False
        self._schedule.installed(record.token)
        creds = Credentials.of(record, self._margin(record.token))
        self._set_current(creds)
        if self.sink is not None:
            self.sink.offer(record.token)
        self.metrics.session_installed(
            record.created_at, record.last_refreshed_at or record.created_at
        )
        self._wakeup.set()
        return creds

    # ----------------------------------------------------------------- the refresh loop

    async def _keep_fresh(self) -> None:
        """Refresh ahead of expiry; after failures, retry with backoff until a token is had
        (:meth:`RefreshSchedule.step` decides, on the injected clock)."""
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("session.loop_error")
                await self.clock.sleep(self.rules.retry.initial)

    async def _step(self) -> None:
        step = self._schedule.step(self.clock.time(), self.current, self._logged_out)
        record = self._record
        if step.expired and record is not None:
            self.update_gauges()
            log.warning(
                "session.expired",
                extra={"session_id": record.session_id, "last_error": self._schedule.last_error},
            )
        if step.trigger is None:
            await self._wakeup.wait(step.wait)
        else:
            with contextlib.suppress(IdentityError):
                await asyncio.shield(self._renew(step.trigger))

    def _margin(self, token: Token) -> float:
        return min(self.rules.expiry_margin, 0.1 * token.lifetime)

    def _set_current(self, creds: Credentials | None) -> None:
        self.current = creds
        self.update_gauges()
        if self._on_change is not None:
            self._on_change(creds)

    async def use_sealer(self, sealer: Sealer | None, running: Sealer | None) -> bool:
        """New encryption keys for the store (a reload); see SessionPersistence.use_sealer."""
        return await self._persist.use_sealer(self.store, sealer, running, self._record)

    async def flush_saves(self) -> None:
        """Wait for background saves to finish."""
        await self._persist.flush()

    def due(self) -> bool:
        """True when the current token should be renewed now (or there is none)."""
        return self._schedule.due(self.clock.time(), self.current)

    def adopt(self, record: SessionRecord | None) -> Credentials | None:
        """Install a record another process wrote, when it is newer than ours and usable."""
        if record is None or not record.newer_than(self._record):
            return None
        if record.unusable_because(self.identity.fingerprint, self.clock.time()) is not None:
            return None
        creds = self._install(record)
        log.info(
            "session.adopted",
            extra={"session_id": record.session_id, "token": record.token.fingerprint},
        )
        return creds

    def _adopted(self, record: SessionRecord | None) -> bool:
        return self.adopt(record) is not None

    def _held(self) -> SessionRecord | None:
        return self._record

    @property
    def record(self) -> SessionRecord | None:
        """The current session record (holds secrets: for stores only)."""
        return self._record

    def note_api_call(self, at: float) -> None:
        """A request used the session at ``at`` (a worker's, reported later): the latest is
        kept, and written with the record at stop."""
        if at > (self.last_api_call_at or 0):
            self.last_api_call_at = at

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
        valid = creds is not None and creds.usable_at(self.clock.time())
        record = self._record
        expires_at = record.token.expires_at if record is not None else 0
        self.metrics.session_status(valid, expires_at, self._schedule.failures)

    def summary(self) -> dict[str, Any]:
        """A redacted summary for /session: state, expiry, ages, counts. Never a token."""
        schedule = self._schedule
        return summarize(
            Snapshot(
                now=self.clock.time(),
                state=self.state().value,
                store=self.store.kind,
                renewing=self._inflight is not None,
                logins=self.login_count,
                refresh_failures=self.refresh_failures,
                consecutive_failures=schedule.failures,
                last_error=schedule.last_error,
                next_attempt_at=schedule.next_attempt_at,
                refresh_at=schedule.refresh_at,
                last_api_call_at=self.last_api_call_at,
                record=self._record,
            )
        )
