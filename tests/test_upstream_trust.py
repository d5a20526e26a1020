"""The upstream leg holds the data path's promise (issue "Data path trust"): only requests a caller
sent reach the upstream, an Upgrade's following bytes go upstream only after a 101, and whatever the
upstream sends back (trailers, huge heads, odd framing, odd status codes) cannot become headers,
exhaust memory or cut a body short.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
from collections.abc import AsyncIterator

import aiohttp

from tests.conftest import MakeSidecar, proxy_url
from tests.fakes.scripted_upstream import RawRequest, Wire, ok, scripted_upstream
from tests.helpers import exchange


class Endless:
    """An upstream's ``on_head`` that writes ``start`` and then pushes 64 MiB of ``a`` for as long
    as the connection takes it; :attr:`pushed` counts what was taken."""

    def __init__(self, start: bytes) -> None:
        self.start = start
        self.pushed = 0

    async def __call__(
        self, _request: RawRequest, _wire: Wire, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(self.start)
        block = b"a" * (1 << 20)
        with contextlib.suppress(ConnectionError):
            for _ in range(64):
                writer.write(block)
                await writer.drain()
                self.pushed += len(block)
        return True


async def relayed(make_sidecar: MakeSidecar, answer: bytes, path: bytes) -> bytes:
    """What a caller's GET ``path`` gets back (within 1 s) through a new sidecar whose upstream
    answers it with the bytes ``answer``."""

    async def canned(_request: RawRequest) -> bytes:
        return answer

    async with scripted_upstream(canned) as upstream:
        sidecar = await make_sidecar(upstream={"url": upstream.url})
        request = b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
        return await exchange(sidecar.proxy_port, request, within=1)


def split_answer(raw: bytes) -> tuple[bytes, bytes]:
    """A raw answer's head (status line and headers, lower-cased) and the rest."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    return head.lower(), rest


def dechunk(data: bytes) -> bytes:
    """The payload of a chunked body (trailers ignored)."""
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out += data[:size]
        data = data[size + 2 :]


async def chat_is_plain(request: RawRequest) -> bytes:
    """/chat answers a plain 200 and keeps the connection; others say what they saw."""
    if request.target == "/chat":
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    return await ok(request)


