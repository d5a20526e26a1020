"""identity.kind json_login against the FinHub-shaped fake: the calls on the wire, session fields
in headers, rotation and fallback to login, backup endpoints, logout, cookies, persistence."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from sidecar.app import Sidecar
from sidecar.config.models import Config
from tests.conftest import Serve, admin_url, merge, proxy_url
from tests.fakes.clock import FakeClock
from tests.fakes.finhub import PREFIX, FinHub
from tests.helpers import advance, eventually, sample

MakeSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
def clock(finhub: FinHub) -> FakeClock:
    """The fake clock the FinHub fake runs on, shared with the sidecar."""
    assert isinstance(finhub.clock, FakeClock)
    finhub.lifetime = 600  # short lifetimes: a refresh every 540 s of fake time
    return finhub.clock


def finhub_config(url: str, finhub: FinHub, secrets: Path) -> dict[str, Any]:
    """A json_login config for the fake, written like config/finhub.yaml (secrets in files)."""
    (secrets / "password").write_text(finhub.password)
    tenant = {"X-Tenant-ID": finhub.tenant_id}
    return {
        "listen": {"port": 0},
        "admin": {"port": 0},
        "upstream": {"url": url, "timeout": {"connect": 2, "total": 5}},
        "identity": {
            "kind": "json_login",
            "timeout": 2,
            "credentials": {
                "username": finhub.username,
                "password_file": str(secrets / "password"),
                "customer_id": finhub.customer_id,
                "customer_secret": finhub.customer_secret,
            },
            "login": {
                "url": f"{url}{PREFIX}/auth/login",
                "headers": tenant,
                "json": {
                    "username": "{{ credentials.username }}",
                    "password": "{{ credentials.password }}",
                    "customerId": "{{ credentials.customer_id }}",
                    "customerSecret": "{{ credentials.customer_secret }}",
                },
            },
            "refresh": {
                "url": f"{url}{PREFIX}/auth/token/refresh",
                "headers": tenant,
                "json": {
                    "refreshToken": "{{ session.refresh_token }}",
                    "customerId": "{{ credentials.customer_id }}",
                    "customerSecret": "{{ credentials.customer_secret }}",
                },
            },
            "logout": {
                "url": f"{url}{PREFIX}/auth/logout",
                "headers": {
                    "Authorization": "Bearer {{ session.access_token }}",
                    "X-Tenant-ID": "{{ session.tenant_id }}",
                },
            },
            "response": {
                "access_token": "userSessionToken",
                "refresh_token": "refreshToken",
                "expires_in": "expires_in",
                "fields": {"tenant_id": "tenantId", "customer_id": "customerId"},
            },
        },
        "refresh": {"lead_time": 60, "lead_fraction": 0, "jitter": 0, "retry": {"initial": 0.05}},
        "headers": {"tenant_id": "{{ session.tenant_id }}"},
        "session": {"store": "memory"},
    }


@pytest.fixture
async def make(
    finhub: FinHub, finhub_url: str, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[MakeSidecar]:
    """Start sidecars on the fake clock with the FinHub config plus ``overrides``."""
    started: list[Sidecar] = []

    async def _make(wait: bool = True, **overrides: Any) -> Sidecar:
        data = finhub_config(finhub_url, finhub, tmp_path)
        config = Config.model_validate(merge(data, overrides))
        sidecar = Sidecar(config, clock=clock, drain_timeout=1.0)
        await sidecar.start()
        started.append(sidecar)
        if wait:
            await eventually(lambda: sidecar.session.usable() is not None, what="login")
        return sidecar

    yield _make
    for sidecar in reversed(started):
        await sidecar.stop()


async def get(http: aiohttp.ClientSession, sidecar: Sidecar, **headers: str) -> dict[str, Any]:
    async with http.get(proxy_url(sidecar, f"{PREFIX}/accounts"), headers=headers) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body


async def test_login_call_on_the_wire_and_secret_files_re_read(
    make: MakeSidecar, finhub: FinHub, tmp_path: Path
) -> None:
    """The login is a POST of the rendered JSON body with the configured headers and a fresh
    uuid4 X-Request-ID; the password file is read again at the next login."""
    sidecar = await make()
    (call,) = finhub.auth_calls("login")
    assert call.json == {
        "username": finhub.username,
        "password": finhub.password,
        "customerId": finhub.customer_id,
        "customerSecret": finhub.customer_secret,
    }
    assert call.headers["Content-Type"] == "application/json"
    assert call.headers["X-Tenant-ID"] == finhub.tenant_id
    assert uuid.UUID(call.headers["X-Request-ID"]).version == 4
    finhub.password = "rotated-password-000"
    (tmp_path / "password").write_text("rotated-password-000\n")
    await sidecar.session.logout()
    await sidecar.session.force_refresh()
    second = finhub.auth_calls("login")[1]
    assert second.json["password"] == "rotated-password-000"
    assert second.headers["X-Request-ID"] != call.headers["X-Request-ID"]


async def test_session_fields_fill_headers(
    make: MakeSidecar, finhub: FinHub, http: aiohttp.ClientSession
) -> None:
    """X-Tenant-ID comes from the login answer's tenantId, a static header from customerId; the
    caller's own X-Tenant-ID is replaced; /session names the fields but shows no value."""
    finhub.tenant_id = "7654321"
    sidecar = await make(
        identity={"login": {"headers": {"X-Tenant-ID": "7654321"}}},
        headers={"static": {"X-Customer": "{{ session.customer_id }}"}},
    )
    await get(http, sidecar, **{"X-Tenant-ID": "1"})
    seen = finhub.calls[-1].headers
    assert seen["X-Tenant-ID"] == "7654321"
    assert seen["X-Customer"] == finhub.customer_id
    assert finhub.rejected == []
    async with http.get(admin_url(sidecar, "/session")) as resp:
        text = await resp.text()
    assert '"session_fields": ["customer_id", "tenant_id"]' in text
    assert finhub.customer_id not in text


