"""Identity-provider error text is bounded and scrubbed of every credential value before it
reaches a caller's 503 body, /session, `sidecar status` or a log line: a provider that repeats
the credentials it was sent (client secret, password, refresh token, customer secret) in its
error answer leaks none of them."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar import cli
from sidecar.app import Sidecar
from sidecar.identity.provider_text import MAX_PROVIDER_TEXT, SecretValues
from sidecar.session.manager import State
from tests.conftest import MakeSidecar, admin_url, proxy_url
from tests.fakes.finhub import PREFIX, FinHub
from tests.fakes.idp import FakeIdP
from tests.helpers import eventually
from tests.test_finhub import finhub_env, load_finhub


async def everything_said(
    sidecar: Sidecar, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> dict[str, str]:
    """What callers and operators are shown while the provider refuses: the proxy's 503, a
    forced refresh's 503, /session and `sidecar status`."""
    said = {}
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 503
        said["503"] = await resp.text()
    async with http.post(admin_url(sidecar, "/session/refresh")) as resp:
        assert resp.status == 503
        said["refresh"] = await resp.text()
    async with http.get(admin_url(sidecar, "/session")) as resp:
        said["session"] = await resp.text()
    capsys.readouterr()
    await asyncio.to_thread(cli.main, ["status", "--admin", admin_url(sidecar)])
    said["status"] = capsys.readouterr().out
    return said


def assert_leaks_none(secrets: list[str], said: dict[str, str], log: io.StringIO) -> None:
    said = {**said, "log": log.getvalue()}
    for secret in secrets:
        for where, text in said.items():
            assert secret not in text, (where, text)
    last_error = json.loads(said["session"])["last_error"]
    assert "[redacted]" in last_error, last_error  # the provider's text is shown, scrubbed
    assert len(last_error) < MAX_PROVIDER_TEXT + 200, last_error


@pytest.mark.parametrize(
    "identity",
    [
        {},
        {"client_auth": "client_secret_post"},
        {"grant": "password", "username": "svc-user", "password": "user-password-9876543210"},
    ],
    ids=["client_secret_basic", "client_secret_post", "password"],
)
async def test_an_oauth2_provider_echoing_credentials_leaks_none(
    make_sidecar: MakeSidecar,
    idp: FakeIdP,
    http: aiohttp.ClientSession,
    log_output: io.StringIO,
    capsys: pytest.CaptureFixture[str],
    identity: dict[str, Any],
) -> None:
    """invalid_client answers that repeat the client secret and the password (raw, form-encoded,
    in the Basic header): the error is shown with those values replaced, and bounded."""
    idp.down = "echo"
    sidecar = await make_sidecar(identity=identity, refresh={"retry": {"initial": 30, "max": 60}})
    await eventually(lambda: sidecar.session.summary()["last_error"] is not None, what="refusal")
    said = await everything_said(sidecar, http, capsys)
    assert_leaks_none([idp.client_secret, idp.password], said, log_output)


async def test_a_refresh_refusal_echoing_the_refresh_token_leaks_it_nowhere(
    make_sidecar: MakeSidecar,
    idp: FakeIdP,
    http: aiohttp.ClientSession,
    log_output: io.StringIO,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A refresh answered with an echo of the refresh token and the client credentials: the
    refresh token appears in no answer and no log line."""
    sidecar = await make_sidecar(refresh={"retry": {"initial": 30, "max": 60}})
    await eventually(lambda: sidecar.session.state() is State.VALID, what="login")
    record = sidecar.session.record
    assert record is not None
    assert record.token.refresh_token is not None
    idp.down = "echo"
    async with http.post(admin_url(sidecar, "/session/refresh")) as resp:
        assert resp.status == 503
        body = await resp.text()
    async with http.get(admin_url(sidecar, "/session")) as resp:
        session = await resp.text()
    for secret in (record.token.refresh_token, idp.client_secret):
        for text in (body, session, log_output.getvalue()):
            assert secret not in text, text


async def test_a_json_login_provider_echoing_credentials_leaks_none(
    finhub: FinHub,
    finhub_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    log_output: io.StringIO,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """FinHub-shaped login refused with a body repeating the password and the customer secret:
    neither reaches a caller, /session, `sidecar status` or the log."""
    finhub.echo_credentials = True
    env = finhub_env(finhub, finhub_url, tmp_path / "secrets", SIDECAR_REFRESH_RETRY_INITIAL="30")
    sidecar = Sidecar(load_finhub(env), clock=finhub.clock)
    await sidecar.start()
    try:
        await eventually(lambda: sidecar.session.summary()["last_error"] is not None)
        said = await everything_said(sidecar, http, capsys)
        assert any(c.path == f"{PREFIX}/auth/login" for c in finhub.calls)
        assert_leaks_none([finhub.password, finhub.customer_secret], said, log_output)
    finally:
        await sidecar.stop()


def test_scrubbing_covers_encoded_forms_and_bounds_the_text() -> None:
    """A noted value is replaced raw, form-encoded, percent-encoded (either case) and
    JSON-escaped; the latest value of a key replaces the one before (a rotated secret); the
    result is one line of at most MAX_PROVIDER_TEXT characters."""
    values = SecretValues()
    values.note("client_secret", "old secret")
    values.note("client_secret", 's3cr3t/+&"x y')
    values.note("password", "pw")
    text = (
        's3cr3t/+&"x y | s3cr3t%2F%2B%26%22x+y | s3cr3t%2f%2b%26%22x%20y | s3cr3t/+&\\"x y'
        " | pw | old secret\r\nX-Evil: 1" + "z" * 500
    )
    clean = values.provider_text(text)
    assert "s3cr3t" not in clean
    assert "pw" not in clean
    assert "old secret" in clean  # no longer configured: no longer a secret
    assert "\r" not in clean
    assert "\n" not in clean
    assert len(clean) <= MAX_PROVIDER_TEXT
