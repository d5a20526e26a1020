"""The :8080 front: HTTP/1.1 on ``asyncio.Protocol``, requests parsed by llhttp (``httptools``).

Why not aiohttp's ``web.Server``: its server side was most of what a request cost once the upstream
leg was lean (see docs/performance.md). This module does only what a reverse proxy needs and never
parses HTTP by hand: framing, smuggling shapes (CL+TE, duplicate CL, obfuscated TE) and bad
characters are llhttp's to find. On top of llhttp it enforces the size limits (431, 414), turns
every refusal into a :class:`~sidecar.errors.RefusedRequest` (raised from the llhttp callbacks
too), answers it with the server's ``refusal`` bytes, and closes the connection after it.

One task per connection answers its requests in order (keep-alive, pipelining). Request bodies
reach the handler as a :class:`Body` stream; reading from the socket pauses while too much waits
unread, and writes wait for the transport's buffer to drain, so bodies of any size stream through
bounded memory. After an ``Upgrade`` the connection's raw bytes feed that same stream.

Each request gets exactly one answer: a body that turns bad once its handler started fails the
body stream (the handler answers the error, or cuts the connection) instead of queueing a second
answer. The deadlines of the caller's phases (head, body, idle) are checked by the server's one
sweep (:meth:`FrontProtocol.check_deadlines`); see docs/security.md for what callers see.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

import httptools

from sidecar.errors import BodyEnd, RefusedRequest
from sidecar.http.exchange import Body, Request, wake
from sidecar.http.wire import body_head

#: longest request line and header line accepted (as aiohttp's and nginx's defaults, ~8 KiB)
MAX_LINE = 8190
#: most header lines in one request
MAX_HEADERS = 128
#: largest whole request head: bounds what llhttp holds while a head is still incomplete
MAX_HEAD = 64 * 1024
#: stop reading from a caller that pipelines more requests than this ahead of the answers
MAX_QUEUED = 32
#: methods refused with 405 whatever the upstream: TRACE echoes the request, token included
#: (TRACK is IIS's name for it; llhttp does not know it, see :func:`_bad_method`)
REFUSED_METHODS = frozenset({"TRACE", "TRACK"})
#: after its last answer, a connection drops what the caller still sends for this many deadline
#: sweeps before closing (a close with unread bytes resets it: the caller could lose the answer)
LINGER_TICKS = 2
#: the usual method names as llhttp hands them over, decoded once
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
#: answers one request completely; the front closes the connection when it raises
Handler = Callable[[Request], Awaitable[None]]


class Listener(Protocol):
    """What a connection needs of the server that accepted it
    (:class:`~sidecar.http.server.FrontServer`): the handler, the refusal answer, the deadline
    sweep's count and limits, and the bookkeeping a graceful shutdown reads."""

    loop: asyncio.AbstractEventLoop
    #: answers one request
    handler: Handler
    #: the whole answer to a refused request (counted and logged by whoever builds it)
    refusal: Callable[[RefusedRequest], bytes]
    connections: set[FrontProtocol]
    #: requests being answered right now, and who waits for that to reach 0
    in_flight: int
    idle: asyncio.Future[None] | None
    draining: bool
    #: deadline sweeps so far, and each deadline in sweeps (the timeouts: for messages)
    ticks: int
    head_ticks: int
    body_ticks: int
    idle_ticks: int
    head_timeout: float
    body_timeout: float

    def admit(self, protocol: FrontProtocol) -> None:
        """``protocol``'s connection is set up: count it among the server's connections."""


