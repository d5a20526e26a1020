"""Process lifecycle with a real ``sidecar run``: graceful shutdown on SIGTERM (drain, persist,
exit 0) and configuration reload on SIGHUP; plus reload applied in process."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.config.models import Config
from tests.conftest import MakeSidecar, Serve, admin_url, base_config, merge, proxy_url
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import eventually
from tests.processes import SidecarProcess


@pytest.fixture
def processes() -> Iterator[list[SidecarProcess]]:
    """Sidecar processes a test starts; any still running at the end are killed."""
    started: list[SidecarProcess] = []
    yield started
    for proc in started:
        proc.kill()


@pytest.fixture
def config(idp_url: str, upstream_url: str, idp: FakeIdP, tmp_path: Path) -> dict[str, Any]:
    """The test servers' config with a file store, as YAML data."""
    return merge(
        base_config(idp_url, upstream_url, idp),
        {"session": {"store": "file", "path": str(tmp_path / "session.json")}},
    )


Started = Callable[[dict[str, Any]], Awaitable[SidecarProcess]]


@pytest.fixture
def start(
    config: dict[str, Any],
    tmp_path: Path,
    processes: list[SidecarProcess],
    http: aiohttp.ClientSession,
) -> Started:
    """Start ``sidecar run`` on the test config merged with the given keys; wait until ready."""

    async def _start(extra: dict[str, Any]) -> SidecarProcess:
        proc = SidecarProcess(merge(config, extra), tmp_path, "sidecar")
        processes.append(proc)
        proc.start()
        await proc.wait_ready(http)
        return proc

    return _start


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def wait_refused(port: int, within: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await refused(port):
        assert loop.time() < deadline, "the proxy still accepts connections"
        await asyncio.sleep(0.02)


async def exit_code(proc: SidecarProcess, within: float) -> int:
    assert proc.process is not None
    code = await asyncio.to_thread(proc.process.wait, within)
    return int(code)


async def test_sigterm_drains_the_request_in_flight_then_persists_and_exits_0(
    start: Started, tmp_path: Path, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    """SIGTERM while a slow upstream answer is in flight: new connections are refused at once,
    the response still completes, the session file is written with the last call's time, and the
    process exits 0."""
    proc = await start({"listen": {"drain_timeout": 10}})
    slow = asyncio.ensure_future(http.get(proc.url("/slow/1.5")))
    await eventually(lambda: any(s.path_qs == "/slow/1.5" for s in upstream.seen))
    proc.signal(signal.SIGTERM)
    await wait_refused(proc.proxy_port)
    async with await slow as resp:
        assert resp.status == 200
        assert (await resp.json()) == {"slept": 1.5}
    assert await exit_code(proc, 10) == 0
    stored = json.loads((tmp_path / "session.json").read_text())
    assert stored["last_api_call_at"] is not None
    events = [e["event"] for e in proc.events()]
    assert events.index("sidecar.draining") < events.index("sidecar.drained")
    assert "Traceback" not in proc.log_path.read_text()


async def test_a_request_outlasting_the_drain_timeout_is_cut_and_the_exit_is_still_0(
    start: Started, tmp_path: Path, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    """listen.drain_timeout 0.5 s and a 30 s upstream answer in flight: the caller's connection
    is closed after the drain timeout and the process exits 0 within a few seconds."""
    proc = await start({"listen": {"drain_timeout": 0.5}})
    slow = asyncio.ensure_future(http.get(proc.url("/slow/30")))
    await eventually(lambda: any(s.path_qs == "/slow/30" for s in upstream.seen))
    loop = asyncio.get_running_loop()
    signalled = loop.time()
    proc.signal(signal.SIGTERM)
    with pytest.raises(aiohttp.ClientError):
        async with await slow as resp:
            await resp.read()
    assert await exit_code(proc, 10) == 0
    assert loop.time() - signalled < 5
    assert (tmp_path / "session.json").exists()


async def test_sighup_reloads_keeps_or_renews_the_session_and_refuses_bad_files(
    start: Started,
    config: dict[str, Any],
    http: aiohttp.ClientSession,
    upstream: FakeUpstream,
    idp: FakeIdP,
) -> None:
    """SIGHUP reads the file again. A header change applies to the next request and keeps the
    session (same identity, no login); an invalid file is logged naming the key and the file, and
    the running config stays; a port change is logged as needing a restart; another identity
    (a new scope) starts a new session with a login."""
    proc = await start({})
    first = (await proc.summary(http))["session_id"]

    async def reload(new: dict[str, Any], event: str) -> dict[str, Any]:
        count = sum(1 for e in proc.events() if e["event"] == event)
        proc.write_config(new)
        proc.signal(signal.SIGHUP)
        await eventually(
            lambda: sum(1 for e in proc.events() if e["event"] == event) > count, what=event
        )
        return [e for e in proc.events() if e["event"] == event][-1]

    async def tenant_seen() -> str:
        async with http.get(proc.url("/x")) as resp:
            assert resp.status == 200
        return upstream.seen[-1].headers["X-Tenant-ID"]

    renamed = merge(config, {"headers": {"tenant_id": "tenant-after-reload"}})
    await reload(renamed, "sidecar.reloaded")
    assert await tenant_seen() == "tenant-after-reload"
    assert (await proc.summary(http))["session_id"] == first
    assert idp.grants() == ["client_credentials"]

    failed = await reload(merge(renamed, {"upstream": {"bogus": 1}}), "sidecar.reload_failed")
    assert "upstream.bogus" in str(failed["error"])
    assert str(proc.config_path) in str(failed["error"])
    assert await tenant_seen() == "tenant-after-reload"

    moved = merge(renamed, {"admin": {"host": "127.0.0.2"}})
    restart = await reload(moved, "sidecar.reload_needs_restart")
    assert restart["keys"] == ["admin.host"]

    other = merge(moved, {"identity": {"scope": "other-scope"}})
    await reload(other, "sidecar.reloaded")
    await eventually(lambda: len(idp.token_calls) == 2, what="a login for the new identity")
    assert idp.token_calls[-1].form == {"grant_type": "client_credentials", "scope": "other-scope"}
    summary = await proc.summary(http)
    assert summary["session_id"] != first
    assert summary["state"] == "VALID"
    proc.signal(signal.SIGTERM)
    assert await exit_code(proc, 10) == 0


async def test_reload_in_process_moves_upstream_and_keeps_forwarding(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    serve: Serve,
    idp: FakeIdP,
    upstream: FakeUpstream,
    idp_url: str,
) -> None:
    """A reload that names another upstream sends the next request there, with the same token
    and session; the old upstream sees nothing more."""
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.usable() is not None)
    second = FakeUpstream(idp=idp)
    second_url = await serve(second.app())
    async with http.get(proxy_url(sidecar, "/before")) as resp:
        assert resp.status == 200
    data = merge(base_config(idp_url, second_url, idp), {"listen": {"drain_timeout": 1}})
    await sidecar.reload(Config.model_validate(data))
    async with http.get(proxy_url(sidecar, "/after")) as resp:
        assert resp.status == 200
    assert [s.path_qs for s in upstream.seen] == ["/before"]
    assert [s.path_qs for s in second.seen] == ["/after"]
    assert second.seen[0].token_valid
    assert idp.grants() == ["client_credentials"]


async def test_readyz_says_503_while_draining(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    """Once the drain starts, /readyz answers 503 with draining: true (so traffic is steered
    elsewhere) while the request in flight still completes."""
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.usable() is not None)
    async with http.get(admin_url(sidecar, "/readyz")) as resp:
        assert resp.status == 200
    slow = asyncio.ensure_future(http.get(proxy_url(sidecar, "/slow/0.5")))
    await eventually(lambda: any(s.path_qs == "/slow/0.5" for s in upstream.seen))
    draining = asyncio.ensure_future(sidecar.drain())
    await eventually(lambda: sidecar.metrics.in_flight_now() == 1)
    async with http.get(admin_url(sidecar, "/readyz")) as resp:
        assert resp.status == 503
        assert (await resp.json())["draining"] is True
    async with await slow as resp:
        assert resp.status == 200
    await draining
