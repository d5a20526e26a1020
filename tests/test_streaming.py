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
        if sidecar.metrics.in_flight._value.get() == 0:
            break
        await asyncio.sleep(0.02)
    assert sidecar.metrics.in_flight._value.get() == 0
