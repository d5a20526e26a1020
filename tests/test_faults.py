"""The fault suite: the identity provider and the upstream fail in every way the resilience issue
lists, on loopback. Each case checks what the caller saw, what the metrics counted, and that no
request reached the upstream without a token valid at that moment.

Cases already covered elsewhere are listed in docs/development.md ("Fault and hostile-input
suites").
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.app import Sidecar
from tests.conftest import MakeSidecar, admin_url, proxy_url
from tests.fakes.clock import FakeClock
from tests.fakes.gate import Gate
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import events, eventually, sample

#: the failure reason each provider fault is counted under
IDP_FAULTS = {
    "refused": "unreachable",
    "reset": "connection",
    "hang": "timeout",
    "500": "http_500",
    "502": "http_502",
    "503": "http_503",
    "429": "http_429",
    "malformed": "malformed_response",
    "not_a_token": "malformed_response",
    "truncated": "connection",  # the body broke off before its Content-Length
}

RETRY = {"initial": 2, "max": 8}


@pytest.fixture
async def gate(idp_url: str) -> AsyncIterator[Gate]:
    """A gate in front of the identity provider, so that it can refuse connections."""
    g = Gate(int(idp_url.rsplit(":", 1)[1]))
    await g.open()
    yield g
    await g.close()


def all_forwarded_tokens_were_valid(upstream: FakeUpstream) -> bool:
    return all(seen.token_valid for seen in upstream.seen)


async def settle(sidecar: Sidecar, clock: FakeClock) -> None:
    """Wait (real time) until no login or refresh is in flight and the refresh loop sleeps on the
    fake clock, so that the next advance of the clock is seen by it."""
    await eventually(
        lambda: not sidecar.session.summary()["refresh_in_progress"] and clock.sleepers >= 1,
        within=5,
    )


@pytest.mark.parametrize("fault", list(IDP_FAULTS))
async def test_identity_provider_fault_rides_on_the_valid_token_then_503_then_recovers(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    idp: FakeIdP,
    upstream: FakeUpstream,
    clock: FakeClock,
    gate: Gate,
    fault: str,
) -> None:
    """While the provider fails (``fault``) at refresh time: requests keep succeeding with the
    current token, every failed attempt is counted under its reason and the next one is at most
    one capped backoff step away (Retry-After honoured as a floor). Once the token expires with
    no replacement: 503 no_session, /readyz 503, nothing forwarded. When the provider returns,
    the session recovers by itself within one backoff step. No request ever went out with a
    token that was not valid at that moment."""
    idp.lifetime = 600
    sidecar = await make_sidecar(
        clock=clock,
        identity={"token_url": f"{gate.url}/token", "timeout": 0.3},
        refresh={"lead_time": 120, "jitter": 0, "retry": RETRY},
    )
    await eventually(lambda: sidecar.session.usable() is not None, what="login at start")
    await settle(sidecar, clock)
    if fault == "refused":
        await gate.refuse()
    else:
        idp.down = fault

    await clock.advance(481)  # refresh due (120 s before expiry)
    await eventually(lambda: sidecar.session.refresh_failures >= 1, what="a failed refresh")
    await settle(sidecar, clock)
    next_in = sidecar.session.summary()["next_attempt_in"]
    assert next_in <= RETRY["max"]
    if fault == "429":
        assert next_in >= 2  # the provider's Retry-After: 2
    for _ in range(3):
        async with http.get(proxy_url(sidecar, "/x")) as resp:
            assert resp.status == 200
    failures_before = sidecar.session.refresh_failures
    for _ in range(20):  # 20 s of provider outage, still within the token's life
        await clock.advance(1)
        await settle(sidecar, clock)
    assert sidecar.session.refresh_failures >= failures_before + 2, "retries continue"
    assert sidecar.session.summary()["next_attempt_in"] <= RETRY["max"]

    await clock.advance(100)  # past expiry, provider still down
    await settle(sidecar, clock)
    assert sidecar.session.state().value == "EXPIRED"
    seen_before = len(upstream.seen)
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 503
        assert resp.headers["X-Sidecar-Error"] == "1"
        assert (await resp.json())["error"] == "no_session"
    async with http.get(admin_url(sidecar, "/readyz")) as resp:
        assert resp.status == 503
    assert len(upstream.seen) == seen_before

    if fault == "refused":
        await gate.open()
    else:
        idp.down = None
    waited = 0.0
    while sidecar.session.usable() is None and waited < RETRY["max"] + 1:
        await clock.advance(0.5)
        await settle(sidecar, clock)
        waited += 0.5
    assert sidecar.session.usable() is not None, "recovered within one backoff step"
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 200
    async with http.get(admin_url(sidecar, "/readyz")) as resp:
        assert resp.status == 200
    assert all_forwarded_tokens_were_valid(upstream)

    metrics = sidecar.metrics.render().decode()
    reason = IDP_FAULTS[fault]
    failed = sample(metrics, f'sidecar_token_refreshes_total{{reason="{reason}",result="failure"}}')
    assert (failed or 0) >= 3
    # the refresh token outlived the outage: the session went on, no second login
    assert sample(metrics, 'sidecar_logins_total{result="success"}') == 1
    assert sample(metrics, 'sidecar_token_refreshes_total{reason="expired",result="success"}') == 1
    assert sample(metrics, 'sidecar_upstream_requests_total{code="503",method="GET"}') == 1


async def test_start_with_the_provider_refusing_connections_becomes_ready_by_itself(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP, gate: Gate
) -> None:
    """Startup with the provider down (connection refused): the process runs, /healthz 200,
    /readyz 503, requests 503; when the provider starts accepting, it becomes ready without a
    restart."""
    await gate.refuse()
    sidecar = await make_sidecar(
        identity={"token_url": f"{gate.url}/token"},
        refresh={"retry": {"initial": 0.05, "max": 0.2}},
    )
    await eventually(lambda: sidecar.session.summary()["consecutive_failures"] >= 2)
    async with http.get(admin_url(sidecar, "/healthz")) as resp:
        assert resp.status == 200
    async with http.get(admin_url(sidecar, "/readyz")) as resp:
        assert resp.status == 503
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 503
    await gate.open()
    await eventually(lambda: sidecar.session.usable() is not None, what="ready after return")
    async with http.get(admin_url(sidecar, "/readyz")) as resp:
        assert resp.status == 200
    metrics = sidecar.metrics.render().decode()
    assert (sample(metrics, 'sidecar_logins_total{result="failure"}') or 0) >= 2


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("refused", 502, "upstream_unavailable"),
        ("closed before answering", 502, "upstream_unavailable"),
        ("timeout", 504, "upstream_timeout"),
    ],
)
async def test_upstream_faults_are_mapped_counted_and_logged(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    log_output: io.StringIO,
    case: str,
    status: int,
    code: str,
) -> None:
    """Refused → 502, closed without an answer → 502, too slow → 504: a JSON error with
    X-Sidecar-Error, counted in sidecar_upstream_requests_total by code, and one
    proxy.upstream_failed log line with the error code; the next request is served again."""
    overrides: dict[str, object] = {"upstream": {"timeout": {"total": 0.3}}}
    path = {"closed before answering": "/drop", "timeout": "/slow/2"}.get(case, "/x")
    if case == "refused":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dead_port = sock.getsockname()[1]
        overrides = {"upstream": {"url": f"http://127.0.0.1:{dead_port}"}}
    sidecar = await make_sidecar(**overrides)
    await eventually(lambda: sidecar.session.usable() is not None)
    async with http.get(proxy_url(sidecar, path)) as resp:
        assert resp.status == status
        assert resp.headers["X-Sidecar-Error"] == "1"
        assert (await resp.json())["error"] == code
    metrics = sidecar.metrics.render().decode()
    assert sample(metrics, f'sidecar_upstream_requests_total{{code="{status}",method="GET"}}') == 1
    failed = [e for e in events(log_output) if e["event"] == "proxy.upstream_failed"]
    assert [e["code"] for e in failed] == [code]
    if case != "refused":
        async with http.get(proxy_url(sidecar, "/x")) as resp:
            assert resp.status == 200


async def test_upstream_reset_mid_response_is_counted_and_logged(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, log_output: io.StringIO
) -> None:
    """A reset after the head: the caller's connection is cut (the body is not passed off as
    complete), the request is counted, the break is logged, and the proxy serves the next one."""
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.usable() is not None)
    async with http.get(proxy_url(sidecar, "/reset")) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await eventually(lambda: sidecar.metrics.in_flight_now() == 0)
    metrics = sidecar.metrics.render().decode()
    assert sample(metrics, 'sidecar_upstream_requests_total{code="200",method="GET"}') == 1
    assert any(e["event"] == "proxy.upstream_broke_mid_response" for e in events(log_output))
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 200


async def test_rotated_secret_file_is_used_at_the_next_login(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP, tmp_path: Path
) -> None:
    """client_secret_file and password_file are read at every login: the provider rotates both,
    the files are rewritten, and the next login (after invalid_grant on refresh) succeeds with
    the new values, without a restart."""
    secret_file, password_file = tmp_path / "client-secret", tmp_path / "password"
    secret_file.write_text(idp.client_secret + "\n")
    password_file.write_text(idp.password)
    sidecar = await make_sidecar(
        identity={
            "client_secret": None,
            "client_secret_file": str(secret_file),
            "grant": "password",
            "username": idp.username,
            "password_file": str(password_file),
        }
    )
    await eventually(lambda: sidecar.session.usable() is not None)
    idp.client_secret, idp.password = "rotated-secret-1", "rotated-password-1"
    secret_file.write_text("rotated-secret-1\n")
    password_file.write_text("rotated-password-1")
    idp.refresh_tokens.clear()  # the old grant is gone: the refresh fails, a login follows
    async with http.post(admin_url(sidecar, "/session/refresh")) as resp:
        assert resp.status == 200
    assert idp.grants() == ["password", "refresh_token", "password"]
    last = idp.token_calls[-1]
    assert last.form["password"] == "rotated-password-1"
    basic = base64.b64decode(last.headers["Authorization"].removeprefix("Basic ")).decode()
    assert basic == f"{idp.client_id}:rotated-secret-1"
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 200


async def test_non_loopback_listening_warns(
    make_sidecar: MakeSidecar, log_output: io.StringIO
) -> None:
    """Listening beyond loopback needs allow_non_loopback (a config test checks the refusal) and
    is logged as a warning naming the section."""
    await make_sidecar(listen={"host": "0.0.0.0", "allow_non_loopback": True})  # noqa: S104
    warned = [e for e in events(log_output) if e["event"] == "sidecar.non_loopback"]
    assert [(e["section"], e["level"]) for e in warned] == [("listen", "warning")]


async def test_proxy_stays_alive_when_asked_to_reach_the_provider_during_a_hang(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP
) -> None:
    """Requests arriving while the only login hangs wait for that one call (single flight) and
    get 503 when it times out; the provider saw one call, not one per request."""
    idp.down = "hang"
    sidecar = await make_sidecar(
        identity={"timeout": 0.5}, refresh={"retry": {"initial": 600, "max": 600}}
    )

    async def one() -> int:
        async with http.get(proxy_url(sidecar, "/x")) as resp:
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(20)))
    assert statuses == [503] * 20
    assert len(idp.token_calls) == 1


async def test_a_token_is_not_forwarded_in_its_last_seconds(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    idp: FakeIdP,
    upstream: FakeUpstream,
    clock: FakeClock,
) -> None:
    """refresh.expiry_margin: with the provider down, a 100 s token is used until 2 s before its
    expiry and not after, so it cannot expire on its way; /readyz turns 503 at the same moment."""
    idp.lifetime = 100
    sidecar = await make_sidecar(
        clock=clock, refresh={"expiry_margin": 2, "retry": {"initial": 600, "max": 600}}
    )
    await eventually(lambda: sidecar.session.usable() is not None)
    await settle(sidecar, clock)
    idp.down = "503"
    await clock.advance(97.5)
    await settle(sidecar, clock)
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 200
    await clock.advance(1)  # 1.5 s before expiry
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 503
    async with http.get(admin_url(sidecar, "/readyz")) as resp:
        assert resp.status == 503
    assert len(upstream.seen) == 1
    assert all_forwarded_tokens_were_valid(upstream)
