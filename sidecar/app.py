"""Composition root: builds every part from a Config and a Clock, starts, reloads and stops them.
Running it as a process (signals) is :mod:`sidecar.lifecycle`'s.

Start order: demo servers (when enabled) → identity → store → session → proxy and admin listeners.
Stop order is the reverse; a failing close is logged, never raised, so the rest still closes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from aiohttp import web
from pydantic import SecretStr

from sidecar.clock import Clock, SystemClock
from sidecar.compiled import describe
from sidecar.config.identity import Identity
from sidecar.config.json_login import JsonLoginSection
from sidecar.config.models import Config, is_loopback
from sidecar.config.oauth2 import OAuth2Section
from sidecar.errors import ConfigError, IdentityError, StoreError
from sidecar.http.server import FrontServer
from sidecar.identity import IdentityProvider
from sidecar.metrics import Metrics
from sidecar.proxy.callers import CallerPolicy
from sidecar.proxy.forward import CredentialSource, Proxy
from sidecar.proxy.header_values import CookieCapture, SessionCookies
from sidecar.proxy.headers import HeaderRules
from sidecar.session.manager import SessionManager
from sidecar.session.sink import TokenSink
from sidecar.store import SharedStore
from sidecar.store.opening import open_store, same_keys, sealer_for
from sidecar.tls import RECHECK_EVERY

if TYPE_CHECKING:
    from sidecar.demo import DemoIdentityProvider
    from sidecar.proxy.tracing import SpanExporter
    from sidecar.store.crypto import Sealer

log = logging.getLogger(__name__)

Closer = Callable[[], Awaitable[None]]

#: sections whose change a running process cannot apply: SIGHUP logs them as needing a restart
RESTART_SECTIONS = ("listen", "admin", "session", "demo", "tracing")
#: keys of those sections that a reload applies all the same
LIVE_KEYS = ("drain_timeout", "encryption_key_file", "previous_encryption_key_files")
#: the ``listen`` keys of who may call, applied by a reload (the value file is read again)
LIVE_CALLER_KEYS = ("allowed_hosts", "allowed_origins", "require_header")


class Front(Protocol):
    """What the lifecycle needs from a listener such as the :8080 proxy front."""

    async def stop_accepting(self) -> None:
        """Close the listening socket: new connections are refused from now on."""

    async def drain(self, within: float) -> None:
        """Let requests in flight finish for up to ``within`` seconds, then cut the rest."""

    async def close(self) -> None:
        """Release everything (after a drain, or at once)."""


class AiohttpFront:
    """A :class:`Front` over an aiohttp runner and its one TCP site."""

    def __init__(self, runner: web.BaseRunner) -> None:
        self._runner = runner

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Start listening; returns the port (useful when ``port`` is 0)."""
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, host, port, reuse_address=True, reuse_port=reuse_port or None
        )
        await site.start()
        return int(self._runner.addresses[0][1])

    async def stop_accepting(self) -> None:
        for site in list(self._runner.sites):
            await site.stop()

    async def drain(self, within: float) -> None:
        server = self._runner.server
        if server is None:
            return
        await asyncio.sleep(0)  # requests accepted just before the stop start being handled
        server.pre_shutdown()  # idle keep-alive connections close now
        await server.shutdown(within)

    async def close(self) -> None:
        await self._runner.cleanup()


