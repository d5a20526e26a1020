"""Values that reach headers are checked on every path they enter by: a session store holding a
token, a session field or a cookie with a line break (or any byte a header may not hold) is
refused and replaced by a fresh login, never injected into a request; so is an identity answer
or a configured header value that holds one."""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sidecar.app import Sidecar
from sidecar.config.json_login import JsonResponse
from sidecar.config.load import load_config
from sidecar.cookies import Cookie, parse_set_cookie
from sidecar.errors import ConfigError, IdentityUnavailable, StoreUnreadable
from sidecar.field_values import header_value_problem
from sidecar.identity.json_mapping import parse_session
from sidecar.session.manager import State
from sidecar.store import SessionRecord
from sidecar.store.file import FileStore
from sidecar.store.redis import RedisStore
from sidecar.tokens import Token, parse_token_response
from tests.conftest import MakeSidecar, base_config, proxy_url
from tests.fakes.finhub import PREFIX, FinHub
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import events, eventually
from tests.redis_server import RedisServer
from tests.test_finhub import finhub_env, load_finhub

INJECTED = "abc\r\nX-Evil: 1"


def poisoned(record: SessionRecord, **token_changes: Any) -> SessionRecord:
    """``record`` with its token changed as given: still valid for a minute, newer than any
    record written so far (so a watcher would adopt it, were it usable)."""
    now = time.time()
    changes = {"obtained_at": now + 1, "expires_at": now + 600, **token_changes}
    token = dataclasses.replace(record.token, **changes)
    return dataclasses.replace(record, token=token)


def assert_not_injected(seen: list[tuple[str, str]], *, log: io.StringIO) -> None:
    """No header line the stored values would have made, in the request or in the log."""
    for name, value in seen:
        assert name.lower() != "x-evil", seen
        assert "X-Evil" not in value, seen
        assert "\r" not in value, seen
        assert "\n" not in value, seen
    assert "X-Evil" not in log.getvalue()


def refused_in_log(log: io.StringIO) -> list[dict[str, object]]:
    return [e for e in events(log) if e["event"] == "session.store_unreadable"]


