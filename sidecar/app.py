"""Composition root: builds every part from a Config and a Clock, and runs the server lifecycle.

Start order: demo servers (when enabled) → identity → store → session → proxy and admin listeners.
Stop order is the reverse; a failing close is logged, never raised, so the rest still closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web
from pydantic import SecretStr

from sidecar.clock import Clock, SystemClock
from sidecar.config import Config, Identity, is_loopback
from sidecar.errors import ConfigError, StoreError
from sidecar.header_values import SessionCookies
from sidecar.headers import HeaderRules
from sidecar.identity import IdentityProvider
from sidecar.identity.oauth2 import OAuth2Identity
from sidecar.logs import AccessLogger, access_logger
from sidecar.metrics import Metrics
from sidecar.proxy import CredentialSource, Proxy
from sidecar.session import SessionManager
from sidecar.store import SessionStore
from sidecar.store.file import FileStore
from sidecar.store.memory import MemoryStore

if TYPE_CHECKING:
    from sidecar.demo import DemoIdentityProvider

log = logging.getLogger(__name__)

#: seconds in-flight requests get to finish after SIGTERM before they are cut
DRAIN_TIMEOUT = 15.0

Closer = Callable[[], Awaitable[None]]


@dataclass
class Sidecar:
    """One running sidecar: its listeners, session and the resources they own."""

    config: Config
    clock: Clock = field(default_factory=SystemClock)
    rng: random.Random | None = None
    drain_timeout: float = DRAIN_TIMEOUT
    #: False in the supervisor of ``--workers N``: the workers serve the proxy, it serves admin
    serve_proxy: bool = True
    metrics: Metrics = field(default_factory=Metrics)
    session: SessionManager = field(init=False)
    proxy_port: int = field(init=False, default=0)
    admin_port: int = field(init=False, default=0)
    upstream_url: str = field(init=False, default="")
    demo_idp: DemoIdentityProvider | None = field(init=False, default=None)
    _closers: list[tuple[str, Closer]] = field(init=False, default_factory=list)

    async def start(self) -> None:
        """Build and start everything; on failure, close what was already started."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        identity = await self._identity()
        self._closers.append(("identity", identity.aclose))
        store = self._store(identity.fingerprint)
        self._closers.append(("store", store.aclose))
        shared = None
        if store.shared:
            from sidecar.shared import SharedSession

            shared = SharedSession(
                store,  # type: ignore[arg-type]
                cfg.session.lock_lease,
                cfg.session.poll_interval,
            )
        self.session = SessionManager(
            identity,
            store,
            self.clock,
            self.metrics,
            cfg.refresh,
            rng=self.rng,
            shared=shared,
            logout_timeout=cfg.session.logout_timeout,
        )
        await self.session.start()
        self._closers.append(("session", self._stop_session))

        if self.serve_proxy:
            self.proxy_port = await self.open_proxy(self.session)

        from sidecar.admin import admin_app

        admin_runner = web.AppRunner(
            admin_app(self.session, self.metrics),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=2.0,
        )
        self.admin_port = await self._listen("admin", admin_runner, cfg.admin.host, cfg.admin.port)
        for name, host in (("listen", cfg.listen.host), ("admin", cfg.admin.host)):
            if not is_loopback(host):
                log.warning("sidecar.non_loopback", extra={"section": name, "host": host})
        log.info(
            "sidecar.started",
            extra={
                "proxy": f"{cfg.listen.host}:{self.proxy_port}" if self.serve_proxy else "workers",
                "admin": f"{cfg.admin.host}:{self.admin_port}",
                "upstream": self.upstream_url,
                "store": store.kind,
            },
        )

    async def open_proxy(self, session: CredentialSource, *, reuse_port: bool = False) -> int:
        """Start the proxy listener (and its upstream pool) for ``session``; returns the port."""
        cfg = self.config
        proxy = Proxy(
            cfg.upstream,
            self.upstream_url,
            session,
            HeaderRules.compile(
                cfg.headers,
                cookies=SessionCookies(self.upstream_url, self.clock)
                if cfg.upstream.send_cookies
                else None,
            ),
            self.metrics,
            self.clock,
        )
        await proxy.start()
        self._closers.append(("upstream client", proxy.aclose))
        access = (
            {"access_log_class": AccessLogger, "access_log": access_logger()}
            if cfg.log.access_log
            else {"access_log": None}
        )
        proxy_runner = web.ServerRunner(
            proxy.server(**access), handle_signals=False, shutdown_timeout=self.drain_timeout
        )
        return await self._listen(
            "proxy", proxy_runner, cfg.listen.host, cfg.listen.port, reuse_port=reuse_port
        )

    async def _listen(
        self, name: str, runner: web.BaseRunner, host: str, port: int, *, reuse_port: bool = False
    ) -> int:
        await runner.setup()
        self._closers.append((name, runner.cleanup))
        site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
        await site.start()
        return int(runner.addresses[0][1])

    async def _identity(self) -> IdentityProvider:
        cfg = self.config
        self.upstream_url = cfg.upstream.url or ""
        if cfg.identity.kind == "json_login":
            from sidecar.identity.json_login import JsonLoginIdentity

            return JsonLoginIdentity(cfg.identity, self.clock)
        if not cfg.demo.enabled:
            return OAuth2Identity(cfg.identity, self.clock, metrics=self.metrics)
        # the demo's JWT and elliptic-curve libraries are loaded only when the demo runs
        from sidecar.demo import DEMO_CLIENT_ID, DemoIdentityProvider, echo_app

        idp = DemoIdentityProvider(self.clock, cfg.demo.token_lifetime)
        self.demo_idp = idp
        idp_port = await self._serve_app("demo identity provider", idp.app(), 0)
        if cfg.upstream.url is None:
            echo_port = await self._serve_app(
                "demo echo upstream", echo_app(idp), cfg.demo.echo_port
            )
            self.upstream_url = f"http://127.0.0.1:{echo_port}"
        demo_identity = Identity(
            kind="oauth2",
            token_url=f"http://127.0.0.1:{idp_port}/oauth2/token",
            client_id=DEMO_CLIENT_ID,
            client_secret=SecretStr(idp.client_secret),
        )
        return OAuth2Identity(demo_identity, self.clock)

    async def _serve_app(self, name: str, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        return await self._listen(name, runner, "127.0.0.1", port)

    def _store(self, namespace: str) -> SessionStore:
        cfg = self.config.session
        sealer = None
        if cfg.encryption_key_file is not None:
            from sidecar.store.crypto import Sealer

            sealer = Sealer.from_file(cfg.encryption_key_file, context=namespace)
        if cfg.store == "file":
            store = FileStore(cfg.path, sealer)
            store.check_writable()
            return store
        if cfg.store == "redis":
            assert cfg.redis_url is not None
            from sidecar.store.redis import RedisStore

            try:
                return RedisStore(cfg.redis_url, namespace, sealer)
            except ValueError as exc:
                raise ConfigError(f"session.redis_url: {exc}") from exc
        return MemoryStore()

    async def _stop_session(self) -> None:
        await self.session.stop()
        if self.config.session.logout_on_shutdown:
            await self.session.logout()

    async def stop(self) -> None:
        """Close everything in reverse order of creation; log (not raise) failing closes."""
        while self._closers:
            name, close = self._closers.pop()
            try:
                await close()
            except (OSError, StoreError, RuntimeError) as exc:
                log.error("sidecar.close_failed", extra={"part": name, "error": str(exc)})
        log.info("sidecar.stopped")


async def serve(config: Config, *, ready: Callable[[Sidecar], None] | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain and stop. Returns the process exit code."""
    sidecar = Sidecar(config)
    await sidecar.start()
    if ready is not None:
        ready(sidecar)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("sidecar.stopping", extra={"drain_timeout": sidecar.drain_timeout})
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        await sidecar.stop()
    return 0
