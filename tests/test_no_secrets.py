"""Tokens, refresh tokens and secrets never appear in logs, /session, /metrics, errors or
check-config output."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import aiohttp
import pytest
import yaml

from sidecar.app import Sidecar
from sidecar.cli import main
from sidecar.config.models import Config
from sidecar.logs import JsonFormatter, scrub
from tests.conftest import MakeSidecar, Serve, admin_url, merge, proxy_url
from tests.fakes.finhub import PREFIX, FinHub
from tests.fakes.idp import FakeIdP
from tests.helpers import eventually
from tests.test_json_login import finhub_config


async def admin_texts(
    http: aiohttp.ClientSession, sidecar: Sidecar, *get: str, post: tuple[str, ...] = ()
) -> list[str]:
    """The bodies of GETs then POSTs to admin paths, for scanning."""
    texts = []
    for method, paths in (("GET", get), ("POST", post)):
        for path in paths:
            async with http.request(method, admin_url(sidecar, path)) as r:
                texts.append(await r.text())
    return texts


def secrets_of(idp: FakeIdP) -> list[str]:
    return [*idp.issued, *idp.refresh_tokens, idp.client_secret, idp.password]


async def test_a_full_session_lifecycle_leaks_nothing(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP, log_output: io.StringIO
) -> None:
    """Login, refresh, reactive refresh, failures, 503s, logout: no secret in any output."""
    idp.lifetime = 1.2
    sidecar = await make_sidecar(
        refresh={"lead_time": 0.3},
        identity={"grant": "password", "username": idp.username, "password": idp.password},
    )
    await eventually(lambda: sidecar.session.usable() is not None)
    outputs: list[str] = []
    async with http.get(proxy_url(sidecar, "/x"), headers={"Authorization": "Bearer callers"}) as r:
        assert r.status == 200  # its body is the test upstream's echo of the token: not ours
    await eventually(lambda: len(idp.token_calls) >= 2, what="a refresh")
    idp.revoke_all()
    async with http.get(proxy_url(sidecar, "/x")) as r:
        assert r.status == 200
    idp.failures = ["invalid_grant", "malformed", "503"]
    idp.down = "invalid_client"
    await eventually(lambda: sidecar.session.usable() is None, within=5, what="expiry")
    async with http.get(proxy_url(sidecar, "/x")) as r:
        assert r.status == 503
        outputs.append(await r.text())
    outputs += await admin_texts(http, sidecar, "/session", "/metrics", "/readyz")
    idp.down = None
    outputs += await admin_texts(http, sidecar, post=("/session/refresh", "/session/logout"))
    logged = log_output.getvalue()
    assert "session.created" in logged
    assert "session.refreshed" in logged
    assert "session.refresh_failed" in logged or "session.login_failed" in logged
    assert "session.expired" in logged
    assert "session.terminated" in logged
    assert "http.access" in logged
    everything = logged + "\n".join(outputs)
    for secret in secrets_of(idp):
        assert secret not in everything
    assert "callers" not in logged


def test_check_config_redacts_secrets(
    tmp_path: object, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """check-config prints the effective config with secret values masked, including secrets
    that came from the environment and secret-looking static headers."""
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    monkeypatch.setenv("MY_SECRET", "env-secret-value-123")
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "upstream": {"url": "https://api.example.com"},
                "identity": {
                    "kind": "oauth2",
                    "token_url": "https://idp.example.com/token",
                    "client_id": "svc",
                    "client_secret": "${MY_SECRET}",
                    "grant": "password",
                    "username": "u",
                    "password": "literal-password-456",
                },
                "headers": {"static": {"X-Api-Key": "static-key-789", "X-Plain": "visible"}},
            }
        )
    )
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    for secret in ("env-secret-value-123", "literal-password-456", "static-key-789"):
        assert secret not in out
    assert "visible" in out
    assert "**********" in out


def test_scrubber_catches_bearer_jwt_and_secret_pairs() -> None:
    """The formatter's second line of defence masks credential-shaped text wherever it appears."""
    jwt_like = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    text = scrub(
        f"Authorization: Bearer abc.def-ghi and {jwt_like} client_secret=hunter2&x=1 "
        '{"refresh_token": "rt-123"}'
    )
    for secret in ("abc.def-ghi", jwt_like, "hunter2", "rt-123"):
        assert secret not in text
    record = logging.LogRecord("t", logging.INFO, "", 0, "event %s", (jwt_like,), None)
    record.detail = "password=pw-000"
    rendered = JsonFormatter().format(record)
    assert jwt_like not in rendered
    assert "pw-000" not in rendered


def test_token_repr_is_redacted() -> None:
    """A Token in a log message or traceback shows a fingerprint only."""
    from sidecar.tokens import Token

    token = Token(
        access_token="at-secret-1", refresh_token="rt-secret-2", expires_at=2.0, obtained_at=1.0
    )
    for text in (repr(token), str(token), f"{token}", repr([token])):
        assert "at-secret-1" not in text
        assert "rt-secret-2" not in text


