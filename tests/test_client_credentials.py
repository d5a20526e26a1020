"""Client authentication beyond one static secret, on the wire against a real provider on loopback
(tests/fakes/oidc.py): secret and key rotation with overlap (``identity.previous_*_files``) and
workload-identity client assertions (``client_auth: client_assertion_file``).
"""

from __future__ import annotations

import io
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.app import Sidecar
from sidecar.config.load import load_config
from sidecar.errors import ConfigError
from tests.conftest import MakeSidecar
from tests.fakes.clock import FakeClock
from tests.fakes.oidc import ASSERTION_TYPE, NO_SECRET, OIDCProvider, write_key
from tests.helpers import advance, events, eventually, logged_in, sample


@pytest.fixture
def idp() -> OIDCProvider:
    """The provider every sidecar of this module talks to (conftest's fixtures serve it, naming
    its issuer, and give it their fake clock, the one to pass to make_sidecar)."""
    return OIDCProvider()


def used(sidecar: Sidecar, index: int) -> float:
    text = sidecar.metrics.render().decode()
    name = f'sidecar_identity_previous_secret_used_total{{index="{index}"}}'
    return sample(text, name) or 0.0


def secret_of(call_headers: dict[str, str], form: dict[str, str]) -> str:
    import base64

    auth = call_headers.get("Authorization", "")
    if auth.startswith("Basic "):
        return base64.b64decode(auth[6:]).decode().partition(":")[2]
    return form.get("client_secret", "")


# ----------------------------------------------------------------- rotation with overlap


async def test_a_refused_secret_is_retried_with_the_previous_one_then_current_again(
    make_sidecar: MakeSidecar, idp: OIDCProvider, tmp_path: Path, log_output: io.StringIO
) -> None:
    """The Secret was updated before the provider: the current secret is refused
    (invalid_client), the previous one works within the same renewal (logged by index 0, never by
    value, and counted). Once the provider switches, the current secret is tried first and used."""
    current = tmp_path / "secret"
    current.write_text("the-new-secret-0000\n")
    old = tmp_path / "old-secret"
    old.write_text(idp.client_secret + "\n")
    sidecar = await make_sidecar(
        identity={
            "client_secret": None,
            "client_secret_file": str(current),
            "previous_client_secret_files": [str(old)],
        }
    )
    await logged_in(sidecar)
    first, second = idp.token_calls
    assert secret_of(first.headers, first.form) == "the-new-secret-0000"
    assert secret_of(second.headers, second.form) == idp.client_secret
    assert used(sidecar, 0) == 1
    lines = [e for e in events(log_output) if e["event"] == "identity.previous_secret_used"]
    assert len(lines) == 1
    assert lines[0]["index"] == 0
    assert "the-new-secret" not in log_output.getvalue()
    assert idp.client_secret not in log_output.getvalue()

    idp.client_secret = "the-new-secret-0000"  # the provider switches
    await sidecar.session.force_refresh()
    assert len(idp.token_calls) == 3  # one call: the current secret, first again
    last = idp.token_calls[-1]
    assert last.grant_type == "refresh_token"
    assert secret_of(last.headers, last.form) == "the-new-secret-0000"
    assert used(sidecar, 0) == 1


async def test_previous_secrets_are_tried_in_order_past_an_unreadable_one(
    make_sidecar: MakeSidecar, idp: OIDCProvider, tmp_path: Path, log_output: io.StringIO
) -> None:
    """previous_client_secret_files[0] is gone (a half-done rotation), [1] is refused, [2] is
    accepted: the renewal succeeds with index 2, and the unreadable file is logged by its key."""
    files = [tmp_path / f"previous-{n}" for n in range(3)]
    files[1].write_text("an-even-older-secret")
    files[2].write_text(idp.client_secret)
    sidecar = await make_sidecar(
        identity={
            "client_secret": "not-yet-known-by-the-provider",
            "client_auth": "client_secret_post",
            "previous_client_secret_files": [str(f) for f in files],
        }
    )
    await logged_in(sidecar)
    assert [c.form["client_secret"] for c in idp.token_calls] == [
        "not-yet-known-by-the-provider",
        "an-even-older-secret",
        idp.client_secret,
    ]
    assert used(sidecar, 2) == 1
    unreadable = [
        e for e in events(log_output) if e["event"] == "identity.previous_secret_unreadable"
    ]
    assert "identity.previous_client_secret_files[0]" in str(unreadable[0]["error"])


async def test_without_an_accepted_secret_the_renewal_fails_and_is_retried(
    make_sidecar: MakeSidecar, idp: OIDCProvider, clock: FakeClock, tmp_path: Path
) -> None:
    """Neither the current nor the previous secret is accepted: the login fails with the
    provider's invalid_client (retried with backoff, the process goes on), and succeeds once the
    provider accepts the current secret."""
    old = tmp_path / "old"
    old.write_text("old-and-also-wrong")
    sidecar = await make_sidecar(
        clock=clock,
        identity={"client_secret": "new-and-wrong", "previous_client_secret_files": [str(old)]},
    )
    failures = 'sidecar_login_failures_total{reason="invalid_client"}'

    def failed_once() -> bool:
        # the provider records its second call before sidecar has read the answer: wait for
        # sidecar to count the failed login, not for the provider's call list
        return sample(sidecar.metrics.render().decode(), failures) == 1

    await eventually(failed_once, what="one login failed with both secrets refused")
    assert len(idp.token_calls) == 2
    assert sidecar.session.usable() is None
    idp.client_secret = "new-and-wrong"
    await advance(clock, 1)  # once the retry sleeps on the clock: a jump before is lost
    await logged_in(sidecar)


