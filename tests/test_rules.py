"""Pure rules: refresh schedule, backoff, token-response parsing, header compilation."""

from __future__ import annotations

import random

import jwt
import pytest

from sidecar.config.headers import Headers
from sidecar.config.models import Refresh, Retry
from sidecar.errors import IdentityUnavailable
from sidecar.proxy.headers import HeaderRules, valid_traceparent
from sidecar.session.schedule import RefreshSchedule
from sidecar.session.timing import backoff_delay, refresh_at, refresh_lead
from sidecar.tokens import (
    DEFAULT_LIFETIME,
    Credentials,
    SessionRecord,
    Token,
    parse_token_response,
)
from tests.helpers import upstream_headers

NOW = 1_800_000_000.0


def token(lifetime: float) -> Token:
    return Token(access_token="a", expires_at=NOW + lifetime, obtained_at=NOW)


def test_refresh_lead_is_the_larger_of_time_and_fraction() -> None:
    """max(lead_time, lead_fraction * lifetime): 300 s for 1800 s at 10 %; 720 s for 3600 s at
    20 %."""
    assert refresh_lead(1800, Refresh(lead_time=300, lead_fraction=0.1)) == 300
    assert refresh_lead(3600, Refresh(lead_time=300, lead_fraction=0.2)) == 720


def test_refresh_lead_never_exceeds_half_a_short_lifetime() -> None:
    """A 2 s token with a 300 s lead refreshes after 1 s, not in a loop."""
    assert refresh_lead(2, Refresh(lead_time=300)) == 1.0


def test_refresh_at_with_jitter_stays_in_bounds() -> None:
    """Jitter only moves the refresh earlier, by at most jitter * lead."""
    rules = Refresh(lead_time=300, lead_fraction=0.2, jitter=0.1)
    rng = random.Random(7)
    moments = [refresh_at(token(1800), rules, rng) - NOW for _ in range(1000)]
    assert min(moments) >= 1800 - 360 * 1.1
    assert max(moments) <= 1800 - 360
    assert max(moments) - min(moments) > 20  # jitter really spreads replicas


def snapshot(tok: Token, margin: float = 0.0) -> Credentials:
    record = SessionRecord("id", "session", "activity", tok, created_at=tok.obtained_at)
    return Credentials.of(record, margin)


def test_schedule_steps_from_startup_to_refresh_to_expiry() -> None:
    """The schedule's state machine over plain values: no session is a login due now
    (``startup``); a fresh token means waiting until its refresh moment; past it, a proactive
    refresh; once the token is unusable, an ``expired`` renewal, announced once; a logout waits
    until woken."""
    rules = Refresh(lead_time=300, lead_fraction=0.0, jitter=0.0, expiry_margin=10)
    schedule = RefreshSchedule(rules, random.Random(1))
    assert schedule.step(NOW, None, logged_out=False).trigger == "startup"
    tok = token(1800)
    current = snapshot(tok, margin=10)
    schedule.installed(tok)
    assert schedule.refresh_at == NOW + 1500
    step = schedule.step(NOW, current, logged_out=False)
    assert (step.trigger, step.wait, step.expired) == (None, 1500, False)
    assert not schedule.due(NOW + 1499, current)
    assert schedule.step(NOW + 1500, current, logged_out=False).trigger == "proactive"
    late = schedule.step(NOW + 1790, current, logged_out=False)
    assert (late.trigger, late.expired) == ("expired", True)
    assert not schedule.step(NOW + 1791, current, logged_out=False).expired, "announced once"
    assert schedule.step(NOW, current, logged_out=True).wait is None


def test_schedule_backs_off_after_a_failure_until_the_next_attempt() -> None:
    """After a failure the loop waits for the backoff (before the token runs out), counts the
    failures in a row, and an installed token forgets them; an operator's retry_now makes the
    next attempt due at once and keeps the count."""
    rules = Refresh(lead_time=300, lead_fraction=0.0, jitter=0.0, retry=Retry(initial=1, max=60))
    schedule = RefreshSchedule(rules, random.Random(3))
    tok = token(1800)
    current = snapshot(tok)
    schedule.installed(tok)
    now = NOW + 1600
    schedule.failed(IdentityUnavailable("down"), "session.refresh_failed", now, current)
    assert schedule.failures == 1
    assert now <= schedule.next_attempt_at <= now + 2
    step = schedule.step(now, current, logged_out=False)
    assert step.trigger is None
    assert step.wait == pytest.approx(schedule.next_attempt_at - now)
    schedule.retry_now()
    assert schedule.step(now, current, logged_out=False).trigger == "proactive"
    assert schedule.failures == 1
    schedule.installed(token(1800))
    assert (schedule.failures, schedule.last_error) == (0, None)