async def test_an_upgrade_not_switched_sends_only_its_head_and_the_connection_is_not_reused(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """The issue's reproducer: a caller sends an Upgrade head followed by a second request and
    half-closes; the upstream answers a plain 200 on /chat. The second request never reaches the
    upstream, the upstream connection is not pooled, the caller's connection closes after the
    answer, and the next caller gets its own answer (its head, with the token, is nobody's body)."""
    async with scripted_upstream(chat_is_plain) as upstream:
        sidecar = await make_sidecar(upstream={"url": upstream.url})
        attack = (
            b"GET /chat HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n"
            b"POST /store HTTP/1.1\r\nHost: localhost\r\nContent-Length: 250\r\n\r\n"
        )
        answer = await exchange(sidecar.proxy_port, attack, half_close=True)
        head, body = split_answer(answer)
        assert head.startswith(b"http/1.1 200"), answer
        assert body == b"ok"  # one answer, then the connection closed
        async with http.get(proxy_url(sidecar, "/victim")) as resp:
            assert resp.status == 200
            assert await resp.text() == "GET /victim 0"
        assert [r.target for r in upstream.requests] == ["/chat", "/victim"]
        assert b"/store" not in b"".join(upstream.received)
        assert upstream.requests[0].connection != upstream.requests[1].connection


async def test_websocket_bytes_go_upstream_only_after_the_101(make_sidecar: MakeSidecar) -> None:
    """Bytes a caller sends right behind its Upgrade head wait for the upstream's 101; then they
    pass through the tunnel, and the caller's half-close reaches the upstream."""
    got_head = asyncio.Event()
    seen_before_101 = bytearray()
    tunnelled = bytearray()

    async def on_head(request: RawRequest, reader: Wire, writer: asyncio.StreamWriter) -> bool:
        got_head.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                seen_before_101.extend(await reader.read(100))
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        while data := await reader.read(65536):
            tunnelled.extend(data)
        writer.write(b"bye")
        return True

    async with scripted_upstream(on_head=on_head) as upstream:
        sidecar = await make_sidecar(upstream={"url": upstream.url})
        answer = await exchange(
            sidecar.proxy_port,
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n"
            b"early-bytes",
            half_close=True,
        )
    assert got_head.is_set()
    assert bytes(seen_before_101) == b""
    assert bytes(tunnelled) == b"early-bytes"
    assert answer.startswith(b"HTTP/1.1 101")
    assert answer.endswith(b"\r\n\r\nbye")


async def test_a_non_websocket_upgrade_with_a_body_is_forwarded_as_a_plain_request(
    make_sidecar: MakeSidecar,
) -> None:
    """``curl --http2 -d data``: the h2c Upgrade is dropped and the body, whether framed by
    Content-Length or chunked, reaches the upstream; then the caller's connection closes."""
    for framing, body in (
        (b"Content-Length: 4", b"data"),
        (b"Transfer-Encoding: chunked", b"2\r\nda\r\n2\r\nta\r\n0\r\n\r\n"),
    ):
        async with scripted_upstream() as upstream:
            sidecar = await make_sidecar(upstream={"url": upstream.url})
            answer = await exchange(
                sidecar.proxy_port,
                b"POST /x HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                + framing
                + b"\r\n\r\n"
                + body
                + b"GET /next HTTP/1.1\r\nHost: localhost\r\n\r\n",
            )
        head, rest = split_answer(answer)
        assert head.startswith(b"http/1.1 200"), answer
        assert b"connection: close" in head
        assert rest == b"POST /x 4"
        (seen,) = upstream.requests
        assert seen.body == b"data"
        assert seen.header("upgrade") is None
        assert seen.header("http2-settings") is None


async def trailer_answer(_request: RawRequest) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: Set-Cookie\r\n\r\n"
        b"2\r\nok\r\n0\r\nSet-Cookie: stolen=1\r\nX-Late: 1\r\n\r\n"
    )


async def test_upstream_trailers_never_become_headers(make_sidecar: MakeSidecar) -> None:
    """A trailer field (Set-Cookie) on a chunked answer does not reach the caller as a header,
    whether the answer arrives in one piece or the trailer comes later."""

    async def late_trailer(request: RawRequest) -> bytes:
        await asyncio.sleep(0.2)  # the head and first chunk went out already (see on_head)
        return b"0\r\nSet-Cookie: stolen=1\r\n\r\n"

    async def head_first(request: RawRequest, _wire: Wire, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        await writer.drain()
        writer.write(await late_trailer(request))
        return True

    for answer_kind in ("whole", "late"):
        if answer_kind == "whole":
            context = scripted_upstream(trailer_answer)
        else:
            context = scripted_upstream(on_head=head_first)
        async with context as upstream:
            sidecar = await make_sidecar(upstream={"url": upstream.url})
            answer = await exchange(
                sidecar.proxy_port,
                b"GET /t HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
        head, body = split_answer(answer)
        assert head.startswith(b"http/1.1 200"), answer
        assert b"set-cookie" not in answer.lower(), answer_kind
        assert b"x-late" not in answer.lower(), answer_kind
        if b"transfer-encoding: chunked" in head:
            body = dechunk(body)
        assert body == b"ok", answer_kind


async def test_bytes_behind_a_whole_answer_in_the_same_read_never_reach_the_caller(
    make_sidecar: MakeSidecar,
) -> None:
    """A second answer (or any bytes) written right behind a complete one is not parsed into it:
    the caller gets the first answer exactly (its body, its reason), and the upstream connection
    is not used again (the next request opens a new one)."""
    first = b"HTTP/1.1 200 Fine\r\nContent-Length: 2\r\n\r\nhi"
    for behind in (
        b"HTTP/1.1 201 Other\r\nContent-Length: 3\r\nX-Second: 1\r\n\r\nbye",
        b"HTTP/1.1 200 OK\r\nTransfer-Enc",  # half a head
        b"garbage",
    ):

        async def doubled(_request: RawRequest, answer: bytes = first + behind) -> bytes:
            return answer

        async with scripted_upstream(doubled) as upstream:
            sidecar = await make_sidecar(upstream={"url": upstream.url})
            request = b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            for _ in range(2):
                raw = await exchange(sidecar.proxy_port, request, within=1)
                head, body = split_answer(raw)
                assert head.startswith(b"http/1.1 200 fine\r\n"), (behind, raw)
                assert b"x-second" not in head, behind
                assert body == b"hi", (behind, raw)
            assert upstream.connections == 2, behind


#: answers of every framing, by target: each one's body as the caller must get it
FRAMED = {
    "/small": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    "/chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"abc",
    ),
    "/trailer": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nt\r\n0\r\nX-T: 1\r\n\r\n",
        b"t",
    ),
    "/empty": (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    "/interim": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\ni",
        b"i",
    ),
    # larger than one read: its later bytes bypass llhttp (see UpstreamConnection.data_received)
    "/big": (b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"b" * 300000, b"b" * 300000),
}


