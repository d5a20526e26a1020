"""The proxy on :8080: refuse what must not be forwarded, add credentials, stream both ways.

The proxy reads the session's current credentials and never talks to the identity provider or the
store itself. Every error it makes is JSON ``{"error": ..., "detail": ...}`` with
``X-Sidecar-Error: 1``: 503 without a valid session, 502 when the upstream refuses or resets, 504
on timeout, 4xx for requests it refuses. HTTP on the caller's side is
:mod:`sidecar.http.connection`'s, on the upstream's side :mod:`sidecar.http.client`'s; this module
decides what goes from one to the other.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from yarl import URL

from sidecar import tls
from sidecar.clock import Clock
from sidecar.config.models import Upstream
from sidecar.errors import (
    RefusedRequest,
    SidecarError,
    UpstreamBroken,
    UpstreamError,
    UpstreamUnavailable,
)
from sidecar.http.client import UpstreamPool, UpstreamResponse
from sidecar.http.egress import Egress
from sidecar.http.exchange import Request
from sidecar.http.wire import (
    CHUNKED,
    CODED,
    CONTENT_LENGTH,
    DROP,
    DROP_WITH_LENGTH,
    EXPECT_CONTINUE,
    LAST_CHUNK,
    NO_BODY,
    UPGRADE_TO,
    Limited,
    Relocation,
    check_target,
    error_parts,
    has_length,
    reason_phrase,
    refusal_bytes,
    request_line,
    response_head,
    says_invalid_token,
    upgrade_protocol,
)
from sidecar.logs import write_access
from sidecar.metrics import Metrics
from sidecar.proxy.callers import CallerPolicy
from sidecar.proxy.headers import HeaderRules, caller_traceparent, trace_id
from sidecar.tokens import Credentials

if TYPE_CHECKING:
    from sidecar.proxy.tracing import SpanExporter

log = logging.getLogger("sidecar.proxy")

#: RFC 9110 9.2.2: sending these twice means the same as sending them once
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class CredentialSource(Protocol):
    """What the proxy reads: the session manager, or a worker's view of its supervisor's."""

    current: Credentials | None
    last_api_call_at: float | None

    async def credentials(self) -> Credentials:
        """Valid credentials, waiting for a login/refresh if needed; NoSessionError if none."""

    async def reactive_refresh(self, used: Credentials) -> Credentials | None:
        """New credentials after the upstream rejected ``used``, or None."""

    def capture_cookies(self, set_cookies: Sequence[str], host: str, path: str) -> None:
        """Keep the upstream's ``Set-Cookie`` values (upstream.capture_cookies) in the jar."""


