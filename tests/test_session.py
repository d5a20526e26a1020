"""Session lifecycle against the test identity provider, with a controllable clock."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import MakeSidecar, admin_url, proxy_url
from tests.fakes.clock import FakeClock
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import advance, eventually, sample


async def test_login_at_start_then_proactive_refresh_on_schedule(
    make_sidecar: MakeSidecar, idp: FakeIdP, clock: FakeClock
) -> None:
    """1800 s tokens, lead 300 s / 20 %: refreshed between 1404 s and 1440 s, with the refresh
    token, and not before."""
    idp.lifetime = 1800
    sidecar = await make_sidecar(clock=clock, refresh={"lead_time": 300, "lead_fraction": 0.2})
    await eventually(lambda: sidecar.session.usable() is not None, what="login at start")
    assert idp.grants() == ["client_credentials"]
    await advance(clock, 1403)
    await asyncio.sleep(0.05)
    assert idp.grants() == ["client_credentials"]
    await advance(clock, 38)
    await eventually(lambda: len(idp.token_calls) == 2, what="proactive refresh")
    assert idp.grants() == ["client_credentials", "refresh_token"]
    await eventually(lambda: sidecar.session.summary()["refresh_count"] == 1)


async def test_two_hundred_requests_on_an_expired_token_make_one_token_call(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP, clock: FakeClock
) -> None:
    """Single flight: every request waits for the same refresh; the provider sees one call."""
    idp.lifetime = 60
    sidecar = await make_sidecar(clock=clock)
    await eventually(lambda: sidecar.session.usable() is not None)
    idp.delay = 0.3
    await advance(clock, 61)  # expired: the loop starts one refresh, which takes 0.3 s of real time

    async def one() -> int:
        async with http.get(proxy_url(sidecar, "/x")) as resp:
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert statuses == [200] * 200
    assert len(idp.token_calls) == 2  # the login at start and one refresh


async def test_requests_never_wait_for_a_proactive_refresh(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP, clock: FakeClock
) -> None:
    """While the slow refresh is in flight, requests go out at once with the still-valid token."""
    idp.lifetime = 600
    sidecar = await make_sidecar(clock=clock, refresh={"lead_time": 100, "jitter": 0})
    await eventually(lambda: sidecar.session.usable() is not None)
    idp.delay = 2.0
    await advance(clock, 550)
    await eventually(lambda: len(idp.token_calls) == 2, what="refresh started")
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 200
    assert loop.time() - started < 1.0
    assert sidecar.session.summary()["refresh_in_progress"] is True


async def test_refresh_failure_keeps_serving_with_current_token_then_recovers(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP, clock: FakeClock
) -> None:
    """The provider is down at refresh time: requests still succeed with the valid token, failures
    are counted, and the next retry after the provider returns succeeds."""
    idp.lifetime = 600
    sidecar = await make_sidecar(
        clock=clock, refresh={"lead_time": 120, "jitter": 0, "retry": {"initial": 5, "max": 20}}
    )
    await eventually(lambda: sidecar.session.usable() is not None)
    idp.down = "503"
    await advance(clock, 481)
    await eventually(lambda: sidecar.session.refresh_failures >= 1, what="failed refresh")
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 200
    failures_before = len(idp.token_calls)
    await advance(clock, 21)  # at least one backoff step (capped at 20 s)
    await eventually(lambda: len(idp.token_calls) > failures_before, what="retry")
    idp.down = None
    await advance(clock, 21)
    await eventually(lambda: sidecar.session.summary()["refresh_count"] == 1, what="recovery")
    metrics = sidecar.metrics.render().decode()
    assert (
        sample(metrics, 'sidecar_token_refreshes_total{reason="http_503",result="failure"}') or 0
    ) >= 2
    assert (
        sample(metrics, 'sidecar_token_refreshes_total{reason="proactive",result="success"}') == 1
    )


@pytest.mark.parametrize("mode", ["503", "reset"])
async def test_a_refresh_endpoint_down_falls_back_to_a_login_before_the_token_runs_out(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    idp: FakeIdP,
    clock: FakeClock,
    mode: str,
) -> None:
    """Refreshes fail (5xx, or the connection drops) while logins work: the refresh is retried
    with backoff for the first half of the refresh lead, then the session logs in again with the
    credentials, before the token stops being usable; no request gets a 503 across two
    lifetimes."""
    idp.lifetime = 600
    sidecar = await make_sidecar(
        clock=clock,
        refresh={
            "lead_time": 120,
            "lead_fraction": 0,
            "jitter": 0,
            "retry": {"initial": 5, "max": 20},
        },
    )
    await eventually(lambda: sidecar.session.usable() is not None)
    started = clock.time()
    idp.refresh_down = mode
    statuses = []
    for _ in range(240):
        await advance(clock, 5)
        await eventually(lambda: not sidecar.session.summary()["refresh_in_progress"])
        async with http.get(proxy_url(sidecar, "/x")) as resp:
            statuses.append(resp.status)
    assert set(statuses) == {200}
    grants = idp.grants()
    assert grants[:2] == ["client_credentials", "refresh_token"]
    logins = [c.at - started for c in idp.token_calls if c.grant_type == "client_credentials"]
    assert len(logins) >= 3, grants
    # the first token is usable until 598 s: retried as a refresh until 540 s, then a login
    assert 540 <= logins[1] < 598, logins
    metrics = sidecar.metrics.render().decode()
    assert (sample(metrics, 'sidecar_logins_total{result="success"}') or 0) >= 3


async def test_rejected_refresh_token_falls_back_to_login(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    idp: FakeIdP,
    clock: FakeClock,
    upstream: FakeUpstream,
) -> None:
    """invalid_grant on refresh: a full login with the credentials, and a new session id."""
    idp.lifetime = 600
    sidecar = await make_sidecar(clock=clock)
    await eventually(lambda: sidecar.session.usable() is not None)
    first_session = sidecar.session.summary()["session_id"]
    idp.failures = ["invalid_grant"]
    await advance(clock, 500)
    await eventually(lambda: len(idp.token_calls) == 3, what="refresh then login")
    assert idp.grants() == ["client_credentials", "refresh_token", "client_credentials"]
    await eventually(lambda: sidecar.session.summary().get("session_id") != first_session)
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 200
    assert upstream.seen[-1].headers["X-Session-ID"] == sidecar.session.summary()["session_id"]
    metrics = sidecar.metrics.render().decode()
    assert (
        sample(metrics, 'sidecar_token_refreshes_total{reason="invalid_grant",result="failure"}')
        == 1
    )
    assert sample(metrics, 'sidecar_logins_total{result="success"}') == 2


async def test_expired_with_provider_down_gives_503_and_recovers_by_itself(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    idp: FakeIdP,
    clock: FakeClock,
    upstream: FakeUpstream,
) -> None:
    """Never forward an expired token: 503 while none can be had, ready again once the provider
    is back."""
    idp.lifetime = 100
    sidecar = await make_sidecar(clock=clock, refresh={"retry": {"initial": 1, "max": 4}})
    await eventually(lambda: sidecar.session.usable() is not None)
    idp.down = "500"
    await advance(clock, 101)
    await eventually(lambda: sidecar.session.state().value == "EXPIRED")
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 503
    async with http.get(admin_url(sidecar, "/readyz")) as resp:
        assert resp.status == 503
    assert all(idp.is_valid(s.headers["Authorization"][7:]) for s in upstream.seen)
    idp.down = None
    for _ in range(10):
        await advance(clock, 4)
        await asyncio.sleep(0.05)
        if sidecar.session.usable() is not None:
            break
    assert sidecar.session.usable() is not None
    async with http.get(admin_url(sidecar, "/readyz")) as resp:
        assert resp.status == 200
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 200


async def test_start_with_provider_down_becomes_ready_without_restart(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP
) -> None:
    """The process starts and answers 503 / not ready; when the provider comes up, it is ready."""
    idp.down = "hang"
    idp_timeout = {"timeout": 0.3}
    sidecar = await make_sidecar(
        identity=idp_timeout, refresh={"retry": {"initial": 0.1, "max": 0.2}}
    )
    async with http.get(admin_url(sidecar, "/readyz")) as resp:
        assert resp.status == 503
    async with http.get(admin_url(sidecar, "/healthz")) as resp:
        assert resp.status == 200
    idp.down = None
    await eventually(lambda: sidecar.session.usable() is not None, within=5, what="ready")
    async with http.get(admin_url(sidecar, "/readyz")) as resp:
        assert resp.status == 200


async def test_upstream_401_triggers_one_refresh_and_replay_for_a_burst(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP
) -> None:
    """Tokens revoked behind our back: 50 concurrent requests see 200 after exactly one refresh."""
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.usable() is not None)
    idp.revoke_all()
    idp.delay = 0.2

    async def one(i: int) -> int:
        async with http.post(proxy_url(sidecar, f"/x?{i}"), data=b"replayable body") as resp:
            assert (await resp.json())["body"] == "replayable body"
            return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(50)))
    assert statuses == [200] * 50
    assert idp.grants() == ["client_credentials", "refresh_token"]
    metrics = sidecar.metrics.render().decode()
    assert sample(metrics, "sidecar_reactive_refreshes_total") == 1


async def test_401_with_unreplayable_body_is_returned_and_never_loops(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP, upstream: FakeUpstream
) -> None:
    """A streamed body cannot be replayed: the caller gets the 401. An upstream that rejects every
    token gets one reactive refresh per interval, never one per request."""
    sidecar = await make_sidecar(upstream={"replay_body_limit": 10})
    await eventually(lambda: sidecar.session.usable() is not None)
    idp.revoke_all()
    async with http.post(proxy_url(sidecar, "/x"), data=os.urandom(1000)) as resp:
        assert resp.status == 401
    assert idp.grants() == ["client_credentials"]
    idp.is_valid = lambda access_token: False  # type: ignore[method-assign]
    for _ in range(20):
        async with http.get(proxy_url(sidecar, "/x")) as resp:
            assert resp.status == 401
    assert idp.grants() == ["client_credentials", "refresh_token"]
    assert len(upstream.seen) == 1 + 20 + 1  # one replay only


async def test_logout_revokes_and_stays_out_until_refresh(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP
) -> None:
    """POST /session/logout revokes refresh then access token; requests get 503 until
    POST /session/refresh logs in again with a new session."""
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.usable() is not None)
    first = sidecar.session.summary()["session_id"]
    async with http.post(admin_url(sidecar, "/session/logout")) as resp:
        assert resp.status == 200
        assert (await resp.json())["state"] == "LOGGED_OUT"
    revoked = [c.form["token_type_hint"] for c in idp.calls if c.path == "/revoke"]
    assert revoked == ["refresh_token", "access_token"]
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 503
    async with http.post(admin_url(sidecar, "/session/refresh")) as resp:
        assert resp.status == 200
        summary = await resp.json()
    assert summary["state"] == "VALID"
    assert summary["session_id"] != first
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 200


async def test_admin_posts_from_web_pages_are_refused(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """A browser page cannot log the sidecar out: POSTs with an Origin header get 403."""
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.usable() is not None)
    async with http.post(
        admin_url(sidecar, "/session/logout"), headers={"Origin": "https://evil.example"}
    ) as resp:
        assert resp.status == 403
    assert sidecar.session.state().value == "VALID"


async def test_expiry_from_jwt_exp_without_expires_in(
    make_sidecar: MakeSidecar, idp: FakeIdP, clock: FakeClock
) -> None:
    """Without expires_in, the token's lifetime is read from its JWT exp claim."""
    idp.lifetime = 900
    idp.send_expires_in = False
    sidecar = await make_sidecar(clock=clock)
    await eventually(lambda: sidecar.session.usable() is not None)
    assert sidecar.session.summary()["expires_in"] == pytest.approx(900, abs=1)


