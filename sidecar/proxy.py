"""The proxy on :8080: refuse what must not be forwarded, add credentials, stream both ways.

The proxy reads the session's current credentials and never talks to the identity provider or the
store itself. Every error it makes is JSON ``{"error": ..., "detail": ...}`` with
``X-Sidecar-Error: 1``: 503 without a valid session, 502 when the upstream refuses or resets, 504
on timeout, 4xx for requests it refuses. HTTP on the caller's side is :mod:`sidecar.front`'s, on
the upstream's side :mod:`sidecar.upstream`'s; this module decides what goes from one to the other.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote

from yarl import URL

from sidecar import tls
from sidecar.clock import Clock
from sidecar.config import Upstream
from sidecar.errors import RefusedRequest, SidecarError, UpstreamError
from sidecar.exchange import Request
from sidecar.headers import HOP_BY_HOP, HeaderRules
from sidecar.logs import write_access
from sidecar.metrics import Metrics
from sidecar.session import Credentials
from sidecar.upstream import UpstreamBroken, UpstreamPool, UpstreamResponse

log = logging.getLogger(__name__)


def error_parts(
    status: int, code: str, detail: str, request_id: str | None = None
) -> tuple[bytes, bytes]:
    """A proxy-made error's header lines and JSON body (``X-Sidecar-Error: 1`` marks it)."""
    extra = b"" if request_id is None else b"X-Request-ID: %b\r\n" % request_id.encode("latin-1")
    body = json.dumps({"error": code, "detail": detail}).encode()
    return b"Content-Type: application/json; charset=utf-8\r\nX-Sidecar-Error: 1\r\n" + extra, body


def refusal_bytes(status: int, code: str, detail: str) -> bytes:
    """A whole error response for a request the front refused; the connection closes after it."""
    head, body = error_parts(status, code, detail)
    return b"HTTP/1.1 %d %s\r\n%bContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (
        status,
        _reason(status).encode(),
        head,
        len(body),
        body,
    )


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def check_target(raw_path: str) -> None:
    """Refuse request targets that are not origin-form or that climb out of the path prefix.

    Absolute-form (``GET http://other/``) and asterisk-form targets would make us an open proxy or
    are meaningless here; ``.`` and ``..`` segments, also percent-encoded, could leave the
    upstream's path prefix once the upstream normalises them.
    """
    if not raw_path.startswith("/") or raw_path.startswith("//"):
        raise RefusedRequest(
            "only origin-form request targets (/path?query) are accepted: sidecar forwards to its "
            "one configured upstream and is not a forward proxy",
            status=400,
            code="target_refused",
        )
    path = raw_path.split("?", 1)[0]
    if "." not in path and "%" not in path:
        return  # no dot segment can hide in it (the common case, checked without decoding)
    decoded = unquote(unquote(path))  # twice: %252e%252e decodes to .. at a lenient upstream
    if any(seg in (".", "..") for seg in decoded.replace("\\", "/").split("/")):
        raise RefusedRequest(
            "dot segments are not allowed in the path", status=400, code="path_traversal_refused"
        )


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
    ) -> None:
        self._session = session
        self._metrics = metrics
        self._clock = clock
        #: write an access line per request (``log.access_log``)
        self.access_log = access_log
        self._pool: UpstreamPool | None = None
        #: the upstream TLS files as the current pool read them, and the task that looks again
        self._stamp: tls.Stamp = ()
        self._watcher: asyncio.Task[None] | None = None
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
            await asyncio.sleep(tls.RECHECK_EVERY)
            cfg = self._config
            if URL(self._base).scheme != "https":
                continue
            stamp = await asyncio.to_thread(tls.file_stamp, cfg.tls)
            if stamp == self._stamp:
                continue
            try:
                await self.reconfigure(cfg, self._base, self._rules)
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
            self._error(request, exc.http_status, exc.code, str(exc))
        except ConnectionError:
            request.conn.abort()  # the caller went away
        except Exception:
            log.exception("proxy.internal_error", extra={"request_id": request.request_id})
            self._error(request, 500, "internal_error", "the proxy failed; see its log")
        finally:
            metrics.in_flight.dec()
            status = request.status or 500
            elapsed = self._clock.monotonic() - started
            metrics.count_request(request.method, status)
            metrics.observe_duration(elapsed)
            if self.access_log:
                write_access(
                    request.method,
                    request.raw_path,
                    status,
                    elapsed,
                    request.request_id,
                    request.sent,
                )

    def _error(self, request: Request, status: int, code: str, detail: str) -> None:
        if request.started:
            request.conn.abort()  # the answer began: a truncated one must not look complete
            return
        head, body = error_parts(status, code, detail, request.request_id)
        request.respond(status, _reason(status), head, body)

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
                body = stream if limit is None or length is not None else _limited(stream, limit)
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
        head, request_id = self._rules.head(line, request.headers, creds, framing)
        request.request_id = request_id
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
        reason = upstream.reason or _reason(status)
        body = upstream.body_if_complete()
        if body is not None and request.method != "HEAD":
            upstream.release()
            request.respond(
                status, reason, response_head(upstream.headers, _DROP_WITH_LENGTH), body
            )
            return
        head = response_head(upstream.headers, _DROP)
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
        head = response_head(upstream.headers, _DROP)
        switched = next((v for n, v in upstream.headers if n.lower() == b"upgrade"), protocol)
        head += b"Connection: Upgrade\r\nUpgrade: " + switched + b"\r\n"
        request.start(101, upstream.reason or "Switching Protocols", head, chunked=False)
        try:
            await self._pump(request, upstream, False)
        finally:
            upstream.close()


_DROP = frozenset(h.encode() for h in HOP_BY_HOP)
_DROP_WITH_LENGTH = _DROP | {b"content-length"}


#: Connection tokens that name no other header (they are hop-by-hop themselves)
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b""})


def response_head(raw: list[tuple[bytes, bytes]], drop: frozenset[bytes]) -> bytes:
    """The upstream's response header lines minus ``drop`` (lower-case names) and minus those the
    upstream's Connection header names (RFC 9110 7.6.1)."""
    lines = []
    listed: set[bytes] | None = None
    for name, value in raw:
        lname = name.lower()
        if lname in drop:
            if lname == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")} - _PLAIN_CONNECTION
                if tokens:
                    listed = tokens if listed is None else listed | tokens
            continue
        lines.append(name + b": " + value + b"\r\n")
    if listed:
        return b"".join(line for line in lines if line.split(b":", 1)[0].lower() not in listed)
    return b"".join(lines)


async def _limited(body: AsyncIterable[bytes], limit: int) -> AsyncIterator[bytes]:
    """Pass a chunked body through until it grows past ``limit`` bytes, then refuse it (the
    upstream connection is aborted, so the upstream never takes it for complete)."""
    seen = 0
    async for chunk in body:
        seen += len(chunk)
        if seen > limit:
            raise RefusedRequest(
                f"request body larger than {limit} bytes", status=413, code="body_too_large"
            )
        yield chunk
