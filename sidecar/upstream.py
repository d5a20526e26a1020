"""The lean upstream leg: pooled keep-alive HTTP/1.1 connections, the request head written in one
buffer, responses parsed by llhttp (through ``httptools``), bodies streamed with backpressure.

Why not ``aiohttp.ClientSession``: two thirds of a minimal aiohttp proxy's per-request cost is its
client side (see PERFORMANCE.md). This module does only what a reverse proxy to one origin needs,
and never parses HTTP by hand: framing errors from the upstream are llhttp's to find.

Error mapping (at this one boundary): refused/reset/garbled → :class:`UpstreamUnavailable` (502),
no response head in time → :class:`UpstreamTimeout` (504), a failure after the head was passed on
→ :class:`UpstreamBroken` (the proxy cuts the caller's connection).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools

from sidecar.errors import RefusedRequest, UpstreamTimeout, UpstreamUnavailable

#: pause reading from the upstream while this many body bytes wait for the caller
HIGH_WATER = 1 << 18
LOW_WATER = 1 << 16


class UpstreamBroken(UpstreamUnavailable):
    """The upstream failed after its response head was received (mid-body)."""

    code = "upstream_broken"


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.tls = False
        self._parser: httptools.HttpResponseParser | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._error: Exception | None = None
        self._head_only = False
        self._upgrade = False
        #: after a 101 answer the connection carries raw bytes (a WebSocket), not HTTP
        self.tunnel = False
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.head_done = False
        self.complete = False
        self.got_bytes = False
        self.keep_alive = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check here
        self.transport = cast(asyncio.Transport, transport)
        self.tls = transport.get_extra_info("ssl_object") is not None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # every request head goes out in one write: never let Nagle hold it back (not all
            # event loops set this themselves)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.tunnel:
            self.on_body(data)
            return
        if self._remaining > 0 and self._parser is not None:
            self._length_delimited(data)
            return
        parser = self._parser
        if parser is None:  # bytes nobody asked for: the connection cannot be trusted
            self._fail(UpstreamUnavailable("upstream sent data without a request"))
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if not self.tunnel:
                self._fail(UpstreamUnavailable("upstream switched protocols unexpectedly"))
                return
            self._parser = None
            rest = data[int(exc.args[0]) :]
            if rest:
                self.on_body(rest)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamUnavailable(f"upstream sent a malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.tunnel:
            self._message_complete()  # the end of the tunnelled stream
        elif (
            self._parser is not None and self.head_done and not self.complete and self._until_close
        ):
            self._message_complete()  # a body delimited by the end of the connection
        elif self._parser is not None and not self.complete:
            why = "upstream closed the connection"
            if self.tls and not self.got_bytes:
                # how a TLS 1.3 server refuses a missing client certificate: after the handshake
                why += " without answering over TLS (does it require upstream.tls.cert_file?)"
            self._fail(UpstreamUnavailable(why), close=False)
        self._wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # -- httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if status == 101 and self._upgrade:
            self.status = status
            self.tunnel = True
            self.head_done = True
            _wake(self._head_waiter)
            return
        if 100 <= status < 200:
            self.headers = []  # informational (100, 103): the final answer follows
            self.reason = ""
            return
        self.status = status
        self.keep_alive = bool(self._parser.should_keep_alive())
        length = None
        framed = 0
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length":
                framed += 1
                length = value
            elif lname == b"transfer-encoding":
                framed += 2
        bodiless = status in (204, 304)
        self._until_close = not framed and not bodiless
        if framed == 1 and not bodiless and not self._head_only:
            # llhttp has checked the value; the body's later bytes bypass it (see data_received)
            self._remaining = int(length or 0)
        self.head_done = True
        _wake(self._head_waiter)
        if self._head_only:
            self.keep_alive = False  # llhttp cannot be told a HEAD answer has no body
            self._message_complete()

    def on_body(self, body: bytes) -> None:
        if self._head_only:
            return
        self._remaining -= len(body)
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        _wake(self._body_waiter)

    def on_message_complete(self) -> None:
        if self.status == 0 or self.tunnel:
            return  # the end of an informational answer, or of the head before a tunnel
        self._message_complete()

    def _length_delimited(self, data: bytes) -> None:
        """More of a body whose Content-Length llhttp has read: the bytes are passed on as they
        came, without llhttp copying them once more (most of a large download's cost). Bytes
        past the body's end were never asked for: the connection is not used again."""
        remaining = self._remaining
        if len(data) > remaining:
            self.keep_alive = False
            data = data[:remaining]
        self.on_body(data)
        if self._remaining == 0:
            self._message_complete()

    # -- exchange

    _until_close = False
    #: body bytes still to come of a Content-Length response (0: none, or not counted)
    _remaining = 0

    def _message_complete(self) -> None:
        if self.complete:
            return
        self.complete = True
        self._parser = None
        _wake(self._head_waiter)
        _wake(self._body_waiter)

    def _fail(self, error: Exception, *, close: bool = True) -> None:
        if self._error is None:
            self._error = error
        self._parser = None
        if close and self.transport is not None:
            self.transport.abort()
        self.closed = True
        for waiter in (self._head_waiter, self._body_waiter):
            _wake(waiter)

    def head_timed_out(self, seconds: float) -> None:
        if not self.head_done:
            self._fail(UpstreamTimeout(f"upstream did not answer within {seconds:g}s"))

    def _wake_drain(self) -> None:
        _wake(self._drain_waiter)

    def begin(self, head_only: bool, upgrade: bool = False) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._upgrade = upgrade
        self.tunnel = False
        self._error = None
        self._until_close = False
        self._remaining = 0
        self.status = 0
        self.reason = ""
        self.headers = []
        self.chunks.clear()
        self.buffered = 0
        self.head_done = self.complete = self.got_bytes = self.keep_alive = False

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("upstream connection closed")
        if self._write_paused:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    async def wait_head(self) -> None:
        while not self.head_done and self._error is None:
            if self.closed and not self.complete:
                raise self._error or UpstreamUnavailable("upstream closed the connection")
            self._head_waiter = self._loop.create_future()
            try:
                await self._head_waiter
            finally:
                self._head_waiter = None
        if self._error is not None:
            raise self._error

    async def next_chunk(self) -> bytes | None:
        """The next body bytes, or None at the end of the body."""
        while not self.chunks:
            if self._error is not None:
                raise UpstreamBroken(str(self._error))
            if self.complete:
                return None
            self._body_waiter = self._loop.create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self._read_paused and self.buffered < LOW_WATER and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return chunk


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class UpstreamResponse:
    """A response being received; give the connection back with :meth:`release` or
    :meth:`close`."""

    __slots__ = ("_conn", "_pool", "_read_timeout", "_writer", "headers", "reason", "status")

    def __init__(
        self,
        pool: UpstreamPool,
        conn: _Connection,
        writer: asyncio.Task[None] | None,
        read_timeout: float,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._writer = writer
        self._read_timeout = read_timeout
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers

    @property
    def complete(self) -> bool:
        """True when the whole body has been received."""
        return self._conn.complete

    def body_if_complete(self) -> bytes | None:
        """The whole body when it has already arrived (small responses), else None."""
        conn = self._conn
        if not conn.complete or conn._error is not None:
            return None
        body = b"".join(conn.chunks)
        conn.chunks.clear()
        conn.buffered = 0
        return body

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; each wait is bounded by the read timeout (a tunnel's
        silences are not: a quiet WebSocket is still open)."""
        conn = self._conn
        timeout = None if conn.tunnel else self._read_timeout
        while True:
            try:
                async with asyncio.timeout(timeout):
                    chunk = await conn.next_chunk()
            except TimeoutError as exc:
                raise UpstreamBroken("upstream went silent mid-body") from exc
            if chunk is None:
                return
            yield chunk

    def release(self) -> None:
        """Return the connection to the pool when the exchange finished cleanly, else close it."""
        conn = self._conn
        writer = self._writer
        reusable = conn.complete and conn.keep_alive and not conn.closed and not conn.chunks
        if writer is not None and not writer.done():
            writer.cancel()
            reusable = False
        if reusable:
            self._pool.put(conn)
        else:
            self.close()

    def close(self) -> None:
        conn = self._conn
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        conn._parser = None
        conn.closed = True
        if conn.transport is not None:
            conn.transport.abort()


class UpstreamPool:
    """Keep-alive connections to one origin."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        *,
        connect_timeout: float,
        head_timeout: float,
        max_idle: int,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout
        self._head_timeout = head_timeout
        self._max_idle = max_idle
        self._idle: collections.deque[_Connection] = collections.deque()
        self._closed = False
        #: exchanges waiting for a response head, with their deadlines (loop time)
        self._waiting: dict[_Connection, float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        # a timeout fires at most a tenth of itself (and at most 0.1 s) late
        self._sweep_every = min(head_timeout / 10, 0.1)

    def put(self, conn: _Connection) -> None:
        if len(self._idle) < self._max_idle and not self._closed:
            conn.reused = True
            conn._parser = None
            self._idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"connecting to the upstream took longer than {self._connect_timeout:g}s"
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamUnavailable(
                f"TLS with the upstream failed: certificate verify failed: {exc.verify_message} "
                "(check upstream.tls.ca_file and the host name in upstream.url)"
            ) from exc
        except ssl.SSLError as exc:
            raise UpstreamUnavailable(f"TLS with the upstream failed: {exc.reason}") from exc
        except OSError as exc:
            raise UpstreamUnavailable(
                f"upstream connection failed: {exc.strerror or type(exc).__name__}"
            ) from exc
        return conn

    def _idle_connection(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def request(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        *,
        head_only: bool = False,
        chunked: bool = False,
        upgrade: bool = False,
    ) -> UpstreamResponse:
        """Send one request and wait for the response head.

        ``head`` is the complete request head (request line, headers, blank line). ``body`` is
        bytes (sent with the head in one write), an async iterator of chunks (streamed, framed
        chunked when ``chunked``), or None. A request on a reused connection that the server had
        already closed is retried once on a fresh one when its body can be sent again. With
        ``upgrade``, a 101 answer turns the connection into a raw tunnel (``body`` is the caller's
        side of it; the response's body is the upstream's).
        """
        replayable = not hasattr(body, "__aiter__")
        conn = self._idle_connection()
        if conn is None:
            conn = await self._connect()
        try:
            return await self._exchange(conn, head, body, head_only, chunked, upgrade)
        except UpstreamUnavailable:
            if not (conn.reused and not conn.got_bytes and replayable):
                raise
        conn = await self._connect()  # the pooled connection had gone stale
        return await self._exchange(conn, head, body, head_only, chunked, upgrade)

    async def _exchange(
        self,
        conn: _Connection,
        head: bytes,
        body: Any,
        head_only: bool,
        chunked: bool,
        upgrade: bool,
    ) -> UpstreamResponse:
        assert conn.transport is not None
        conn.begin(head_only, upgrade)
        writer: asyncio.Task[None] | None = None
        if body is None:
            conn.transport.write(head)
        elif isinstance(body, bytes):
            conn.transport.write(head + body)
        else:
            conn.transport.write(head)
            writer = asyncio.get_running_loop().create_task(_send_body(conn, body, chunked))
        # one sweeping timer for all exchanges rather than a timer each: less work per request
        waiting = self._waiting
        waiting[conn] = conn._loop.time() + self._head_timeout
        if self._sweeper is None:
            self._sweeper = conn._loop.call_later(self._sweep_every, self._sweep)
        try:
            await conn.wait_head()
        except BaseException:
            _abort(conn, writer)
            raise
        finally:
            del waiting[conn]
        if writer is not None and writer.done() and writer.exception() is not None:
            _abort(conn, writer)
            raise UpstreamUnavailable("sending the request body failed")
        return UpstreamResponse(self, conn, writer, self._head_timeout)

    def _sweep(self) -> None:
        """Fail the exchanges whose response head is overdue (at most a tick late)."""
        self._sweeper = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn, deadline in list(self._waiting.items()):
            if deadline <= now:
                conn.head_timed_out(self._head_timeout)
        self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    def close(self) -> None:
        """Close the idle connections; those in use are closed when given back. The timeout
        sweep goes on while exchanges still wait for their heads (after a reload)."""
        self._closed = True
        if self._sweeper is not None and not self._waiting:
            self._sweeper.cancel()
            self._sweeper = None
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None:
                conn.transport.close()


def _abort(conn: _Connection, writer: asyncio.Task[None] | None) -> None:
    if writer is not None and not writer.done():
        writer.cancel()
    conn.closed = True
    if conn.transport is not None:
        conn.transport.abort()


async def _send_body(conn: _Connection, body: AsyncIterator[bytes], chunked: bool) -> None:
    """Stream a request body with backpressure, chunked-framed when its length is unknown.

    If the caller's body breaks off, the upstream connection is aborted, so the upstream never
    takes a truncated body for a complete one.
    """
    transport = conn.transport
    assert transport is not None
    try:
        async for chunk in body:
            if not chunk:
                continue
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            await conn.drain()
        if chunked:
            transport.write(b"0\r\n\r\n")
    except asyncio.CancelledError:
        transport.abort()
        raise
    except RefusedRequest as exc:  # the caller's body broke a rule (too large)
        conn._fail(exc)
    except Exception as exc:  # noqa: BLE001 - any failure of either side ends this exchange
        conn._fail(UpstreamUnavailable(f"request body could not be sent: {type(exc).__name__}"))