async def test_a_refused_private_key_is_retried_with_the_previous_key(
    make_sidecar: MakeSidecar, idp: OIDCProvider, tmp_path: Path
) -> None:
    """private_key_jwt: the provider still knows only the old public key; the assertion signed
    with the current key is refused, one signed with previous_private_key_files[0] is accepted."""
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    idp.client_public_key = old.public_key()
    sidecar = await make_sidecar(
        identity={
            **NO_SECRET,
            "client_auth": "private_key_jwt",
            "private_key_file": str(write_key(tmp_path / "new.pem", new)),
            "previous_private_key_files": [str(write_key(tmp_path / "old.pem", old))],
        }
    )
    await logged_in(sidecar)
    assert len(idp.token_calls) == 2
    assert used(sidecar, 0) == 1
    idp.client_public_key = new.public_key()
    await sidecar.session.force_refresh()
    assert len(idp.token_calls) == 3
    assert used(sidecar, 0) == 1


# ----------------------------------------------------------------- workload identity


def workload_token(key: ec.EllipticCurvePrivateKey, idp: OIDCProvider, now: float) -> str:
    """A projected service-account token as the kubelet writes it (issuer, subject, audience)."""
    claims = {
        "iss": idp.workload_issuer,
        "sub": idp.workload_subject,
        "aud": idp.workload_audience,
        "iat": int(now),
        "exp": int(now) + 3600,
    }
    return jwt.encode(claims, key, algorithm="ES256")


async def test_client_assertion_file_sends_the_workload_token_read_at_every_call(
    make_sidecar: MakeSidecar, idp: OIDCProvider, clock: FakeClock, tmp_path: Path
) -> None:
    """client_auth client_assertion_file: the file's JWT is the client_assertion (jwt-bearer
    assertion type) with the client_id and no secret; the file is re-read at every call, so the
    kubelet's rotated token is sent at the next renewal."""
    key = ec.generate_private_key(ec.SECP256R1())
    idp.workload_key = key.public_key()
    tokens = [workload_token(key, idp, clock.now), workload_token(key, idp, clock.now + 1)]
    projected = tmp_path / "token"
    projected.write_text(tokens[0])
    sidecar = await make_sidecar(
        clock=clock,
        identity={
            **NO_SECRET,
            "client_auth": "client_assertion_file",
            "client_assertion_file": str(projected),
        },
    )
    await logged_in(sidecar)
    projected.write_text(tokens[1] + "\n")
    await sidecar.session.force_refresh()
    first, second = idp.token_calls
    assert first.form["client_assertion_type"] == ASSERTION_TYPE
    assert first.form["client_assertion"] == tokens[0]
    assert first.form["client_id"] == idp.client_id
    assert "client_secret" not in first.form
    assert "Authorization" not in first.headers
    assert second.form["client_assertion"] == tokens[1]
    assert idp.assertion_failures == []


async def test_a_missing_client_assertion_file_fails_the_renewal_not_the_process(
    make_sidecar: MakeSidecar,
    idp: OIDCProvider,
    clock: FakeClock,
    tmp_path: Path,
    log_output: io.StringIO,
) -> None:
    """The projected token is not there yet: the login fails naming the key (retried with
    backoff); once the kubelet writes it, the next attempt logs in."""
    key = ec.generate_private_key(ec.SECP256R1())
    idp.workload_key = key.public_key()
    projected = tmp_path / "token"
    sidecar = await make_sidecar(
        clock=clock,
        identity={
            **NO_SECRET,
            "client_auth": "client_assertion_file",
            "client_assertion_file": str(projected),
        },
    )

    def failed() -> bool:
        return any(
            e["event"] == "session.login_failed"
            and "identity.client_assertion_file" in str(e.get("error"))
            for e in events(log_output)
        )

    await eventually(failed, what="the failure logged with its key")
    assert idp.token_calls == []
    projected.write_text(workload_token(key, idp, clock.now))
    await advance(clock, 1)  # once the retry sleeps on the clock: a jump before is lost
    await logged_in(sidecar)


def test_client_assertion_file_keys_are_checked_at_load(tmp_path: Path) -> None:
    """client_auth client_assertion_file without the file key is an error naming it; the file
    key with another client_auth, or previous_* lists with the wrong client_auth, are errors
    naming theirs; an unreadable file is named at load."""
    base = (
        "upstream: {url: 'https://api.example'}\n"
        "identity: {kind: oauth2, token_url: 'https://idp.example/token', client_id: c, "
    )
    cases = {
        "client_auth: client_assertion_file}": (
            "identity.client_assertion_file: required for client_auth client_assertion_file"
        ),
        "client_secret: s, client_assertion_file: /x}": (
            "identity.client_assertion_file: not used with client_auth client_secret_basic"
        ),
        "client_secret: s, previous_private_key_files: [/x]}": (
            "identity.previous_private_key_files: not used with client_auth client_secret_basic"
        ),
        "client_auth: client_assertion_file, client_assertion_file: /x, "
        "previous_client_secret_files: [/y]}": (
            "identity.previous_client_secret_files: not used with client_auth client_assertion_file"
        ),
    }
    for tail, expected in cases.items():
        path = tmp_path / "config.yaml"
        path.write_text(base + tail + "\n")
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert expected in str(exc.value), tail
    present, missing = tmp_path / "previous", tmp_path / "nothing-here"
    present.write_text("an-old-secret")
    path = tmp_path / "config.yaml"
    path.write_text(
        base + f"client_secret: s, previous_client_secret_files: ['{present}', '{missing}']}}\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert f"identity.previous_client_secret_files[1]: cannot read {missing}" in str(exc.value)