async def test_header_values_are_rendered_once_per_session_not_per_request(
    make: MakeSidecar,
    http: aiohttp.ClientSession,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fifty requests on one token render the session header templates once; a refresh (a new
    credentials snapshot) renders them once more."""
    from sidecar.proxy.header_values import SessionValues

    renders: list[object] = []
    original = SessionValues._render

    def counting(self: SessionValues, creds: Any) -> None:
        renders.append(creds)
        original(self, creds)

    monkeypatch.setattr(SessionValues, "_render", counting)
    sidecar = await make()
    for _ in range(50):
        await get(http, sidecar)
    assert len(renders) == 1
    await advance(clock, 560)
    await eventually(lambda: sidecar.session.summary().get("refresh_count") == 1, what="refresh")
    for _ in range(5):
        await get(http, sidecar)
    assert len(renders) == 2


async def test_rotation_and_rejected_refresh_token_falls_back_to_login(
    make: MakeSidecar, finhub: FinHub, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """Each refresh presents the newest refresh token; when the API rejects it (401), the session
    manager logs in again with the credentials (a new session) and traffic goes on."""
    sidecar = await make()
    first_session = sidecar.session.summary()["session_id"]
    await advance(clock, 560)
    await eventually(lambda: len(finhub.auth_calls("token/refresh")) == 1, what="refresh")
    await advance(clock, 560)
    await eventually(lambda: len(finhub.auth_calls("token/refresh")) == 2, what="2nd refresh")
    assert [c.json["refreshToken"] for c in finhub.auth_calls("token/refresh")] == (
        finhub.used_refresh_tokens
    )
    finhub.refresh_tokens.clear()  # the API forgets them: the next refresh is rejected
    await advance(clock, 560)
    await eventually(lambda: len(finhub.auth_calls("login")) == 2, what="fallback login")
    await eventually(lambda: sidecar.session.summary()["session_id"] != first_session)
    await get(http, sidecar)
    metrics = sidecar.metrics.render().decode()
    rejected = 'sidecar_token_refreshes_total{reason="invalid_grant",result="failure"}'
    assert sample(metrics, rejected) == 1.0
    assert finhub.rejected == []


async def test_backup_urls_serve_login_and_refresh_when_the_primary_fails(
    make: MakeSidecar, finhub: FinHub, finhub_url: str, serve: Serve, clock: FakeClock
) -> None:
    """FinHub disaster recovery: the primary login and refresh endpoints answer 503, so the
    backups (tried in order) are used; the primary was tried first."""
    broken = FinHub(clock=clock, down="503")
    broken_url = await serve(broken.app())
    await make(
        identity={
            "login": {
                "url": f"{broken_url}{PREFIX}/auth/login",
                "backup_urls": [f"{finhub_url}{PREFIX}/auth/login"],
            },
            "refresh": {
                "url": f"{broken_url}{PREFIX}/auth/token/refresh",
                "backup_urls": [f"{finhub_url}{PREFIX}/auth/token/refresh"],
            },
        }
    )
    assert len(broken.auth_calls("login")) == 1
    assert len(finhub.auth_calls("login")) == 1
    await advance(clock, 560)
    await eventually(lambda: len(finhub.auth_calls("token/refresh")) == 1, what="refresh")
    assert len(broken.auth_calls("token/refresh")) == 1


async def test_backup_url_used_when_the_primary_is_unreachable(
    make: MakeSidecar, finhub: FinHub, finhub_url: str
) -> None:
    """A refused connection on the primary moves on to the backup."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sidecar = await make(
        identity={
            "login": {
                "url": f"{closed}{PREFIX}/auth/login",
                "backup_urls": [f"{finhub_url}{PREFIX}/auth/login"],
            }
        }
    )
    assert sidecar.session.usable() is not None
    assert len(finhub.auth_calls("login")) == 1


