"""`sidecar run --workers 2`: two proxy processes on one port sharing one session."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sidecar.clock import SystemClock
from tests.conftest import base_config, merge
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import eventually, free_port, sample
from tests.processes import SidecarProcess


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (its workers)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


@contextlib.asynccontextmanager
async def two_workers(
    config: dict[str, Any], tmp_path: Path, name: str, http: aiohttp.ClientSession, *args: str
) -> AsyncIterator[SidecarProcess]:
    """``run --workers 2`` (then ``args``), ready and with both workers up; stopped afterwards,
    which must exit 0."""
    proc = SidecarProcess(config, tmp_path, name)
    proc.start(["--workers", "2", *args])
    try:
        await proc.wait_ready(http)
        await eventually(lambda: len(children(proc.pid)) == 2, what="two workers")
        yield proc
    finally:
        assert proc.stop() == 0


async def test_two_workers_share_one_session_and_sum_their_metrics(
    idp_url: str, upstream_url: str, idp: FakeIdP, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Under steady traffic with 2 s tokens, the provider sees the calls of one session (not one
    per worker), every request succeeds, /metrics on the one admin port counts every request,
    and a killed worker is replaced."""
    idp.lifetime = 2.0
    port, admin = free_port(), free_port()
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"port": port},
                "admin": {"port": admin},
                "upstream": {"url": upstream_url},
                "identity": {
                    "kind": "oauth2",
                    "token_url": f"{idp_url}/token",
                    "client_id": idp.client_id,
                    "client_secret": idp.client_secret,
                },
                "refresh": {"lead_time": 0.4, "lead_fraction": 0.2, "jitter": 0.1},
                "session": {"store": "memory"},
                "log": {"access_log": False},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen(  # noqa: S603, ASYNC220 - our own module
        [sys.executable, "-m", "sidecar", "run", "-c", str(config), "--workers", "2"],
        stdout=log,
        stderr=log,
        env=env,
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/x") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert loop.time() < deadline, (tmp_path / "log").read_text()[-2000:]
            await asyncio.sleep(0.1)
        calls_before = len(idp.token_calls)
        statuses: collections.Counter[int] = collections.Counter()
        stop_at = loop.time() + 8

        async def caller() -> None:
            # a fresh connection per request spreads the load over both workers
            while loop.time() < stop_at:
                async with (
                    aiohttp.ClientSession() as one,
                    one.get(f"http://127.0.0.1:{port}/x") as resp,
                ):
                    statuses[resp.status] += 1
                await asyncio.sleep(0.01)

        await asyncio.gather(*(caller() for _ in range(4)))
        total = sum(statuses.values())
        assert statuses[200] == total, statuses
        calls = len(idp.token_calls) - calls_before
        assert 8 / 2 <= calls <= 8 / 1.5 + 2, calls  # one session's refreshes, not two
        assert set(idp.grants()[calls_before:]) == {"refresh_token"}
        await asyncio.sleep(1.5)  # workers report every second
        async with http.get(f"http://127.0.0.1:{admin}/metrics") as resp:
            text = await resp.text()
        counted = sample(text, 'sidecar_upstream_requests_total{code="200",method="GET"}')
        assert counted is not None
        assert counted >= total
        workers = children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        await asyncio.sleep(2.5)
        after = children(proc.pid)
        assert len(after) == 2
        assert workers[0] not in after
        async with http.get(f"http://127.0.0.1:{port}/x") as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
        log.close()
    assert code == 0


async def test_sighup_reloads_the_supervisor_and_every_worker(
    idp_url: str,
    upstream_url: str,
    idp: FakeIdP,
    upstream: FakeUpstream,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Under --workers, SIGHUP applies a header change in both workers (and in a worker started
    after it) without a new login; a bad file is refused and the running config stays."""
    config = merge(base_config(idp_url, upstream_url, idp), {"log": {"access_log": False}})
    async with two_workers(config, tmp_path, "workers", http) as proc:

        async def tenants(count: int) -> set[str]:
            """X-Tenant-ID as the upstream saw it, over fresh connections (both workers)."""
            first = len(upstream.seen)
            for _ in range(count):
                async with aiohttp.ClientSession() as one, one.get(proc.url("/x")) as resp:
                    assert resp.status == 200
            return {seen.headers["X-Tenant-ID"] for seen in upstream.seen[first:]}

        def events(name: str) -> list[dict[str, object]]:
            return [e for e in proc.events() if e["event"] == name]

        assert await tenants(10) == {"1234567"}
        proc.write_config(merge(config, {"headers": {"tenant_id": "after-reload"}}))
        proc.signal(signal.SIGHUP)
        await eventually(lambda: len(events("sidecar.worker_reloaded")) == 2, what="2 reloads")
        assert {e["worker"] for e in events("sidecar.worker_reloaded")} == set(children(proc.pid))
        assert await tenants(20) == {"after-reload"}

        bad = merge(config, {"headers": {"tenant_id": "never"}, "upstream": {"bogus": 1}})
        proc.write_config(bad)
        proc.signal(signal.SIGHUP)
        await eventually(lambda: len(events("sidecar.reload_failed")) == 1, what="a refusal")
        assert "upstream.bogus" in str(events("sidecar.reload_failed")[0]["error"])
        assert await tenants(10) == {"after-reload"}

        os.kill(children(proc.pid)[0], signal.SIGKILL)  # its replacement starts on the new config
        await eventually(lambda: len(events("sidecar.worker_exited")) == 1, what="an exit")
        await eventually(lambda: len(events("sidecar.worker_ready")) == 3, within=10, what="ready")
        assert await tenants(20) == {"after-reload"}
        assert idp.grants() == ["client_credentials"]  # one login, kept through the reloads


async def test_workers_run_on_the_loop_the_supervisor_was_given(
    idp_url: str, upstream_url: str, idp: FakeIdP, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """``run --workers 2 --loop uvloop``: every worker process has uvloop loaded and answers
    (before, only the supervisor ran on uvloop and the workers on asyncio)."""
    async with two_workers(
        base_config(idp_url, upstream_url, idp),
        tmp_path,
        "uvloop-workers",
        http,
        "--loop",
        "uvloop",
    ) as proc:
        for pid in children(proc.pid):
            maps = await asyncio.to_thread(Path(f"/proc/{pid}/maps").read_text)
            assert "/uvloop/" in maps, f"worker {pid} has not loaded uvloop"
        async with http.get(proc.url("/x")) as resp:
            assert resp.status == 200


async def test_workers_stop_forwarding_a_token_at_its_expiry_margin(
    idp_url: str, upstream_url: str, idp: FakeIdP, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """refresh.expiry_margin holds in the workers as in one process: with the provider down, a
    6 s token (margin capped at a tenth: 0.6 s) is forwarded until 0.6 s before its expiry and
    answered 503 from then on, never sent in its last 0.6 s."""
    idp.lifetime = 6
    config = merge(
        base_config(idp_url, upstream_url, idp),
        {
            "refresh": {"lead_time": 0, "lead_fraction": 0, "jitter": 0, "expiry_margin": 2},
            "log": {"access_log": False},
        },
    )
    async with two_workers(config, tmp_path, "margin", http) as proc:
        idp.down = "503"
        expires = max(idp.issued.values())
        wall = SystemClock()
        answers: list[tuple[float, int]] = []
        while wall.time() < expires + 0.3:
            sent = wall.time()
            async with aiohttp.ClientSession() as one, one.get(proc.url("/x")) as resp:
                answers.append((sent, resp.status))
            await asyncio.sleep(0.02)
    usable_until = expires - 0.6
    late = [status for sent, status in answers if sent >= usable_until + 0.05]
    early = [status for sent, status in answers if sent < usable_until - 0.3]
    assert late
    assert set(late) == {503}, answers
    assert early
    assert set(early) == {200}, answers


async def test_sigterm_under_workers_drains_like_one_process(
    idp_url: str,
    upstream_url: str,
    idp: FakeIdP,
    upstream: FakeUpstream,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """SIGTERM to `run --workers 2` with slow answers in flight in both workers: /readyz says 503
    at once (while they are still in flight), the proxy port refuses new connections, every
    request in flight is answered 200 within listen.drain_timeout, none is logged as a 500, and
    the process exits 0."""
    config = merge(base_config(idp_url, upstream_url, idp), {"listen": {"drain_timeout": 10}})
    async with two_workers(config, tmp_path, "drain", http) as proc:
        clients = [aiohttp.ClientSession() for _ in range(6)]

        async def slow(client: aiohttp.ClientSession) -> tuple[int, object]:
            async with client.get(proc.url("/slow/2")) as resp:
                return resp.status, await resp.json()

        in_flight = [asyncio.ensure_future(slow(client)) for client in clients]
        await eventually(
            lambda: sum(s.path_qs == "/slow/2" for s in upstream.seen) == 6, what="6 in flight"
        )
        proc.signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        signalled = loop.time()

        async def readyz() -> int:
            try:
                async with http.get(proc.admin("/readyz")) as resp:
                    return resp.status
            except aiohttp.ClientError:
                return 0

        while (status := await readyz()) == 200:
            assert loop.time() - signalled < 1, "/readyz still 200 a second after SIGTERM"
            await asyncio.sleep(0.02)
        assert status == 503
        assert not any(task.done() for task in in_flight)
        answers = await asyncio.gather(*in_flight)
        for client in clients:
            await client.close()
        assert answers == [(200, {"slept": 2.0})] * 6
        assert loop.time() - signalled < 10
        assert proc.process is not None
        assert await asyncio.to_thread(proc.process.wait, 15) == 0
    accessed = [e for e in proc.events() if e.get("event") == "http.access"]
    assert {e["status"] for e in accessed if e["path"] == "/slow/2"} == {200}
    assert [e for e in accessed if e["status"] == 500] == []
    assert "Traceback" not in proc.log_path.read_text()
    # the supervisor and each of the two workers
    assert [e["event"] for e in proc.events()].count("sidecar.drained") == 3


def connections_by_process(port: int, pids: list[int]) -> dict[int, int]:
    """How many established TCP connections on local ``port`` each of ``pids`` holds (the
    sockets of /proc/net/tcp matched to each process's descriptors by inode)."""
    inodes: set[str] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    counts = {}
    for pid in pids:
        held = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                held += target.startswith("socket:[") and target[8:-1] in inodes
        counts[pid] = held
    return counts


async def test_connections_opened_at_once_are_spread_over_the_workers(
    idp_url: str, upstream_url: str, idp: FakeIdP, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """50 keep-alive connections opened at once (as a load generator or a client's pool does)
    land on both workers: each holds at least 10 of them. With SO_REUSEPORT the kernel picks a
    worker for each connection (a 25/25 split on average; below 10 has a chance near one in a
    million); with one listening socket shared by the workers, the first worker to wake took
    all 50 in most trials."""
    config = base_config(idp_url, upstream_url, idp)
    async with two_workers(config, tmp_path, "spread", http) as proc:
        workers = children(proc.pid)
        opened = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", proc.proxy_port) for _ in range(50))
        )
        try:
            for _reader, writer in opened:
                writer.write(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            heads = await asyncio.gather(*(reader.readuntil(b"\r\n\r\n") for reader, _ in opened))
            assert all(head.startswith(b"HTTP/1.1 200 ") for head in heads)
            held = await asyncio.to_thread(connections_by_process, proc.proxy_port, workers)
        finally:
            for _reader, writer in opened:
                writer.close()
        assert sum(held.values()) == 50, held
        assert min(held.values()) >= 10, held
