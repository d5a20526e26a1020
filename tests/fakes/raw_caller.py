"""A raw HTTP/1.1 caller for byte-level tests: it writes a generated sequence in its pieces (with
the pauses and the half-close it asks for), collects every byte that comes back, and reads the
answers with h11 as the client that sent those requests would.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import h11

from tests.fakes.http_sequences import Sequence

#: after its last write, a caller that sees no byte for this long stops waiting for more
IDLE = 2.0


@dataclass
class CallerResult:
    """What came back on a caller's connection."""

    received: bytes
    #: sidecar ended the connection (EOF or reset) rather than leaving it open
    ended: bool


@dataclass
class Answer:
    """One response h11 read on the caller's side."""

    status: int
    headers: dict[str, str]
    body: bytes


async def converse(port: int, sequence: Sequence, idle: float = IDLE) -> CallerResult:
    """Write the sequence's pieces (pausing where it says), half-close if it says, and read
    everything sidecar sends until it ends the connection or goes quiet for ``idle`` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    ended = False

    async def read() -> None:
        nonlocal ended
        try:
            while chunk := await reader.read(65536):
                received.extend(chunk)
        except ConnectionError:
            pass
        ended = True

    reading = asyncio.create_task(read())
    try:
        await _write(writer, sequence, reading)
        while not reading.done():
            before = len(received)
            await asyncio.wait({reading}, timeout=idle)
            if len(received) == before:
                break
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return CallerResult(bytes(received), ended)


async def _write(
    writer: asyncio.StreamWriter, sequence: Sequence, reading: asyncio.Task[None]
) -> None:
    """Write the pieces until sidecar ends the connection (the rest cannot matter then); a
    reset or a socket already gone is sidecar's choice to make, not an error of the caller."""
    with contextlib.suppress(OSError):
        for piece, pause in sequence.pieces:
            if reading.done() or writer.transport.is_closing():
                return
            writer.write(piece)
            await writer.drain()
            if pause is not None:
                await asyncio.sleep(pause)
        if sequence.half_close and not reading.done() and not writer.transport.is_closing():
            writer.write_eof()


def read_answers(result: CallerResult, methods: list[str]) -> tuple[list[Answer], bytes, bool]:
    """Read the caller's side with h11 as the client that sent ``methods`` in turn: the answers,
    the bytes after the last one read, and whether an answer broke off unfinished."""
    parser = h11.Connection(h11.CLIENT)
    parser.receive_data(result.received)
    if result.ended:
        parser.receive_data(b"")
    answers: list[Answer] = []
    broken = False
    for method in methods:
        if parser.states != {h11.CLIENT: h11.IDLE, h11.SERVER: h11.IDLE}:
            break
        parser.send(
            h11.Request(method=method, target="/", headers=[("Host", "x"), ("Content-Length", "0")])
        )
        parser.send(h11.EndOfMessage())
        response: h11.Response | None = None
        body = b""
        try:
            while True:
                event = parser.next_event()
                if isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif not isinstance(event, h11.InformationalResponse):
                    broken = response is not None
                    return answers, parser.trailing_data[0], broken
        except h11.RemoteProtocolError:
            return answers, parser.trailing_data[0], response is not None
        assert response is not None
        headers = {n.decode().lower(): v.decode("latin-1") for n, v in response.headers}
        answers.append(Answer(response.status_code, headers, body))
        if parser.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}:
            parser.start_next_cycle()
    return answers, parser.trailing_data[0], broken