async def test_password_grant_with_client_secret_post_on_the_wire(
    make_sidecar: MakeSidecar, idp: FakeIdP, tmp_path: object
) -> None:
    """The password grant sends username/password and, with client_secret_post, the client's
    credentials in the form instead of a Basic header; scope and audience are sent too."""
    sidecar = await make_sidecar(
        identity={
            "grant": "password",
            "username": idp.username,
            "password": idp.password,
            "client_auth": "client_secret_post",
            "scope": "read write",
            "audience": "api://x",
        }
    )
    await eventually(lambda: sidecar.session.usable() is not None)
    call = idp.token_calls[0]
    assert call.form["grant_type"] == "password"
    assert call.form["username"] == idp.username
    assert call.form["password"] == idp.password
    assert call.form["client_id"] == idp.client_id
    assert call.form["client_secret"] == idp.client_secret
    assert call.form["scope"] == "read write"
    assert call.form["audience"] == "api://x"
    assert "Authorization" not in call.headers


async def test_client_secret_basic_on_the_wire(make_sidecar: MakeSidecar, idp: FakeIdP) -> None:
    """client_secret_basic: credentials only in the Authorization header, never in the form."""
    import base64

    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.usable() is not None)
    call = idp.token_calls[0]
    assert (
        call.headers["Authorization"]
        == "Basic " + base64.b64encode(f"{idp.client_id}:{idp.client_secret}".encode()).decode()
    )
    assert "client_secret" not in call.form
    assert call.form == {"grant_type": "client_credentials"}