@dataclass
class Sidecar:
    """One running sidecar: its listeners, session and the resources they own."""

    config: Config
    clock: Clock = field(default_factory=SystemClock)
    rng: random.Random | None = None
    #: False in the supervisor of ``--workers N``: the workers serve the proxy, it serves admin
    serve_proxy: bool = True
    metrics: Metrics = field(default_factory=Metrics)
    session: SessionManager = field(init=False)
    proxy_port: int = field(init=False, default=0)
    admin_port: int = field(init=False, default=0)
    upstream_url: str = field(init=False, default="")
    demo_idp: DemoIdentityProvider | None = field(init=False, default=None)
    proxy: Proxy | None = field(init=False, default=None)
    #: where the proxy reads its credentials (and hands captured cookies)
    _source: CredentialSource = field(init=False)
    #: the exporter of ``tracing.otlp_endpoint`` (None without one, or before first use)
    spans: SpanExporter | None = field(init=False, default=None)
    #: seconds in-flight requests get at shutdown; None: ``listen.drain_timeout``
    drain_timeout: float | None = None
    #: seconds between looks at the upstream's and the identity provider's TLS files
    tls_recheck_every: float = RECHECK_EVERY
    _drain: float = field(init=False)
    _draining: bool = field(init=False, default=False)
    #: the proxy port is open (here, or under --workers in every worker): /readyz waits for it
    listening: bool = field(init=False, default=False)
    _fronts: list[Front] = field(init=False, default_factory=list)
    #: the proxy listener (None until open_proxy): what a drain stops and waits for
    front: FrontServer | None = field(init=False, default=None)
    _closers: list[tuple[str, Closer]] = field(init=False, default_factory=list)
    #: the store's encryption at rest (None: none), to tell whether a reload changes its keys
    _sealer: Sealer | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._drain = (
            self.config.listen.drain_timeout if self.drain_timeout is None else self.drain_timeout
        )

    @property
    def drain_seconds(self) -> float:
        """Seconds in-flight requests get to finish at shutdown."""
        return self._drain

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
        try:
            self._sealer = await asyncio.to_thread(sealer_for, cfg.session, identity.fingerprint)
            store = await open_store(cfg.session, identity.fingerprint, self._sealer)
        except BaseException:
            await identity.aclose()
            raise
        shared = None
        if store.shared:
            from sidecar.session.shared import SharedSession

            shared = SharedSession(
                store,  # type: ignore[arg-type]
                cfg.session.lock_lease,
                cfg.session.poll_interval,
                self.clock,
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
            sink=_token_sink(cfg),
        )
        # a reload may replace both: the closers close whichever the session holds by then
        self._closers.append(("identity", lambda: self.session.identity.aclose()))
        self._closers.append(("store", lambda: self.session.store.aclose()))
        await self.session.start()
        self._closers.append(("session", self._stop_session))

        if self.serve_proxy:
            self.proxy_port = await self.open_proxy(self.session)

        from sidecar.admin import admin_app

        admin_runner = web.AppRunner(
            admin_app(self.session, self.metrics, lambda: self._draining, lambda: self.listening),
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
                # uvloop's loop class lives in the uvloop package
                "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                "data_path": describe(),
            },
        )

    async def open_proxy(
        self,
        session: CredentialSource,
        *,
        reuse_port: bool = False,
        unix_sock: socket.socket | None = None,
    ) -> int:
        """Start the proxy listeners (and the upstream pool) for ``session``; returns the TCP
        port (0 without one). ``unix_sock``: the ``listen.unix_socket`` a supervisor bound for
        its workers (else this process binds it)."""
        cfg = self.config
        proxy = Proxy(
            cfg.upstream,
            self.upstream_url,
            session,
            self._rules(cfg, self.upstream_url),
            self.metrics,
            self.clock,
            access_log=cfg.log.access_log,
            callers=await asyncio.to_thread(CallerPolicy.compile, cfg.listen),
            spans=self.span_exporter(),
            tls_recheck_every=self.tls_recheck_every,
        )
        await proxy.start()
        self._source = session
        proxy.capture_cookies = _capture(cfg, self.upstream_url, session)
        self.proxy = proxy
        self._closers.append(("upstream client", proxy.aclose))
        port = 0
        if cfg.listen.port is not None:
            front = FrontServer(
                proxy.handle,
                proxy.front_refusal,
                self.clock,
                cfg.listen,
                upstream_pool=cfg.upstream.pool_size,
            )
            self.front = front
            self._closers.append(("proxy", front.close))
            port = await front.listen(cfg.listen.host, cfg.listen.port, reuse_port=reuse_port)
            self._fronts.append(front)
        if cfg.listen.unix_socket is not None:
            await self._open_unix(proxy, cfg.listen.unix_socket, unix_sock)
        self.mark_listening()
        return port

    async def _open_unix(self, proxy: Proxy, path: Path, sock: socket.socket | None) -> None:
        """The proxy on ``listen.unix_socket`` too: the same handler, without the Host check."""
        if sock is None:
            from sidecar.http.unix_socket import UnixListener

            listener = await asyncio.to_thread(UnixListener.bind, path)
            self._closers.append(("unix socket file", listener.remove))
            sock = listener.sock
        local = FrontServer(
            functools.partial(proxy.handle, unix=True),
            proxy.front_refusal,
            self.clock,
            self.config.listen,
            upstream_pool=self.config.upstream.pool_size,
        )
        self._closers.append(("proxy on unix socket", local.close))
        await local.listen_on(sock)
        self._fronts.append(local)
        log.info("proxy.unix_socket", extra={"path": str(path)})

    async def _listen(self, name: str, runner: web.BaseRunner, host: str, port: int) -> int:
        front = AiohttpFront(runner)
        self._closers.append((name, front.close))
        return await front.listen(host, port)

    async def _identity(self) -> IdentityProvider:
        cfg = self.config
        self.upstream_url = cfg.upstream.url or ""
        if not _demo_identity(cfg):
            return await self._provider(cfg.identity)
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
        demo_identity = OAuth2Section(
            token_url=f"http://127.0.0.1:{idp_port}/oauth2/token",
            client_id=DEMO_CLIENT_ID,
            client_secret=SecretStr(idp.client_secret),
        )
        from sidecar.identity.oauth2 import OAuth2Identity

        return OAuth2Identity(
            demo_identity, self.clock, metrics=self.metrics, spans=self.span_exporter()
        )

    async def _provider(self, identity: Identity) -> IdentityProvider:
        """The provider for an identity section (not the embedded demo's); only its kind's
        module is imported. Built in a thread: building one reads the files that name its
        principal (a subject token, an assertion), and a reload builds one while the proxy
        serves."""
        spans = self.span_exporter()  # made, and started, here in the loop
        if isinstance(identity, JsonLoginSection):
            from sidecar.identity.json_login import JsonLoginIdentity

            return await asyncio.to_thread(
                JsonLoginIdentity,
                identity,
                self.clock,
                metrics=self.metrics,
                spans=spans,
                tls_recheck_every=self.tls_recheck_every,
            )
        if isinstance(identity, OAuth2Section):
            from sidecar.identity.oauth2 import OAuth2Identity

            return await asyncio.to_thread(
                OAuth2Identity,
                identity,
                self.clock,
                metrics=self.metrics,
                spans=spans,
                tls_recheck_every=self.tls_recheck_every,
            )
        # the demo's provider is built at start, with its embedded server
        raise ConfigError("identity.kind: demo takes effect at a restart")

    def _rules(self, config: Config, upstream_url: str) -> HeaderRules:
        cookies = SessionCookies(upstream_url, self.clock) if config.upstream.send_cookies else None
        return HeaderRules.compile(
            config.headers,
            cookies=cookies,
            # the tracing section as the process started (a change needs a restart)
            sample=self.config.tracing.sample,
            new_span=self.span_exporter() is not None,
        )

    def span_exporter(self) -> SpanExporter | None:
        """The span exporter of ``tracing.otlp_endpoint`` (made and started at first use), or
        None without one. Closed with the rest, after the parts that record spans."""
        endpoint = self.config.tracing.otlp_endpoint
        if endpoint is None or self.spans is not None:
            return self.spans
        from sidecar.proxy.tracing import SpanExporter

        self.spans = SpanExporter(
            endpoint,
            self.clock,
            service_name=self.config.tracing.service_name,
            sample=self.config.tracing.sample,
            metrics=self.metrics,
        )
        self.spans.start()
        self._closers.append(("span exporter", self.spans.aclose))
        return self.spans

    async def _serve_app(self, name: str, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        return await self._listen(name, runner, "127.0.0.1", port)

    async def _stop_session(self) -> None:
        await self.session.stop()
        if self.config.session.logout_on_shutdown:
            await self.session.logout()

    async def drain(self) -> None:
        """Graceful shutdown, first half: refuse new connections, give the requests in flight up
        to ``drain_timeout`` seconds, cut the rest. :meth:`stop` then persists and closes."""
        timeout = self.drain_seconds
        self._draining = True  # /readyz turns 503 for the rest of the process's life
        for front in self._fronts:
            await front.stop_accepting()
        log.info(
            "sidecar.draining",
            extra={"in_flight": self.metrics.in_flight_now(), "drain_timeout": timeout},
        )
        started = self.clock.monotonic()
        await asyncio.gather(*(front.drain(timeout) for front in self._fronts))
        log.info(
            "sidecar.drained",
            extra={"seconds": round(self.clock.monotonic() - started, 3)},
        )

    async def reload(self, config: Config) -> None:
        """Apply a new configuration to the running process (SIGHUP).

        Live: the upstream section (a new pool and TLS context: certificate files are read
        again), header rules, refresh rules, the log level, and the identity. The
        session is kept when the identity's fingerprint is unchanged; another identity starts a
        new session. Keys of sections a running process cannot change are logged as needing a
        restart.
        """
        old = self.config
        pending = [
            f"{section}.{key}"
            for section in RESTART_SECTIONS
            for key, value in getattr(config, section)
            if getattr(getattr(old, section), key) != value
            and key not in LIVE_KEYS
            and key not in LIVE_CALLER_KEYS
        ]
        if config.log.access_log != old.log.access_log:
            pending.append("log.access_log")
        if config.log.format != old.log.format:
            pending.append("log.format")
        current = self.session.identity
        identity: IdentityProvider = current
        if not _demo_identity(old):
            identity = await self._provider(config.identity)
            if self.session.store.shared and identity.fingerprint != current.fingerprint:
                # replicas find their shared session by identity: all must restart together
                identity = current
                pending.append("identity (with a shared store)")
        changed = identity.fingerprint != current.fingerprint
        # the key files as they are now (a rotated Secret behind the same path counts), read
        # before anything changes: a bad key file leaves the running config as it was
        sealer = await asyncio.to_thread(sealer_for, config.session, identity.fingerprint)
        rekey = not changed and not same_keys(sealer, self._sealer)
        if rekey and self.session.store.shared:  # peers read what is stored: it must still open
            await cast(SharedStore, self.session.store).check_sealer(sealer)
        # a new identity gets its own store namespace (and encryption context); the store's
        # other keys need a restart, so it is opened as the running config says
        store = await open_store(old.session, identity.fingerprint, sealer) if changed else None
        try:
            await self.reconfigure_proxy(config)
        except BaseException:
            if store is not None:
                await self._close_quietly("store", store.aclose)
            raise
        logging.getLogger().setLevel(config.log.level.upper())
        self._drain = config.listen.drain_timeout
        replaced_store = self.session.store
        previous = await self.session.reconfigure(identity, config.refresh, store)
        if previous is not identity:
            await self._close_quietly("identity", previous.aclose)
        if store is not None:
            await self._close_quietly("store", replaced_store.aclose)
        if not rekey or await self.session.use_sealer(sealer, self._sealer):
            self._sealer = sealer
        self.config = config
        log.info(
            "sidecar.reloaded", extra={"identity_changed": changed, "upstream": self.upstream_url}
        )
        if pending:
            log.warning("sidecar.reload_needs_restart", extra={"keys": pending})

    def use_upstream(self, url: str) -> None:
        """Proxy to ``url`` (a worker's, before :meth:`open_proxy`: the supervisor's upstream,
        which may be the demo's echo upstream)."""
        self.upstream_url = url

    def mark_listening(self) -> None:
        """The proxy port accepts connections: /readyz may say ready. :meth:`open_proxy` marks it
        itself; under ``--workers``, the supervisor does once every worker accepts."""
        self.listening = True

    async def reload_proxy(self, config: Config, upstream_url: str) -> None:
        """A worker's share of a reload (SIGHUP): the proxy's sections
        (:meth:`reconfigure_proxy`, proxying to ``upstream_url``, the supervisor's) and the log
        level; ``config`` is the running config from then on. What reconfigure_proxy raises
        leaves everything as it was."""
        await self.reconfigure_proxy(config, upstream_url)
        logging.getLogger().setLevel(config.log.level.upper())
        self.config = config

    async def reconfigure_proxy(self, config: Config, upstream_url: str | None = None) -> None:
        """The proxy's share of a reload, and all of a worker's: the upstream section (a new
        pool) and the header rules, from the next request on. ``upstream_url`` overrides the
        config's (a worker takes the supervisor's, which may be the demo's echo upstream)."""
        url = upstream_url or config.upstream.url or self.upstream_url
        # read first (also where no proxy runs: the supervisor refuses a bad value file before
        # any worker sees it), so that an unreadable file changes nothing
        callers = await asyncio.to_thread(CallerPolicy.compile, config.listen)
        if self.proxy is not None:
            await self.proxy.reconfigure(config.upstream, url, self._rules(config, url))
            self.proxy.callers = callers
            self.proxy.capture_cookies = _capture(config, url, self._source)
        self.upstream_url = url

    async def _close_quietly(self, name: str, close: Closer) -> None:
        try:
            await close()
        except (OSError, StoreError, RuntimeError, IdentityError) as exc:
            log.error("sidecar.close_failed", extra={"part": name, "error": str(exc)})

    async def stop(self) -> None:
        """Close everything in reverse order of creation; log (not raise) failing closes."""
        while self._closers:
            name, close = self._closers.pop()
            await self._close_quietly(name, close)
        log.info("sidecar.stopped")


def _capture(config: Config, upstream_url: str, session: CredentialSource) -> CookieCapture | None:
    """What takes the upstream's cookies into the session's jar (upstream.capture_cookies)."""
    if not config.upstream.capture_cookies:
        return None
    return CookieCapture(upstream_url, session.capture_cookies)


def _token_sink(config: Config) -> TokenSink | None:
    """The token file sink of ``session.token_sink``, when configured."""
    sink = config.session.token_sink
    return None if sink is None else TokenSink(sink.path, sink.file_mode())


def _demo_identity(config: Config) -> bool:
    """True when the session comes from the embedded demo's provider."""
    return config.demo.enabled and config.identity.kind != "json_login"
