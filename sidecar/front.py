"""The :8080 front: HTTP/1.1 on ``asyncio.Protocol``, requests parsed by llhttp (``httptools``).

Why not aiohttp's ``web.Server``: its server side was most of what a request cost once the upstream
leg was lean (see docs/performance.md). This module does only what a reverse proxy needs and never
parses HTTP by hand: framing, smuggling shapes (CL+TE, duplicate CL, obfuscated TE) and bad
characters are llhttp's to find. On top of llhttp it enforces the size limits (431, 414), answers
every refusal with a JSON error and one warning log line, and closes the connection after it.

One task per connection answers its requests in order (keep-alive, pipelining). Request bodies
reach the handler as a :class:`Body` stream; reading from the socket pauses while too much waits
unread, and writes wait for the transport's buffer to drain, so bodies of any size stream through
bounded memory. After an ``Upgrade`` the connection's raw bytes feed that same stream.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

import httptools

from sidecar.errors import RefusedRequest
from sidecar.exchange import Body, Request, wake

if TYPE_CHECKING:
    from sidecar.front_server import FrontServer

log = logging.getLogger(__name__)

#: longest request line and header line accepted (as aiohttp's and nginx's defaults, ~8 KiB)
MAX_LINE = 8190
#: most header lines in one request
MAX_HEADERS = 128
#: largest whole request head: bounds what llhttp holds while a head is still incomplete
MAX_HEAD = 64 * 1024
#: stop reading from a caller that pipelines more requests than this ahead of the answers
MAX_QUEUED = 32
#: a connection with no request being answered for about this long is closed (aiohttp's 75 s)
KEEPALIVE_TIMEOUT = 75.0
#: the idle sweep looks this many times per KEEPALIVE_TIMEOUT
IDLE_TICKS = 5
#: answers one request completely; the front closes the connection when it raises
Handler = Callable[[Request], Awaitable[None]]


class _Refusal(Exception):
    """A request the front refuses before it is handled (raised inside llhttp callbacks)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code


