"""The caller's side of :8080 on the wire, where requests are odd or hostile: trailers, heads of
any size in one packet, bodies that break after the handler started, TRACE, unknown methods,
HTTP/1.0 keep-alive, half-closing callers, Connection lists and look-alike header names."""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path

import pytest

from tests.conftest import MakeSidecar
from tests.fakes.upstream import FakeUpstream, header_values
from tests.helpers import eventually, read_response

SIDECAR_DIR = Path(__file__).resolve().parent.parent / "sidecar"


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def until_closed(reader: asyncio.StreamReader, within: float = 5) -> bytes:
    return await asyncio.wait_for(reader.read(), within)


async def test_request_trailers_never_become_headers(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """Trailer fields of a chunked request are dropped: an X-Forwarded-For or Authorization in
    the trailers does not reach the upstream as a header; the body does."""
    sidecar = await make_sidecar()
    reader, writer = await connect(sidecar.proxy_port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nX-Trailer: t\r\n\r\n"
    )
    head, body = await read_response(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["body"] == "abc"
    seen = upstream.seen[-1]
    assert header_values(seen, "X-Forwarded-For") == []
    assert header_values(seen, "X-Trailer") == []


async def test_a_big_head_in_one_packet_is_refused_with_431(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """The 64 KiB head limit holds whatever the read boundaries: an 80 KB head of ordinary-sized
    lines written in one piece is refused with 431 and reaches no upstream."""
    sidecar = await make_sidecar()
    reader, writer = await connect(sidecar.proxy_port)
    lines = b"".join(b"X-%d: %b\r\n" % (i, b"v" * 8000) for i in range(10))
    writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\n" + lines + b"\r\n")
    raw = await until_closed(reader)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 431")
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("name", "late"),
    [
        ("malformed chunk", b"zz\r\n"),
        ("too many trailer fields", b"0\r\n" + b"".join(b"T-%d: 1\r\n" % i for i in range(200))),
    ],
)
async def test_a_body_that_breaks_after_the_handler_started_gets_one_answer(
    make_sidecar: MakeSidecar, upstream: FakeUpstream, name: str, late: bytes
) -> None:
    """When a chunked body turns bad once its request is being forwarded, the caller gets
    exactly one answer (the refusal, as the answer had not begun) and the connection closes."""
    sidecar = await make_sidecar()
    reader, writer = await connect(sidecar.proxy_port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n"
    )
    await eventually(lambda: len(upstream.seen) == 1, what="the upstream has the request")
    writer.write(late)
    raw = await until_closed(reader)
    writer.close()
    assert raw.count(b"HTTP/1.1 ") == 1, (name, raw)
    assert raw.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), name
    assert b"X-Sidecar-Error: 1" in raw


@pytest.mark.parametrize(
    ("method", "status"), [("TRACE", 405), ("TRACK", 405), ("BAN", 501), ("X-PURGE-ALL", 501)]
)
async def test_trace_track_and_unknown_methods_are_refused(
    make_sidecar: MakeSidecar, upstream: FakeUpstream, method: str, status: int
) -> None:
    """TRACE and TRACK (which would echo the token back) get 405; methods llhttp cannot parse
    get 501 with a detail naming the method; none reaches the upstream."""
    sidecar = await make_sidecar()
    reader, writer = await connect(sidecar.proxy_port)
    writer.write(f"{method} /x HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    raw = await until_closed(reader)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), method
    assert b"X-Sidecar-Error: 1" in head
    assert method in json.loads(body)["detail"]
    assert upstream.seen == []


async def test_http10_keep_alive_is_announced_and_honoured(make_sidecar: MakeSidecar) -> None:
    """An HTTP/1.0 caller asking for keep-alive is told ``Connection: keep-alive`` (else it could
    not know, and would wait for the close) and can send a second request on the connection."""
    sidecar = await make_sidecar()
    reader, writer = await connect(sidecar.proxy_port)
    for _ in range(2):
        writer.write(b"GET /status/200 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"Connection: keep-alive" in head
    writer.close()


async def test_each_http_version_is_answered_as_such(make_sidecar: MakeSidecar) -> None:
    """The version llhttp read decides: HTTP/1.1 (with or without a Connection field) stays
    open unannounced; 1.0 and 2.0 without keep-alive (1.0 needs no Host) are answered with
    ``Connection: close`` and closed; a version llhttp does not read (1.2) is a 400."""
    sidecar = await make_sidecar()
    reader, writer = await connect(sidecar.proxy_port)
    for extra in (b"", b"Connection: keep-alive\r\n", b"Connection: x-other\r\n"):
        writer.write(b"GET /status/200 HTTP/1.1\r\nHost: localhost\r\n" + extra + b"\r\n")
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200"), extra
        assert b"Connection:" not in head, extra
    writer.close()
    for request, status in (
        (b"GET /status/200 HTTP/1.0\r\n\r\n", b"200"),
        (b"GET /status/200 HTTP/2.0\r\nHost: localhost\r\n\r\n", b"200"),
        (b"GET /status/200 HTTP/1.2\r\nHost: localhost\r\n\r\n", b"400"),
    ):
        reader, writer = await connect(sidecar.proxy_port)
        writer.write(request)
        raw = await until_closed(reader)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 " + status), (request, raw[:80])
        assert b"Connection: close" in raw.partition(b"\r\n\r\n")[0], request


async def test_http10_callers_are_never_sent_100_continue(make_sidecar: MakeSidecar) -> None:
    """An HTTP/1.0 request with ``Expect: 100-continue`` gets no interim answer: its first
    response line is the final one. ``Proxy-Connection: keep-alive`` (which llhttp reads as
    Connection, and older clients send to proxies) keeps it alive, and it is still 1.0."""
    sidecar = await make_sidecar()
    for extra, stays_open in ((b"", False), (b"Proxy-Connection: keep-alive\r\n", True)):
        reader, writer = await connect(sidecar.proxy_port)
        writer.write(
            b"POST /echo HTTP/1.0\r\n" + extra + b"Content-Length: 3\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        await asyncio.sleep(0.2)
        writer.write(b"abc")
        if stays_open:
            head, body = await read_response(reader)
            raw = head + b"\r\n\r\n" + body
            assert b"Connection: keep-alive" in head, head
        else:
            raw = await until_closed(reader)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200"), (extra, raw[:40])
        assert b"100 Continue" not in raw, extra


async def test_a_caller_that_half_closes_after_its_request_gets_the_answer(
    make_sidecar: MakeSidecar,
) -> None:
    """``printf 'GET ...' | nc -N``: the request is complete, then the caller shuts down its
    sending side; it still gets the answer, then the connection closes."""
    sidecar = await make_sidecar()
    reader, writer = await connect(sidecar.proxy_port)
    writer.write(b"GET /slow/0.1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    writer.write_eof()
    raw = await until_closed(reader)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200")
    assert raw.endswith(b'{"slept": 0.1}')


async def test_every_connection_line_is_honoured_and_look_alike_names_are_dropped(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """Headers named by any of several Connection lines are not forwarded, and names with
    underscores that servers map to framing or managed headers (Transfer_Encoding,
    Content_Length, X_Request_ID) are dropped; other underscore names pass."""
    sidecar = await make_sidecar()
    reader, writer = await connect(sidecar.proxy_port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nConnection: X-First\r\nConnection: X-Second\r\n"
        b"X-First: 1\r\nX-Second: 2\r\nTransfer_Encoding: chunked\r\nContent_Length: 99\r\n"
        b"X_Request_ID: forged\r\nAuthorization_: x\r\nX_Custom: kept\r\n"
        b"Content-Length: 3\r\n\r\nabc"
    )
    head, body = await read_response(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    names = {k.lower() for k, _ in upstream.seen[-1].header_list}
    for gone in ("x-first", "x-second", "transfer_encoding", "content_length", "x_request_id"):
        assert gone not in names, gone
    assert "x_custom" in names
    assert json.loads(body)["body"] == "abc"


@pytest.mark.parametrize(
    "path",
    ["/a/..;/b", "/a/..;jsessionid=1/b", "/a/%c0%ae%c0%ae/b", "/a/%25c0%25ae./b", "/a%c0%af../b"],
)
async def test_disguised_dot_segments_are_refused(
    make_sidecar: MakeSidecar, upstream: FakeUpstream, path: str
) -> None:
    """``..;`` (a dot segment to servlet containers) and overlong UTF-8 dots and slashes
    (``%c0%ae``, ``%c0%af``) are refused like plain ``..``; nothing reaches the upstream."""
    sidecar = await make_sidecar()
    reader, writer = await connect(sidecar.proxy_port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    head, body = await read_response(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 400"), path
    assert json.loads(body)["error"] == "path_traversal_refused"
    assert upstream.seen == []


DATA_PATH = sorted(
    path.relative_to(SIDECAR_DIR).as_posix()
    for package in ("http", "proxy")
    for path in (SIDECAR_DIR / package).glob("*.py")
)


@pytest.mark.parametrize("module", DATA_PATH)
def test_no_assert_on_the_data_path(module: str) -> None:
    """The data path (both packages, the caller's side and the upstream's) checks with real code,
    never ``assert`` (which ``python -O`` removes): the behaviour must not depend on the
    interpreter's flags."""
    tree = ast.parse((SIDECAR_DIR / module).read_text(encoding="utf-8"))
    found = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert found == [], f"sidecar/{module}: assert on lines {found}"


async def test_requests_queued_before_a_refused_one_are_all_answered_first(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """Two good requests and a third with a bad chunk, pipelined in one write: the refusal is
    parsed before the first answer goes out, yet both good requests are forwarded and answered
    (neither announces a close), then the 400, then the connection closes (found by make fuzz)."""
    sidecar = await make_sidecar()
    reader, writer = await connect(sidecar.proxy_port)
    writer.write(
        b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"POST /c HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5 5\r\n"
    )
    answers = [await read_response(reader) for _ in range(3)]
    rest = await until_closed(reader)
    writer.close()
    assert [head.split(b"\r\n", 1)[0] for head, _ in answers] == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 400 Bad Request",
    ]
    assert [b"Connection: close" in head for head, _ in answers] == [False, False, True]
    assert rest == b""
    assert [seen.path_qs for seen in upstream.seen] == ["/a", "/b"]
