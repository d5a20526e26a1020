"""At the descriptor limit: sidecar as a process under a low RLIMIT_NOFILE, flooded with stalled
connections, keeps answering its probes and, within the body deadline, proxied requests; its log
stays a few lines a second."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import base_config
from tests.fakes.idp import FakeIdP
from tests.processes import SidecarProcess

STALLED = (
    b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
    b"GET /echo HTTP/1.1\r\nHost: localhost\r\nX-Slow: ",  # a head that never ends
)


async def stall(port: int, raw: bytes) -> asyncio.StreamWriter | None:
    """A connection that sends ``raw`` and then nothing (None if it could not even connect)."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 3)
    except (OSError, TimeoutError):
        return None
    writer.write(raw)
    return writer


Stalled = list[asyncio.StreamWriter | None]


@contextlib.asynccontextmanager
async def at_64_descriptors(
    config: dict[str, Any], tmp_path: Path, name: str, *args: str
) -> AsyncIterator[tuple[SidecarProcess, aiohttp.ClientSession, Stalled]]:
    """Sidecar as a process under RLIMIT_NOFILE 64 (``args`` after ``run``), ready; a client that
    opens a connection per request; a list for the stalled connections. Afterwards those are
    closed and the process stopped, which must exit 0."""
    proc = SidecarProcess(config, tmp_path, name)
    proc.start(list(args), nofile=64)
    writers: Stalled = []
    try:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            await proc.wait_ready(http)
            yield proc, http, writers
    finally:
        for writer in writers:
            if writer is not None:
                writer.close()
        assert proc.stop() == 0


async def proxied_status(proc: SidecarProcess, http: aiohttp.ClientSession) -> int:
    """Ask for /status/200 through the proxy (3 s a try) until it answers 200 or 10 s pass: the
    last status it answered (0 if none)."""
    clock = asyncio.get_running_loop()
    started = clock.time()
    status = 0
    while clock.time() - started < 10:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with asyncio.timeout(3), http.get(proc.url("/status/200")) as resp:
                status = resp.status
        if status == 200:
            break
        await asyncio.sleep(0.2)
    return status


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_stalled_connections_at_the_descriptor_limit_leave_probes_and_requests_served(
    tmp_path: Path, idp_url: str, upstream_url: str, idp: FakeIdP, loop: str
) -> None:
    """Under RLIMIT_NOFILE 64, 150 stalled connections (bodies that never come, 100-continue
    left unanswered, heads that never end): /readyz on the admin port answers within a few
    seconds while they are open, a proxied request succeeds within the body deadline, and the
    log holds a bounded number of lines."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    config = base_config(idp_url, upstream_url, idp)
    config["listen"] = {**config["listen"], "body_timeout": 2, "head_timeout": 2}
    clock = asyncio.get_running_loop()
    async with at_64_descriptors(config, tmp_path, "fds", "--loop", loop) as (proc, http, writers):
        writers += await asyncio.gather(
            *(stall(proc.proxy_port, STALLED[i % 3]) for i in range(150))
        )
        started = clock.time()
        async with asyncio.timeout(5):
            async with http.get(proc.admin("/readyz")) as resp:
                assert resp.status == 200
        status = await proxied_status(proc, http)
        assert status == 200, "no proxied request answered within the body deadline"
        assert clock.time() - started < 8
    lines = proc.log_path.read_text().splitlines()
    assert len(lines) < 300, f"{len(lines)} log lines"


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_running_out_of_descriptors_pauses_accepting_instead_of_spinning(
    tmp_path: Path, idp_url: str, upstream_url: str, idp: FakeIdP
) -> None:
    """With max_connections set above what RLIMIT_NOFILE 64 allows, a flood runs the process out
    of descriptors: accepting pauses (proxy.accept_paused, about once a second, not once per
    attempt), the process does not spin meanwhile, and once the stalled connections time out
    proxied requests are served again."""
    config = base_config(idp_url, upstream_url, idp)
    config["listen"] = {
        **config["listen"],
        "body_timeout": 2,
        "head_timeout": 2,
        "max_connections": 500,
    }
    async with at_64_descriptors(config, tmp_path, "emfile") as (proc, http, writers):
        before = cpu_seconds(proc.pid)
        writers += await asyncio.gather(
            *(stall(proc.proxy_port, STALLED[i % 2]) for i in range(120))
        )
        await asyncio.sleep(1.5)
        assert cpu_seconds(proc.pid) - before < 1.0, "the process spun at the fd limit"
        assert await proxied_status(proc, http) == 200
    paused = [e for e in proc.events() if e["event"] == "proxy.accept_paused"]
    assert 1 <= len(paused) <= 15
