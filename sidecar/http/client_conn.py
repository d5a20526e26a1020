"""One pooled keep-alive HTTP/1.1 connection to the upstream: an ``asyncio.Protocol`` that feeds
llhttp (through ``httptools``) and holds the response's head and body chunks for one exchange.

:mod:`sidecar.http.client` pools these and turns them into responses; a failure here becomes the
error that module maps (:class:`UpstreamBroken` once the head was passed on).
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable
from typing import cast

import httptools

from sidecar.errors import (
    BadUpstreamHead,
    SurplusBytes,
    UpstreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sidecar.http.exchange import wake

#: pause reading from the upstream while this many body bytes wait for the caller
HIGH_WATER = 1 << 18
LOW_WATER = 1 << 16
#: largest response head accepted (status line and header lines, interim answers included),
#: whatever the read boundaries: nginx refuses heads past its 4-8 KiB buffer, we allow more
MAX_HEAD = 64 * 1024
#: most header lines in one response head
MAX_HEADERS = 256


class UpstreamConnection:
    """One keep-alive connection; carries one exchange at a time."""

    # slots: attribute reads and writes are most of what the callbacks do, per answer
    __slots__ = (
        "_body_waiter",
        "_drain_waiter",
        "_error",
        "_head_only",
        "_head_waiter",
        "_loop",
        "_parser",
        "_read_paused",
        "_remaining",
        "_spare",
        "_unparsed",
        "_until_close",
        "_upgrade",
        "_write_paused",
        "buffered",
        "chunks",
        "closed",
        "codings",
        "complete",
        "got_bytes",
        "head_done",
        "headers",
        "keep_alive",
        "on_continue",
        "reason",
        "reused",
        "status",
        "tls",
        "transport",
        "tunnel",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.tls = False
        self._parser: httptools.HttpResponseParser | None = None
        #: the parser of the last answer when llhttp itself saw that answer end, nothing after
        #: it: at the start of a message, it parses the next exchange's answer (see begin)
        self._spare: httptools.HttpResponseParser | None = None
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
        #: transfer codings of the body besides chunked (e.g. b"gzip"), passed on to the caller
        self.codings = b""
        #: writes the upstream's ``100 Continue`` to the caller (set while an expectation is
        #: passed on)
        self.on_continue: Callable[[], None] | None = None
        #: bytes fed to llhttp since it last gave body bytes: what it (and httptools) may hold
        #: as an unfinished head, trailer or chunk line; bounded by MAX_HEAD
        self._unparsed = 0
        #: the answer's body is delimited by the end of the connection
        self._until_close = False
        #: body bytes still to come of a Content-Length answer (0: none, or not counted)
        self._remaining = 0

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
            self.fail(UpstreamUnavailable("upstream sent data without a request"))
            return
        self._unparsed += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, SurplusBytes):
                # the response is whole; what follows it was never asked for: dropped unread,
                # and the connection is not used again (as at a later read, see above)
                self.keep_alive = False
                self._parser = self._spare = None
                return
            if isinstance(cause, BadUpstreamHead):
                self.fail(cause)
            else:
                self.fail(UpstreamUnavailable(f"upstream sent a malformed response: {exc}"))
            return
        except httptools.HttpParserUpgrade as exc:
            if not self.tunnel:
                self.fail(UpstreamUnavailable("upstream switched protocols unexpectedly"))
                return
            self._parser = None
            rest = data[int(exc.args[0]) :]
            if rest:
                self.on_body(rest)
        except httptools.HttpParserError as exc:
            if self.complete and not self.failed:
                # the answer is whole; llhttp refuses what follows it (bytes after an answer
                # with "Connection: close"): dropped unread with the connection, as above
                self.keep_alive = False
                self._parser = self._spare = None
                return
            self.fail(UpstreamUnavailable(f"upstream sent a malformed response: {exc}"))
            return
        if self._unparsed > MAX_HEAD:
            # an unfinished head (or trailer section) growing past the limit, however it was cut
            # into reads: httptools would hold all of it
            what = "trailer section" if self.head_done else "response head"
            self.fail(BadUpstreamHead(f"upstream {what} larger than {MAX_HEAD} bytes"))

    def eof_received(self) -> bool | None:
        """The upstream half-closed: the transport closes; connection_lost says what it meant."""
        return None

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
            self.fail(UpstreamUnavailable(why), close=False)
        self._wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            # a second answer (or anything) behind the whole first one in the same read: llhttp
            # would parse it on, into this exchange's reason, headers and body
            raise SurplusBytes

    def on_status(self, reason: bytes) -> None:
        self.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a trailer field: never merged into the head already passed on
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser is None:
            return
        status = parser.get_status_code()
        if not 100 <= status <= 599:
            raise BadUpstreamHead(f"upstream answered with status {status}, outside 100-599")
        headers = self.headers
        if len(headers) > MAX_HEADERS:
            raise BadUpstreamHead(
                f"upstream response head has more than {MAX_HEADERS} header lines"
            )
        if self._unparsed > MAX_HEAD and _head_size(self.reason, headers) > MAX_HEAD:
            # the reads so far were larger than the limit: measure the head itself (its end
            # may share a read with body bytes, which do not count)
            raise BadUpstreamHead(f"upstream response head larger than {MAX_HEAD} bytes")
        if status == 101 and self._upgrade:
            self.status = status
            self.tunnel = True
            self.head_done = True
            wake(self._head_waiter)
            return
        if 100 <= status < 200:
            if status == 100 and self.on_continue is not None:
                self.on_continue()  # the caller's expectation, met by the upstream
                self.on_continue = None
            self.headers = []  # informational (100, 103): the final answer follows
            self.reason = ""
            return
        self.status = status
        # an Upgrade answered without switching: the connection saw a request the upstream may
        # read differently from us; never use it again
        self.keep_alive = bool(parser.should_keep_alive()) and not self._upgrade
        length = None  # the first Content-Length value, and how many there are
        lengths = 0
        encoded: list[bytes] = []
        for name, value in self.headers:
            size = len(name)
            if size != 14 and size != 17:
                continue  # neither Content-Length nor Transfer-Encoding: not lowered
            lname = name.lower()
            if lname == b"content-length":
                lengths += 1
                if length is None:
                    length = value
            elif lname == b"transfer-encoding":
                encoded.append(value)
        bodiless = status in (204, 304)
        self._until_close = not lengths and not encoded and not bodiless
        if encoded:
            codings = [c.strip().lower() for c in b",".join(encoded).split(b",") if c.strip()]
            if codings and codings[-1] != b"chunked" and not bodiless:
                # RFC 9112 6.3: a final coding other than chunked is delimited by the close
                self._until_close = True
            self.codings = b", ".join(c for c in codings if c != b"chunked")
        if lengths == 1 and length is not None and not (encoded or bodiless or self._head_only):
            # llhttp has checked the value; the body's later bytes bypass it (see data_received)
            self._remaining = int(length)
        self.head_done = True
        wake(self._head_waiter)
        if self._head_only:
            self.keep_alive = False  # llhttp cannot be told a HEAD answer has no body
            self._message_complete()

    def on_body(self, body: bytes) -> None:
        self._unparsed = 0
        if self._head_only:
            return
        self._remaining -= len(body)
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        if self._body_waiter is not None:  # (no call at all for a body nobody waits for yet)
            wake(self._body_waiter)

    def on_message_complete(self) -> None:
        if self.status == 0 or self.tunnel:
            return  # the end of an informational answer, or of the head before a tunnel
        # llhttp read this answer to its end and stands at the start of the next message: it
        # can parse the next answer, unless bytes follow in this read (on_message_begin drops it)
        self._spare = self._parser
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

    def _message_complete(self) -> None:
        if self.complete:
            return
        self.complete = True
        self._parser = None
        if not self.head_done:
            wake(self._head_waiter)
        if self._body_waiter is not None:
            wake(self._body_waiter)

    @property
    def failed(self) -> bool:
        """True once this exchange ended in an error (the next read raises it)."""
        return self._error is not None

    def stop_parsing(self) -> None:
        """Parse nothing more until the next :meth:`begin` (the connection is idle or gone)."""
        self._parser = None

    def fail(self, error: Exception, *, close: bool = True) -> None:
        """End the exchange with ``error`` for whoever waits on it; abort unless ``close`` is
        False."""
        if self._error is None:
            self._error = error
        self._parser = self._spare = None
        if close and self.transport is not None:
            self.transport.abort()
        self.closed = True
        for waiter in (self._head_waiter, self._body_waiter):
            wake(waiter)

    def head_timed_out(self, seconds: float) -> None:
        if not self.head_done:
            self.fail(UpstreamTimeout(f"upstream did not answer within {seconds:g}s"))

    def _wake_drain(self) -> None:
        wake(self._drain_waiter)

    def begin(
        self,
        head_only: bool,
        upgrade: bool = False,
        on_continue: Callable[[], None] | None = None,
    ) -> None:
        """Start an exchange: parse the answer to the request about to be sent. The parser of
        the previous answer goes on when llhttp saw that answer end cleanly with nothing
        behind it (a connection is reused only then, see UpstreamResponse.release); else a
        fresh one (the body went past llhttp, the answer was cut short, to a HEAD...)."""
        parser = self._spare
        self._spare = None
        self._parser = parser if parser is not None else httptools.HttpResponseParser(self)
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
        self.codings = b""
        self.on_continue = on_continue
        self._unparsed = 0

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("upstream connection closed")
        if self._write_paused:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def head_pending(self) -> asyncio.Future[None] | None:
        """None once the response head is here; else a future to await before asking again.
        Raises the exchange's error. (Not a coroutine: the exchange awaits the future itself,
        one frame less per request.)"""
        if self._error is not None:
            raise self._error
        if self.head_done:
            return None
        if self.closed and not self.complete:
            raise UpstreamUnavailable("upstream closed the connection")
        waiter = self._head_waiter = self._loop.create_future()
        return waiter

    def take_all(self) -> bytes:
        """The body bytes received and not yet taken, all at once; reading resumes if it had
        paused for them (a connection pooled while paused would never read its next answer)."""
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)  # (one: no copy)
        chunks.clear()
        self.buffered = 0
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return body

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


def _head_size(reason: str, headers: list[tuple[bytes, bytes]]) -> int:
    """The bytes of a response head: status line and header lines (as llhttp handed them)."""
    return 15 + len(reason) + sum(len(n) + len(v) + 4 for n, v in headers)