async def request_through(
    sidecar: Sidecar, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 200, await resp.text()
    assert upstream.seen[-1].token_valid


# ----------------------------------------------------------------- the store at start


@pytest.mark.parametrize(
    "changes",
    [
        {"access_token": INJECTED},
        {"access_token": "abc def"},
        {"access_token": "abc\x00"},
        {"token_type": "Bearer\r\nX-Evil: 1"},
        {"fields": {"tenant_id": "1\r\nX-Evil: 1"}},
        {"refresh_token": "rt\nX-Evil: 1"},
        {"cookies": (Cookie("sid", "v\r\nX-Evil: 1", "127.0.0.1", "/"),)},
    ],
    ids=["token-crlf", "token-space", "token-nul", "token-type", "field", "refresh", "cookie"],
)
async def test_a_poisoned_file_record_is_refused_and_a_fresh_token_used(
    make_sidecar: MakeSidecar,
    idp: FakeIdP,
    upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    log_output: io.StringIO,
    changes: dict[str, Any],
) -> None:
    """A file record of this very identity, valid for ten more minutes but holding a value no
    header may carry, is not restored: the refusal is logged (naming the field, not the value),
    the sidecar logs in afresh, and the upstream sees the new token and no injected line."""
    path = tmp_path / "s" / "session.json"
    session = {"store": "file", "path": str(path)}
    first = await make_sidecar(session=session)
    await eventually(lambda: path.exists(), what="login saved")
    good = first.session.record
    assert good is not None
    await first.stop()
    await FileStore(path).save(poisoned(good, **changes))

    second = await make_sidecar(session=session)
    await eventually(lambda: second.session.state() is State.VALID, what="fresh login")
    assert idp.grants() == ["client_credentials", "client_credentials"]
    await request_through(second, http, upstream)
    assert upstream.seen[-1].headers["Authorization"] != f"Bearer {INJECTED}"
    assert_not_injected(upstream.seen[-1].header_list, log=log_output)
    await eventually(lambda: bool(refused_in_log(log_output)), what="the refusal logged")
    assert "session record is malformed" in str(refused_in_log(log_output)[0]["error"])


async def test_a_poisoned_redis_record_is_refused_and_a_fresh_token_used(
    make_sidecar: MakeSidecar,
    idp: FakeIdP,
    upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    log_output: io.StringIO,
) -> None:
    """The same with the Redis store: the record a replica finds at start holds a token with a
    line break (and a session field with one); it is refused, and a fresh login is used."""
    session = {"store": "redis", "redis_url": redis_server.url}
    first = await make_sidecar(session=session)
    await eventually(lambda: first.session.record is not None, what="login")
    good = first.session.record
    assert good is not None
    fingerprint = first.session.identity.fingerprint
    await first.stop()
    store = RedisStore(redis_server.url, fingerprint)
    try:
        await store.save(poisoned(good, access_token=INJECTED, fields={"t": "1\r\nX-Evil: 2"}))
    finally:
        await store.aclose()

    second = await make_sidecar(session=session)
    await eventually(lambda: second.session.state() is State.VALID, what="fresh login")
    assert idp.grants() == ["client_credentials", "client_credentials"]
    await request_through(second, http, upstream)
    assert_not_injected(upstream.seen[-1].header_list, log=log_output)
    await eventually(lambda: bool(refused_in_log(log_output)), what="the refusal logged")


async def test_the_watcher_never_adopts_a_poisoned_peer_record(
    make_sidecar: MakeSidecar,
    upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    log_output: io.StringIO,
) -> None:
    """A "peer" writes a newer record with a line break in its token to the shared store while
    the sidecar runs: the watcher reads it, logs it as unreadable and keeps its own session."""
    session = {"store": "redis", "redis_url": redis_server.url, "poll_interval": 0.1}
    sidecar = await make_sidecar(session=session)
    await eventually(lambda: sidecar.session.state() is State.VALID, what="login")
    good = sidecar.session.record
    assert good is not None
    store = RedisStore(redis_server.url, sidecar.session.identity.fingerprint)
    try:
        await store.save(poisoned(good, access_token=INJECTED))
    finally:
        await store.aclose()
    await eventually(lambda: bool(refused_in_log(log_output)), what="the peer record read")
    assert sidecar.session.record is good
    await request_through(sidecar, http, upstream)
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {good.token.access_token}"
    assert_not_injected(upstream.seen[-1].header_list, log=log_output)


async def test_a_poisoned_session_field_never_reaches_a_header_template(
    finhub: FinHub,
    finhub_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    log_output: io.StringIO,
) -> None:
    """json_login with ``X-Tenant-ID: {{ session.tenant_id }}``: a stored session whose
    tenant_id field holds a line break is refused at start; the fresh login's tenant is sent."""
    env = finhub_env(finhub, finhub_url, tmp_path / "secrets")
    first = Sidecar(load_finhub(env), clock=finhub.clock)
    await first.start()
    try:
        await eventually(lambda: first.session.record is not None, what="login")
        good = first.session.record
        assert good is not None
    finally:
        first.session.store = FileStore(tmp_path / "elsewhere.json")  # no logout clears ours
        await first.stop()
    fields = {**good.token.fields, "tenant_id": f"{finhub.tenant_id}\r\nX-Evil: 1"}
    await FileStore(Path(env["SIDECAR_SESSION_PATH"])).save(
        poisoned(good, fields=fields, obtained_at=finhub.clock.time())
    )
    logins = sum(1 for c in finhub.calls if c.path.endswith("/auth/login"))

    second = Sidecar(load_finhub(env), clock=finhub.clock)
    await second.start()
    try:
        await eventually(lambda: second.session.state() is State.VALID, what="fresh login")
        async with http.get(proxy_url(second, f"{PREFIX}/accounts")) as resp:
            assert resp.status == 200, await resp.text()
        assert sum(1 for c in finhub.calls if c.path.endswith("/auth/login")) == logins + 1
        last = finhub.calls[-1]
        assert last.headers["X-Tenant-ID"] == finhub.tenant_id
        assert_not_injected(list(last.headers.items()), log=log_output)
    finally:
        await second.stop()


# ----------------------------------------------------------------- the one check, each path


def test_the_check_follows_rfc_9110_and_rfc_6750() -> None:
    """Field values: visible ASCII, space, tab. Bearer tokens: the b64token characters."""
    assert header_value_problem("a b\tc~!") is None
    for bad in ("a\rb", "a\nb", "a\x00", "a\x7f", "caf\u00e9", "\x1b[31m"):
        assert header_value_problem(bad) is not None, bad
    assert header_value_problem("eyJ.a-b_c~d+e/f==", bearer=True) is None
    for bad in ("a b", "a\r\nb", "a=b", "", "a!b", "a,b"):
        assert header_value_problem(bad, bearer=True) is not None, bad
    problem = header_value_problem(INJECTED, bearer=True)
    assert problem is not None
    assert "X-Evil" not in problem


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("access_token", INJECTED, "access_token"),
        ("fields", {"tenant_id": INJECTED}, "fields.tenant_id"),
        ("fields", {INJECTED: "1"}, "fields: a name"),
        ("cookies", [Cookie("sid", INJECTED, "h", "/").to_dict()], "cookie sid"),
        ("cookies", [Cookie(INJECTED, "v", "h", "/").to_dict()], "cookie name"),
    ],
)
def test_a_stored_record_with_a_bad_value_is_unreadable_without_quoting_it(
    key: str, value: object, named: str
) -> None:
    """The store's one reader refuses the record; the message names the field only."""
    token = Token(access_token="good", expires_at=2.0, obtained_at=1.0)
    data = SessionRecord("i", "s", "a", token, 1.0).to_dict()
    data["token"][key] = value
    with pytest.raises(StoreUnreadable, match=named) as caught:
        SessionRecord.from_dict(data)
    assert "X-Evil" not in str(caught.value)