async def test_a_pooled_connection_parses_each_answer_from_its_start(
    make_sidecar: MakeSidecar,
) -> None:
    """Answers of every framing (length, chunked, trailers, none, an interim 103, a body larger
    than a read, a HEAD's) follow each other on the pooled upstream connections in every order
    of pairs, and each reaches the caller exactly: nothing of one answer is parsed into the
    next. (Two /big in a row: the second arrives whole while reading is paused for it; its
    connection must read again once that body is taken, or the next answer times out.)"""

    async def by_target(request: RawRequest) -> bytes:
        if request.method == "HEAD":  # a length, and no body
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        return FRAMED[request.target][0]

    order = [(a, b) for a in FRAMED for b in FRAMED]
    async with scripted_upstream(by_target) as upstream:
        sidecar = await make_sidecar(upstream={"url": upstream.url})
        async with aiohttp.ClientSession() as client:
            for first, second in order:
                for target in (first, second):
                    async with client.get(proxy_url(sidecar, target)) as response:
                        assert (target, await response.read()) == (target, FRAMED[target][1])
                async with client.head(proxy_url(sidecar, first)) as response:
                    assert response.status == 200, first
        # the connections were reused (a HEAD's is not: llhttp cannot be told it has no body)
        assert upstream.connections <= len(order) + 2


async def test_a_dropped_request_is_sent_again_once_only_when_that_is_harmless(
    make_sidecar: MakeSidecar,
) -> None:
    """A pooled connection the upstream closes on reading the next request (its keep-alive
    timeout racing the request) costs the caller nothing when sending it twice is harmless: an
    idempotent request goes once more on a new connection. A streamed body cannot be sent
    again, and a POST must not be (the upstream may have acted on it before closing, RFC 9110
    9.2.2): each is a 502, and the upstream saw it once."""
    seen: list[int] = []

    async def drop_second(request: RawRequest, wire: Wire, _writer: asyncio.StreamWriter) -> bool:
        seen.append(request.connection)
        if seen.count(request.connection) != 2:
            return False
        length = int(request.header("Content-Length") or 0)
        if length:
            request.body = await wire.readexactly(length)  # read whole, then closed unanswered
        return True

    async def chunks() -> AsyncIterator[bytes]:
        yield b"part"

    async with scripted_upstream(on_head=drop_second) as upstream:
        sidecar = await make_sidecar(upstream={"url": upstream.url})
        async with aiohttp.ClientSession() as client:
            for _ in range(2):
                async with client.get(proxy_url(sidecar, "/r")) as response:
                    assert response.status == 200
            assert upstream.connections == 2
            async with client.post(proxy_url(sidecar, "/s"), data=chunks()) as response:
                assert response.status == 502
            async with client.get(proxy_url(sidecar, "/warm")) as response:
                assert response.status == 200
            async with client.post(proxy_url(sidecar, "/pay"), data=b"amount=100") as response:
                assert response.status == 502
        posts = [r.body for r in upstream.requests if r.target == "/pay"]
        assert posts == [b"amount=100"], posts


