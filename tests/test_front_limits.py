"""What the proxy's front refuses before anything is forwarded: oversized heads and bodies,
malformed or smuggling-shaped requests. Each answer is a JSON error with X-Sidecar-Error."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from sidecar.logs import setup_logging
from tests.conftest import MakeSidecar, proxy_url
from tests.fakes.upstream import FakeUpstream


async def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; return the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    body = await reader.read(int(headers.get("Content-Length", "0")))
    writer.close()
    return status, headers, body


@pytest.mark.parametrize(
    ("name", "raw", "status"),
    [
        (
            "header too long",
            b"GET /x HTTP/1.1\r\nHost: l\r\nX-A: " + b"a" * 20000 + b"\r\n\r\n",
            431,
        ),
        (
            "too many headers",
            b"GET /x HTTP/1.1\r\nHost: l\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(300))
            + b"\r\n",
            431,
        ),
        ("request line too long", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: l\r\n\r\n", 414),
        (
            "Content-Length with Transfer-Encoding",
            b"POST /x HTTP/1.1\r\nHost: l\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "duplicate Content-Length",
            b"POST /x HTTP/1.1\r\nHost: l\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            400,
        ),
        ("bare CR in a header value", b"GET /x HTTP/1.1\r\nHost: l\r\nX-A: a\rb\r\n\r\n", 400),
        ("NUL in a header value", b"GET /x HTTP/1.1\r\nHost: l\r\nX-A: a\x00b\r\n\r\n", 400),
        (
            "obfuscated Transfer-Encoding",
            b"POST /x HTTP/1.1\r\nHost: l\r\nTransfer-Encoding: xchunked\r\n\r\n",
            400,
        ),
        ("space before the colon", b"GET /x HTTP/1.1\r\nHost: l\r\nX-A : 1\r\n\r\n", 400),
    ],
)
async def test_malformed_and_oversized_requests_are_refused_quietly(
    make_sidecar: MakeSidecar, upstream: FakeUpstream, name: str, raw: bytes, status: int
) -> None:
    """Each case gets its status and a JSON error, reaches no upstream, and is logged as one
    warning line without a traceback."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("info", stream)
    try:
        sidecar = await make_sidecar()
        got, headers, body = await exchange(sidecar.proxy_port, raw)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert got == status, name
    assert headers["X-Sidecar-Error"] == "1"
    assert json.loads(body)["error"]
    assert upstream.seen == []
    logged = stream.getvalue()
    assert "proxy.refused_request" in logged
    assert "Traceback" not in logged


async def test_body_over_the_limit_is_refused_with_413(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    """With upstream.max_request_body set, a declared length over it is refused before anything
    is sent, and a chunked body that grows past it is cut off with 413 too; bodies within the
    limit pass."""
    sidecar = await make_sidecar(upstream={"max_request_body": 1000, "replay_body_limit": 10})
    async with http.post(proxy_url(sidecar, "/upload"), data=b"x" * 1001) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "body_too_large"
    assert upstream.seen == []

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 300

    async with http.post(proxy_url(sidecar, "/upload"), data=chunks()) as resp:
        assert resp.status == 413
    async with http.post(proxy_url(sidecar, "/upload"), data=b"z" * 1000) as resp:
        assert resp.status == 200
        assert (await resp.json())["bytes"] == 1000