@pytest.mark.parametrize("access", [INJECTED, "a b", "tok\u00e9n", "a;b"])
def test_an_identity_answer_with_a_bad_token_is_malformed(access: str) -> None:
    """oauth2 (and the demo): a token that is not a b64token is a malformed answer."""
    with pytest.raises(IdentityUnavailable, match="access_token") as caught:
        parse_token_response({"access_token": access, "expires_in": 60}, 1000.0)
    assert caught.value.reason == "malformed_response"
    assert access not in str(caught.value)


def test_a_json_login_answer_with_a_bad_field_or_token_is_malformed() -> None:
    """json_login: the access token must be a b64token, each field and the refresh token a
    field value; a field with a DEL or a non-ASCII letter is refused like a line break."""
    response = JsonResponse(
        access_token="userSessionToken",
        refresh_token="refreshToken",
        fields={"tenant_id": "tenantId", "customer_id": "customerId"},
    )
    base = {"userSessionToken": "a.b.c", "refreshToken": "r", "tenantId": "1", "customerId": "c"}
    for key, value in [
        ("userSessionToken", "a\tb"),
        ("tenantId", "1\x7f"),
        ("tenantId", "caf\u00e9"),
        ("refreshToken", "r\r\nX: 1"),
    ]:
        with pytest.raises(IdentityUnavailable) as caught:
            parse_session(
                {**base, key: value}, response, 1000.0, previous=None, cookies=(), call="login"
            )
        assert value not in str(caught.value)


def test_a_set_cookie_that_cannot_go_into_a_header_is_ignored() -> None:
    """A cookie from the identity provider whose value holds a non-ASCII byte or a control
    character is ignored (RFC 6265 5.2 lets a user agent ignore a cookie entirely)."""
    assert parse_set_cookie("sid=ok", "h", "/", 0.0) is not None
    for header in ("sid=caf\u00e9", "sid=a\x7fb", "s\u00efd=v"):
        assert parse_set_cookie(header, "h", "/", 0.0) is None, header


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"tenant_id": "1\r\nX-Evil: 1"}, "headers.tenant_id"),
        ({"correlation_id": "a\nX-Evil: 1"}, "headers.correlation_id"),
        ({"static": {"X-Team": "caf\u00e9"}}, "headers.static"),
        ({"static": {"X-Team": "a\x1bb"}}, "headers.static"),
    ],
)
def test_a_configured_header_value_that_cannot_go_into_a_header_is_a_config_error(
    headers: dict[str, Any], key: str, idp: FakeIdP, tmp_path: Path
) -> None:
    """headers.*: refused when the configuration is loaded, naming the key, never the value."""
    config = base_config("http://127.0.0.1:1", "http://127.0.0.1:2", idp)
    config["headers"] = headers
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ConfigError, match="visible ASCII") as caught:
        load_config(path, env={})
    assert f"{key}" in str(caught.value)
    assert "X-Evil" not in str(caught.value)
