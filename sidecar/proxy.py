"""The proxy on :8080: refuse what must not be forwarded, add credentials, stream both ways.

The proxy reads the session's current credentials and never talks to the identity provider or the
store itself. Every error it makes is JSON ``{"error": ..., "detail": ...}`` with
``X-Sidecar-Error: 1``: 503 without a valid session, 502 when the upstream refuses or resets, 504
on timeout, 4xx for requests it refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.clock import Clock
from sidecar.config import Upstream
from sidecar.errors import (
    RefusedRequest,
    SidecarError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sidecar.headers import HOP_BY_HOP, REQUEST_ID, HeaderRules
from sidecar.logs import REQUEST_ID_KEY
from sidecar.metrics import Metrics
from sidecar.session import Credentials
from sidecar.tls import tls_context
from sidecar.upstream import UpstreamBroken, UpstreamPool, UpstreamResponse

log = logging.getLogger(__name__)

#: chunk size for streaming bodies: large enough to amortise per-write overhead
STREAM_CHUNK = 1 << 16

#: handshake headers that belong to each WebSocket leg separately (RFC 6455 4.1)
_WS_HANDSHAKE = {
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
    "sec-websocket-protocol",
}


def error_response(
    status: int, code: str, detail: str, request_id: str | None = None
) -> web.Response:
    """A proxy-made error: JSON body and ``X-Sidecar-Error: 1``."""
    headers = {"X-Sidecar-Error": "1"}
    if request_id:
        headers["X-Request-ID"] = request_id
    body = json.dumps({"error": code, "detail": detail})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


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
    ) -> None:
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self._pool: UpstreamPool | None = None
        self._client: aiohttp.ClientSession | None = None
        #: WebSocket clients of earlier configurations, closed with the proxy (their sockets
        #: may still carry live WebSockets)
        self._old_clients: list[aiohttp.ClientSession] = []
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
        old_pool, old_client = self._pool, self._client
        before = (self._config, self._base, self._rules)
        self._target(upstream, upstream_url, rules)
        try:
            await self.start()
        except BaseException:
            self._target(*before)  # e.g. an unreadable certificate: keep forwarding as before
            raise
        if old_pool is not None:
            old_pool.close()
        if old_client is not None:
            self._old_clients.append(old_client)

    async def start(self) -> None:
        """Open the keep-alive pool (and the WebSocket client) toward the upstream."""
        cfg = self._config
        url = URL(self._base)
        ssl_ctx = None
        if url.scheme == "https":
            ssl_ctx = await asyncio.to_thread(tls_context, cfg.tls)
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
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.pool_size, ssl=ssl_ctx or True),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=cfg.timeout.connect, sock_read=cfg.timeout.total
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # the caller's cookies are the caller's business
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()
        for client in [*self._old_clients, self._client]:
            if client is not None:
                await client.close()

    def server(self, **kwargs: Any) -> web.Server:
        """The low-level aiohttp server running this proxy (no router: every path is ours)."""
        return _ProxyServer(self.handle, **kwargs)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Entry point for every request: measure, count, and turn our errors into responses."""
        metrics = self._metrics
        started = self._clock.monotonic()
        metrics.in_flight.inc()
        status = 500
        try:
            response = await self._forward(request)
            status = response.status
            return response
        except SidecarError as exc:
            status = exc.http_status
            if isinstance(exc, UpstreamError):
                log.warning(
                    "proxy.upstream_failed",
                    extra={
                        "error": str(exc),
                        "code": exc.code,
                        "request_id": request.get(REQUEST_ID_KEY),
                    },
                )
            return error_response(exc.http_status, exc.code, str(exc), request.get(REQUEST_ID_KEY))
        finally:
            metrics.in_flight.dec()
            metrics.count_request(request.method, status)
            metrics.observe_duration(self._clock.monotonic() - started)

    async def _credentials(self) -> Credentials:
        """The session snapshot: a plain attribute read while the token is valid."""
        session = self._session
        creds = session.current
        now = self._clock.time()
        if creds is not None and now < creds.expires_at:
            session.last_api_call_at = now
            return creds
        return await session.credentials()

    async def _forward(self, request: web.BaseRequest) -> web.StreamResponse:
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
        if _is_websocket(request.headers):
            return await self._websocket(request, URL(self._base + raw_path, encoded=True), creds)

        replayable = True
        chunked = False
        body: Any = None
        framing = b""
        if request.body_exists:
            limit = self._config.max_request_body
            if limit is not None and (request.content_length or 0) > limit:
                raise RefusedRequest(
                    f"request body larger than {limit} bytes", status=413, code="body_too_large"
                )
            if request.headers.get("Expect", "").lower() == "100-continue":
                # the low-level server does not answer Expect itself (RFC 9110 10.1.1)
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            length = request.content_length
            if length is not None and length <= self._config.replay_body_limit:
                body = await request.read()
                framing = b"Content-Length: %d\r\n" % len(body)
            else:
                body = request.content.iter_chunked(STREAM_CHUNK)
                if limit is not None and length is None:
                    body = _limited(body, limit)
                replayable = False
                if length is None:
                    chunked = True
                    framing = b"Transfer-Encoding: chunked\r\n"
                else:
                    framing = b"Content-Length: %d\r\n" % length
        elif method in ("POST", "PUT", "PATCH"):
            framing = b"Content-Length: 0\r\n"
        request_line = f"{method} {self._prefix}{raw_path} HTTP/1.1\r\nHost: {self._host}\r\n"
        line = request_line.encode("latin-1")
        upstream = await self._send(request, line, creds, framing, body, chunked)
        if upstream.status == 401 and replayable:
            fresh = await self._session.reactive_refresh(creds)
            if fresh is not None:
                upstream.release()
                upstream = await self._send(request, line, fresh, framing, body, chunked)
        return await self._relay(request, upstream)

    async def _send(
        self,
        request: web.BaseRequest,
        line: bytes,
        creds: Credentials,
        framing: bytes,
        body: Any,
        chunked: bool,
    ) -> UpstreamResponse:
        head, request_id = self._rules.head(line, request.raw_headers, creds, framing)
        if request_id is not None:
            request[REQUEST_ID_KEY] = request_id
        assert self._pool is not None
        return await self._pool.request(
            head, body, head_only=request.method == "HEAD", chunked=chunked
        )

    async def _relay(
        self, request: web.BaseRequest, upstream: UpstreamResponse
    ) -> web.StreamResponse:
        """Pass the upstream's response on: in one piece when it has fully arrived, else streamed.

        When the upstream fails mid-body, the caller's connection is cut: a truncated body must not
        pass for a complete one.
        """
        headers = _response_headers(upstream.headers)
        body = upstream.body_if_complete()
        if body is not None and request.method != "HEAD":
            upstream.release()
            headers.popall("Content-Length", None)
            return web.Response(
                status=upstream.status, reason=upstream.reason or None, headers=headers, body=body
            )
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason or None, headers=headers
        )
        try:
            await response.prepare(request)
            async for chunk in upstream.iter_body():
                await response.write(chunk)
        except UpstreamBroken as exc:
            upstream.close()
            log.warning(
                "proxy.upstream_broke_mid_response",
                extra={"error": str(exc), "request_id": request.get(REQUEST_ID_KEY)},
            )
            _abort(request)
            return response
        except BaseException:
            upstream.close()  # the caller left: the upstream connection is not reusable
            raise
        upstream.release()
        await response.write_eof()
        return response

    async def _websocket(
        self, request: web.BaseRequest, url: URL, creds: Credentials
    ) -> web.StreamResponse:
        """Proxy a WebSocket: connect upstream first (with our headers), then accept the caller."""
        assert self._client is not None
        headers = self._rules.apply(request.headers, creds, url.path)
        request_id = headers.get(REQUEST_ID)
        if request_id is not None:
            request[REQUEST_ID_KEY] = request_id
        for name in list(headers):
            if name.lower() in _WS_HANDSHAKE:
                del headers[name]
        protocols = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        try:
            async with asyncio.timeout(self._config.timeout.total):
                upstream = await self._client.ws_connect(
                    url,
                    headers=headers,
                    protocols=protocols,
                    autoclose=False,
                    autoping=True,
                    max_msg_size=0,
                )
        except TimeoutError as exc:
            raise UpstreamTimeout("upstream did not accept the WebSocket in time") from exc
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamUnavailable(
                f"upstream refused the WebSocket (HTTP {exc.status})"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream WebSocket failed: {type(exc).__name__}") from exc
        front = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoclose=False,
            autoping=True,
            max_msg_size=0,
        )
        try:
            await front.prepare(request)
            await _pump_both(front, upstream)
        finally:
            await upstream.close()
            await front.close()
        return front


