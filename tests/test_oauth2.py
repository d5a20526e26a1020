"""Standards OAuth2/OIDC on the wire, against a real provider on loopback (tests/fakes/oidc.py):
discovery, private_key_jwt, the jwt_bearer and token_exchange grants, credential-file rotation,
backup token endpoints and revocation.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import MakeSidecar, Serve, admin_url
from tests.fakes.clock import FakeClock
from tests.fakes.idp import FakeIdP
from tests.fakes.oidc import (
    ASSERTION_TYPE,
    JWT_BEARER,
    JWT_TYPE,
    NO_SECRET,
    TOKEN_EXCHANGE,
    OIDCProvider,
    write_key,
)
from tests.helpers import eventually, logged_in, sample


@pytest.fixture
def idp() -> OIDCProvider:
    """The provider every sidecar of this module talks to (conftest's fixtures serve it, naming
    its issuer, and give it their fake clock, the one to pass to make_sidecar)."""
    return OIDCProvider()


def private_key_jwt(
    idp: OIDCProvider,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    tmp_path: Path,
    **extra: Any,
) -> dict[str, Any]:
    """Identity settings for private_key_jwt with ``key``, whose public half the provider trusts."""
    idp.client_public_key = key.public_key()
    return {
        **NO_SECRET,
        "client_auth": "private_key_jwt",
        "private_key_file": str(write_key(tmp_path / "client.pem", key)),
        **extra,
    }


def logged(caplog: pytest.LogCaptureFixture, event: str, **fields: str) -> bool:
    """True when an ``event`` line was logged whose fields contain the given texts."""
    return any(
        r.getMessage() == event
        and all(text in str(getattr(r, k, "")) for k, text in fields.items())
        for r in caplog.records
    )


async def test_discovery_gives_token_and_revocation_endpoints(
    make_sidecar: MakeSidecar, idp: OIDCProvider, idp_url: str, clock: FakeClock
) -> None:
    """With only identity.issuer, the token and revocation endpoints come from the discovery
    document, fetched once; logout revokes at the discovered endpoint."""
    sidecar = await make_sidecar(
        clock=clock, identity={"issuer": idp_url, "token_url": None, "revocation_url": None}
    )
    await logged_in(sidecar)
    await sidecar.session.force_refresh()
    await sidecar.session.logout()
    assert idp.paths() == [
        "/.well-known/openid-configuration",
        "/token",
        "/token",
        "/revoke",
        "/revoke",
    ]


async def test_discovery_with_the_provider_down_at_start_is_retried(
    make_sidecar: MakeSidecar, idp: OIDCProvider, idp_url: str
) -> None:
    """The process starts while discovery fails (503), reports not ready, and logs in by itself
    once the provider answers: discovery is part of the login and its backoff."""
    idp.down = "503"
    sidecar = await make_sidecar(identity={"issuer": idp_url, "token_url": None})
    await eventually(lambda: len(idp.calls) >= 2, what="discovery retried")
    assert sidecar.session.usable() is None
    assert set(idp.paths()) == {"/.well-known/openid-configuration"}
    idp.down = None
    await logged_in(sidecar)
    metrics = sidecar.metrics.render().decode()
    assert (sample(metrics, 'sidecar_logins_total{result="failure"}') or 0) >= 2


async def test_a_discovery_document_for_another_issuer_is_refused(
    make_sidecar: MakeSidecar, idp: OIDCProvider, idp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """OIDC Discovery 4.3: a document naming another issuer is not used; no token is asked for."""
    idp.discovery_issuer = "https://evil.example"
    sidecar = await make_sidecar(identity={"issuer": idp_url, "token_url": None})
    await eventually(
        lambda: logged(caplog, "session.login_failed", reason="discovery_issuer_mismatch"),
        what="refusal",
    )
    assert "/token" not in idp.paths()
    assert sidecar.session.summary()["state"] == "NONE"
    assert "evil.example" in sidecar.session.summary()["last_error"]


@pytest.mark.parametrize(
    ("key_type", "signing_alg", "expected_alg"),
    [("ec", None, "ES256"), ("rsa", None, "RS256"), ("rsa", "PS256", "PS256")],
)
async def test_private_key_jwt_on_the_wire(
    make_sidecar: MakeSidecar,
    idp: OIDCProvider,
    clock: FakeClock,
    tmp_path: Path,
    key_type: str,
    signing_alg: str | None,
    expected_alg: str,
) -> None:
    """private_key_jwt (RFC 7523 2.2): a client_assertion the provider verifies with the public key
    alone, iss = sub = client_id, aud = token endpoint, kid, a 60 s exp from the injected clock,
    a new jti each time; no secret anywhere."""
    key = (
        ec.generate_private_key(ec.SECP256R1())
        if key_type == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    sidecar = await make_sidecar(
        clock=clock,
        identity=private_key_jwt(
            idp, key, tmp_path, key_id="client-key-1", signing_alg=signing_alg
        ),
    )
    await logged_in(sidecar)
    await sidecar.session.force_refresh()
    first, second = idp.token_calls
    assert idp.assertion_failures == []
    assert first.form["client_assertion_type"] == ASSERTION_TYPE
    assert "client_secret" not in first.form
    assert "Authorization" not in first.headers
    header = jwt.get_unverified_header(first.form["client_assertion"])
    assert header["alg"] == expected_alg
    assert header["kid"] == "client-key-1"
    claims = jwt.decode(first.form["client_assertion"], options={"verify_signature": False})
    assert claims["iss"] == claims["sub"] == idp.client_id
    assert claims["aud"] == idp.token_endpoint
    assert claims["iat"] == int(clock.now)
    assert claims["exp"] == int(clock.now) + 60
    again = jwt.decode(second.form["client_assertion"], options={"verify_signature": False})
    assert again["jti"] != claims["jti"]


async def test_private_key_rotation_is_picked_up_at_the_next_login(
    make_sidecar: MakeSidecar, idp: OIDCProvider, tmp_path: Path
) -> None:
    """The key file is re-read at every login: after it is replaced, the provider (which now
    trusts only the new key) accepts the next assertion."""
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    key_file = write_key(tmp_path / "client.pem", old)
    idp.client_public_key = old.public_key()
    idp.issue_refresh_tokens = False
    sidecar = await make_sidecar(
        identity={**NO_SECRET, "client_auth": "private_key_jwt", "private_key_file": str(key_file)}
    )
    await logged_in(sidecar)
    write_key(key_file, new)
    idp.client_public_key = new.public_key()
    await sidecar.session.force_refresh()
    assert len(idp.token_calls) == 2
    assert idp.assertion_failures == []


async def test_a_reused_or_expired_client_assertion_is_refused_by_the_fake(
    make_sidecar: MakeSidecar, idp: OIDCProvider, clock: FakeClock, tmp_path: Path
) -> None:
    """The provider really checks: replaying a recorded assertion is invalid_client, and so is
    one presented after its exp."""
    key = ec.generate_private_key(ec.SECP256R1())
    sidecar = await make_sidecar(clock=clock, identity=private_key_jwt(idp, key, tmp_path))
    await logged_in(sidecar)
    recorded = idp.token_calls[0].form
    assert not idp._assertion_ok(recorded["client_assertion"], [key.public_key()], client=True)
    assert idp.assertion_failures == ["jti_reused"]
    idp.seen_jti.clear()
    await clock.advance(61)
    assert not idp._assertion_ok(recorded["client_assertion"], [key.public_key()], client=True)
    assert idp.assertion_failures[-1] == "expired"


async def test_jwt_bearer_grant_sends_the_assertion_file_read_at_each_login(
    make_sidecar: MakeSidecar, idp: OIDCProvider, clock: FakeClock, tmp_path: Path
) -> None:
    """jwt_bearer (RFC 7523 2.1) with identity.assertion_file: the file's JWT is the assertion,
    re-read at every login, so an externally rotated assertion is sent the next time."""
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    idp.assertion_keys = [issuer_key.public_key()]
    idp.issue_refresh_tokens = False

    def assertion(n: int) -> str:
        claims = {
            "iss": "https://workload-issuer.example",
            "sub": f"workload-{n}",
            "aud": idp.token_endpoint,
            "exp": int(clock.now) + 300,
            "jti": f"jti-{n}",
        }
        return jwt.encode(claims, issuer_key, algorithm="ES256")

    assertions = [assertion(1), assertion(2)]  # ECDSA signatures differ each time: sign once
    assertion_file = tmp_path / "assertion.jwt"
    assertion_file.write_text(assertions[0] + "\n")
    sidecar = await make_sidecar(
        clock=clock,
        identity={"grant": "jwt_bearer", "assertion_file": str(assertion_file), "scope": "orders"},
    )
    await logged_in(sidecar)
    assertion_file.write_text(assertions[1])
    await sidecar.session.force_refresh()
    first, second = idp.token_calls
    assert first.grant_type == JWT_BEARER
    assert first.form["assertion"] == assertions[0]
    assert second.form["assertion"] == assertions[1]
    assert first.form["scope"] == "orders"
    assert first.headers["Authorization"].startswith("Basic ")  # client auth stays as configured


async def test_jwt_bearer_grant_signed_with_the_private_key(
    make_sidecar: MakeSidecar, idp: OIDCProvider, tmp_path: Path
) -> None:
    """jwt_bearer without an assertion file: sidecar signs one with identity.private_key_file,
    verified by the provider with the public key; client_auth none sends only the client_id."""
    key = ec.generate_private_key(ec.SECP256R1())
    idp.client_public_key = key.public_key()
    sidecar = await make_sidecar(
        identity={
            **NO_SECRET,
            "grant": "jwt_bearer",
            "client_auth": "none",
            "private_key_file": str(write_key(tmp_path / "k.pem", key)),
        }
    )
    await logged_in(sidecar)
    call = idp.token_calls[0]
    assert call.grant_type == JWT_BEARER
    assert call.form["client_id"] == idp.client_id
    assert "client_assertion" not in call.form
    assert idp.assertion_failures == []


async def test_token_exchange_sends_the_rotated_subject_token_on_the_next_login(
    make_sidecar: MakeSidecar, idp: OIDCProvider, tmp_path: Path
) -> None:
    """token_exchange (RFC 8693) from a projected service-account token: the file is read at
    every login, so after the kubelet rotates it the next login sends the new content; actor
    token, requested type, audience, resource and scope are on the wire."""
    subject = tmp_path / "token"
    actor = tmp_path / "actor"
    subject.write_text("sa-token-generation-1")
    actor.write_text("actor-token-1")
    idp.subject_tokens = {"sa-token-generation-1", "sa-token-generation-2"}
    idp.actor_token = "actor-token-1"
    sidecar = await make_sidecar(
        identity={
            "grant": "token_exchange",
            "subject_token_file": str(subject),
            "actor_token_file": str(actor),
            "actor_token_type": JWT_TYPE,
            "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "audience": "orders-api",
            "resource": "https://orders.example/",
            "scope": "orders.read",
        }
    )
    await logged_in(sidecar)
    subject.write_text("sa-token-generation-2\n")
    await sidecar.session.force_refresh()
    first, second = idp.token_calls
    assert first.form == {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": "sa-token-generation-1",
        "subject_token_type": JWT_TYPE,
        "actor_token": "actor-token-1",
        "actor_token_type": JWT_TYPE,
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "audience": "orders-api",
        "resource": "https://orders.example/",
        "scope": "orders.read",
    }
    assert second.grant_type == TOKEN_EXCHANGE  # no refresh token: a re-exchange
    assert second.form["subject_token"] == "sa-token-generation-2"


async def test_a_missing_subject_token_file_is_retried_not_a_crash(
    make_sidecar: MakeSidecar, idp: OIDCProvider, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A subject-token file that disappears (mid-rotation) fails the login with a message naming
    the key, and the next attempt after it is back succeeds."""
    subject = tmp_path / "token"
    subject.write_text("sa-1")
    idp.subject_tokens = {"sa-1"}
    config = {"grant": "token_exchange", "subject_token_file": str(subject)}
    subject.unlink()
    sidecar = await make_sidecar(identity=config)  # validated in memory, not through load_config
    await eventually(
        lambda: logged(caplog, "session.login_failed", error="identity.subject_token_file"),
        what="failure logged",
    )
    subject.write_text("sa-1")
    await logged_in(sidecar)


