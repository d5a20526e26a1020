"""A raw HTTP/1.1 upstream for byte-level tests: it records every byte each connection brings,
parses requests with h11 (a parser independent of sidecar's llhttp) and answers each complete
request with a small 200 at once. It never switches protocols: an ``Upgrade`` request gets a
plain 200 and the connection stays open for whatever comes next, as an upstream that does not
speak WebSocket would behave.

Each answer carries ``X-Upstream-Request: <n>``, a counter over all the upstream's connections,
so a test can tell which request a response that reached the caller answers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import h11

#: the header naming the request (numbered from 1 across connections) an answer belongs to
ANSWER_HEADER = "X-Upstream-Request"


@dataclass
class RawConnection:
    """What one connection from sidecar brought, byte for byte."""

    #: 1 for the first connection accepted, 2 for the next, ...
    number: int
    data: bytearray = field(default_factory=bytearray)
    #: the counter values of the requests answered on this connection, in order
    answered: list[int] = field(default_factory=list)
    #: the peer ended its side (EOF or reset)
    ended: bool = False
    #: what h11 objected to, when the bytes stopped being HTTP/1.1 requests
    error: str | None = None


class RawUpstream:
    """An asyncio server on 127.0.0.1:0; ``connections`` lists everything it received."""

    def __init__(self) -> None:
        self.connections: list[RawConnection] = []
        self.answered = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        """Listen on a free loopback port; returns ``http://127.0.0.1:<port>``."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        """Stop listening and cut every connection still open."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # each connection's task then reads its end and returns
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        record = RawConnection(number=len(self.connections) + 1)
        self.connections.append(record)
        try:
            await self._serve(reader, writer, record)
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: RawConnection
    ) -> None:
        parser = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        while True:
            try:
                data = await reader.read(65536)
            except ConnectionError:
                data = b""
            record.data += data
            if not data:
                record.ended = True
            parser.receive_data(data)
            try:
                while True:
                    event = parser.next_event()
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.EndOfMessage) and request is not None:
                        writer.write(self._answer(parser, request, record))
                        request = None
                    elif event is h11.PAUSED and parser.states == {
                        h11.CLIENT: h11.DONE,
                        h11.SERVER: h11.DONE,
                    }:
                        parser.start_next_cycle()
                    elif event in (h11.NEED_DATA, h11.PAUSED) or isinstance(
                        event, h11.ConnectionClosed
                    ):
                        break
            except h11.RemoteProtocolError as exc:
                record.error = str(exc)
                return
            if not data:
                return

    def _answer(self, parser: h11.Connection, request: h11.Request, record: RawConnection) -> bytes:
        """A 200 naming the request; never 101, whatever the request asked for."""
        self.answered += 1
        number = self.answered
        record.answered.append(number)
        body = b"upstream request %d: %b %b\n" % (number, request.method, request.target)
        head = h11.Response(
            status_code=200,
            headers=[
                ("Content-Type", "text/plain"),
                ("Content-Length", str(len(body))),
                (ANSWER_HEADER, str(number)),
            ],
        )
        out = parser.send(head) or b""
        if request.method != b"HEAD":
            out += parser.send(h11.Data(data=body)) or b""
        out += parser.send(h11.EndOfMessage()) or b""
        return out


# -- reading the recorded bytes back, after the fact


@dataclass
class UpstreamRequest:
    """One request as h11 read it from the bytes the upstream received."""

    connection: int
    #: the X-Upstream-Request value its answer carried (0 for a request that never completed)
    number: int
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]]
    complete: bool = True

    def header(self, name: str) -> list[bytes]:
        """Every value of header ``name`` (any case)."""
        return [v for n, v in self.headers if n.decode("latin-1").lower() == name]

    def describe(self) -> str:
        return f"#{self.number} on connection {self.connection}: {self.method} {self.target}"


@dataclass
class Reading:
    """One upstream connection's bytes, read by h11."""

    record: RawConnection
    requests: list[UpstreamRequest] = field(default_factory=list)
    #: a request whose head arrived but whose body did not end before the connection did
    truncated: UpstreamRequest | None = None
    #: bytes that are neither a request head nor part of a body
    stray: bytes = b""
    error: str | None = None


def read_back(record: RawConnection) -> Reading:
    """Read one upstream connection's bytes with h11, answering each request as a server must
    before h11 reads the next (the answers go nowhere)."""
    out = Reading(record)
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(bytes(record.data))
    current: UpstreamRequest | None = None
    try:
        while True:
            event = parser.next_event()
            if isinstance(event, h11.Request):
                current = UpstreamRequest(
                    record.number,
                    0,
                    event.method.decode("latin-1"),
                    event.target.decode("latin-1"),
                    list(event.headers.raw_items()),
                    b"",
                    [],
                )
            elif isinstance(event, h11.Data) and current is not None:
                current.body += event.data
            elif isinstance(event, h11.EndOfMessage) and current is not None:
                current.trailers = list(event.headers.raw_items())
                index = len(out.requests)
                current.number = record.answered[index] if index < len(record.answered) else 0
                out.requests.append(current)
                current = None
                parser.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                parser.send(h11.EndOfMessage())
            elif event is h11.PAUSED and parser.states == {
                h11.CLIENT: h11.DONE,
                h11.SERVER: h11.DONE,
            }:
                parser.start_next_cycle()
            else:
                break
    except h11.RemoteProtocolError as exc:
        out.error = str(exc)
    leftover = parser.trailing_data[0]
    if current is not None:
        current.complete = False
        out.truncated = current
    elif leftover or out.error:
        out.stray = leftover
    return out
