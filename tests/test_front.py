"""The proxy's own HTTP/1.1 front on the wire: keep-alive and pipelining in order, response framing
for callers of either HTTP version, metrics and the access line per request, graceful drain, idle
connections, and the same behaviour under uvloop."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from sidecar.logs import setup_logging
from tests.conftest import MakeSidecar, Serve, admin_url, base_config, proxy_url
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import eventually, read_response, sample
from tests.processes import SidecarProcess


async def test_pipelined_requests_are_answered_in_order_on_one_connection(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """Three requests written at once get three answers in request order, although the first
    takes longest upstream; the connection stays open for a fourth."""
    sidecar = await make_sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    writer.write(
        b"GET /slow/0.2 HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /status/201 HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabc"
    )
    await writer.drain()
    first, body = await read_response(reader)
    assert first.startswith(b"HTTP/1.1 200")
    assert json.loads(body) == {"slept": 0.2}
    second, _ = await read_response(reader)
    assert second.startswith(b"HTTP/1.1 201")
    third, body = await read_response(reader)
    assert third.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["body"] == "abc"
    writer.write(b"GET /status/202 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    fourth, _ = await read_response(reader)
    assert fourth.startswith(b"HTTP/1.1 202")
    writer.close()
    assert [s.path_qs for s in upstream.seen] == [
        "/slow/0.2",
        "/status/201",
        "/echo",
        "/status/202",
    ]


async def test_upgrades_other_than_websocket_are_answered_as_plain_http(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """An h2c upgrade would carry later requests past the header rules: it is forwarded as a
    plain request without Upgrade, answered, and the connection is closed."""
    sidecar = await make_sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    writer.write(
        b"GET /status/200 HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\nPRI * HTTP/2.0\r\n"
    )
    await writer.drain()
    head, _ = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" in head
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    seen = {k.lower() for k in upstream.seen[-1].headers}
    assert "upgrade" not in seen
    assert "http2-settings" not in seen


async def test_unknown_length_is_chunked_for_http11_and_closed_for_http10(
    serve: Serve, make_sidecar: MakeSidecar
) -> None:
    """An upstream body of unknown length that is still arriving reaches an HTTP/1.1 caller
    chunked and an HTTP/1.0 caller delimited by closing the connection; both get every byte."""

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for piece in (b"one,", b"two,", b"three"):
            await response.write(piece)
            await asyncio.sleep(0.05)  # not all there with the head: streamed, not buffered
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/chunked", chunked)
    sidecar = await make_sidecar(upstream={"url": await serve(app)})
    async with aiohttp.ClientSession() as http, http.get(proxy_url(sidecar, "/chunked")) as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert await resp.read() == b"one,two,three"
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    writer.write(b"GET /chunked HTTP/1.0\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)  # until the proxy closes
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert b"Connection: close" in head
    assert body == b"one,two,three"


async def test_every_request_is_counted_and_logged_once(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """Each answer, the proxy's own errors included, is one sample in the request counter and the
    duration histogram and one access line with its status and request id."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("info", stream)
    try:
        sidecar = await make_sidecar()
        for path in ("/status/200", "/status/404", "/a/%2e%2e/b"):
            # encoded=True: the client must not resolve the dot segments itself
            async with http.get(URL(proxy_url(sidecar, path), encoded=True)) as resp:
                await resp.read()
        async with http.get(admin_url(sidecar, "/metrics")) as resp:
            text = await resp.text()
        logging.getLogger("test").info("flush")  # any other record writes pending access lines
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    for code in ("200", "404", "400"):
        name = f'sidecar_upstream_requests_total{{code="{code}",method="GET"}}'
        assert sample(text, name) == 1.0, code
    assert sample(text, "sidecar_upstream_request_duration_seconds_count") == 3.0
    assert sample(text, "sidecar_requests_in_flight") == 0.0
    access = [json.loads(line) for line in stream.getvalue().splitlines() if "http.access" in line]
    assert [(a["path"], a["status"]) for a in access] == [
        ("/status/200", 200),
        ("/status/404", 404),
        ("/a/../b", 400),  # the access line shows the path decoded
    ]
    assert access[0]["request_id"]
    assert access[0]["bytes"] > 0


async def test_drain_lets_in_flight_requests_finish_and_refuses_new_connections(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """During a drain (SIGTERM's first half), a request already being answered completes; the
    listener is closed."""
    sidecar = await make_sidecar()
    slow = asyncio.ensure_future(http.get(proxy_url(sidecar, "/slow/0.3")))
    assert sidecar.front is not None
    await eventually(lambda: sidecar.front is not None and sidecar.front.in_flight == 1)
    draining = asyncio.ensure_future(sidecar.drain())
    await asyncio.sleep(0.05)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    async with await slow as resp:
        assert resp.status == 200
        assert await resp.json() == {"slept": 0.3}
    await draining


async def test_idle_keep_alive_connections_are_closed(make_sidecar: MakeSidecar) -> None:
    """A connection that sends nothing after its answer is closed after listen.idle_timeout;
    one that keeps asking stays open."""
    sidecar = await make_sidecar(listen={"idle_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    writer.write(b"GET /status/200 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await read_response(reader)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
    writer.close()


async def test_uvloop_serves_the_same_front(
    tmp_path: Path,
    idp_url: str,
    upstream_url: str,
    idp: FakeIdP,
    http: aiohttp.ClientSession,
    upstream: FakeUpstream,
) -> None:
    """``sidecar run --loop uvloop`` forwards with the injected token, streams, and refuses
    hostile requests the same way."""
    pytest.importorskip("uvloop")
    proc = SidecarProcess(base_config(idp_url, upstream_url, idp), tmp_path, "uv")
    proc.start(extra_args=["--loop", "uvloop"])
    try:
        await proc.wait_ready(http)
        async with http.post(proc.url("/echo"), data=b"x" * 100_000) as resp:
            assert resp.status == 200
        assert idp.is_valid(upstream.seen[-1].headers["Authorization"].removeprefix("Bearer "))
        async with http.get(proc.url(f"/stream/{8 << 20}")) as resp:
            assert len(await resp.read()) == 8 << 20
        async with http.get(URL(proc.url("/a/%2e%2e/b"), encoded=True)) as resp:
            assert resp.status == 400
            assert resp.headers["X-Sidecar-Error"] == "1"
    finally:
        assert proc.stop() == 0