class FrontProtocol(asyncio.Protocol):
    """One caller's connection: parse, queue requests in order, answer them one at a time."""

    def __init__(self, server: FrontServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._queue: collections.deque[Request | _Refusal] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._parsing: Request | None = None
        self._last: Request | None = None
        self._url = b""
        self._head_bytes = 0
        self._in_head = False
        self._read_paused = False
        self._write_paused = False
        self._tunnel: Body | None = None
        self.closed = False
        self.closing_after_response = False
        #: the request being answered (None while idle between requests)
        self.current: Request | None = None
        #: idle sweeps this connection has been through since a request began
        self.idle_ticks = 0

    @property
    def has_work(self) -> bool:
        """A request is being answered or waits its turn."""
        return self.current is not None or bool(self._queue)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A caller connected: no Nagle delay, and a task to answer its requests."""
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check here
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        self._task = self.loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        """Feed llhttp, or the tunnel after an upgrade; parse errors become refusals."""
        if self._tunnel is not None:
            self._tunnel.feed(data)
            return
        if self._parser is None:
            return  # refused or upgraded: nothing more is parsed
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[int(exc.args[0]) :])
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refusal):
                self._refuse(cause)
            else:
                self._refuse(_Refusal(400, "bad_request", "malformed request"))
            return
        except httptools.HttpParserError as exc:
            self._refuse(_Refusal(400, "bad_request", str(exc) or "malformed request"))
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._refuse(_Refusal(431, "headers_too_large", "headers too large"))

    def eof_received(self) -> bool | None:
        """The caller half-closed: a tunnel passes that on, anything else closes."""
        if self._tunnel is not None:
            self._tunnel.finish()
            return True  # half-close: the other direction may still flow
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """The caller is gone: end its body streams and cancel what answers it."""
        self.closed = True
        self._parser = None
        self.server.connections.discard(self)
        if self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.finish(ConnectionResetError("caller closed the connection"))
        if self._tunnel is not None:
            self._tunnel.finish()
        wake(self._drain_waiter)
        if self._task is not None and not self._task.done():
            # the handler's ``finally`` blocks close its upstream and count the request
            self._task.cancel()

    def pause_writing(self) -> None:
        """The transport's buffer is full: writers wait in :meth:`drain`."""
        self._write_paused = True

    def resume_writing(self) -> None:
        """The transport's buffer drained: release the waiting writer."""
        self._write_paused = False
        wake(self._drain_waiter)

    # -- flow control and writing, used by Request and Body

    def pause_reading(self) -> None:
        """Stop reading from the caller (too much waits unread)."""
        if not self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the caller again."""
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        """Queue bytes for the caller (dropped once the connection is closed)."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the caller's side is backed up; ConnectionResetError once it is gone."""
        if self.closed:
            raise ConnectionResetError("caller closed the connection")
        if self._write_paused:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
            if self.closed:
                raise ConnectionResetError("caller closed the connection")

    def abort(self) -> None:
        """Cut the connection (a response that cannot be completed must not look complete)."""
        self.closing_after_response = True
        if self.transport is not None:
            self.transport.abort()

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        """llhttp: a new request starts (its head counts toward the limits)."""
        self.idle_ticks = 0
        self._url = b""
        self._in_head = True
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        """llhttp: (part of) the request target; over MAX_LINE is 414."""
        self._url += url
        if len(self._url) > MAX_LINE:
            raise _Refusal(414, "uri_too_long", "uri too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        """llhttp: one header line; too long or too many is 431."""
        request = self._parsing
        if request is None:
            assert self._parser is not None
            method = self._parser.get_method().decode("ascii")
            request = self._parsing = Request(self, method, self._url.decode("latin-1"))
        if len(name) + len(value) + 2 > MAX_LINE or len(request.headers) >= MAX_HEADERS:
            raise _Refusal(431, "headers_too_large", "headers too large")
        request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        """llhttp: the head is complete: queue the request, open its body stream."""
        parser = self._parser
        assert parser is not None
        request = self._parsing
        if request is None:  # a request without any header line
            request = Request(
                self, parser.get_method().decode("ascii"), self._url.decode("latin-1")
            )
            self._parsing = request
        self._in_head = False
        request.version = parser.get_http_version()
        request.keep_alive = bool(parser.should_keep_alive())
        request.upgrade = bool(parser.should_upgrade())
        length = request.header(b"content-length")
        if length is not None:
            request.length = int(length)
        if (length is not None and request.length) or request.header(b"transfer-encoding"):
            request.body = Body(self)
        self._queue.append(request)
        if len(self._queue) > MAX_QUEUED:
            self.pause_reading()
        wake(self._waiter)

    def on_body(self, body: bytes) -> None:
        """llhttp: body bytes (de-chunked) for the request being parsed."""
        request = self._parsing
        if request is not None and request.body is not None:
            request.body.feed(body)

    def on_message_complete(self) -> None:
        """llhttp: the request is complete, body included."""
        request = self._parsing
        self._parsing = None
        self._last = request
        if request is not None and request.body is not None:
            request.body.finish()

    # -- requests in order

    def _refuse(self, refusal: _Refusal) -> None:
        """Stop parsing; the refusal is answered after the requests queued before it."""
        self._parser = None
        self._in_head = False
        self.pause_reading()
        request = self._parsing
        self._parsing = None
        if request is not None and request in self._queue:
            self._queue.remove(request)  # half-parsed: never handled
        elif request is not None and request.body is not None:
            request.body.finish(RefusedRequest(str(refusal), status=refusal.status))
        self._queue.append(refusal)
        wake(self._waiter)

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stops at CONNECT and Upgrade: from here on the caller's bytes are raw.

        For a WebSocket upgrade they become the tunnel's stream, which the proxy sends upstream
        only after a 101. Any other Upgrade (h2c, ...) is dropped and its request goes on as plain
        HTTP: httptools makes llhttp skip the body of an Upgrade request, so a second parser reads
        that body (llhttp still, framed as the head declared it). Nothing after it is read: the
        connection closes after the answer.
        """
        self._parser = None
        request = self._last
        if request is not None and not request.wants_websocket():
            if request.body is not None:
                self._parsing = request  # a bad body is refused as any request's would be
                self._parser = _body_parser(self, request)
                if rest:
                    self.data_received(rest)
            return
        tunnel = Body(self)
        if rest:
            tunnel.feed(rest)
        self._tunnel = tunnel
        if request is not None:
            request.body = tunnel

    async def _serve(self) -> None:
        server = self.server
        queue = self._queue
        try:
            while not self.closed:
                if not queue:
                    if self.closing_after_response or server.draining:
                        break
                    self._waiter = self.loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                    continue
                item = queue.popleft()
                if self._read_paused and len(queue) < MAX_QUEUED // 2 and self._parser is not None:
                    self.resume_reading()
                if isinstance(item, _Refusal):
                    self._answer_refusal(item)
                    break
                self.current = item
                server.in_flight += 1
                try:
                    await server.handler(item)
                finally:
                    server.in_flight -= 1
                    self.current = None
                    if server.in_flight == 0:
                        wake(server.idle)
                body = item.body
                if (
                    not item.keep_alive
                    or item.upgrade
                    or self.closing_after_response
                    or (body is not None and not body.done)
                ):
                    break  # an unread body cannot be skipped safely: close instead
        finally:
            if self.transport is not None and not self.closed:
                self.transport.close()

    def _body_done(self) -> None:
        """The body of an Upgrade request sidecar does not tunnel has been read: stop parsing."""
        self._parser = None
        self._parsing = None

    def _answer_refusal(self, refusal: _Refusal) -> None:
        status, code = refusal.status, refusal.code
        detail = str(refusal)[:200]
        log.warning(
            "proxy.refused_request", extra={"status": status, "code": code, "detail": detail}
        )
        self.closing_after_response = True
        self.write(self.server.error_bytes(status, code, detail))


class _UpgradeBody:
    """llhttp callbacks for the body of an Upgrade request that is answered as plain HTTP."""

    __slots__ = ("_body", "_front")

    def __init__(self, front: FrontProtocol, body: Body) -> None:
        self._front = front
        self._body = body

    def on_body(self, data: bytes) -> None:
        self._body.feed(data)

    def on_message_complete(self) -> None:
        self._body.finish()
        self._front._body_done()


def _body_parser(front: FrontProtocol, request: Request) -> httptools.HttpRequestParser:
    """A parser that reads only ``request``'s body, framed as its head declared (llhttp checked
    that framing already), into a fresh body stream for the request."""
    body = request.body = Body(front)
    framing = (
        b"Transfer-Encoding: chunked"
        if request.length is None
        else b"Content-Length: %d" % request.length
    )
    parser = httptools.HttpRequestParser(_UpgradeBody(front, body))
    parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
    return parser