async def test_hop_by_hop_fields_of_the_upstreams_answer_stay_behind(
    make_sidecar: MakeSidecar,
) -> None:
    """The upstream's Connection header and the fields it names (RFC 9110 7.6.1), in any case
    and over several lines, never reach the caller; its other fields do, names as sent."""
    for connection in (b"keep-alive", b"close", b"Keep-Alive, X-Hop", b"x-hop"):
        answer = (
            b"HTTP/1.1 200 OK\r\nConnection: " + connection + b"\r\nConnection: X-Other\r\n"
            b"X-Hop: 1\r\nx-other: 2\r\nKeep-Alive: timeout=5\r\nX-Kept: 3\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )
        raw = await relayed(make_sidecar, answer, b"/c")
        head, body = split_answer(raw)
        assert body == b"ok", connection
        assert b"\r\nx-kept: 3" in head, connection
        for gone in (b"x-other", b"keep-alive: timeout"):
            assert gone not in head, (connection, head)
        assert (b"x-hop" in head) == (b"hop" not in connection.lower()), (connection, head)


async def test_a_connection_list_naming_content_length_leaves_the_framing(
    make_sidecar: MakeSidecar,
) -> None:
    """``Connection: Content-Length`` from the upstream does not strip the length the caller
    needs to find the end of the answer (a streamed one: the body arrives in two parts), so a
    pipelined second request's answer is not taken for more of the first body."""

    async def on_head(request: RawRequest, _wire: Wire, writer: asyncio.StreamWriter) -> bool:
        if request.target != "/first":
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 10\r\n\r\n")
        writer.write(b"hello")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"world")
        return True

    async with scripted_upstream(on_head=on_head) as upstream:
        sidecar = await make_sidecar(upstream={"url": upstream.url})
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
        writer.write(
            b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"GET /second HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert b"\r\nContent-Length: 10" in head, head
        assert await asyncio.wait_for(reader.readexactly(10), 2) == b"helloworld"
        second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert second.startswith(b"HTTP/1.1 200"), second
        writer.close()


async def test_bytes_behind_a_closing_answer_cost_the_caller_nothing(
    make_sidecar: MakeSidecar,
) -> None:
    """An answer with ``Connection: close`` and bytes behind it in the same read (what llhttp
    calls data after close): the answer is relayed whole, the bytes are dropped with that
    upstream connection, and the caller's connection goes on with its next request."""

    async def closing(_request: RawRequest) -> bytes:
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nokJUNK"

    async with scripted_upstream(closing) as upstream:
        sidecar = await make_sidecar(upstream={"url": upstream.url})
        request = b"GET /c HTTP/1.1\r\nHost: localhost\r\n\r\n"
        raw = await exchange(sidecar.proxy_port, request * 2, within=1)
    assert raw.count(b"HTTP/1.1 200 OK") == 2, raw
    assert b"JUNK" not in raw, raw
    assert upstream.connections == 2


async def test_oversized_upstream_heads_are_502_whatever_the_read_boundaries(
    make_sidecar: MakeSidecar,
) -> None:
    """A response head larger than the limit, in one write or dribbled, or with too many header
    lines, is a 502 JSON error; the upstream connection is dropped."""
    big = b"X-Big: " + b"a" * (80 * 1024) + b"\r\n"
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(300))
    for name, extra in (("one write", big), ("many lines", many)):
        answer = b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: 2\r\n\r\nok"
        raw = await relayed(make_sidecar, answer, b"/h")
        head, body = split_answer(raw)
        assert head.startswith(b"http/1.1 502"), (name, raw[:200])
        assert b"x-sidecar-error: 1" in head
        assert b"response head" in body, body


