"""Bodies stream in both directions with bounded memory; WebSockets are proxied with our headers."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import MakeSidecar, proxy_url
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import eventually

GIB = 1 << 30


def rss_bytes() -> int:
    """Resident set size of this process (proxy, upstream and client all live here)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_one_gib_download_streams_with_bounded_memory(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """A 1 GiB response passes through whole while the process grows by less than 100 MB."""
    sidecar = await make_sidecar(upstream={"timeout": {"total": 10}})
    baseline = rss_bytes()
    peak = baseline
    received = 0
    timeout = aiohttp.ClientTimeout(total=120)
    async with http.get(proxy_url(sidecar, f"/stream/{GIB}"), timeout=timeout) as resp:
        assert resp.status == 200
        assert resp.content_length == GIB
        async for chunk in resp.content.iter_chunked(1 << 20):
            received += len(chunk)
            if received % (64 << 20) < len(chunk):
                peak = max(peak, rss_bytes())
    assert received == GIB
    assert peak - baseline < 100 * 1024 * 1024, f"RSS grew by {(peak - baseline) >> 20} MiB"


async def test_large_upload_streams_chunked_and_intact(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """A 64 MiB chunked upload arrives byte for byte (checked by SHA-256) without being buffered."""
    sidecar = await make_sidecar()
    block = os.urandom(1 << 20)
    expected = hashlib.sha256(block * 64).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield block

    async with http.post(proxy_url(sidecar, "/upload"), data=body()) as resp:
        assert resp.status == 200
        result = await resp.json()
    assert result == {"bytes": 64 << 20, "sha256": expected, "chunked": True}


async def test_upload_with_content_length_keeps_it(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    """A body with Content-Length above the replay buffer is streamed with the same length."""
    sidecar = await make_sidecar(upstream={"replay_body_limit": 1024})
    payload = os.urandom(300_000)
    async with http.put(proxy_url(sidecar, "/upload"), data=payload) as resp:
        result = await resp.json()
    assert result["bytes"] == len(payload)
    assert result["chunked"] is False
    assert upstream.seen[-1].headers["Content-Length"] == str(len(payload))


async def test_upstream_reset_mid_body_cuts_the_callers_connection(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """A body the upstream did not finish must not reach the caller as if it were complete."""
    sidecar = await make_sidecar()
    async with http.get(proxy_url(sidecar, "/reset")) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_websocket_round_trip_with_injected_headers(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP
) -> None:
    """Text and binary frames go both ways; the upstream's handshake saw our token and headers;
    the upstream's close code reaches the caller."""
    sidecar = await make_sidecar()
    async with http.ws_connect(
        proxy_url(sidecar, "/ws"),
        protocols=("chat.v1",),
        headers={"Authorization": "Bearer caller-token"},
    ) as ws:
        assert ws.protocol == "chat.v1"
        hello = (await ws.receive_json())["hello"]
        assert idp.is_valid(hello["Authorization"].removeprefix("Bearer "))
        assert hello["X-Tenant-ID"] == "1234567"
        assert "X-Request-ID" in hello
        await ws.send_str("ping")
        assert (await ws.receive_str()) == "echo:ping"
        await ws.send_bytes(b"\x01\x02\x03")
        assert (await ws.receive_bytes()) == b"\x03\x02\x01"
        await ws.send_str("close")
        msg = await ws.receive()
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.close_code == 4001


async def test_client_disconnect_mid_download_frees_the_request(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """A caller that leaves mid-download does not leave a request in flight."""
    sidecar = await make_sidecar()
    async with http.get(proxy_url(sidecar, f"/stream/{GIB}")) as resp:
        await resp.content.read(1 << 20)
    for _ in range(100):
        if sidecar.metrics.in_flight_now() == 0:
            break
        await asyncio.sleep(0.02)
    assert sidecar.metrics.in_flight_now() == 0


class RawUpstream:
    """An upstream written at the socket level, to send bodies in odd pieces (or too long)."""

    def __init__(self, body: bytes, extra: bytes = b"", piece: int = 1000) -> None:
        self.body, self.extra, self.piece = body, extra, piece
        self.connections = 0
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                self.requests += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body))
                payload = self.body + self.extra
                for start in range(0, len(payload), self.piece):
                    writer.write(payload[start : start + self.piece])
                    await writer.drain()
                    await asyncio.sleep(0)  # let each piece go out as its own segment
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[tuple[RawUpstream, str]]:
    raw = RawUpstream(os.urandom(3 << 20) + b"end")
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield raw, f"http://127.0.0.1:{port}"
    server.close()


async def test_length_delimited_body_in_many_pieces_arrives_intact_and_reuses_the_connection(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    raw_upstream: tuple[RawUpstream, str],
) -> None:
    """A Content-Length body passes through byte for byte however it is cut up, and the upstream
    connection is used again once the body has ended."""
    raw, url = raw_upstream
    raw.piece = 7919  # a prime: the pieces never line up with any buffer size
    sidecar = await make_sidecar(upstream={"url": url})
    for _ in range(3):
        async with http.get(proxy_url(sidecar, "/file")) as resp:
            assert resp.status == 200
            got = await resp.read()
        assert hashlib.sha256(got).digest() == hashlib.sha256(raw.body).digest()
    assert raw.requests == 3
    assert raw.connections == 1


async def test_bytes_past_the_content_length_are_dropped_with_the_connection(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    raw_upstream: tuple[RawUpstream, str],
) -> None:
    """An upstream that sends more than it announced: the caller gets exactly the announced body,
    and the connection that carried the surplus is not trusted with another request."""
    raw, url = raw_upstream
    raw.extra = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmuggled"
    sidecar = await make_sidecar(upstream={"url": url})
    for _ in range(2):
        async with http.get(proxy_url(sidecar, "/file")) as resp:
            assert resp.status == 200
            got = await resp.read()
        assert got == raw.body
    assert raw.requests == 2
    await eventually(lambda: raw.connections == 2, what="a fresh upstream connection")
