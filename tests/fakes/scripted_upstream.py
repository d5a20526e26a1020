"""An upstream written at the socket level, for tests where the bytes themselves matter: it records
every byte it receives and answers each request with whatever raw bytes the test scripts (odd
framing, trailers, huge heads, early answers, interim 100s).

Requests are read with a deliberately small reader (Content-Length and chunked bodies), so that
what it saw is exactly what the proxy sent, independent of the proxy's own parser.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class RawRequest:
    """One request as the upstream read it off the wire."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    #: the connection's number (0 for the first connection the upstream accepted)
    connection: int = 0

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


#: answers a complete request with raw response bytes (closing after them when they say
#: ``Connection: close``)
Answer = Callable[[RawRequest], Awaitable[bytes]]
#: sees a request head before its body is read; may write to the caller (an interim 100 or an
#: early final answer) and returns True when the connection is to be closed without reading on
OnHead = Callable[[RawRequest, "Wire", asyncio.StreamWriter], Awaitable[bool]]


async def ok(request: RawRequest) -> bytes:
    """The default answer: 200 with ``<method> <target>`` and the body's length."""
    body = f"{request.method} {request.target} {len(request.body)}".encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


@dataclass
class ScriptedUpstream:
    """Records raw bytes per connection and the requests parsed from them."""

    answer: Answer = ok
    on_head: OnHead | None = None
    requests: list[RawRequest] = field(default_factory=list)
    received: list[bytearray] = field(default_factory=list)
    url: str = ""
    _server: asyncio.Server | None = None

    @property
    def connections(self) -> int:
        """How many connections the upstream accepted."""
        return len(self.received)

    async def start(self) -> str:
        """Listen on a free loopback port; returns the base URL."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.received)
        raw = bytearray()
        self.received.append(raw)
        wire = Wire(reader, raw)
        try:
            while True:
                head = await wire.readuntil(b"\r\n\r\n")
                request = _parse_head(head, index)
                if self.on_head is not None and await self.on_head(request, wire, writer):
                    self.requests.append(request)
                    break
                request.body = await _read_body(wire, request)
                self.requests.append(request)
                answer = await self.answer(request)
                writer.write(answer)
                await writer.drain()
                if (
                    b"\r\nconnection: close\r\n"
                    in answer.split(b"\r\n\r\n", 1)[0].lower() + b"\r\n"
                ):
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class Wire:
    """A StreamReader that keeps a copy of every byte read."""

    def __init__(self, reader: asyncio.StreamReader, raw: bytearray) -> None:
        self._reader = reader
        self._raw = raw

    async def readuntil(self, sep: bytes) -> bytes:
        data = await self._reader.readuntil(sep)
        self._raw += data
        return data

    async def read(self, n: int) -> bytes:
        data = await self._reader.read(n)
        self._raw += data
        return data

    async def readexactly(self, n: int) -> bytes:
        data = await self._reader.readexactly(n)
        self._raw += data
        return data


def _parse_head(head: bytes, connection: int) -> RawRequest:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return RawRequest(method, target, headers, connection=connection)


async def _read_body(wire: Wire, request: RawRequest) -> bytes:
    if (request.header("transfer-encoding") or "").lower() == "chunked":
        parts: list[bytes] = []
        while True:
            size = int((await wire.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await wire.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailer fields
                return b"".join(parts)
            parts.append(await wire.readexactly(size))
            await wire.readexactly(2)
    length = int(request.header("content-length") or 0)
    return await wire.readexactly(length) if length else b""


@contextlib.asynccontextmanager
async def scripted_upstream(
    answer: Answer = ok, on_head: OnHead | None = None
) -> AsyncIterator[ScriptedUpstream]:
    """A started :class:`ScriptedUpstream`, closed on exit."""
    upstream = ScriptedUpstream(answer, on_head)
    await upstream.start()
    try:
        yield upstream
    finally:
        upstream.close()
