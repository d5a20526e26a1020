"""Deadlines on the caller's side of :8080 (head, body, 100-continue, idle) and the connection cap:
a caller that stalls is answered 408 (or closed) and its connection given back."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from tests.conftest import MakeSidecar
from tests.fakes.upstream import FakeUpstream
from tests.helpers import sample

REFUSED = 'sidecar_refused_requests_total{reason="%s"}'

FAST = {"head_timeout": 0.4, "body_timeout": 0.4, "idle_timeout": 5}


async def answer(reader: asyncio.StreamReader, within: float = 5) -> tuple[bytes, bytes]:
    """Everything until the proxy closes: the first response's head and the rest."""
    raw = await asyncio.wait_for(reader.read(), within)
    head, _, rest = raw.partition(b"\r\n\r\n")
    return head, rest


async def test_a_head_sent_too_slowly_gets_408_and_the_connection_closes(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """Slowloris: a head that is still incomplete after listen.head_timeout (though bytes keep
    trickling in) is answered 408 with the JSON error, and the connection is closed."""
    sidecar = await make_sidecar(listen=FAST)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\n")
    loop = asyncio.get_running_loop()
    started = loop.time()
    closed = asyncio.ensure_future(answer(reader))
    for i in range(30):  # a header line every 0.1 s: never a silence as long as the deadline
        if closed.done():
            break
        writer.write(b"X-%d: 1\r\n" % i)
        await asyncio.sleep(0.1)
    head, body = await closed
    assert loop.time() - started < 2.0
    assert head.startswith(b"HTTP/1.1 408")
    assert b"X-Sidecar-Error: 1" in head
    assert json.loads(body)["error"] == "head_timeout"
    writer.close()
    assert upstream.seen == []


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_deadline(
    make_sidecar: MakeSidecar,
) -> None:
    """A connection that never starts a request is closed quietly after listen.head_timeout,
    not kept for the idle timeout."""
    sidecar = await make_sidecar(listen=FAST)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        (
            "declared length, nothing sent",
            b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n",
        ),
        (
            "part of the body",
            b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nabc",
        ),
        (
            "chunked, stalled mid-body",
            b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n",
        ),
        (
            "100-continue, nothing after it",
            b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n"
            b"Expect: 100-continue\r\n\r\n",
        ),
    ],
)
async def test_a_body_that_stops_arriving_gets_408_and_the_connection_closes(
    make_sidecar: MakeSidecar, name: str, raw: bytes
) -> None:
    """A body the caller stops sending (also after being sent 100 Continue) is answered 408 with
    the JSON error once listen.body_timeout passes in silence; then the connection closes."""
    sidecar = await make_sidecar(listen=FAST)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    writer.write(raw)
    head, body = await answer(reader)
    writer.close()
    if b"Expect" in raw:
        assert head.startswith(b"HTTP/1.1 100 Continue"), name
        head, _, body = body.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), name
    assert b"X-Sidecar-Error: 1" in head
    assert json.loads(body)["error"] == "body_timeout"


async def test_a_body_that_keeps_moving_is_not_cut(
    make_sidecar: MakeSidecar,
) -> None:
    """The body deadline is for silence, not for the whole body: an upload sending a little
    every 0.1 s for longer than body_timeout is forwarded whole."""
    sidecar = await make_sidecar(listen=FAST)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"
    )
    for _ in range(10):
        await asyncio.sleep(0.1)
        writer.write(b"x")
    head, body = await answer(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["body"] == "x" * 10


async def test_connections_beyond_max_connections_get_503_and_stalled_ones_give_way(
    make_sidecar: MakeSidecar, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """With listen.max_connections open (stalled mid-body), another connection is answered 503
    with the JSON error and closed, counted and logged once as a refusal like any other; once the
    body deadline frees the stalled ones, new requests are served again."""
    caplog.set_level(logging.WARNING, logger="sidecar")
    sidecar = await make_sidecar(listen={**FAST, "body_timeout": 1.0, "max_connections": 2})
    stalled = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n")
        stalled.append((reader, writer))
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    head, body = await answer(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 503")
    assert b"X-Sidecar-Error: 1" in head
    assert json.loads(body)["error"] == "too_many_connections"
    refused = [r for r in caplog.records if r.getMessage() == "proxy.refused_request"]
    assert [getattr(r, "code", None) for r in refused] == ["too_many_connections"]
    counted = sample(sidecar.metrics.render().decode(), REFUSED % "too_many_connections")
    assert counted == 1.0
    for r, w in stalled:
        head, _ = await answer(r)
        assert head.startswith(b"HTTP/1.1 408")
        w.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    writer.write(b"GET /status/200 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    head, _ = await answer(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
