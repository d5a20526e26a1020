"""One exchange on the front: a parsed request, its body stream, and how its answer is written.

These objects only see the connection through :class:`Connection` (flow control and writes), so the
proxy's forwarding logic never touches the protocol or the parser.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol

from sidecar.http.wire import (
    CHUNK,
    CHUNKED,
    CLOSE,
    CONTINUE,
    KEEP_ALIVE,
    STATUS_HEAD,
    WHOLE,
)


class Connection(Protocol):
    """What an exchange needs from the caller's connection (``front.FrontProtocol``)."""

    loop: asyncio.AbstractEventLoop
    #: set when this connection closes after the current answer (refusal, drain, abort)
    closing_after_response: bool

    def pause_reading(self) -> None:
        """Stop reading from the caller (too many body bytes wait unread)."""

    def resume_reading(self) -> None:
        """Read from the caller again."""

    def write(self, data: bytes) -> None:
        """Queue bytes for the caller."""

    async def drain(self) -> None:
        """Wait while the caller's side is backed up; ConnectionResetError once it is gone."""

    def abort(self) -> None:
        """Cut the connection: an answer that cannot be completed must not look complete."""

    def expect_body(self) -> None:
        """The caller was told to send its body (100 Continue): its deadline starts now."""


#: pause reading from the caller while this many body bytes wait for the handler
HIGH_WATER = 1 << 18
LOW_WATER = 1 << 16


class Body:
    """A request body (or, after an upgrade, the caller's raw bytes) as it arrives."""

    __slots__ = ("_chunks", "_conn", "_error", "_waiter", "buffered", "done", "expects_continue")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self.buffered = 0
        self.done = False
        #: the caller holds the body back until it is sent ``100 Continue`` (an HTTP/1.1
        #: request with ``Expect: 100-continue``, RFC 9110 10.1.1)
        self.expects_continue = False

    def feed(self, data: bytes) -> None:
        """Add bytes; reading from the caller pauses while too many wait."""
        self._chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER:
            self._conn.pause_reading()
        wake(self._waiter)

    def finish(self, error: Exception | None = None) -> None:
        """The body ended (cleanly, or with ``error`` for whoever reads next)."""
        if error is not None and not self.done:
            self._error = error
        self.done = True
        wake(self._waiter)

    async def chunk(self) -> bytes | None:
        """The next bytes of the body, or None at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.done:
                return None
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self.buffered -= len(data)
        if self.buffered < LOW_WATER:
            self._conn.resume_reading()
        return data

    async def read(self) -> bytes:
        """The whole body (only for bodies known to be small)."""
        parts = []
        while (data := await self.chunk()) is not None:
            parts.append(data)
        return b"".join(parts)

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        data = await self.chunk()
        if data is None:
            raise StopAsyncIteration
        return data


class Request:
    """One parsed request head, its body stream and where its answer goes."""

    __slots__ = (
        "body",
        "conn",
        "headers",
        "keep_alive",
        "length",
        "method",
        "raw_path",
        "request_id",
        "sent",
        "started",
        "status",
        "traceparent",
        "upgrade",
        "version",
    )

    def __init__(self, conn: Connection, method: str, raw_path: str) -> None:
        self.conn = conn
        self.method = method
        self.raw_path = raw_path
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: Body | None = None
        self.length: int | None = None
        self.keep_alive = True
        self.upgrade = False
        self.version = "1.1"
        self.request_id: str | None = None
        #: the traceparent sent upstream (None until the request is forwarded)
        self.traceparent: str | None = None
        #: the response status once its head was written (0 before), body bytes written so far
        self.status = 0
        self.sent = 0
        self.started = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (``name`` in lower case)."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def wants_websocket(self) -> bool:
        """An upgrade to WebSocket (RFC 6455 4.1): the one protocol switch sidecar tunnels."""
        value = self.header(b"upgrade")
        return self.upgrade and value is not None and value.strip().lower() == b"websocket"

    # -- answering: ``head`` is the header lines (each ending in CRLF), without framing

    def send_continue(self, interim: bytes = CONTINUE) -> None:
        """Tell a caller waiting with ``Expect: 100-continue`` to send its body (RFC 9110
        10.1.1); an HTTP/1.0 caller is never sent a 1xx (it would take it for the answer)."""
        if self.version != "1.0" and not self.started:
            self.conn.write(interim)
        self.conn.expect_body()

    def respond(self, status: int, reason: str, head: bytes, body: bytes) -> None:
        """Answer in one write (one send to the socket), with a Content-Length."""
        length = len(body)
        if self.method == "HEAD":
            body = b""
        self.sent = len(body)
        connection = self._connection(status)
        encoded = _REASONS.get(reason) or _reason_bytes(reason)
        if status in (204, 304):  # no Content-Length (RFC 9110 8.6)
            self.conn.write(STATUS_HEAD % (status, encoded, head + connection) + body)
        else:
            self.conn.write(WHOLE % (status, encoded, head, length, connection, body))

    def start(self, status: int, reason: str, head: bytes, *, chunked: bool) -> None:
        """Write the response head of a streamed answer (chunked when asked and possible)."""
        if chunked:
            head += CHUNKED
        head += self._connection(status)
        encoded = _REASONS.get(reason) or _reason_bytes(reason)
        self.conn.write(STATUS_HEAD % (status, encoded, head))

    def _connection(self, status: int) -> bytes:
        """The answer with ``status`` begins: the Connection line it needs, if any."""
        body = self.body
        self.status = status
        self.started = True
        if status != 101 and (
            not self.keep_alive
            or self.conn.closing_after_response
            # answered before its body was read: the connection closes rather than skip it
            or (body is not None and not body.done)
        ):
            self.keep_alive = False
            return CLOSE
        if self.version == "1.0" and status != 101:
            # HTTP/1.0 keeps a connection only when told so (RFC 9112 9.3, appendix C.2.2)
            return KEEP_ALIVE
        return b""

    async def send(self, data: bytes, chunked: bool = False) -> None:
        """Write body bytes (as one chunk when ``chunked``), waiting while the caller's side is
        backed up."""
        self.sent += len(data)
        self.conn.write(CHUNK % (len(data), data) if chunked else data)
        await self.conn.drain()


_REASONS: dict[str, bytes] = {}


def _reason_bytes(reason: str) -> bytes:
    """Reason phrases, encoded once each (a handful of distinct ones in practice)."""
    encoded = _REASONS.get(reason)
    if encoded is None:
        encoded = reason.encode("latin-1", "replace")
        if len(_REASONS) < 256:
            _REASONS[reason] = encoded
    return encoded


def wake(waiter: asyncio.Future[None] | None) -> None:
    """Release whoever awaits ``waiter`` (if anyone still does)."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