class Proxy:
    """Forwards requests to one upstream origin with the session's credentials."""

    def __init__(
        self,
        upstream: Upstream,
        upstream_url: str,
        session: CredentialSource,
        rules: HeaderRules,
        metrics: Metrics,
        clock: Clock,
        *,
        access_log: bool = True,
        callers: CallerPolicy,
        egress: Egress | None = None,
        spans: SpanExporter | None = None,
        tls_recheck_every: float = tls.RECHECK_EVERY,
    ) -> None:
        #: who may call (the ``listen`` rules); a reload replaces it
        self.callers = callers
        self._session = session
        #: HTTPS_PROXY / HTTP_PROXY / NO_PROXY, the process environment's unless given
        self._egress = egress if egress is not None else Egress(os.environ)
        #: upstream.capture_cookies (None when off): each answer's Set-Cookie into the jar
        self.capture_cookies: Callable[[Sequence[tuple[bytes, bytes]], str], None] | None = None
        self._metrics = metrics
        self._clock = clock
        #: write an access line per request (``log.access_log``)
        self.access_log = access_log
        #: where a span per request goes (``tracing.otlp_endpoint``), or None
        self.spans = spans
        self._pool: UpstreamPool | None = None
        #: the upstream TLS files as the current pool read them, and the task that looks again
        #: every ``tls_recheck_every`` seconds
        self._tls: tls.TLSFiles | None = None
        self._tls_recheck_every = tls_recheck_every
        self._watcher: asyncio.Task[None] | None = None
        #: a SIGHUP and a certificate rotation must not build pools at the same time
        self._rebuilding = asyncio.Lock()
        self._target(upstream, upstream_url, rules)

    def _target(self, upstream: Upstream, upstream_url: str, rules: HeaderRules) -> None:
        self._config = upstream
        self._base = upstream_url.rstrip("/")
        url = URL(self._base)
        self._prefix = url.raw_path.rstrip("/")
        host = url.raw_host or ""
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        if not url.is_default_port():
            host += f":{url.port}"
        #: the request line and Host field, filled with each request's method and target
        self._line = request_line(self._prefix, host)
        self._rules = rules
        #: absolute Location values naming the upstream are turned back toward the caller
        self._relocation = Relocation(url) if upstream.rewrite_location else None

    async def reconfigure(self, upstream: Upstream, upstream_url: str, rules: HeaderRules) -> None:
        """Forward with a new upstream section and header rules from the next request on.

        A new pool (and TLS context, so certificate and key files are read again) replaces the
        old one; requests in flight finish on their old connections, which are then closed.
        """
        async with self._rebuilding:
            await self._reconfigure(upstream, upstream_url, rules)

    async def _reconfigure(self, upstream: Upstream, upstream_url: str, rules: HeaderRules) -> None:
        old_pool = self._pool
        before = (self._config, self._base, self._rules)
        self._target(upstream, upstream_url, rules)
        try:
            await self.start()
        except BaseException:
            self._target(*before)  # e.g. an unreadable certificate: keep forwarding as before
            raise
        if old_pool is not None:
            old_pool.close()

    async def start(self) -> None:
        """Open the keep-alive pool toward the upstream."""
        cfg = self._config
        url = URL(self._base)
        ssl_ctx = None
        if url.scheme == "https":
            files = tls.TLSFiles(cfg.tls, self._clock, self._tls_recheck_every)
            ssl_ctx = await files.context()
            self._tls = files
            if files.watched and self._watcher is None:
                self._watcher = asyncio.get_running_loop().create_task(self._watch_tls())
        self._pool = UpstreamPool(
            url.raw_host or "",
            url.port or 80,
            ssl_ctx,
            connect_timeout=cfg.timeout.connect,
            # total bounds the wait for the response head; while a body streams, the same
            # figure bounds each silence, so a long download is not cut off while data flows
            head_timeout=cfg.timeout.total,
            max_idle=cfg.pool_size,
            via=self._egress.proxy_for(url),
        )

    async def _watch_tls(self) -> None:
        """Every ``tls_recheck_every`` seconds: when the upstream's certificate, key or CA file
        changed, build a new pool with them (as a SIGHUP would). A change that cannot be read
        (a half-written pair) is logged once and tried again at the next change."""
        while True:
            await self._clock.sleep(self._tls_recheck_every)
            async with self._rebuilding:  # the config as it is now, not as a SIGHUP left it
                reloaded = await self._reload_changed_tls()
            if reloaded:
                log.info("proxy.tls_reloaded", extra={"upstream": self._base})

    async def _reload_changed_tls(self) -> bool:
        """A new pool when the upstream's TLS files changed; True when one was built."""
        files = self._tls
        if URL(self._base).scheme != "https" or files is None or not await files.changed():
            return False
        try:
            await self._reconfigure(self._config, self._base, self._rules)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.error(
                "proxy.tls_reload_failed",
                extra={"error": str(exc), "kept": "the certificates read before"},
            )
            return False
        return True

    async def aclose(self) -> None:
        """Close the pooled upstream connections (and stop looking at the TLS files)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._pool is not None:
            self._pool.close()

    async def handle(self, request: Request, *, unix: bool = False) -> None:
        """Answer one request: measure, count, log, and turn our errors into responses.
        ``unix``: it came over the Unix socket (no Host check, see :mod:`sidecar.proxy.callers`)."""
        metrics = self._metrics
        started = self._clock.monotonic()
        metrics.request_started()
        made = False  # the status is sidecar's own answer, not the upstream's
        try:
            self.callers.check(request, any_host=unix)
            method = request.method
            if method == "CONNECT":
                raise RefusedRequest(
                    "CONNECT is not supported: sidecar is not a forward proxy",
                    status=405,
                    code="connect_refused",
                )
            raw_path = request.raw_path
            check_target(raw_path)
            creds = self._usable()
            if creds is None:
                creds = await self._session.credentials()
            line = (self._line % (method, raw_path)).encode("latin-1")
            if request.upgrade:
                if request.wants_websocket():
                    await self._tunnel(request, line, creds)
                    return
                # any other switch (h2c, ...) would carry requests past our header rules: answered
                # as plain HTTP/1.1 with its body (Upgrade is hop-by-hop, never forwarded), then the
                # connection ends (the front read no further than that body)
                request.keep_alive = False

            replayable = True
            chunked = False
            body: Any = None
            framing = b""
            on_continue = None
            stream = request.body
            if stream is not None:
                cfg = self._config
                limit = cfg.max_request_body
                length = request.length
                if limit is not None and (length or 0) > limit:
                    raise RefusedRequest(
                        f"request body larger than {limit} bytes", status=413, code="body_too_large"
                    )
                # the caller waits for an interim 100 before sending its body (an HTTP/1.0
                # request's expectation is ignored: no 1xx ever goes to it, RFC 9110 10.1.1)
                expects = stream.expects_continue and not stream.done
                if length is not None and length <= cfg.replay_body_limit:
                    if expects:
                        request.send_continue()  # buffered for a replay: we take the body
                    body = await stream.read()
                    framing = CONTENT_LENGTH % len(body)
                else:
                    body = stream if limit is None or length is not None else Limited(stream, limit)
                    replayable = False
                    if length is None:
                        chunked = True
                        framing = CHUNKED
                    else:
                        framing = CONTENT_LENGTH % length
                    if expects:
                        # streamed: the upstream decides, so that its early refusal (413, 401)
                        # reaches the caller before the body is sent; its 100 is relayed
                        framing += EXPECT_CONTINUE
                        on_continue = request.send_continue
            elif method in ("POST", "PUT", "PATCH"):
                framing = NO_BODY
            upstream = await self._send(request, line, creds, framing, body, chunked, on_continue)
            if upstream.status == 401 and replayable and self._may_replay(method, upstream):
                try:
                    fresh = await self._session.reactive_refresh(creds)
                except BaseException:
                    upstream.close()  # neither pooled nor relayed: it must not stay open
                    raise
                if fresh is not None:
                    upstream.release()
                    upstream = await self._send(request, line, fresh, framing, body, chunked)
            if not self._relay_whole(request, upstream):
                await self._relay(request, upstream)
        except SidecarError as exc:
            if isinstance(exc, UpstreamError):
                log.warning(
                    "proxy.upstream_failed",
                    extra={"error": str(exc), "code": exc.code, "request_id": request.request_id},
                )
            elif isinstance(exc, RefusedRequest):
                self._refused(exc)
            made = self._error(request, exc.http_status, exc.code, str(exc))
        except ConnectionError:
            request.conn.abort()  # the caller went away
        except Exception:
            log.exception("proxy.internal_error", extra={"request_id": request.request_id})
            made = self._error(request, 500, "internal_error", "the proxy failed; see its log")
        finally:
            # no status: the caller left before any answer (nginx's 499), not a server error
            status = request.status or 499
            elapsed = self._clock.monotonic() - started
            source = "sidecar" if made or not request.status else "upstream"
            metrics.request_finished(request.method, status, source, elapsed)
            if self.access_log:
                write_access(
                    request.method,
                    request.raw_path,
                    status,
                    elapsed,
                    request.request_id,
                    request.sent,
                    # of the traceparent sent upstream; without one, trace_id finds the caller's
                    sent[3:35] if (sent := request.traceparent) is not None else trace_id(request),
                )
            if self.spans is not None:
                self.spans.proxied(
                    request.method,
                    request.raw_path,
                    status,
                    source,
                    request.traceparent,
                    caller_traceparent(request),
                    elapsed,
                )

    def front_refusal(self, refused: RefusedRequest) -> bytes:
        """The whole answer to a request (or connection) the front refused before it was handled
        (malformed, too large, too many connections...); the connection closes after it."""
        detail = self._refused(refused)
        return refusal_bytes(refused.http_status, refused.code, detail)

    def _refused(self, refused: RefusedRequest) -> str:
        """Count and log a refusal, the front's and the proxy's alike: one quiet line each
        (``proxy.refused_request``, docs/operations.md), never a traceback. Returns the detail
        as shown (bounded: it may quote what the caller sent)."""
        detail = str(refused)[:200]
        self._metrics.request_refused(refused.code)
        log.warning(
            "proxy.refused_request",
            extra={"status": refused.http_status, "code": refused.code, "detail": detail},
        )
        return detail

    def _error(self, request: Request, status: int, code: str, detail: str) -> bool:
        """Answer with sidecar's own error; False when the upstream's answer had begun."""
        if request.started:
            request.conn.abort()  # the answer began: a truncated one must not look complete
            return False
        head, body = error_parts(status, code, detail, request.request_id)
        request.respond(status, reason_phrase(status), head, body)
        return True

    def _usable(self) -> Credentials | None:
        """The session snapshot when its token is valid (a plain attribute read), else None:
        then :meth:`CredentialSource.credentials` waits for one. Not a coroutine: the common
        case needs no await."""
        session = self._session
        creds = session.current
        now = self._clock.time()
        if creds is not None and creds.usable_at(now):
            session.last_api_call_at = now
            return creds
        return None

    @staticmethod
    def _may_replay(method: str, upstream: UpstreamResponse) -> bool:
        """Whether a 401 leads to a reactive refresh and a replay with the new token.

        Only when sending the request twice is harmless (an idempotent method), or when the
        upstream says the token itself was refused (``WWW-Authenticate: Bearer
        error="invalid_token"``, RFC 6750 3.1), so the first request did nothing. Any other 401
        (an application's own "not allowed") reaches the caller as it is, and the session keeps
        its token.
        """
        return method in IDEMPOTENT or says_invalid_token(upstream.headers)

    def _send(
        self,
        request: Request,
        line: bytes,
        creds: Credentials,
        framing: bytes,
        body: Any,
        chunked: bool,
        on_continue: Callable[[], None] | None = None,
        *,
        upgrade: bool = False,
    ) -> Coroutine[Any, Any, UpstreamResponse]:
        """The request head with our headers; returns the pool's exchange to await (this is no
        coroutine itself: one frame less per request)."""
        head, request.request_id, request.traceparent = self._rules.head(
            line, request.headers, creds, framing
        )
        pool = self._pool
        if pool is None:
            raise UpstreamUnavailable("the proxy is not started")
        return pool.request(
            head,
            body,
            head_only=request.method == "HEAD",
            chunked=chunked,
            upgrade=upgrade,
            on_continue=on_continue,
            idempotent=request.method in IDEMPOTENT,
        )

    def _relay_whole(self, request: Request, upstream: UpstreamResponse) -> bool:
        """Pass the upstream's response on in one piece when it has fully arrived (a small
        answer: the common case, without a coroutine); False when it is to be streamed by
        :meth:`_relay`."""
        if self.capture_cookies is not None:
            self.capture_cookies(upstream.headers, self._prefix + request.raw_path)
        if upstream.codings or request.method == "HEAD":
            return False
        body = upstream.body_if_complete()
        if body is None:
            return False
        upstream.release()
        status = upstream.status
        head = response_head(upstream.headers, DROP_WITH_LENGTH, self._relocation, request.headers)
        request.respond(status, upstream.reason or reason_phrase(status), head, body)
        return True

    async def _relay(self, request: Request, upstream: UpstreamResponse) -> None:
        """Pass the upstream's response on, streamed (after :meth:`_relay_whole` declined it).

        When the upstream fails mid-body, the caller's connection is cut: a truncated body must not
        pass for a complete one.
        """
        status = upstream.status
        reason = upstream.reason or reason_phrase(status)
        relocation = self._relocation
        codings = upstream.codings
        head = response_head(upstream.headers, DROP, relocation, request.headers)
        if request.method == "HEAD" or status in (204, 304):
            upstream.release()
            request.start(status, reason, head, chunked=False)
            return
        if codings:
            # a body under codings besides chunked (RFC 9112 6.1) keeps them: re-framed chunked
            # after them; HTTP/1.0 has no transfer codings to carry them
            if request.version != "1.1":
                upstream.close()
                raise UpstreamUnavailable(
                    "the upstream's answer uses a transfer coding an HTTP/1.0 caller cannot take"
                )
            request.start(status, reason, head + CODED % codings, chunked=False)
            await self._pump(request, upstream, True)
            return
        known = has_length(upstream.headers)
        # without a length: chunked to an HTTP/1.1 caller, else delimited by closing
        chunked = not known and request.version == "1.1"
        if not known and not chunked:
            request.keep_alive = False
        request.start(status, reason, head, chunked=chunked)
        await self._pump(request, upstream, chunked)

    async def _pump(self, request: Request, upstream: UpstreamResponse, chunked: bool) -> None:
        """Copy the upstream's body (or tunnel bytes) to the caller, with backpressure."""
        try:
            while (chunk := await upstream.next_chunk()) is not None:
                await request.send(chunk, chunked)
        except UpstreamBroken as exc:
            upstream.close()
            log.warning(
                "proxy.upstream_broke_mid_response",
                extra={"error": str(exc), "request_id": request.request_id},
            )
            request.conn.abort()
            return
        except BaseException:
            upstream.close()  # the caller left: the upstream connection is not reusable
            raise
        upstream.release()
        if chunked:
            request.conn.write(LAST_CHUNK)

    async def _tunnel(self, request: Request, line: bytes, creds: Credentials) -> None:
        """An ``Upgrade`` (WebSocket): ask the upstream with our headers; after its 101, copy
        raw bytes both ways until either side closes (RFC 9110 7.8).

        Only the head goes first: the caller's following bytes wait for the 101. Any other
        answer is relayed and both connections close after it (the upstream's was never pooled):
        bytes the caller sent behind the head are never sent anywhere, not parsed as requests.
        """
        protocol = upgrade_protocol(request.headers) or b""
        framing = UPGRADE_TO % protocol
        upstream = await self._send(request, line, creds, framing, None, False, upgrade=True)
        if upstream.status != 101:
            request.keep_alive = False
            if not self._relay_whole(request, upstream):
                await self._relay(request, upstream)
            return
        head = response_head(upstream.headers, DROP)
        head += UPGRADE_TO % (upgrade_protocol(upstream.headers) or protocol)
        request.start(101, upstream.reason or "Switching Protocols", head, chunked=False)
        upstream.start_tunnel(request.body)
        try:
            await self._pump(request, upstream, False)
        finally:
            upstream.close()