async def test_a_64_mib_upstream_header_is_refused_without_being_buffered(
    make_sidecar: MakeSidecar,
) -> None:
    """An upstream streaming an endless header line gets its connection cut after the limit: the
    caller has a 502 quickly and the upstream could not push more than a few MiB."""
    endless = Endless(b"HTTP/1.1 200 OK\r\nX-Huge: ")
    async with scripted_upstream(on_head=endless) as upstream:
        sidecar = await make_sidecar(upstream={"url": upstream.url})
        raw = await exchange(
            sidecar.proxy_port, b"GET /h HTTP/1.1\r\nHost: localhost\r\n\r\n", within=5
        )
    assert raw.startswith(b"HTTP/1.1 502"), raw[:200]
    assert endless.pushed < 16 << 20, f"the upstream pushed {endless.pushed >> 20} MiB"


async def test_a_body_delimited_by_close_under_a_transfer_coding_is_relayed_whole(
    make_sidecar: MakeSidecar,
) -> None:
    """``Transfer-Encoding: gzip`` without chunked: the body runs to the end of the connection
    (RFC 9112 6.3) and reaches the caller whole, the coding named, re-framed chunked."""
    payload = os.urandom(200_000)
    coded = gzip.compress(payload)

    async def answer(_request: RawRequest, _wire: Wire, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
        for start in range(0, len(coded), 10_000):
            writer.write(coded[start : start + 10_000])
            await writer.drain()
        return True  # closing ends the body

    async with scripted_upstream(on_head=answer) as upstream:
        sidecar = await make_sidecar(upstream={"url": upstream.url})
        raw = await exchange(
            sidecar.proxy_port, b"GET /z HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
    head, body = split_answer(raw)
    assert head.startswith(b"http/1.1 200"), raw[:200]
    assert b"transfer-encoding: gzip, chunked" in head
    assert gzip.decompress(dechunk(body)) == payload


async def test_status_codes_outside_100_to_599_are_502(make_sidecar: MakeSidecar) -> None:
    """An upstream status such as 600 or 999 is not relayed: the caller gets a 502."""
    for status in (b"600", b"999", b"099"):
        answer = b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 2\r\n\r\nok"
        raw = await relayed(make_sidecar, answer, b"/s")
        assert raw.startswith(b"HTTP/1.1 502"), (status, raw[:200])


async def test_an_endless_trailer_section_is_cut_without_being_buffered(
    make_sidecar: MakeSidecar,
) -> None:
    """A chunked answer whose trailer section never ends: the caller's connection is cut (its
    answer cannot be completed) and the upstream could not push more than a few MiB."""
    endless = Endless(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: ")
    async with scripted_upstream(on_head=endless) as upstream:
        sidecar = await make_sidecar(upstream={"url": upstream.url})
        raw = await exchange(
            sidecar.proxy_port, b"GET /t HTTP/1.1\r\nHost: localhost\r\n\r\n", within=5
        )
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    assert not raw.endswith(b"0\r\n\r\n")  # never completed
    assert endless.pushed < 16 << 20, f"the upstream pushed {endless.pushed >> 20} MiB"


async def test_an_upstream_closing_after_its_answer_is_nothing_the_loop_reports(
    make_sidecar: MakeSidecar,
) -> None:
    """An answer delimited by the upstream's close ends the ordinary way: the body reaches the
    caller and the event loop reports no error (an upstream protocol without ``eof_received``
    made asyncio report every upstream close as a fatal protocol error)."""
    loop = asyncio.get_running_loop()
    reported: list[object] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context.get("message")))
    try:
        raw = await relayed(
            make_sidecar, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", b"/"
        )
    finally:
        loop.set_exception_handler(previous)
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"until the end" in raw
    assert reported == []
