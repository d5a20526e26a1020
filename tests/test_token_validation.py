"""identity.validate: each new access token is checked against the provider's JWKS (signature,
iss, aud, exp, nbf, allowed algorithms) before it is used; a token that fails is never used."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.app import Sidecar
from tests.conftest import MakeSidecar
from tests.fakes.clock import FakeClock
from tests.fakes.oidc import OIDCProvider
from tests.helpers import advance, eventually, sample

NOW = 1_800_000_000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def idp(clock: FakeClock) -> OIDCProvider:
    """The provider of this module, on the sidecar's fake clock (conftest's idp_url serves it,
    naming its issuer)."""
    return OIDCProvider(clock=clock)


def validating(idp_url: str, **validate: Any) -> dict[str, Any]:
    """Identity settings: discovery from the issuer, validation on, audience api://orders."""
    return {
        "issuer": idp_url,
        "token_url": None,
        "audience": "api://orders",
        "validate": {"enabled": True, **validate},
    }


async def ready(sidecar: Sidecar) -> None:
    """A token is held and the login task is over (a force_refresh would join it)."""
    await eventually(
        lambda: (
            sidecar.session.usable() is not None
            and not sidecar.session.summary()["refresh_in_progress"]
        ),
        what="a token",
    )


def metrics_of(sidecar: Sidecar) -> str:
    return sidecar.metrics.render().decode()


async def test_a_valid_token_is_used_and_the_jwks_is_fetched_once(
    make_sidecar: MakeSidecar, idp: OIDCProvider, idp_url: str, clock: FakeClock
) -> None:
    """A correctly signed token for our audience passes; later tokens reuse the cached keys."""
    sidecar = await make_sidecar(clock=clock, identity=validating(idp_url))
    await ready(sidecar)
    await sidecar.session.force_refresh()
    await sidecar.session.force_refresh()
    assert idp.paths().count("/jwks") == 1
    assert len(idp.token_calls) == 3


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"claim_overrides": {"aud": "api://someone-else"}}, "invalid_token_audience"),
        ({"claim_overrides": {"iss": "https://other-issuer.example"}}, "invalid_token_issuer"),
        ({"claim_overrides": {"exp": NOW - 120}}, "invalid_token_expired"),
        ({"claim_overrides": {"nbf": NOW + 600}}, "invalid_token_not_yet_valid"),
        ({"claim_overrides": {"exp": None}}, "invalid_token_claims"),
        ({"rogue_key": "new"}, "invalid_token_signature"),
        ({"header_kid": "unknown-kid"}, "invalid_token_key"),
        ({"token_alg": "HS256"}, "invalid_token_algorithm"),
        ({"token_alg": "none"}, "invalid_token_algorithm"),
    ],
)
async def test_a_token_that_fails_a_check_is_never_used(
    make_sidecar: MakeSidecar,
    idp: OIDCProvider,
    idp_url: str,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    fault: dict[str, Any],
    reason: str,
) -> None:
    """Each failed check: no token is installed, the login counts as a failure, the reason is
    the label of sidecar_token_validation_failures_total and in a log line that never holds the
    token; once the provider issues good tokens again, the session recovers with backoff."""
    if "claim_overrides" in fault:
        idp.claim_overrides = fault["claim_overrides"]
    if fault.get("rogue_key"):
        idp.rogue_key = ec.generate_private_key(ec.SECP256R1())
    if "header_kid" in fault:
        idp.header_kid = fault["header_kid"]
    idp.token_alg = fault.get("token_alg", "ES256")
    sidecar = await make_sidecar(
        clock=clock, identity=validating(idp_url), refresh={"retry": {"initial": 1, "max": 2}}
    )
    label = f'sidecar_token_validation_failures_total{{reason="{reason}"}}'
    await eventually(lambda: sample(metrics_of(sidecar), label) == 1, what=reason)
    assert sidecar.session.current is None
    assert (sample(metrics_of(sidecar), 'sidecar_logins_total{result="failure"}') or 0) >= 1
    lines = [r for r in caplog.records if r.getMessage() == "identity.token_invalid"]
    assert lines
    assert lines[0].reason == reason  # type: ignore[attr-defined]
    for token in idp.issued:
        assert token not in caplog.text
        assert all(token not in str(r.__dict__) for r in caplog.records)

    idp.claim_overrides, idp.rogue_key, idp.header_kid, idp.token_alg = {}, None, None, "ES256"
    for _ in range(20):
        await clock.advance(2)
        if sidecar.session.usable() is not None:
            break
        await eventually(lambda: not sidecar.session.summary()["refresh_in_progress"])
    assert sidecar.session.usable() is not None


