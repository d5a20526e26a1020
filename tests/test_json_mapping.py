"""Reading vendor answers: dotted paths, expiry sources, rotation, missing values."""

from __future__ import annotations

import base64
import json

import pytest

from sidecar.config.json_login import JsonResponse
from sidecar.errors import IdentityUnavailable
from sidecar.identity.json_mapping import lookup, parse_session
from sidecar.store import SessionRecord
from sidecar.tokens import DEFAULT_LIFETIME, Token
from tests.helpers import upstream_headers

NOW = 1_800_000_000.0


def jwt_with_exp(exp: float) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part({'exp': exp})}.sig"


def parse(body: object, previous: Token | None = None, **response: object) -> Token:
    return parse_session(
        body,
        JsonResponse.model_validate(response),
        NOW,
        previous=previous,
        cookies=(),
        call="login" if previous is None else "refresh",
    )


def test_nested_paths_and_list_indexes() -> None:
    """Dotted paths walk objects; numeric segments index lists; a missing step is missing."""
    body = {"data": {"sessions": [{"token": "t0"}, {"token": "t1"}]}}
    assert lookup(body, "data.sessions.1.token") == "t1"
    token = parse(
        {"data": {"s": {"tok": "at-1", "rt": "rt-1", "ttl": 90}, "tenant": {"id": 42}}},
        access_token="data.s.tok",
        refresh_token="data.s.rt",
        expires_in="data.s.ttl",
        fields={"tenant_id": "data.tenant.id"},
    )
    assert (token.access_token, token.refresh_token) == ("at-1", "rt-1")
    assert token.expires_at == NOW + 90
    assert token.fields == {"tenant_id": "42"}


def test_expiry_sources_expires_in_expires_at_jwt_exp_default() -> None:
    """expires_in (seconds) or expires_at (epoch seconds) when configured and present, else the
    JWT's exp, else the short default lifetime."""
    assert parse({"a": "t", "in": "120"}, access_token="a", expires_in="in").expires_at == NOW + 120
    at = parse({"a": "t", "at": NOW + 500}, access_token="a", expires_at="at")
    assert at.expires_at == NOW + 500
    jwt = jwt_with_exp(NOW + 700)
    assert parse({"a": jwt}, access_token="a", expires_in="in").expires_at == NOW + 700
    assert parse({"a": "opaque"}, access_token="a").expires_at == NOW + DEFAULT_LIFETIME
    with pytest.raises(IdentityUnavailable, match="already expired"):
        parse({"a": "t", "at": NOW - 1}, access_token="a", expires_at="at")
    with pytest.raises(IdentityUnavailable, match="expires_in is not a number"):
        parse({"a": "t", "in": "soon"}, access_token="a", expires_in="in")


def test_missing_access_token_or_field_names_key_and_reason() -> None:
    """The error names the configured key and path (never a value) and carries a metric reason."""
    with pytest.raises(IdentityUnavailable) as caught:
        parse({"token": "x"}, access_token="userSessionToken")
    assert caught.value.reason == "missing_access_token"
    assert "response.access_token" in str(caught.value)
    with pytest.raises(IdentityUnavailable) as caught:
        parse({"a": "t"}, access_token="a", fields={"tenant_id": "tenantId"})
    assert caught.value.reason == "missing_field"
    assert "response.fields.tenant_id" in str(caught.value)
    with pytest.raises(IdentityUnavailable) as caught:
        parse({"a": "two words"}, access_token="a")
    assert caught.value.reason == "malformed_response"


def test_refresh_rotates_and_keeps_what_the_answer_lacks() -> None:
    """A new refresh token replaces the old; an answer without one keeps it; fields missing from
    a refresh answer keep their values, present ones are updated."""
    login = parse(
        {"a": "t1", "r": "rt1", "t": "7", "g": "eu"},
        access_token="a",
        refresh_token="r",
        fields={"tenant_id": "t", "region": "g"},
    )
    rotated = parse(
        {"a": "t2", "r": "rt2", "g": "us"},
        login,
        access_token="a",
        refresh_token="r",
        fields={"tenant_id": "t", "region": "g"},
    )
    assert rotated.refresh_token == "rt2"
    assert rotated.fields == {"tenant_id": "7", "region": "us"}
    kept = parse({"a": "t3"}, rotated, access_token="a", refresh_token="r")
    assert kept.refresh_token == "rt2"


def test_old_records_without_fields_or_cookies_still_load() -> None:
    """Records written before json_login (no token.fields, no token.cookies) read back; a token
    without them is written exactly as before, so older builds read ours."""
    old = {
        "version": 1,
        "identity": "abc",
        "session_id": "s",
        "activity_id": "a",
        "token": {"access_token": "at", "expires_at": NOW + 5, "obtained_at": NOW},
        "created_at": NOW,
    }
    record = SessionRecord.from_dict(old)
    assert record.token.fields == {}
    assert record.token.cookies == ()
    assert set(record.token.to_dict()) == {
        "access_token",
        "refresh_token",
        "token_type",
        "expires_at",
        "obtained_at",
        "scope",
    }


def test_workers_receive_fields_and_cookies_but_not_the_refresh_token() -> None:
    """--workers N: the credentials sent to a worker carry the session fields and cookies (for
    headers and send_cookies), never the refresh token."""
    from sidecar.cookies import Cookie
    from sidecar.tokens import Credentials
    from sidecar.workers import creds_from_dict, creds_to_dict

    token = Token(
        access_token="at",
        refresh_token="rt",
        expires_at=NOW + 60,
        obtained_at=NOW,
        fields={"tenant_id": "7"},
        cookies=(Cookie("sid", "v", "h.example", "/"),),
    )
    creds = Credentials(token, "Bearer at", "s", "a", NOW + 60)
    data = creds_to_dict(creds)
    assert data is not None
    back = creds_from_dict(json.loads(json.dumps(data)))
    assert back.token.fields == {"tenant_id": "7"}
    assert back.token.cookies == token.cookies
    assert back.token.refresh_token is None


def test_a_header_whose_session_field_is_missing_is_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """{{ session.tenant_id }} for a session without that field: X-Tenant-ID is not sent (rather
    than every request failing), and one warning names the key, not a value."""
    from sidecar.config.headers import Headers
    from sidecar.proxy.headers import HeaderRules
    from sidecar.tokens import Credentials

    rules = HeaderRules.compile(
        Headers(tenant_id="{{ session.tenant_id }}", static={"X-C": "c-{{ session.customer }}"})
    )
    with_fields = Token("at", NOW + 60, NOW, fields={"tenant_id": "7", "customer": "9"})
    without = Token("at2", NOW + 60, NOW)
    full = upstream_headers(rules, [], Credentials(with_fields, "Bearer at", "s", "a", NOW + 60))
    assert (full["X-Tenant-ID"], full["X-C"]) == ("7", "c-9")
    bare = Credentials(without, "Bearer at2", "s", "a", NOW + 60)
    for _ in range(3):
        head, _rid, _trace = rules.head(b"GET / HTTP/1.1\r\nHost: h\r\n", [], bare, b"")
        assert b"X-Tenant-ID" not in head
        assert b"X-C:" not in head
    warnings = [r for r in caplog.records if r.getMessage() == "headers.value_unavailable"]
    assert len(warnings) == 2  # one per templated key, once for this snapshot