async def test_admin_posts_from_other_hosts_are_refused(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """With the admin port on the pod network, only loopback callers may change the session;
    probes and scrapes (GETs) still work from anywhere."""
    import subprocess

    # this machine's own interface address: traffic to it never leaves the machine
    listing = subprocess.run(  # noqa: ASYNC221
        ["/usr/sbin/ip", "-4", "-o", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if "inet" not in listing:
        pytest.skip("this machine has no non-loopback address to call the admin port from")
    own_address = listing[listing.index("inet") + 1].split("/")[0]
    sidecar = await make_sidecar(admin={"host": own_address, "allow_non_loopback": True})
    await eventually(lambda: sidecar.session.usable() is not None)
    base = f"http://{own_address}:{sidecar.admin_port}"
    async with http.post(base + "/session/logout") as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "not_loopback"
    async with http.get(base + "/readyz") as resp:
        assert resp.status == 200
    assert sidecar.session.state().value == "VALID"


async def test_session_gauges_follow_the_session_through_login_and_refresh(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP, clock: FakeClock
) -> None:
    """/metrics: after the login, the session-started and last-refresh gauges are the login's
    time and the expiry gauge the token's expiry; after a refresh, the started one stays, the
    refresh one moves to the refresh's time, and the expiry follows the new token."""
    idp.lifetime = 600
    start = clock.time()
    sidecar = await make_sidecar(
        clock=clock, refresh={"lead_time": 120, "lead_fraction": 0, "jitter": 0}
    )
    await eventually(lambda: sidecar.session.usable() is not None)

    async def gauges() -> tuple[float | None, float | None, float | None]:
        async with http.get(admin_url(sidecar, "/metrics")) as resp:
            text = await resp.text()
        return (
            sample(text, "sidecar_session_started_timestamp_seconds"),
            sample(text, "sidecar_last_refresh_success_timestamp_seconds"),
            sample(text, "sidecar_token_expiry_timestamp_seconds"),
        )

    login = sidecar.session.record
    assert login is not None
    assert await gauges() == (start, start, start + 600)
    assert login.token.expires_at == start + 600
    await advance(clock, 481)
    await eventually(lambda: sidecar.session.summary()["refresh_count"] == 1, what="refresh")
    refreshed = sidecar.session.record
    assert refreshed is not None
    assert refreshed.last_refreshed_at is not None
    assert start + 480 <= refreshed.last_refreshed_at <= start + 481
    started, last_refresh, expiry = await gauges()
    assert started == start == refreshed.created_at
    assert last_refresh == refreshed.last_refreshed_at
    assert expiry == refreshed.token.expires_at == refreshed.token.obtained_at + 600
    assert expiry > start + 600


async def test_session_gauges_of_a_restored_session_are_the_stored_ones(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    idp: FakeIdP,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """A sidecar restarted 100 s later on its file store shows the stored session's start,
    last refresh and expiry in /metrics, not the moment it restarted."""
    idp.lifetime = 600
    start = clock.time()
    store = {"store": "file", "path": str(tmp_path / "session.json")}
    first = await make_sidecar(clock=clock, session=store)
    await eventually(lambda: first.session.usable() is not None)
    await first.stop()
    clock.now += 100
    second = await make_sidecar(clock=clock, session=store)
    await eventually(lambda: second.session.usable() is not None)
    assert idp.grants() == ["client_credentials"]
    async with http.get(admin_url(second, "/metrics")) as resp:
        text = await resp.text()
    assert sample(text, "sidecar_session_started_timestamp_seconds") == start
    assert sample(text, "sidecar_last_refresh_success_timestamp_seconds") == start
    assert sample(text, "sidecar_token_expiry_timestamp_seconds") == start + 600
