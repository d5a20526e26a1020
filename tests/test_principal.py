"""A stored or shared session belongs to one principal at one provider.

It is reused only by a sidecar that would log in as the same principal (every non-secret value
naming it, through a keyed hash), and kept when only a secret rotates.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import redis.asyncio as aioredis

from sidecar.app import Sidecar
from sidecar.config.json_login import JsonLoginSection
from sidecar.config.models import Config
from sidecar.config.oauth2 import OAuth2Section
from sidecar.identity.principal import is_secret_name, json_login_principal, oauth2_principal
from tests.conftest import merge, proxy_url
from tests.fakes.clock import FakeClock
from tests.fakes.finhub import PREFIX, FinHub
from tests.helpers import eventually
from tests.redis_server import RedisServer
from tests.test_json_login import finhub_config

MakeSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
def clock(finhub: FinHub) -> FakeClock:
    """The fake clock the FinHub fake runs on, shared with the sidecars."""
    assert isinstance(finhub.clock, FakeClock)
    return finhub.clock


@pytest.fixture
async def make(
    finhub: FinHub, finhub_url: str, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[MakeSidecar]:
    """Start sidecars with the FinHub config plus ``overrides``, logged in as ``username``
    (its password in a file of its own)."""
    started: list[Sidecar] = []

    async def _make(username: str, password: str, **overrides: Any) -> Sidecar:
        secrets = tmp_path / username
        secrets.mkdir(exist_ok=True)
        data = finhub_config(finhub_url, finhub, secrets)
        (secrets / "password").write_text(password)
        data["identity"]["credentials"]["username"] = username
        config = Config.model_validate(merge(data, overrides))
        sidecar = Sidecar(config, clock=clock, drain_timeout=1.0)
        await sidecar.start()
        started.append(sidecar)
        await eventually(lambda: sidecar.session.usable() is not None, what=f"{username} in")
        return sidecar

    yield _make
    for sidecar in reversed(started):
        await sidecar.stop()


async def whose(http: aiohttp.ClientSession, sidecar: Sidecar, finhub: FinHub) -> str:
    """Call the API through ``sidecar``; the user whose session token the API received."""
    async with http.get(proxy_url(sidecar, f"{PREFIX}/accounts")) as resp:
        assert resp.status == 200, await resp.text()
    return FinHub.subject(finhub.calls[-1].headers["Authorization"])


async def test_another_username_does_not_restore_the_stored_session(
    make: MakeSidecar,
    finhub: FinHub,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    log_output: io.StringIO,
) -> None:
    """File store: a sidecar restarted with username bob instead of alice logs in as bob (the API
    gets bob's token), never restoring alice's session; neither name is in the file or the
    logs."""
    finhub.other_users = {"alice": "alice-password-1", "bob": "bob-password-2"}
    store = {"session": {"store": "file", "path": str(tmp_path / "session.json")}}
    alice = await make("alice", "alice-password-1", **store)
    assert await whose(http, alice, finhub) == "alice"
    await alice.stop()
    bob = await make("bob", "bob-password-2", **store)
    assert len(finhub.auth_calls("login")) == 2
    assert await whose(http, bob, finhub) == "bob"
    stored = (tmp_path / "session.json").read_text()
    assert "alice" not in stored
    assert "bob" not in stored
    assert "alice" not in log_output.getvalue()
    assert "bob" not in log_output.getvalue()


async def test_a_rotated_password_keeps_the_stored_session(
    make: MakeSidecar, finhub: FinHub, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """File store: the same user restarted with a rotated password file reuses its session
    (no second login): a secret is not part of whose session it is."""
    finhub.other_users = {"alice": "alice-password-1"}
    store = {"session": {"store": "file", "path": str(tmp_path / "session.json")}}
    first = await make("alice", "alice-password-1", **store)
    await first.stop()
    finhub.other_users = {"alice": "alice-password-rotated"}
    second = await make("alice", "alice-password-rotated", **store)
    assert len(finhub.auth_calls("login")) == 1
    assert await whose(http, second, finhub) == "alice"


async def test_two_users_of_one_vendor_url_on_one_redis_get_two_sessions(
    make: MakeSidecar,
    finhub: FinHub,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    log_output: io.StringIO,
) -> None:
    """Redis store: sidecars of alice and bob at the same login URL each log in and each call
    goes out with its own user's token; the Redis keys name neither user."""
    finhub.other_users = {"alice": "alice-password-1", "bob": "bob-password-2"}
    shared = {"session": {"store": "redis", "redis_url": redis_server.url, "poll_interval": 0.2}}
    alice = await make("alice", "alice-password-1", **shared)
    bob = await make("bob", "bob-password-2", **shared)
    assert len(finhub.auth_calls("login")) == 2
    assert await whose(http, alice, finhub) == "alice"
    assert await whose(http, bob, finhub) == "bob"
    assert alice.session.summary()["session_id"] != bob.session.summary()["session_id"]
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        keys = [key.decode() async for key in raw.scan_iter("sidecar:*")]
    finally:
        await raw.aclose()
    assert len({key.split(":")[1] for key in keys}) == 2
    assert not [key for key in keys if "alice" in key or "bob" in key]
    assert "alice" not in log_output.getvalue()


def _oauth2(**identity: Any) -> OAuth2Section:
    base = {"kind": "oauth2", "token_url": "https://idp.example.com/token", "client_id": "svc"}
    return OAuth2Section.model_validate({**base, "client_secret": "s-1", **identity})


def _jwt(sub: str, jti: str) -> str:
    return jwt.encode({"sub": sub, "jti": jti}, "k" * 32, algorithm="HS256")


def test_oauth2_principal_is_every_naming_value_and_no_secret(tmp_path: Path) -> None:
    """oauth2: client id, username, scope, audience, resource, grant and the token-exchange
    subject's ``sub`` each make another principal; a rotated client secret or password, or a
    re-issued subject token of the same ``sub``, does not. The id shows none of the values."""
    base = _oauth2()
    assert oauth2_principal(base) == oauth2_principal(_oauth2(client_secret="s-2"))
    for change in (
        {"client_id": "other"},
        {"scope": "write"},
        {"audience": "api-2"},
        {"resource": "https://api-2.example.com"},
        {"token_url": "https://idp-2.example.com/token"},
    ):
        assert oauth2_principal(_oauth2(**change)) != oauth2_principal(base), change
    alice = _oauth2(grant="password", username="alice", password="p-1")
    rotated = _oauth2(grant="password", username="alice", password="p-2")
    assert oauth2_principal(alice) == oauth2_principal(rotated)
    assert oauth2_principal(alice) != oauth2_principal(
        _oauth2(grant="password", username="bob", password="p-1")
    )
    subject = tmp_path / "subject-token"
    exchange = _oauth2(grant="token_exchange", subject_token_file=str(subject))
    subject.write_text(_jwt("system:serviceaccount:ns:alice", "1"))
    first = oauth2_principal(exchange)
    subject.write_text(_jwt("system:serviceaccount:ns:alice", "2"))  # the kubelet re-issued it
    assert oauth2_principal(exchange) == first
    subject.write_text(_jwt("system:serviceaccount:ns:bob", "3"))
    assert oauth2_principal(exchange) != first
    assert "alice" not in first
    assert len(first) == 32


def test_json_login_principal_hashes_names_but_not_secrets(tmp_path: Path) -> None:
    """json_login: username and customer id (literal or from a file) and the login call's written
    tenant make another principal; password and customer secret do not."""
    user_file = tmp_path / "username"
    user_file.write_text("alice\n")

    def ident(tenant: str = "1", **credentials: str) -> JsonLoginSection:
        creds = {
            "username_file": str(user_file),
            "password": "p-1",
            "customer_id": "c-1",
            "customer_secret": "cs-1",
            **credentials,
        }
        login = {"url": "https://api.example.com/login", "headers": {"X-Tenant-ID": tenant}}
        return JsonLoginSection.model_validate(
            {"kind": "json_login", "credentials": creds, "login": login}
        )

    base = json_login_principal(ident())
    assert json_login_principal(ident(password="p-2", customer_secret="cs-2")) == base
    assert json_login_principal(ident(customer_id="c-2")) != base
    assert json_login_principal(ident(tenant="2")) != base
    user_file.write_text("bob\n")
    assert json_login_principal(ident()) != base
    naming = ("username", "customer_id", "account", "key_id", "access_key_id", "client_id")
    assert [n for n in naming if is_secret_name(n)] == []
    assert all(is_secret_name(n) for n in ("password", "customer_secret", "api_key", "pin"))
