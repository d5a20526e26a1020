"""Three sidecar processes share one identity's session through a real redis-server."""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.store.redis import RedisStore
from tests.conftest import MakeSidecar, Serve
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import eventually
from tests.processes import SidecarProcess
from tests.redis_server import RedisServer

REPLICAS = 3


@pytest.fixture
async def cluster_config(
    serve: Serve, idp: FakeIdP, upstream: FakeUpstream, redis_server: RedisServer
) -> dict[str, Any]:
    idp_url = await serve(idp.app())
    upstream_url = await serve(upstream.app())
    return {
        "upstream": {"url": upstream_url},
        "identity": {
            "kind": "oauth2",
            "token_url": f"{idp_url}/token",
            "revocation_url": f"{idp_url}/revoke",
            "client_id": idp.client_id,
            "client_secret": idp.client_secret,
            "timeout": 10,
        },
        "refresh": {
            "lead_time": 0.6,
            "lead_fraction": 0.2,
            "jitter": 0.2,
            "retry": {"initial": 0.1, "max": 0.5},
        },
        "session": {
            "store": "redis",
            "redis_url": redis_server.url,
            "lock_lease": 2,
            "poll_interval": 0.5,
        },
        "log": {"access_log": False},
    }


@pytest.fixture
async def replicas(
    cluster_config: dict[str, Any], tmp_path: Path, http: aiohttp.ClientSession
) -> AsyncIterator[list[SidecarProcess]]:
    procs = [SidecarProcess(cluster_config, tmp_path, f"replica{i}") for i in range(REPLICAS)]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            await proc.wait_ready(http)
        yield procs
    finally:
        for proc in procs:
            proc.stop()


async def drive(
    http: aiohttp.ClientSession, procs: list[SidecarProcess], seconds: float
) -> collections.Counter[int]:
    """Steady traffic round-robin over the replicas; returns status counts."""
    statuses: collections.Counter[int] = collections.Counter()
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds

    async def caller(offset: int) -> None:
        i = offset
        while loop.time() < stop_at:
            proc = procs[i % len(procs)]
            i += 1
            if proc.process is None or proc.process.poll() is not None:
                continue
            async with http.get(proc.url("/x")) as resp:
                await resp.read()
                statuses[resp.status] += 1
            await asyncio.sleep(0.01)

    await asyncio.gather(*(caller(i) for i in range(6)))
    return statuses


async def test_three_replicas_make_one_login_and_one_refresh_per_lifetime(
    replicas: list[SidecarProcess],
    http: aiohttp.ClientSession,
    idp: FakeIdP,
    upstream: FakeUpstream,
) -> None:
    """10 lifetimes of 3 s tokens under steady traffic: one login in total, about one refresh per
    lifetime in total (not per replica), no refresh token used twice, zero failed requests."""
    assert idp.grants() == ["client_credentials"]
    idp.lifetime = 3.0
    # start the 3 s regime from a fresh token issued under the new lifetime
    async with http.post(replicas[0].admin("/session/refresh")) as resp:
        assert resp.status == 200
    calls_before = len(idp.token_calls)
    statuses = await drive(http, replicas, 30.0)
    total = sum(statuses.values())
    assert statuses[200] == total, statuses
    assert upstream.rejected == 0
    grants = idp.grants()[calls_before:]
    assert set(grants) == {"refresh_token"}, grants
    # a single process refreshes every 2.4 s or a bit earlier (lead 0.6 s, jitter 20 %)
    # (three replicas refreshing on their own would make three times as many)
    assert 30 / 3 <= len(grants) <= 30 / 2.25 + 3, len(grants)
    presented = [
        c.form["refresh_token"] for c in idp.token_calls if c.grant_type == "refresh_token"
    ]
    assert len(presented) == len(set(presented))
    sessions = {(await p.summary(http))["session_id"] for p in replicas}
    assert len(sessions) == 1


async def test_killing_the_lock_holder_mid_refresh_delays_others_by_at_most_the_lease(
    replicas: list[SidecarProcess],
    http: aiohttp.ClientSession,
    idp: FakeIdP,
    redis_server: RedisServer,
) -> None:
    """The lock holder dies while the provider is slow: another replica waits out what is left
    of the dead holder's lease (at most 2 s), no longer, takes over and gets a fresh token, which
    the third replica adopts."""
    import redis.asyncio as aioredis

    raw = aioredis.from_url(redis_server.url)
    assert len(idp.token_calls) == 1, [(p.pid, [e["event"] for e in p.events()]) for p in replicas]
    idp.delay = 30  # the holder's refresh hangs until it is killed
    async with aiohttp.ClientSession() as side:
        refresh = asyncio.ensure_future(side.post(replicas[0].admin("/session/refresh")))
        await eventually(lambda: len(idp.token_calls) >= 2, within=10, what="holder's refresh call")
        replicas[0].kill()
        refresh.cancel()
    idp.delay = 0
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    locks = [key async for key in raw.scan_iter("sidecar:*:lock")]
    assert len(locks) == 1, "the dead holder's lock is still there"
    left = await raw.pttl(locks[0]) / 1000
    await raw.aclose()
    assert 0 < left <= 2.0
    old = (await replicas[1].summary(http))["token_fingerprint"]
    async with http.post(replicas[1].admin("/session/refresh")) as resp:
        assert resp.status == 200
        fresh = await resp.json()
    waited = loop.time() - killed_at
    # (once seen failing in CI, not reproduced since: the events say which way it went)
    events = [(e["event"], e.get("token")) for e in replicas[1].events()]
    assert fresh["token_fingerprint"] != old, (old, fresh, waited, events)
    assert left - 0.1 <= waited <= left + 0.5, (waited, left)

    async def third_adopted() -> bool:
        summary = await replicas[2].summary(http)
        return bool(summary["token_fingerprint"] == fresh["token_fingerprint"])

    deadline = loop.time() + 2
    while not await third_adopted():
        assert loop.time() < deadline, "third replica did not adopt the new token"
        await asyncio.sleep(0.05)