_HOP_BY_HOP_B = frozenset(h.encode() for h in HOP_BY_HOP)


def _response_headers(raw: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop ones (also those named in Connection)."""
    listed: set[bytes] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            listed.update(t.strip().lower() for t in value.split(b","))
    drop = _HOP_BY_HOP_B | listed if listed else _HOP_BY_HOP_B
    return CIMultiDict(
        (n.decode("latin-1"), v.decode("latin-1")) for n, v in raw if n.lower() not in drop
    )


async def _limited(body: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
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


class _ProxyRequestHandler(RequestHandler):
    """aiohttp's connection handler, with our answer to requests its parser refuses.

    Oversized header sections get 431 and oversized request lines 414 (RFC 6585, RFC 9110)
    instead of a bare 400; every refusal is a JSON error with X-Sidecar-Error and one warning log
    line, not a traceback per hostile request.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, BadHttpMessage):
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        code = "bad_request"
        if isinstance(exc, LineTooLong):
            # the parser reports an over-long request target as a bytearray, a header as bytes
            url = isinstance(exc.args[0], bytearray)
            status, code = (414, "uri_too_long") if url else (431, "headers_too_large")
        elif "Too many headers" in str(exc):
            status, code = 431, "headers_too_large"
        detail = str(exc).split(":", 1)[0] if code == "bad_request" else code.replace("_", " ")
        log.warning(
            "proxy.refused_request", extra={"status": status, "code": code, "detail": detail[:200]}
        )
        response = error_response(status, code, detail[:200])
        response.force_close()
        return response


class _ProxyServer(web.Server):
    """web.Server building our request handler."""

    def __call__(self) -> RequestHandler:
        return _ProxyRequestHandler(self, loop=self._loop, **self._kwargs)


def _is_websocket(headers: CIMultiDictProxy[str]) -> bool:
    return (
        headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in headers.get("Connection", "").lower()
    )


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _pump_both(
    front: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    """Copy messages both ways until either side closes; close the other with the same code."""

    async def pump(
        source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    ) -> None:
        async for msg in source:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                break
        code = source.close_code or aiohttp.WSCloseCode.OK
        with contextlib.suppress(ConnectionError, RuntimeError):
            await sink.close(code=code)

    tasks = [
        asyncio.ensure_future(pump(front, upstream)),
        asyncio.ensure_future(pump(upstream, front)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