@pytest.mark.parametrize("failure", ["503", "refused"])
async def test_backup_token_url_answers_when_the_primary_does_not(
    make_sidecar: MakeSidecar,
    serve: Serve,
    idp: OIDCProvider,
    idp_url: str,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    """identity.backup_token_urls: the primary answering 5xx or refusing connections makes the
    backup answer; it is logged and kept for the next calls."""
    primary = FakeIdP(down="503")
    primary_url = await serve(primary.app()) if failure == "503" else "http://127.0.0.1:9"
    sidecar = await make_sidecar(
        identity={"token_url": f"{primary_url}/token", "backup_token_urls": [f"{idp_url}/token"]}
    )
    await logged_in(sidecar)
    await sidecar.session.force_refresh()
    assert len(idp.token_calls) == 2
    assert len(primary.token_calls) == (1 if failure == "503" else 0)
    assert logged(caplog, "identity.endpoint_switched", url=idp_url)


async def test_an_oauth_error_from_the_primary_does_not_try_the_backup(
    make_sidecar: MakeSidecar, serve: Serve, idp: OIDCProvider, idp_url: str
) -> None:
    """invalid_client is the provider's answer, not an outage: the backup is not asked."""
    primary = FakeIdP(down="invalid_client")
    primary_url = await serve(primary.app())
    sidecar = await make_sidecar(
        identity={"token_url": f"{primary_url}/token", "backup_token_urls": [f"{idp_url}/token"]}
    )
    await eventually(lambda: len(primary.token_calls) >= 1)
    await asyncio.sleep(0.1)
    assert idp.token_calls == []
    assert sidecar.session.summary()["state"] == "NONE"


async def test_post_logout_revokes_refresh_then_access_at_the_discovered_endpoint(
    make_sidecar: MakeSidecar, http: Any, idp: OIDCProvider, idp_url: str
) -> None:
    """POST /session/logout: RFC 7009 revocation of the refresh token, then the access token,
    at the endpoint from discovery; the session is cleared."""
    sidecar = await make_sidecar(
        identity={"issuer": idp_url, "token_url": None, "revocation_url": None}
    )
    await logged_in(sidecar)
    refresh_token = sidecar.session.record.token.refresh_token  # type: ignore[union-attr]
    async with http.post(admin_url(sidecar, "/session/logout")) as resp:
        assert (await resp.json())["state"] == "LOGGED_OUT"
    revocations = [c.form for c in idp.calls if c.path == "/revoke"]
    assert [f["token_type_hint"] for f in revocations] == ["refresh_token", "access_token"]
    assert revocations[0]["token"] == refresh_token
    assert refresh_token in idp.revoked


@pytest.mark.parametrize(
    ("mode", "reason", "message"),
    [
        ("html_200", "malformed_response", "an HTML page that is not JSON"),
        ("html_502", "http_502", "HTTP 502 (an HTML error page)"),
        ("503", "http_503", "HTTP 503"),
        ("404", "http_404", "HTTP 404"),
        ("not_json", "malformed_response", "a body that is not JSON"),
        ("json_array", "malformed_response", "not a JSON object"),
        ("no_token", "malformed_response", "access_token is missing"),
        ("expires_negative", "malformed_response", "expires_in must be a positive number"),
        ("expires_zero", "malformed_response", "expires_in must be a positive number"),
        ("expires_absurd", "malformed_response", "absurd (more than a year)"),
        ("expires_text", "malformed_response", "expires_in is not a number"),
        ("token_type_mac", "malformed_response", "token_type 'MAC' is not supported"),
        ("invalid_client", "invalid_client", "error='invalid_client'"),
    ],
)
async def test_bad_provider_answers_are_labelled_failures_never_crashes(
    make_sidecar: MakeSidecar,
    http: Any,
    idp: OIDCProvider,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    reason: str,
    message: str,
) -> None:
    """Each bad answer, at login and at refresh: a log line saying what was wrong, a failure
    counted (logins_total, and refreshes_total with the reason), no token installed from it,
    and the sidecar keeps running and recovers once the provider answers properly."""
    idp.down = mode
    sidecar = await make_sidecar(refresh={"retry": {"initial": 0.05, "max": 0.1}})
    await eventually(
        lambda: logged(caplog, "session.login_failed", reason=reason, error=message), what=mode
    )
    metrics = sidecar.metrics.render().decode()
    assert (sample(metrics, 'sidecar_logins_total{result="failure"}') or 0) >= 1
    assert sidecar.session.current is None
    idp.down = None
    await logged_in(sidecar)
    token = sidecar.session.current
    idp.down = mode
    with pytest.raises(Exception, match="refresh failed"):
        await sidecar.session.force_refresh()
    label = f'sidecar_token_refreshes_total{{reason="{reason}",result="failure"}}'
    assert sample(sidecar.metrics.render().decode(), label) == 1
    assert logged(caplog, "session.refresh_failed", reason=reason, error=message)
    assert sidecar.session.current is token  # the valid token stays in use
    async with http.get(admin_url(sidecar, "/healthz")) as resp:
        assert resp.status == 200


async def test_a_hanging_revocation_endpoint_does_not_hold_up_shutdown(
    make_sidecar: MakeSidecar, idp: OIDCProvider, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """session.logout_on_shutdown with a revocation endpoint that never answers: stop() returns
    after session.logout_timeout, the failure is logged, and the stored session is cleared."""
    store = tmp_path / "session.json"
    sidecar = await make_sidecar(
        identity={"timeout": 30},
        session={
            "store": "file",
            "path": str(store),
            "logout_on_shutdown": True,
            "logout_timeout": 0.5,
        },
    )
    await logged_in(sidecar)
    assert store.exists()
    idp.revocation_hangs = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    await sidecar.stop()
    assert loop.time() - started < 3
    assert "/revoke" in idp.paths()
    assert logged(caplog, "session.logout_failed", reason="timeout")
    assert not store.exists()


async def test_refresh_sends_scope_and_resource_again(
    make_sidecar: MakeSidecar, idp: OIDCProvider
) -> None:
    """A refresh (RFC 6749 section 6) repeats scope and resource (RFC 8707 section 2.2), not the
    login-only audience, and authenticates the client as the login did."""
    sidecar = await make_sidecar(
        identity={"scope": "orders.read", "resource": "https://orders.example/", "audience": "x"}
    )
    await logged_in(sidecar)
    await sidecar.session.force_refresh()
    login, refresh = idp.token_calls
    assert login.form["audience"] == "x"
    assert refresh.form == {
        "grant_type": "refresh_token",
        "refresh_token": refresh.form["refresh_token"],
        "scope": "orders.read",
        "resource": "https://orders.example/",
    }
    assert refresh.headers["Authorization"] == login.headers["Authorization"]