async def test_redis_restart_loses_no_requests_while_tokens_stay_valid(
    replicas: list[SidecarProcess],
    http: aiohttp.ClientSession,
    idp: FakeIdP,
    redis_server: RedisServer,
) -> None:
    """Redis goes away for 3 s, across a refresh, and comes back: every request succeeds
    throughout (each replica renews on its own meanwhile), and afterwards the replicas converge
    on one token again."""
    idp.lifetime = 3.0
    async with http.post(replicas[0].admin("/session/refresh")) as resp:
        assert resp.status == 200
    traffic = asyncio.ensure_future(drive(http, replicas, 9.0))
    await asyncio.sleep(1)
    redis_server.stop()
    await asyncio.sleep(3)
    redis_server.start()
    statuses = await traffic
    assert statuses[200] == sum(statuses.values()), statuses
    logged = [e["event"] for p in replicas for e in p.events()]
    assert "session.store_unavailable" in logged
    assert "session.store_available" in logged
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        tokens = {(await p.summary(http))["token_fingerprint"] for p in replicas}
        if len(tokens) == 1:
            break
        assert loop.time() < deadline, f"replicas did not converge: {tokens}"
        await asyncio.sleep(0.05)


async def test_logout_on_one_replica_ends_the_session_on_all(
    replicas: list[SidecarProcess], http: aiohttp.ClientSession, idp: FakeIdP
) -> None:
    """POST /session/logout on one replica revokes once and every replica stops forwarding;
    POST /session/refresh on another starts one new session that all of them adopt."""
    async with http.post(replicas[0].admin("/session/logout")) as resp:
        assert resp.status == 200
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    while {(await p.summary(http))["state"] for p in replicas} != {"LOGGED_OUT"}:
        assert loop.time() < deadline, "not every replica logged out"
        await asyncio.sleep(0.05)
    for proc in replicas:
        async with http.get(proc.url("/x")) as resp:
            assert resp.status == 503
    # one replica revoked the refresh and the access token; the others did not revoke again
    revoked = [c.form["token_type_hint"] for c in idp.calls if c.path == "/revoke"]
    assert revoked == ["refresh_token", "access_token"]
    logins = idp.grants().count("client_credentials")
    async with http.post(replicas[1].admin("/session/refresh")) as resp:
        assert resp.status == 200
        session_id = (await resp.json())["session_id"]
    deadline = loop.time() + 3
    while {(await p.summary(http)).get("session_id") for p in replicas} != {session_id}:
        assert loop.time() < deadline, "replicas did not adopt the new session"
        await asyncio.sleep(0.05)
    assert idp.grants().count("client_credentials") == logins + 1
    for proc in replicas:
        async with http.get(proc.url("/x")) as resp:
            assert resp.status == 200


async def test_redis_url_with_a_password_read_from_a_file(
    cluster_config: dict[str, Any], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """session.redis_url_file: the URL, password included, comes from a file (a mounted Secret).
    The session lands in that password-protected redis; check-config shows the file's path and
    never the password."""
    import redis.asyncio as aioredis

    password = "redis-pw-in-a-file-81"
    guarded = RedisServer(tmp_path, password=password)
    guarded.start()
    try:
        url_file = tmp_path / "redis-url"
        url_file.write_text(guarded.url + "\n")
        session = {**cluster_config["session"], "redis_url": None, "redis_url_file": str(url_file)}
        proc = SidecarProcess({**cluster_config, "session": session}, tmp_path, "from-file")
        proc.start()
        try:
            await proc.wait_ready(http)
            async with http.get(proc.url("/x")) as resp:
                assert resp.status == 200
        finally:
            proc.stop()
        direct = aioredis.from_url(guarded.url)
        try:
            assert await direct.keys("sidecar:*:session")
        finally:
            await direct.aclose()
        shown = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "sidecar", "check-config", "-c", str(proc.config_path)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert str(url_file) in shown.stdout
        assert password not in shown.stdout + shown.stderr
        assert password not in proc.log_path.read_text()
    finally:
        guarded.stop()


async def test_a_replica_that_stops_mid_release_still_gives_the_renewal_lock_back(
    make_sidecar: MakeSidecar, redis_server: RedisServer
) -> None:
    """A replica stopped (a rolling update) while its renewal was on the way to giving the shared
    lock back (the unlock still waiting for a Redis connection when the stop cancels it) releases
    the lock on the way out: the next replica logs in at once, not after the lease runs out."""
    session = {"store": "redis", "redis_url": redis_server.url, "lock_lease": 60}
    first = await make_sidecar(session=session)
    shared = first.session._shared
    assert shared is not None
    unlock = shared.store.unlock
    stalled = asyncio.Event()

    async def stalled_once(owner: str) -> None:  # the fault: the first release never gets out
        if not stalled.is_set():
            stalled.set()
            await asyncio.Event().wait()
        await unlock(owner)

    shared.store.unlock = stalled_once  # type: ignore[method-assign]
    await eventually(stalled.is_set, what="the login done, its release stalled")
    store = RedisStore(redis_server.url, first.session.identity.fingerprint)
    try:
        assert await store.lock_owner() == shared.owner
        await first.stop()
        assert await store.lock_owner() is None
    finally:
        await store.aclose()
