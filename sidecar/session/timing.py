"""Pure scheduling maths: when to refresh a token, and how long to back off after a failure.

No clock is read here; callers pass ``now`` and a random source, so every rule is testable exactly.
"""

from __future__ import annotations

import random

from sidecar.config.models import Refresh, Retry
from sidecar.tokens import Token

#: the refresh never happens earlier than this fraction of the lifetime after issue, so that a
#: lead time longer than a short token's whole life cannot turn into a refresh loop
MIN_ELAPSED_FRACTION = 0.5


def refresh_lead(lifetime: float, rules: Refresh) -> float:
    """Seconds before expiry at which to refresh, before jitter.

    ``max(lead_time, lead_fraction * lifetime)``, capped at half the lifetime: a 2-second demo token
    with the default 300-second lead is refreshed after 1 second, not immediately and forever.
    """
    lead = max(rules.lead_time, rules.lead_fraction * lifetime)
    return min(lead, lifetime * (1 - MIN_ELAPSED_FRACTION))


def refresh_at(token: Token, rules: Refresh, rng: random.Random) -> float:
    """The wall-clock moment to start refreshing ``token``.

    Jitter moves the moment earlier by up to ``jitter * lead``, so replicas that obtained tokens
    together do not all call the identity provider in the same instant.
    """
    lead = refresh_lead(token.lifetime, rules)
    lead += rng.uniform(0.0, rules.jitter * lead)
    return max(token.obtained_at, token.expires_at - lead)


def login_instead(token: Token, usable_until: float, now: float, rules: Refresh) -> bool:
    """After a failed refresh of ``token`` (usable until ``usable_until``): True when the session
    should log in with its credentials now rather than retry the refresh.

    A refresh endpoint that is down (5xx, unreachable) is retried through the first half of the
    refresh lead; in the second half (or once the token is no longer usable) a full login comes
    next, so that the session is renewed before the token runs out whenever a login can be made.
    """
    return usable_until - now <= refresh_lead(token.lifetime, rules) / 2


def backoff_delay(
    attempt: int,
    retry: Retry,
    rng: random.Random,
    retry_after: float | None = None,
    usable_for: float | None = None,
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, initial * 2**attempt)].

    While the current token is still usable for ``usable_for`` seconds, the delay is at most half
    of that (but never capped below ``retry.initial``), so the next try comes before the token
    runs out and a short outage costs no request. A provider's ``Retry-After`` is honoured as a
    floor (capped at ``retry.max``), since it says when asking again can succeed.
    """
    ceiling = min(retry.max, retry.initial * (2 ** min(attempt, 30)))
    delay = rng.uniform(0.0, ceiling)
    if usable_for is not None and usable_for > 0:
        delay = min(delay, max(retry.initial, usable_for / 2))
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, retry.max))
    return delay