async def test_a_json_login_session_leaks_nothing(
    serve: Serve, http: aiohttp.ClientSession, log_output: io.StringIO, tmp_path: Path
) -> None:
    """json_login: login, refresh, a rejected refresh, a failing call, logout, with cookies and
    session fields: no credential, token, refresh token or cookie value in any output."""
    finhub = FinHub(lifetime=1.5, set_cookies=["sid=cookie-secret-4242; Path=/"])
    url = await serve(finhub.app())
    data = merge(
        finhub_config(url, finhub, tmp_path),
        {"refresh": {"lead_time": 0.5}, "upstream": {"send_cookies": True}},
    )
    sidecar = Sidecar(Config.model_validate(data), drain_timeout=1.0)
    await sidecar.start()
    try:
        await eventually(lambda: sidecar.session.usable() is not None)
        outputs: list[str] = []
        async with http.get(proxy_url(sidecar, f"{PREFIX}/x")) as r:
            assert r.status == 200
        await eventually(lambda: len(finhub.auth_calls("token/refresh")) >= 1, what="refresh")
        finhub.refresh_tokens.clear()
        await eventually(lambda: len(finhub.auth_calls("login")) >= 2, what="fallback login")
        finhub.down = "503"
        await eventually(lambda: sidecar.session.usable() is None, within=5, what="expiry")
        outputs += await admin_texts(http, sidecar, "/session", "/metrics")
        finhub.down = None
        outputs += await admin_texts(http, sidecar, post=("/session/refresh", "/session/logout"))
    finally:
        await sidecar.stop()
    logged = log_output.getvalue()
    assert "session.refresh_rejected" in logged
    everything = logged + "\n".join(outputs)
    secrets = [finhub.password, finhub.customer_secret, "cookie-secret-4242"]
    secrets += [*finhub.issued, *finhub.refresh_tokens, *finhub.used_refresh_tokens]
    for secret in secrets:
        assert secret not in everything


def test_check_config_redacts_json_login_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config masks every credential value (paths of _file ones are shown) and
    secret-looking headers of the identity calls."""
    finhub = FinHub()
    data = finhub_config("https://api.finhub.example", finhub, tmp_path)
    data["identity"]["login"]["headers"]["X-Api-Key"] = "login-api-key-555"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    for secret in (finhub.customer_secret, finhub.username, "login-api-key-555"):
        assert secret not in out
    assert str(tmp_path / "password") in out


async def test_oauth2_credential_files_and_assertions_leak_nowhere(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    serve: Serve,
    tmp_path: Path,
    log_output: io.StringIO,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Private key, signed client assertions, jwt_bearer assertions and subject tokens: in none
    of the logs, /session, /metrics, error bodies or check-config, also when the provider
    refuses them and when validation refuses the token."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.fakes.oidc import OIDCProvider

    oidc = OIDCProvider()
    oidc.issuer = await serve(oidc.app())
    key = ec.generate_private_key(ec.SECP256R1())
    oidc.client_public_key = key.public_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    (tmp_path / "key.pem").write_text(pem)
    (tmp_path / "subject").write_text("subject-token-secret-4711")
    (tmp_path / "assertion").write_text("assertion-secret-0815")
    oidc.subject_tokens = {"subject-token-secret-4711"}
    exchange = {
        "issuer": oidc.issuer,
        "token_url": None,
        "revocation_url": None,
        "client_secret": None,
        "grant": "token_exchange",
        "subject_token_file": str(tmp_path / "subject"),
        "client_auth": "private_key_jwt",
        "private_key_file": str(tmp_path / "key.pem"),
        "audience": "api://orders",
        "validate": {"enabled": True},
    }
    first = await make_sidecar(identity=exchange)
    await eventually(lambda: first.session.usable() is not None)
    oidc.claim_overrides = {"aud": "api://elsewhere"}  # validation refuses the next token
    outputs = []
    async with http.post(admin_url(first, "/session/refresh")) as r:
        outputs.append(await r.text())
    oidc.claim_overrides = {}
    oidc.subject_tokens = set()  # the provider refuses the subject token: invalid_grant
    async with http.post(admin_url(first, "/session/refresh")) as r:
        outputs.append(await r.text())
    bearer = {
        **exchange,
        "grant": "jwt_bearer",
        "assertion_file": str(tmp_path / "assertion"),
        "validate": {"enabled": False},
    }
    second = await make_sidecar(identity=bearer)  # the provider rejects this assertion
    await eventually(lambda: second.session.summary()["consecutive_failures"] >= 1)
    for sidecar in (first, second):
        for path in ("/session", "/metrics"):
            async with http.get(admin_url(sidecar, path)) as r:
                outputs.append(await r.text())
        async with http.get(proxy_url(sidecar, "/x")) as r:
            outputs.append(await r.text())
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "upstream": {"url": "https://api.example.com"},
                "identity": {"kind": "oauth2", "client_id": "svc", **bearer},
            }
        )
    )
    assert await asyncio.to_thread(main, ["check-config", "-c", str(config)]) == 0
    outputs.append(capsys.readouterr().out)
    everything = log_output.getvalue() + "\n".join(outputs)
    assert "identity.token_invalid" in everything
    sent = [c.form.get("client_assertion", "") for c in oidc.token_calls]
    key_lines = [line for line in pem.splitlines() if "-----" not in line]
    for secret in [
        *key_lines,
        *filter(None, sent),
        "subject-token-secret-4711",
        "assertion-secret-0815",
        *oidc.issued,
    ]:
        assert secret not in everything
