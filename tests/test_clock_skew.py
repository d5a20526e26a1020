"""Clock-skew-aware expiry: a provider whose clock is not ours, a token whose expiry is absolute
(``exp``) or relative (``expires_in``), against a real sidecar and an upstream that judges tokens on
the provider's clock (tests/fakes/idp.py ``clock_offset``)."""

from __future__ import annotations

import io

import aiohttp
import pytest

from sidecar.tokens import expiry_offset
from tests.conftest import MakeSidecar, proxy_url
from tests.fakes.clock import FakeClock
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import advance, events, eventually, sample


@pytest.mark.parametrize("offset", [120.0, -120.0])
async def test_tokens_with_only_exp_from_a_provider_off_by_two_minutes_are_never_refused(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    idp: FakeIdP,
    clock: FakeClock,
    upstream: FakeUpstream,
    log_output: io.StringIO,
    offset: float,
) -> None:
    """The provider's clock is 2 minutes ahead of ours (or behind), its JWTs carry only ``exp``
    (30 s life, no expires_in, no iat): the offset measured from its Date header corrects every
    expiry, so over three lifetimes of requests every second the upstream refuses none; the gauge
    shows the offset and identity.clock_skew is logged once."""
    idp.clock_offset = offset
    idp.lifetime = 30
    idp.send_expires_in = False
    idp.send_iat = False
    sidecar = await make_sidecar(
        clock=clock, refresh={"lead_time": 5, "lead_fraction": 0.2, "jitter": 0}
    )
    await eventually(lambda: sidecar.session.usable() is not None, what="login")
    for _ in range(90):
        async with http.get(proxy_url(sidecar, "/x")) as resp:
            assert resp.status == 200
        await advance(clock, 1)
    assert upstream.rejected == 0
    assert len(idp.token_calls) >= 4  # the login and at least three renewals
    gauge = sample(sidecar.metrics.render().decode(), "sidecar_identity_clock_skew_seconds")
    assert gauge is not None
    assert abs(gauge - offset) <= 1
    logged = [e for e in events(log_output) if e["event"] == "identity.clock_skew"]
    assert len(logged) == 1
    assert abs(float(str(logged[0]["seconds"])) - offset) <= 1


async def test_expires_in_counts_from_when_the_request_was_sent(
    make_sidecar: MakeSidecar, idp: FakeIdP, clock: FakeClock
) -> None:
    """A token endpoint that takes 20 s to answer a 60 s ``expires_in``: the token is taken to
    expire 60 s after the request was sent, not after the answer arrived."""
    idp.lifetime = 60
    idp.answer_after = 20
    started = clock.time()
    sidecar = await make_sidecar(clock=clock)
    await eventually(lambda: sidecar.session.usable() is not None, what="login")
    record = sidecar.session.record
    assert record is not None
    assert record.token.expires_at == started + 60
    assert clock.time() == started + 20


def test_expiry_offset_trusts_iat_only_to_move_an_expiry_earlier() -> None:
    """Without a Date header: an ``iat`` ahead of our send time is the provider's clock ahead
    (subtracted); a backdated ``iat`` (Entra ID's five minutes) is not applied; a measured skew
    wins over ``iat``; differences within the Date header's resolution are not applied."""
    assert expiry_offset(None, 1_000_120.0, 1_000_000.0) == 120.0
    assert expiry_offset(None, 999_700.0, 1_000_000.0) == 0.0
    assert expiry_offset(-60.0, 1_000_120.0, 1_000_000.0) == -60.0
    assert expiry_offset(1.5, None, 1_000_000.0) == 0.0
    assert expiry_offset(None, None, 1_000_000.0) == 0.0
