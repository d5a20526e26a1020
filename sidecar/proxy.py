"""The proxy on :8080: refuse what must not be forwarded, add credentials, stream both ways.

The proxy reads the session's current credentials and never talks to the identity provider or the
store itself. Every error it makes is JSON ``{"error": ..., "detail": ...}`` with
``X-Sidecar-Error: 1``: 503 without a valid session, 502 when the upstream refuses or resets, 504
on timeout, 4xx for requests it refuses. HTTP on the caller's side is :mod:`sidecar.front`'s, on
the upstream's side :mod:`sidecar.upstream`'s; this module decides what goes from one to the other.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from yarl import URL

from sidecar import tls
from sidecar.clock import Clock
from sidecar.config import Upstream
from sidecar.errors import RefusedRequest, SidecarError, UpstreamError
from sidecar.exchange import Request
from sidecar.headers import HeaderRules, caller_traceparent, trace_id
from sidecar.http_parts import (
    DROP,
    DROP_WITH_LENGTH,
    check_target,
    error_parts,
    limited,
    reason_phrase,
    response_head,
)
from sidecar.logs import write_access
from sidecar.metrics import Metrics
from sidecar.session import Credentials
from sidecar.upstream import UpstreamBroken, UpstreamPool, UpstreamResponse

if TYPE_CHECKING:
    from sidecar.tracing import SpanExporter

log = logging.getLogger(__name__)


class CredentialSource(Protocol):
    """What the proxy reads: the session manager, or a worker's view of its supervisor's."""

    current: Credentials | None
    last_api_call_at: float | None

    async def credentials(self) -> Credentials:
        """Valid credentials, waiting for a login/refresh if needed; NoSessionError if none."""

    async def reactive_refresh(self, used: Credentials) -> Credentials | None:
        """New credentials after the upstream rejected ``used``, or None."""


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
        spans: SpanExporter | None = None,
    ) -> None:
        self._session = session
        self._metrics = metrics
        self._clock = clock
        #: write an access line per request (``log.access_log``)
        self.access_log = access_log
        #: where a span per request goes (``tracing.otlp_endpoint``), or None
        self.spans = spans
        self._pool: UpstreamPool | None = None
        #: the upstream TLS files as the current pool read them, and the task that looks again
        self._stamp: tls.Stamp = ()
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
        self._host = host
        self._rules = rules

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
            # the stamp first: a file that changes while the context is built is seen next time
            self._stamp = await asyncio.to_thread(tls.file_stamp, cfg.tls)
            ssl_ctx = await asyncio.to_thread(tls.tls_context, cfg.tls)
            if tls.has_files(cfg.tls) and self._watcher is None:
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
        )

    async def _watch_tls(self) -> None:
        """Every ``tls.RECHECK_EVERY`` seconds: when the upstream's certificate, key or CA file
        changed, build a new pool with them (as a SIGHUP would). A change that cannot be read
        (a half-written pair) is logged once and tried again at the next change."""
        while True:
            await self._clock.sleep(tls.RECHECK_EVERY)
            async with self._rebuilding:  # the config as it is now, not as a SIGHUP left it
                cfg = self._config
                if URL(self._base).scheme != "https":
                    continue
                stamp = await asyncio.to_thread(tls.file_stamp, cfg.tls)
                if stamp == self._stamp:
                    continue
                try:
                    await self._reconfigure(cfg, self._base, self._rules)
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    self._stamp = stamp
                    log.error(
                        "proxy.tls_reload_failed",
                        extra={"error": str(exc), "kept": "the certificates read before"},
                    )
                    continue
            log.info("proxy.tls_reloaded", extra={"upstream": self._base})

    async def aclose(self) -> None:
        """Close the pooled upstream connections (and stop looking at the TLS files)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._pool is not None:
            self._pool.close()

    async def handle(self, request: Request) -> None:
        """Answer one request: measure, count, log, and turn our errors into responses."""
        metrics = self._metrics
        started = self._clock.monotonic()
        metrics.in_flight.inc()
        made = False  # the status is sidecar's own answer, not the upstream's
        try:
            await self._forward(request)
        except SidecarError as exc:
            if isinstance(exc, UpstreamError):
                log.warning(
                    "proxy.upstream_failed",
                    extra={"error": str(exc), "code": exc.code, "request_id": request.request_id},
                )
            elif isinstance(exc, RefusedRequest):
                # the same one quiet line as the front's own refusals (README, troubleshooting)
                log.warning(
                    "proxy.refused_request",
                    extra={"status": exc.http_status, "code": exc.code, "detail": str(exc)[:200]},
                )
            made = self._error(request, exc.http_status, exc.code, str(exc))
        except ConnectionError:
            request.conn.abort()  # the caller went away
        except Exception:
            log.exception("proxy.internal_error", extra={"request_id": request.request_id})
            made = self._error(request, 500, "internal_error", "the proxy failed; see its log")
        finally:
            metrics.in_flight.dec()
            # no status: the caller left before any answer (nginx's 499), not a server error
            status = request.status or 499
            elapsed = self._clock.monotonic() - started
            source = "sidecar" if made or not request.status else "upstream"
            metrics.count_request(request.method, status, source)
            metrics.observe_duration(elapsed)
            if self.access_log:
                write_access(
                    request.method,
                    request.raw_path,
                    status,
                    elapsed,
                    request.request_id,
                    request.sent,
                    trace_id(request),
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

    def _error(self, request: Request, status: int, code: str, detail: str) -> bool:
        """Answer with sidecar's own error; False when the upstream's answer had begun."""
        if request.started:
            request.conn.abort()  # the answer began: a truncated one must not look complete
            return False
        head, body = error_parts(status, code, detail, request.request_id)
        request.respond(status, reason_phrase(status), head, body)
        return True

    async def _credentials(self) -> Credentials:
        """The session snapshot: a plain attribute read while the token is valid."""
        session = self._session
        creds = session.current
        now = self._clock.time()
        if creds is not None and now < creds.expires_at:
            session.last_api_call_at = now
            return creds
        return await session.credentials()

    async def _forward(self, request: Request) -> None:
        method = request.method
        if method == "CONNECT":
            raise RefusedRequest(
                "CONNECT is not supported: sidecar is not a forward proxy",
                status=405,
                code="connect_refused",
            )
        raw_path = request.raw_path
        check_target(raw_path)
        creds = await self._credentials()
        line = f"{method} {self._prefix}{raw_path} HTTP/1.1\r\nHost: {self._host}\r\n".encode(
            "latin-1"
        )
        if request.upgrade:
            if request.wants_websocket():
                await self._tunnel(request, line, creds)
                return
            # any other switch (h2c, ...) would carry requests past our header rules: answered
            # as plain HTTP/1.1 (Upgrade is hop-by-hop, never forwarded), then the connection ends
            request.keep_alive = False

        replayable = True
        chunked = False
        body: Any = None
        framing = b""
        stream = request.body
        if stream is not None:
            cfg = self._config
            limit = cfg.max_request_body
            length = request.length
            if limit is not None and (length or 0) > limit:
                raise RefusedRequest(
                    f"request body larger than {limit} bytes", status=413, code="body_too_large"
                )
            expect = request.header(b"expect")
            if expect is not None and expect.lower() == b"100-continue":
                # the caller waits for this before sending its body (RFC 9110 10.1.1)
                request.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if length is not None and length <= cfg.replay_body_limit:
                body = await stream.read()
                framing = b"Content-Length: %d\r\n" % len(body)
            else:
                body = stream if limit is None or length is not None else limited(stream, limit)
                replayable = False
                if length is None:
                    chunked = True
                    framing = b"Transfer-Encoding: chunked\r\n"
                else:
                    framing = b"Content-Length: %d\r\n" % length
        elif method in ("POST", "PUT", "PATCH"):
            framing = b"Content-Length: 0\r\n"
        upstream = await self._send(request, line, creds, framing, body, chunked)
        if upstream.status == 401 and replayable:
            fresh = await self._session.reactive_refresh(creds)
            if fresh is not None:
                upstream.release()
                upstream = await self._send(request, line, fresh, framing, body, chunked)
        await self._relay(request, upstream)

    async def _send(
        self,
        request: Request,
        line: bytes,
        creds: Credentials,
        framing: bytes,
        body: Any,
        chunked: bool,
        *,
        upgrade: bool = False,
    ) -> UpstreamResponse:
        head, request.request_id, request.traceparent = self._rules.head(
            line, request.headers, creds, framing
        )
        assert self._pool is not None
        return await self._pool.request(
            head, body, head_only=request.method == "HEAD", chunked=chunked, upgrade=upgrade
        )

    async def _relay(self, request: Request, upstream: UpstreamResponse) -> None:
        """Pass the upstream's response on: in one piece when it has fully arrived, else streamed.

        When the upstream fails mid-body, the caller's connection is cut: a truncated body must not
        pass for a complete one.
        """
        status = upstream.status
        reason = upstream.reason or reason_phrase(status)
        body = upstream.body_if_complete()
        if body is not None and request.method != "HEAD":
            upstream.release()
            request.respond(status, reason, response_head(upstream.headers, DROP_WITH_LENGTH), body)
            return
        head = response_head(upstream.headers, DROP)
        if request.method == "HEAD" or status in (204, 304):
            upstream.release()
            request.start(status, reason, head, chunked=False)
            return
        known = any(n.lower() == b"content-length" for n, _ in upstream.headers)
        # without a length: chunked to an HTTP/1.1 caller, else delimited by closing
        chunked = not known and request.version == "1.1"
        if not known and not chunked:
            request.keep_alive = False
        request.start(status, reason, head, chunked=chunked)
        await self._pump(request, upstream, chunked)

    async def _pump(self, request: Request, upstream: UpstreamResponse, chunked: bool) -> None:
        """Copy the upstream's body (or tunnel bytes) to the caller, with backpressure."""
        try:
            async for chunk in upstream.iter_body():
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
            request.conn.write(b"0\r\n\r\n")

    async def _tunnel(self, request: Request, line: bytes, creds: Credentials) -> None:
        """An ``Upgrade`` (WebSocket): ask the upstream with our headers; after its 101, copy
        raw bytes both ways until either side closes (RFC 9110 7.8)."""
        protocol = request.header(b"upgrade") or b""
        framing = b"Connection: Upgrade\r\nUpgrade: " + protocol + b"\r\n"
        upstream = await self._send(
            request, line, creds, framing, request.body, False, upgrade=True
        )
        if upstream.status != 101:
            request.keep_alive = False
            await self._relay(request, upstream)
            return
        head = response_head(upstream.headers, DROP)
        switched = next((v for n, v in upstream.headers if n.lower() == b"upgrade"), protocol)
        head += b"Connection: Upgrade\r\nUpgrade: " + switched + b"\r\n"
        request.start(101, upstream.reason or "Switching Protocols", head, chunked=False)
        try:
            await self._pump(request, upstream, False)
        finally:
            upstream.close()
