"""The lean upstream leg: pooled keep-alive HTTP/1.1 connections, the request head written in one
buffer, responses parsed by llhttp (:mod:`sidecar.http.client_conn`), bodies streamed with
backpressure.

Why not ``aiohttp.ClientSession``: two thirds of a minimal aiohttp proxy's per-request cost is its
client side (see docs/performance.md). This module does only what a reverse proxy to one origin
needs, and never parses HTTP by hand: framing errors from the upstream are llhttp's to find.

Error mapping (at this one boundary): refused/reset/garbled → :class:`UpstreamUnavailable` (502),
no response head in time → :class:`UpstreamTimeout` (504), a failure after the head was passed on
→ :class:`UpstreamBroken` (the proxy cuts the caller's connection).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

from sidecar.errors import RefusedRequest, UpstreamBroken, UpstreamTimeout, UpstreamUnavailable
from sidecar.http.client_conn import UpstreamConnection
from sidecar.http.egress import ForwardProxy
from sidecar.http.wire import CHUNK, LAST_CHUNK

__all__ = ["UpstreamPool", "UpstreamResponse"]


class UpstreamResponse:
    """A response being received; give the connection back with :meth:`release` or
    :meth:`close`."""

    __slots__ = (
        "_conn",
        "_pool",
        "_read_timeout",
        "_writer",
        "codings",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        conn: UpstreamConnection,
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
        #: transfer codings besides chunked that the body carries (b"" nearly always)
        self.codings = conn.codings

    @property
    def complete(self) -> bool:
        """True when the whole body has been received."""
        return self._conn.complete

    def body_if_complete(self) -> bytes | None:
        """The whole body when it has already arrived (small responses), else None."""
        conn = self._conn
        if not conn.complete or conn.failed:
            return None
        return conn.take_all()

    async def next_chunk(self) -> bytes | None:
        """The body's next chunk as it arrives, None at its end; each wait is bounded by the
        read timeout (a tunnel's silences are not: a quiet WebSocket is still open)."""
        conn = self._conn
        try:
            async with asyncio.timeout(None if conn.tunnel else self._read_timeout):
                return await conn.next_chunk()
        except TimeoutError as exc:
            raise UpstreamBroken("upstream went silent mid-body") from exc

    def start_tunnel(self, body: AsyncIterable[bytes] | None) -> None:
        """After a 101: copy the caller's raw bytes (``body``) to the upstream until the caller
        half-closes, which is passed on. None of them was sent before the 101."""
        if body is not None and self._writer is None:
            conn = self._conn
            self._writer = conn._loop.create_task(self._pool.send_body(conn, body, tunnel=True))

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
        conn.stop_parsing()
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
        via: ForwardProxy | None = None,
    ) -> None:
        self.host = host
        #: the forward proxy every connection tunnels through (HTTPS_PROXY), or None
        self._via = via
        self.port = port
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout
        self._head_timeout = head_timeout
        self._max_idle = max_idle
        self._idle: collections.deque[UpstreamConnection] = collections.deque()
        self._closed = False
        #: exchanges waiting for a response head, with their deadlines (loop time)
        self._waiting: dict[UpstreamConnection, float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        # a timeout fires at most a tenth of itself (and at most 0.1 s) late
        self._sweep_every = min(head_timeout / 10, 0.1)

    def put(self, conn: UpstreamConnection) -> None:
        if len(self._idle) < self._max_idle and not self._closed:
            conn.reused = True
            conn.stop_parsing()
            self._idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                where: dict[str, Any] = {"host": self.host, "port": self.port}
                if self._via is not None:  # the timeout covers the tunnel and the handshake
                    where = {"sock": await self._via.open_tunnel(self.host, self.port)}
                conn = UpstreamConnection(loop)
                # typed Any: the loop asks for an asyncio.Protocol, which a compiled class may not
                # subclass (sidecar/errors.py says why); it only calls the protocol's methods
                factory: Any = lambda: conn  # noqa: E731
                await loop.create_connection(
                    factory,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                    **where,
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

    def _idle_connection(self) -> UpstreamConnection | None:
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
        on_continue: Callable[[], None] | None = None,
        idempotent: bool = True,
    ) -> UpstreamResponse:
        """Send one request and wait for the response head.

        ``head`` is the complete request head (request line, headers, blank line). ``body`` is
        bytes (sent with the head in one write), an async iterator of chunks (streamed, framed
        chunked when ``chunked``), or None. A request on a reused connection that the server had
        already closed is retried once on a fresh one when its body can be sent again and the
        request is ``idempotent``: the upstream may have acted on a request before closing, and a
        proxy must not send a non-idempotent one twice on its own (RFC 9110 9.2.2).

        With ``upgrade``, a 101 answer turns the connection into a raw tunnel: the caller's side
        of it starts with :meth:`UpstreamResponse.start_tunnel`, only after the 101, and the
        response's body is the upstream's. ``on_continue`` is called when the upstream answers
        ``100 Continue`` to an expectation the head passes on.

        The deadline for the response head starts once the request was sent whole: while a
        streamed body moves, each chunk sent starts it again (an idle deadline of the same
        length), so a slow upload that keeps moving is not cut for taking long.
        """
        replayable = idempotent and not hasattr(body, "__aiter__")
        conn = self._idle_connection()
        if conn is None:
            conn = await self._connect()
        # the exchange written out here rather than in a coroutine of its own: one frame less
        # to create and to pass through at each wake-up, on every request
        retried = False
        while True:
            try:
                transport = conn.transport
                if transport is None:
                    raise UpstreamUnavailable("upstream connection is not open")
                conn.begin(head_only, upgrade, on_continue)
                writer: asyncio.Task[None] | None = None
                if body is None:
                    transport.write(head)
                elif isinstance(body, bytes):
                    transport.write(head + body)
                else:
                    transport.write(head)
                    writer = conn._loop.create_task(self.send_body(conn, body, chunked=chunked))
                # one sweeping timer for all exchanges rather than a timer each: less work per
                # request
                waiting = self._waiting
                waiting[conn] = conn._loop.time() + self._head_timeout
                if self._sweeper is None:
                    self._sweeper = conn._loop.call_later(self._sweep_every, self._sweep)
                try:
                    while (pending := conn.head_pending()) is not None:
                        await pending
                except BaseException:
                    _abort(conn, writer)
                    raise
                finally:
                    del waiting[conn]
                if writer is not None and writer.done() and writer.exception() is not None:
                    _abort(conn, writer)
                    raise UpstreamUnavailable("sending the request body failed")
                return UpstreamResponse(self, conn, writer, self._head_timeout)
            except UpstreamUnavailable:
                if retried or not (conn.reused and not conn.got_bytes and replayable):
                    raise
            retried = True
            conn = await self._connect()  # the pooled connection had gone stale

    async def send_body(
        self,
        conn: UpstreamConnection,
        body: AsyncIterable[bytes],
        *,
        chunked: bool = False,
        tunnel: bool = False,
    ) -> None:
        """Stream a request body (or a tunnel's caller side) with backpressure, chunked-framed
        when its length is unknown.

        Each chunk that went out moves the response head's deadline (see :meth:`request`). If
        the caller's body breaks off, the upstream connection is aborted, so the upstream never
        takes a truncated body for a complete one. A tunnel's end is passed on as a half-close.
        """
        transport = conn.transport
        if transport is None:
            return
        waiting = self._waiting
        timeout = self._head_timeout
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if chunked:
                    transport.write(CHUNK % (len(chunk), chunk))
                else:
                    transport.write(chunk)
                await conn.drain()
                if conn in waiting:
                    waiting[conn] = conn._loop.time() + timeout
            if chunked:
                transport.write(LAST_CHUNK)
            elif tunnel and not transport.is_closing() and transport.can_write_eof():
                transport.write_eof()
        except asyncio.CancelledError:
            transport.abort()
            raise
        except RefusedRequest as exc:  # the caller's body broke a rule (too large)
            conn.fail(exc)
        except Exception as exc:  # noqa: BLE001 - any failure of either side ends this exchange
            conn.fail(UpstreamUnavailable(f"request body could not be sent: {type(exc).__name__}"))

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


def _abort(conn: UpstreamConnection, writer: asyncio.Task[None] | None) -> None:
    if writer is not None and not writer.done():
        writer.cancel()
    conn.closed = True
    if conn.transport is not None:
        conn.transport.abort()