class FrontProtocol:
    """One caller's connection: parse, queue requests in order, answer them one at a time."""

    def __init__(self, server: Listener) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._queue: collections.deque[Request | RefusedRequest] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._parsing: Request | None = None
        self._last: Request | None = None
        self._url = b""
        self._head_bytes = 0
        self._head_read = 0
        self._trailers = 0
        self._in_head = False
        self._read_paused = False
        self._write_paused = False
        self._tunnel: Body | None = None
        self._eof = False
        self._lingering = False
        self.closed = False
        self.closing_after_response = False
        #: the request being answered (None while idle between requests)
        self.current: Request | None = None
        # deadlines: the sweep count (server.ticks) when the phase began; see check_deadlines
        self._head_since = self._read_since = self._idle_since = server.ticks
        #: no request has begun on this connection yet (its wait counts as a head's)
        self._fresh = True
        #: the body of the request being parsed waits for the caller to be sent 100 Continue
        self._awaiting_continue = False

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
        self.server.admit(self)
        self._task = self.loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        """Feed llhttp, or the tunnel after an upgrade; parse errors become refusals."""
        if self._tunnel is not None:
            self._tunnel.feed(data)
            return
        if self._parser is None:
            return  # refused or upgraded: nothing more is parsed
        self._read_since = self.server.ticks
        upgraded_at = -1
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            upgraded_at = int(exc.args[0])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, BodyEnd):
                return  # the bytes behind an untunnelled Upgrade's body are never read
            if isinstance(cause, RefusedRequest):
                self._refuse(cause)
            else:
                self._refuse(RefusedRequest("malformed request", status=400, code="bad_request"))
            return
        except httptools.HttpParserInvalidMethodError:
            self._refuse(_bad_method(data))
            return
        except httptools.HttpParserError as exc:
            self._refuse(
                RefusedRequest(str(exc) or "malformed request", status=400, code="bad_request")
            )
            return
        if upgraded_at >= 0:
            # outside the except block: errors of the body parser it starts must not be chained
            # to the Upgrade exception (their cause is how they are told apart)
            self._upgraded(data[upgraded_at:])
            return
        if self._in_head:
            # what llhttp holds of a head still incomplete (a line without its end yet); the
            # callbacks count the completed lines exactly, whatever the read boundaries
            self._head_read += len(data)
            if self._head_read > MAX_HEAD:
                self._refuse(
                    RefusedRequest("headers too large", status=431, code="headers_too_large")
                )

    def eof_received(self) -> bool | None:
        """The caller half-closed: a tunnel passes that on; requests received whole are still
        answered (``printf ... | nc -N``), then the connection closes; anything else closes."""
        if self._tunnel is not None:
            self._tunnel.finish()
            return True  # half-close: the other direction may still flow
        self._eof = True
        if self._lingering:
            return None
        self._parser = None  # nothing more can arrive
        request = self._parsing
        self._parsing = None
        self.closing_after_response = True
        if request is not None and request.body is not None:
            # the body was cut short: its handler fails reading it (the connection is cut)
            request.body.finish(ConnectionResetError("caller closed before the body ended"))
        if self.has_work:
            wake(self._waiter)
            return True  # keep the connection open to write the answers
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
        """Read from the caller again (its deadlines start afresh: it was us who waited)."""
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self._head_since = self._read_since = self.server.ticks
            self.transport.resume_reading()

    def expect_body(self) -> None:
        """The caller was sent ``100 Continue``: the body deadline runs from now."""
        self._awaiting_continue = False
        self._read_since = self.server.ticks

    # -- deadlines, enforced by the server's sweep (one timer for all connections)

    def check_deadlines(self, now: int) -> None:
        """Called by each sweep (``now`` counts sweeps): close or answer 408 what is overdue.

        A head has ``head_timeout`` from its first byte (the first request of a connection: from
        connecting); a body awaited from the caller ``body_timeout`` of silence (after 100
        Continue, once it was sent); an idle connection ``idle_timeout``. While reading is
        paused (the proxy is behind, not the caller), or a request is being answered with
        nothing expected from the caller, no deadline runs.
        """
        server = self.server
        if self._lingering:
            if now - self._head_since >= LINGER_TICKS and self.transport is not None:
                self.transport.close()
            return
        if self.closed or self._parser is None or self._read_paused:
            return  # closing, answering a refusal, a tunnel, or the proxy is the slow one
        if self._in_head or self._fresh:
            if now - self._head_since >= server.head_ticks:
                if self._in_head:
                    detail = f"request head not received within {server.head_timeout:g} s"
                    self._refuse(RefusedRequest(detail, status=408, code="head_timeout"))
                elif self.transport is not None:
                    self.transport.close()  # connected, sent nothing: closed quietly
            return
        request = self._parsing
        if request is not None and request.body is not None:
            if not self._awaiting_continue and now - self._read_since >= server.body_ticks:
                detail = f"request body not received within {server.body_timeout:g} s"
                self._refuse(RefusedRequest(detail, status=408, code="body_timeout"))
            return
        idle = not self.has_work and now - self._idle_since >= server.idle_ticks
        if idle and self.transport is not None:
            self.transport.close()

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
        """llhttp: a new request starts (its head counts toward the limits and its deadline)."""
        self._fresh = False
        self._head_since = self.server.ticks
        self._url = b""
        self._in_head = True
        self._head_bytes = 0
        self._head_read = 0
        self._trailers = 0

    def on_url(self, url: bytes) -> None:
        """llhttp: (part of) the request target; over MAX_LINE is 414."""
        self._url += url
        self._head_bytes += len(url)
        if len(self._url) > MAX_LINE:
            raise RefusedRequest("uri too long", status=414, code="uri_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        """llhttp: one header line (or, after the head, a trailer field); a line too long, too
        many of them or a head over MAX_HEAD in all is 431.

        Trailer fields count toward the same limits but are dropped: they never become headers
        (the body is forwarded with our own framing, and a trailer was never checked as a head).
        """
        size = len(name) + len(value) + 2
        if size > MAX_LINE:
            raise RefusedRequest("header line too large", status=431, code="headers_too_large")
        self._head_bytes += size
        request = self._parsing
        if not self._in_head:  # a trailer field of the request being parsed
            self._trailers += 1
            if request is None or len(request.headers) + self._trailers > MAX_HEADERS:
                raise RefusedRequest(
                    "too many header and trailer fields", status=431, code="headers_too_large"
                )
            if self._head_bytes > MAX_HEAD:
                raise RefusedRequest(
                    "headers and trailers too large", status=431, code="headers_too_large"
                )
            return
        if request is None:
            request = self._parsing = self._new_request()
        if len(request.headers) >= MAX_HEADERS:
            raise RefusedRequest("too many header fields", status=431, code="headers_too_large")
        if self._head_bytes > MAX_HEAD:
            raise RefusedRequest("headers too large", status=431, code="headers_too_large")
        request.headers.append((name, value))

    def _new_request(self) -> Request:
        parser = self._parser
        if parser is None:  # llhttp calls back only while feeding: a broken invariant
            raise RefusedRequest(
                "request parsed without a parser", status=500, code="internal_error"
            )
        raw = parser.get_method()
        method = _METHODS.get(raw) or raw.decode("ascii")
        return Request(self, method, self._url.decode("latin-1"))

    def on_headers_complete(self) -> None:
        """llhttp: the head is complete: queue the request, open its body stream."""
        parser = self._parser
        if parser is None:
            raise RefusedRequest(
                "request parsed without a parser", status=500, code="internal_error"
            )
        request = self._parsing
        if request is None:  # a request without any header line
            request = self._parsing = self._new_request()
        self._in_head = False
        keep_alive = request.keep_alive = bool(parser.should_keep_alive())
        request.upgrade = bool(parser.should_upgrade())
        # the framing fields in one pass over the head (the first of each, as Request.header);
        # only names as long as Content-Length, Transfer-Encoding, Connection or
        # Proxy-Connection are lowered
        length = coding = None
        connection = False
        for name, value in request.headers:
            size = len(name)
            if size != 14 and size != 17 and size != 10 and size != 16:
                continue
            lname = name.lower()
            if lname == b"content-length":
                if length is None:
                    length = value
            elif lname == b"transfer-encoding":
                if coding is None:
                    coding = value
            elif lname == b"connection" or lname == b"proxy-connection":
                connection = True
        # llhttp keeps a request without a Connection field alive only when it is HTTP/1.1 (the
        # versions it reads are 0.9, 1.0, 1.1 and 2.0, and only x.y with x, y > 0 is kept alive
        # by default): then the version is known without asking (get_http_version formats it).
        # llhttp reads Proxy-Connection as Connection: a 1.0 request with
        # "Proxy-Connection: keep-alive" is kept alive too, so either field means asking.
        request.version = "1.1" if keep_alive and not connection else parser.get_http_version()
        if length is not None:
            request.length = int(length)
        if (length is not None and request.length) or coding:
            request.body = body = Body(self)
            self._read_since = self.server.ticks
            expect = request.header(b"expect")
            body.expects_continue = self._awaiting_continue = (
                expect is not None
                and request.version == "1.1"
                and expect.strip().lower() == b"100-continue"
            )
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

    def _refuse(self, refusal: RefusedRequest) -> None:
        """Stop parsing; the refusal is answered after the requests queued before it.

        Exactly one answer per request: when the refused part is the body (a bad chunk, too
        many trailers, a body deadline) of a request whose handler already started, the
        refusal is not queued; the body stream fails with it instead, and the handler answers
        it (or, if its answer has begun, cuts the connection).
        """
        self._parser = None
        self._in_head = False
        self.pause_reading()
        request = self._parsing
        self._parsing = None
        if request is not None and request.body is not None and request not in self._queue:
            # the request being answered is the last this connection gets (nothing after its
            # body was read); a queued refusal closes the connection when its turn comes, so
            # the requests queued before it are answered as usual
            self.closing_after_response = True
            if not request.body.done:  # (done: the handler ends it; the connection closes)
                request.body.finish(refusal)
            return
        if request is not None and request in self._queue:
            self._queue.remove(request)  # its head or body is bad: never handled
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
                if isinstance(item, RefusedRequest):
                    self._answer_refusal(item)
                    break
                if item.method in REFUSED_METHODS:
                    self._answer_refusal(
                        RefusedRequest(
                            f"{item.method} is not forwarded", status=405, code="method_refused"
                        )
                    )
                    break
                self.current = item
                server.in_flight += 1
                try:
                    await server.handler(item)
                finally:
                    server.in_flight -= 1
                    self.current = None
                    self._idle_since = server.ticks
                    if server.in_flight == 0 and server.idle is not None:
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
            self._close()

    def _close(self) -> None:
        """Close after the last answer: the end of our side first, then what the caller still
        sends is read and dropped for a moment before the connection closes (nginx's lingering
        close: a close with unread bytes resets the connection and the caller may lose the answer
        it has not read yet)."""
        transport = self.transport
        if transport is None or self.closed:
            return
        if self._eof or self._tunnel is not None or not transport.can_write_eof():
            transport.close()
            return
        self._parser = None
        self._lingering = True
        self._head_since = self.server.ticks
        transport.write_eof()
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def _body_done(self) -> None:
        """The body of an Upgrade request sidecar does not tunnel has been read: stop parsing."""
        self._parser = None
        self._parsing = None

    def _answer_refusal(self, refusal: RefusedRequest) -> None:
        """Answer a request refused before it was handled; the connection closes after it.
        The server's ``refusal`` counts and logs it with the proxy's own refusals."""
        self.closing_after_response = True
        self.write(self.server.refusal(refusal))


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
        # stop llhttp here: it would go on to parse what follows in the same read as a request
        # of its own (and a malformed one would refuse the requests queued before it)
        raise BodyEnd


def _body_parser(front: FrontProtocol, request: Request) -> httptools.HttpRequestParser:
    """A parser that reads only ``request``'s body, framed as its head declared (llhttp checked
    that framing already), into a fresh body stream for the request."""
    body = request.body = Body(front)
    parser = httptools.HttpRequestParser(_UpgradeBody(front, body))
    parser.feed_data(body_head(request.length))
    return parser


#: a request line as far as needed to name its method (only read after llhttp refused one)
_REQUEST_LINE = re.compile(rb"(?:^|\n)([!#$%&'*+.^_`|~0-9A-Za-z-]+) [^ \r\n]* HTTP/")


def _bad_method(data: bytes) -> RefusedRequest:
    """The refusal of a method llhttp does not know: 405 for TRACK (TRACE by another name),
    501 for other extension methods (llhttp parses only the methods it lists, see docs)."""
    found = _REQUEST_LINE.findall(data)
    method = found[-1].decode("ascii") if found else ""
    if method.upper() in REFUSED_METHODS:
        return RefusedRequest(
            f"{method.upper()} is not forwarded", status=405, code="method_refused"
        )
    shown = f"{method[:32]} " if method else ""
    return RefusedRequest(
        f"the method {shown}is not supported: the proxy's HTTP parser (llhttp) accepts only "
        "the methods it knows (those of RFC 9110, WebDAV, and a few others)",
        status=501,
        code="method_not_implemented",
    )