async def test_logout_call_on_the_wire(
    make: MakeSidecar, finhub: FinHub, http: aiohttp.ClientSession
) -> None:
    """POST /session/logout calls the logout endpoint with the session's token and tenant (a
    fresh X-Request-ID), the API ends the session, and requests get 503 until a new login."""
    sidecar = await make()
    token = sidecar.session.usable()
    assert token is not None
    async with http.post(admin_url(sidecar, "/session/logout")) as resp:
        assert resp.status == 200
    (call,) = finhub.auth_calls("logout")
    assert call.headers["Authorization"] == f"Bearer {token.token.access_token}"
    assert call.headers["X-Tenant-ID"] == finhub.tenant_id
    assert uuid.UUID(call.headers["X-Request-ID"]).version == 4
    assert token.token.access_token in finhub.logged_out
    async with http.get(proxy_url(sidecar, f"{PREFIX}/accounts")) as resp:
        assert resp.status == 503


async def test_failing_logout_is_logged_and_never_blocks(
    make: MakeSidecar, finhub: FinHub, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A logout endpoint that hangs costs at most identity.timeout, is logged, and the local
    session is cleared anyway."""
    sidecar = await make(identity={"timeout": 0.3})
    finhub.down = "hang"
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.post(admin_url(sidecar, "/session/logout")) as resp:
        assert resp.status == 200
        assert (await resp.json())["state"] == "LOGGED_OUT"
    assert loop.time() - started < 2
    assert "session.logout_failed" in caplog.text


async def test_without_refresh_a_new_login_replaces_the_session_content(
    make: MakeSidecar, finhub: FinHub, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """With no refresh call configured, renewal is a login; its answer replaces tokens, fields
    and cookies (a cookie of the first login that the second does not set is gone)."""
    finhub.set_cookies = ["first=1; Path=/"]
    sidecar = await make(identity={"refresh": None}, upstream={"send_cookies": True})
    assert (await get(http, sidecar))["cookie"] == "first=1"
    finhub.set_cookies = ["second=2; Path=/"]
    await advance(clock, 560)
    await eventually(lambda: len(finhub.auth_calls("login")) == 2, what="second login")
    await eventually(lambda: sidecar.session.summary().get("refresh_count") == 1)
    assert finhub.auth_calls("token/refresh") == []
    assert (await get(http, sidecar))["cookie"] == "second=2"


async def test_login_answer_without_token_fails_clearly_with_a_labelled_metric(
    make: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """A response mapping pointing at a missing key: the login fails with an error naming the
    key and path, counted as sidecar_login_failures_total{reason="missing_access_token"}, and
    requests get 503."""
    sidecar = await make(wait=False, identity={"response": {"access_token": "data.sessionToken"}})
    failures = 'sidecar_login_failures_total{reason="missing_access_token"}'
    await eventually(lambda: (sample(sidecar.metrics.render().decode(), failures) or 0) >= 1)
    summary = sidecar.session.summary()
    assert "response.access_token: no value at 'data.sessionToken'" in summary["last_error"]
    async with http.get(proxy_url(sidecar, f"{PREFIX}/accounts")) as resp:
        assert resp.status == 503


async def test_cookies_from_login_and_refresh_go_to_the_upstream_only_when_asked(
    make: MakeSidecar, finhub: FinHub, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """With send_cookies, the session's cookies matching the upstream URL are sent, merged with
    the caller's (ours wins on a clash); the refresh call carries them back to the API that set
    them; a refresh answer's Max-Age=0 deletes one; /session shows only a count."""
    finhub.set_cookies = [
        "sid=login-1; Path=/; HttpOnly",
        "api=only-api; Path=/api",
        "elsewhere=no; Path=/other",
    ]
    sidecar = await make(upstream={"send_cookies": True})
    body = await get(http, sidecar, Cookie="mine=1; sid=callers")
    assert body["cookie"] == "mine=1; api=only-api; sid=login-1"
    assert sidecar.session.summary()["cookies"] == 3
    finhub.set_cookies = ["sid=refreshed; Path=/", "api=; Max-Age=0; Path=/api"]
    await advance(clock, 560)
    await eventually(lambda: len(finhub.auth_calls("token/refresh")) == 1, what="refresh")
    refresh_cookie = finhub.auth_calls("token/refresh")[0].headers.get("Cookie")
    assert refresh_cookie == "api=only-api; sid=login-1"
    await eventually(lambda: sidecar.session.summary().get("refresh_count") == 1)
    assert (await get(http, sidecar))["cookie"] == "sid=refreshed"


async def test_cookies_are_not_sent_by_default(
    make: MakeSidecar, finhub: FinHub, http: aiohttp.ClientSession
) -> None:
    """send_cookies is off by default: the caller's Cookie header passes through untouched."""
    finhub.set_cookies = ["sid=login-1; Path=/"]
    sidecar = await make()
    assert (await get(http, sidecar))["cookie"] is None
    assert (await get(http, sidecar, Cookie="mine=1"))["cookie"] == "mine=1"


async def test_cookies_never_go_to_another_host(
    make: MakeSidecar, finhub: FinHub, finhub_url: str, http: aiohttp.ClientSession
) -> None:
    """Host-only cookies set by the identity API at 127.0.0.1 are not sent to an upstream named
    localhost, though it is the same server: cookies follow RFC 6265 host rules, not sockets."""
    finhub.set_cookies = ["sid=login-1; Path=/"]
    sidecar = await make(
        upstream={"send_cookies": True, "url": finhub_url.replace("127.0.0.1", "localhost")}
    )
    assert (await get(http, sidecar))["cookie"] is None


async def test_fields_and_cookies_survive_a_restart(
    make: MakeSidecar, finhub: FinHub, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """With the file store, a restarted sidecar reuses the stored session without a login, and
    still fills X-Tenant-ID from the stored field and sends the stored cookie."""
    finhub.tenant_id = "7654321"
    overrides: dict[str, Any] = {
        "identity": {"login": {"headers": {"X-Tenant-ID": "7654321"}}},
        "session": {"store": "file", "path": str(tmp_path / "s.json")},
        "upstream": {"send_cookies": True},
    }
    finhub.set_cookies = ["sid=kept; Path=/"]
    first = await make(**overrides)
    await first.stop()
    finhub.set_cookies = []
    second = await make(**overrides)
    assert len(finhub.auth_calls("login")) == 1
    body = await get(http, second)
    assert body["cookie"] == "sid=kept"
    assert finhub.calls[-1].headers["X-Tenant-ID"] == "7654321"
    stored = (tmp_path / "s.json").read_text()
    assert '"fields"' in stored
    assert '"cookies"' in stored


async def test_a_refresh_error_outside_rejected_status_is_retried_not_a_new_login(
    make: MakeSidecar, finhub: FinHub, clock: FakeClock
) -> None:
    """With rejected_status [401], a 400 on refresh does not throw the session away: it is
    counted (reason invalid_request) and the refresh is retried with backoff, same token."""
    sidecar = await make(identity={"refresh": {"rejected_status": [401]}})
    finhub.failures = ["400"]
    await advance(clock, 560)
    await eventually(lambda: len(finhub.auth_calls("token/refresh")) == 1, what="failed refresh")
    for _ in range(20):
        await advance(clock, 0.5)
        if len(finhub.auth_calls("token/refresh")) == 2:
            break
    await eventually(lambda: sidecar.session.summary().get("refresh_count") == 1, what="retry")
    calls = finhub.auth_calls("token/refresh")
    assert calls[0].json["refreshToken"] == calls[1].json["refreshToken"]
    assert len(finhub.auth_calls("login")) == 1
    failed = 'sidecar_token_refreshes_total{reason="invalid_request",result="failure"}'
    assert sample(sidecar.metrics.render().decode(), failed) == 1.0


def test_status_line_counts_cookies() -> None:
    """`sidecar status` mentions the session's cookies by count only."""
    from sidecar.cli import status_line

    line = status_line({"state": "VALID", "expires_in": 60, "cookies": 2, "store": "file"})
    assert "cookies: 2" in line


async def test_a_credential_with_a_line_break_is_refused_in_a_header(
    make: MakeSidecar, finhub: FinHub, tmp_path: Path
) -> None:
    """A secret file rendered into a header must not inject a header line: the login fails with
    a clear reason and the API never sees the call."""
    (tmp_path / "key").write_text("line-one\nX-Evil: 1")
    sidecar = await make(
        wait=False,
        identity={
            "credentials": {"api_key_file": str(tmp_path / "key")},
            "login": {"headers": {"X-Api-Key": "{{ credentials.api_key }}"}},
        },
    )
    failures = 'sidecar_login_failures_total{reason="bad_header_value"}'
    await eventually(lambda: (sample(sidecar.metrics.render().decode(), failures) or 0) >= 1)
    assert finhub.auth_calls("login") == []


async def test_validate_checks_json_login_tokens_against_the_jwks(
    make: MakeSidecar, finhub: FinHub, finhub_url: str, http: aiohttp.ClientSession
) -> None:
    """identity.validate under json_login: session tokens are ES256 JWTs checked against
    identity.jwks_url (signature, iss, aud, exp) before use; a refresh answered with a token for
    another audience is refused (counted by reason), never sent upstream, and the valid token
    stays in use."""
    finhub.signing_key = ec.generate_private_key(ec.SECP256R1())
    validate = {"enabled": True, "issuer": finhub.issuer, "audience": finhub.audience}
    sidecar = await make(identity={"jwks_url": f"{finhub_url}/jwks", "validate": validate})
    await get(http, sidecar)
    assert [c.path for c in finhub.calls].count("/jwks") == 1
    good = sidecar.session.current
    assert good is not None
    finhub.claim_overrides = {"aud": "someone-else"}
    async with http.post(admin_url(sidecar, "/session/refresh")) as resp:
        assert resp.status == 503
    assert len(finhub.auth_calls("token/refresh")) == 1
    assert sidecar.session.current is good
    await get(http, sidecar)
    sent = {c.headers["Authorization"] for c in finhub.calls if c.path == f"{PREFIX}/accounts"}
    assert sent == {good.authorization}
    refused = 'sidecar_token_validation_failures_total{reason="invalid_token_audience"}'
    assert sample(sidecar.metrics.render().decode(), refused) == 1.0


def test_validate_under_json_login_needs_a_jwks_url_issuer_and_audience(tmp_path: Path) -> None:
    """json_login has no discovery: validate.enabled needs identity.jwks_url, validate.issuer
    and validate.audience, each named when missing."""
    finhub = FinHub()
    data = finhub_config("https://api.finhub.example", finhub, tmp_path)
    data["identity"]["validate"] = {"enabled": True}
    with pytest.raises(ValidationError) as exc:
        Config.model_validate(data)
    text = str(exc.value)
    assert "jwks_url: required when validate is enabled" in text
    assert "validate.issuer: required when validate is enabled" in text
    assert "validate.audience: required when validate is enabled" in text
