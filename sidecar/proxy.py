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
import ssl
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.clock import Clock
from sidecar.config import TLS, Upstream
from sidecar.errors import (
    RefusedRequest,
    SidecarError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sidecar.headers import (
    REQUEST_ID,
    HeaderRules,
    connection_listed,
    strip_hop_by_hop,
)
from sidecar.logs import REQUEST_ID_KEY
from sidecar.metrics import Metrics
from sidecar.session import Credentials, SessionManager

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


def tls_context(tls: TLS) -> ssl.SSLContext:
    """The client TLS context for the upstream: verification on unless switched off."""
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


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
    decoded = unquote(unquote(path))  # twice: %252e%252e decodes to .. at a lenient upstream
    if any(seg in (".", "..") for seg in decoded.replace("\\", "/").split("/")):
        raise RefusedRequest(
            "dot segments are not allowed in the path", status=400, code="path_traversal_refused"
        )


class Proxy:
    """Forwards requests to one upstream origin with the session's credentials."""

    def __init__(
        self,
        upstream: Upstream,
        upstream_url: str,
        session: SessionManager,
        rules: HeaderRules,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self._config = upstream
        self._base = upstream_url.rstrip("/")
        self._session = session
        self._rules = rules
        self._metrics = metrics
        self._clock = clock
        self._client: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the pooled keep-alive client toward the upstream."""
        cfg = self._config
        ssl_ctx: ssl.SSLContext | bool = True
        if self._base.startswith("https:"):
            ssl_ctx = await asyncio.to_thread(tls_context, cfg.tls)
        connector = aiohttp.TCPConnector(limit=cfg.pool_size, ssl=ssl_ctx)
        self._client = aiohttp.ClientSession(
            connector=connector,
            # total bounds the wait for the response head (see _send); while a body streams, the
            # same figure bounds each silence, so a long download is not cut off while data flows
            timeout=aiohttp.ClientTimeout(
                total=None, connect=cfg.timeout.connect, sock_read=cfg.timeout.total
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # the caller's cookies are the caller's business
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            read_bufsize=STREAM_CHUNK,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()

    def server(self, **kwargs: Any) -> web.Server:
        """The low-level aiohttp server running this proxy (no router: every path is ours)."""
        return web.Server(self.handle, **kwargs)

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

    async def _forward(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "CONNECT":
            raise RefusedRequest(
                "CONNECT is not supported: sidecar is not a forward proxy",
                status=405,
                code="connect_refused",
            )
        raw_path = request.raw_path
        check_target(raw_path)
        creds = await self._session.credentials()
        url = URL(self._base + raw_path, encoded=True)
        if _is_websocket(request.headers):
            return await self._websocket(request, url, creds)

        replayable = True
        body: Any = None
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= self._config.replay_body_limit:
                body = await request.read()
            else:
                body = request.content
                replayable = False

        headers = self._headers(request, creds)
        upstream = await self._send(request.method, url, headers, body)
        if upstream.status == 401 and replayable:
            fresh = await self._session.reactive_refresh(creds)
            if fresh is not None:
                upstream.release()
                headers = self._headers(request, fresh)
                upstream = await self._send(request.method, url, headers, body)
        return await self._relay(request, upstream)

    def _headers(self, request: web.BaseRequest, creds: Credentials) -> CIMultiDict[str]:
        headers = self._rules.apply(request.headers, creds)
        request_id = headers.get(REQUEST_ID)
        if request_id is not None:
            request[REQUEST_ID_KEY] = request_id
        return headers

    async def _send(
        self, method: str, url: URL, headers: CIMultiDict[str], body: Any
    ) -> aiohttp.ClientResponse:
        """Send the request; map connection failures to 502 and timeouts to 504."""
        assert self._client is not None
        try:
            async with asyncio.timeout(self._config.timeout.total):
                return await self._client.request(
                    method, url, headers=headers, data=body, allow_redirects=False
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"upstream did not answer within {self._config.timeout.total:g}s"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnavailable(
                f"upstream connection failed: {exc.os_error.strerror or exc}"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream failed: {type(exc).__name__}") from exc

    async def _relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Stream the upstream's response to the caller.

        When the upstream fails mid-body, the caller's connection is cut: a truncated body must not
        pass for a complete one.
        """
        extra = connection_listed(upstream.headers) if "Connection" in upstream.headers else set()
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(strip_hop_by_hop(upstream.headers.items(), extra))
        if upstream.content_length is not None and request.method != "HEAD":
            response.content_length = upstream.content_length
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(STREAM_CHUNK):
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            upstream.close()
            log.warning(
                "proxy.upstream_broke_mid_response",
                extra={"error": type(exc).__name__, "request_id": request.get(REQUEST_ID_KEY)},
            )
            _abort(request)
            return response
        except (ConnectionError, asyncio.CancelledError):
            upstream.close()  # the caller left: do not return a half-read connection to the pool
            raise
        upstream.release()
        await response.write_eof()
        return response

    async def _websocket(
        self, request: web.BaseRequest, url: URL, creds: Credentials
    ) -> web.StreamResponse:
        """Proxy a WebSocket: connect upstream first (with our headers), then accept the caller."""
        assert self._client is not None
        headers = self._headers(request, creds)
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