async def test_a_refresh_whose_token_fails_counts_a_refresh_failure_and_keeps_the_old_token(
    make_sidecar: MakeSidecar, idp: OIDCProvider, idp_url: str, clock: FakeClock
) -> None:
    """On the refresh path the reason is the label of sidecar_token_refreshes_total, and the
    current (valid) token stays in use."""
    idp.lifetime = 600
    sidecar = await make_sidecar(clock=clock, identity=validating(idp_url))
    await eventually(lambda: sidecar.session.usable() is not None)
    good = sidecar.session.current
    idp.claim_overrides = {"aud": "api://someone-else"}
    await advance(clock, 500)
    label = 'sidecar_token_refreshes_total{reason="invalid_token_audience",result="failure"}'
    await eventually(lambda: sample(metrics_of(sidecar), label) == 1, what="refresh failure")
    assert sidecar.session.current is good


async def test_a_rotated_signing_key_is_fetched_once_and_unknown_kids_are_rate_limited(
    make_sidecar: MakeSidecar, idp: OIDCProvider, idp_url: str, clock: FakeClock
) -> None:
    """The provider rotates its key: a token with the new kid re-fetches the JWKS once and passes.
    A token with a kid the JWKS never has does not re-fetch again within the interval."""
    sidecar = await make_sidecar(
        clock=clock, identity=validating(idp_url, jwks_min_refetch_interval=60)
    )
    await ready(sidecar)
    idp.signing_key = ec.generate_private_key(ec.SECP256R1())
    idp.key_id = "idp-2"
    await clock.advance(61)
    await sidecar.session.force_refresh()
    assert idp.paths().count("/jwks") == 2
    idp.header_kid = "never-published"
    with pytest.raises(Exception, match="refresh failed"):
        await sidecar.session.force_refresh()
    with pytest.raises(Exception, match="refresh failed"):
        await sidecar.session.force_refresh()
    assert idp.paths().count("/jwks") == 2
    await clock.advance(61)
    with pytest.raises(Exception, match="refresh failed"):
        await sidecar.session.force_refresh()
    assert idp.paths().count("/jwks") == 3


async def test_opaque_tokens_are_checked_by_introspection(
    make_sidecar: MakeSidecar, idp: OIDCProvider, idp_url: str, clock: FakeClock
) -> None:
    """A token that is not a JWT is checked at the discovered introspection endpoint (RFC 7662,
    with client authentication): used while active for our audience, refused when the provider
    calls it inactive or names another audience."""
    idp.opaque_tokens = True
    sidecar = await make_sidecar(
        clock=clock, identity=validating(idp_url), refresh={"retry": {"initial": 1, "max": 2}}
    )
    await ready(sidecar)
    introspections = [c for c in idp.calls if c.path == "/introspect"]
    assert introspections[0].form["token_type_hint"] == "access_token"
    assert introspections[0].headers["Authorization"].startswith("Basic ")
    assert "/jwks" not in idp.paths()
    for overrides, reason in (
        ({"aud": "api://someone-else"}, "invalid_token_audience"),
        ({"exp": NOW - 100}, "invalid_token_expired"),
    ):
        idp.claim_overrides = overrides
        with pytest.raises(Exception, match="refresh failed"):
            await sidecar.session.force_refresh()
        label = f'sidecar_token_validation_failures_total{{reason="{reason}"}}'
        assert sample(metrics_of(sidecar), label) == 1
    idp.claim_overrides = {}
    idp.is_valid = lambda access_token: False  # type: ignore[method-assign]
    with pytest.raises(Exception, match="refresh failed"):
        await sidecar.session.force_refresh()
    label = 'sidecar_token_validation_failures_total{reason="invalid_token_inactive"}'
    assert sample(metrics_of(sidecar), label) == 1


async def test_the_jwks_cache_expires_after_an_hour_and_survives_a_jwks_outage(
    make_sidecar: MakeSidecar, idp: OIDCProvider, idp_url: str, clock: FakeClock
) -> None:
    """After JWKS_MAX_AGE the keys are fetched again; when that fetch fails, the cached keys
    keep verifying (logins go on) and the next login tries again."""
    from sidecar.identity.validation import JWKS_MAX_AGE

    sidecar = await make_sidecar(clock=clock, identity=validating(idp_url))
    await ready(sidecar)
    await clock.advance(JWKS_MAX_AGE + 1)
    await sidecar.session.force_refresh()
    assert idp.paths().count("/jwks") == 2
    await clock.advance(JWKS_MAX_AGE + 1)
    idp.jwks_down = True
    await sidecar.session.force_refresh()  # the stale keys still verify the new token
    assert idp.paths().count("/jwks") == 3
    idp.jwks_down = False
    await sidecar.session.force_refresh()
    assert idp.paths().count("/jwks") == 4