def test_backoff_is_full_jitter_capped_and_honours_retry_after() -> None:
    """Delays lie in [0, min(max, initial * 2^n)]; Retry-After is a floor, itself capped."""
    retry = Retry(initial=1, max=60)
    rng = random.Random(1)
    for attempt in range(12):
        ceiling = min(60, 2**attempt)
        delays = [backoff_delay(attempt, retry, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
    assert backoff_delay(0, retry, rng, retry_after=30) >= 30
    assert backoff_delay(0, retry, rng, retry_after=3600) == 60


def test_backoff_comes_before_a_usable_token_runs_out() -> None:
    """With 6 s of a token left, no retry is later than 3 s away (half of it), however many
    failures came before; never capped below retry.initial; Retry-After still wins."""
    retry = Retry(initial=1, max=60)
    rng = random.Random(2)
    delays = [backoff_delay(8, retry, rng, usable_for=6) for _ in range(200)]
    assert max(delays) <= 3
    assert max(delays) > 2  # still jittered across the capped range
    assert all(d <= 1 for d in (backoff_delay(8, retry, rng, usable_for=0.4) for _ in range(50)))
    assert max(backoff_delay(8, retry, rng, usable_for=-1) for _ in range(50)) > 3  # expired
    assert backoff_delay(8, retry, rng, retry_after=10, usable_for=6) >= 10


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ([], "not a JSON object"),
        ({}, "access_token is missing"),
        ({"access_token": 5}, "access_token is missing"),
        ({"access_token": "a\r\nX-Evil: 1"}, "not allowed in a header"),
        ({"access_token": "a", "token_type": "mac"}, "not supported"),
        ({"access_token": "a", "expires_in": "soon"}, "not a number"),
        ({"access_token": "a", "expires_in": -5}, "positive"),
        ({"access_token": "a", "expires_in": float("nan")}, "positive"),
        ({"access_token": "a", "refresh_token": 7}, "refresh_token"),
    ],
)
def test_malformed_token_responses_are_transient_errors_naming_the_problem(
    body: object, problem: str
) -> None:
    """A malformed answer is IdentityUnavailable(reason=malformed_response), saying what is
    wrong."""
    with pytest.raises(IdentityUnavailable, match=problem) as info:
        parse_token_response(body, NOW)
    assert info.value.reason == "malformed_response"


def test_expiry_sources_in_order() -> None:
    """expires_in wins; else the JWT exp; else the default lifetime. Refresh tokens rotate."""
    assert parse_token_response({"access_token": "a", "expires_in": 60}, NOW).expires_at == NOW + 60
    signed = jwt.encode({"exp": NOW + 900}, "k" * 32, algorithm="HS256")
    assert parse_token_response({"access_token": signed}, NOW).expires_at == NOW + 900
    plain = parse_token_response({"access_token": "opaque"}, NOW)
    assert plain.expires_at == NOW + DEFAULT_LIFETIME
    kept = parse_token_response({"access_token": "a"}, NOW, previous_refresh_token="old")
    assert kept.refresh_token == "old"
    rotated = parse_token_response(
        {"access_token": "a", "refresh_token": "new"}, NOW, previous_refresh_token="old"
    )
    assert rotated.refresh_token == "new"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", False),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", False),
        ("garbage", False),
    ],
)
def test_traceparent_validation(value: str, ok: bool) -> None:
    """W3C trace context: lower-case hex, non-zero ids, version ff invalid."""
    assert valid_traceparent(value) is ok


def test_compiled_rules_drop_connection_listed_and_managed_headers() -> None:
    """Headers named in Connection are dropped along with the fixed hop-by-hop set; the caller's
    copies of managed headers are replaced, never duplicated."""
    rules = HeaderRules.compile(Headers(tenant_id="t1", static={"X-Static": "s"}))
    creds = Credentials(
        token=token(60),
        authorization="Bearer zzz",
        session_id="sid",
        activity_id="aid",
        expires_at=NOW + 60,
    )
    incoming = [
        (b"Host", b"localhost:8080"),
        (b"Connection", b"close, X-Hop"),
        (b"X-Hop", b"1"),
        (b"x-tenant-id", b"spoof"),
        (b"X-Static", b"caller"),
        (b"x-session-id", b"spoof"),
        (b"Upgrade", b"h2c"),
        (b"Accept", b"application/json"),
    ]
    out = upstream_headers(rules, incoming, creds)
    assert out.getall("X-Tenant-ID") == ["t1"]
    assert out.getall("X-Static") == ["s"]
    assert out.getall("X-Session-ID") == ["sid"]
    assert out.getall("Authorization") == ["Bearer zzz"]
    assert out["Accept"] == "application/json"
    for gone in ("Host", "Connection", "X-Hop", "Upgrade"):
        assert gone not in out
