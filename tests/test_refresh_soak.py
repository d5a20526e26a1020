"""Proactive refresh under steady traffic across many token lifetimes.

Real clock, 2-second tokens.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp

from tests.conftest import MakeSidecar, proxy_url
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import eventually

LIFETIME = 2.0
DURATION = 20.0
WORKERS = 8


async def test_steady_traffic_over_ten_lifetimes_sees_no_401_and_no_503(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP, upstream: FakeUpstream
) -> None:
    """8 concurrent callers for 20 s with 2 s tokens: every request succeeds, the upstream never
    saw an expired token, and the provider saw about one token call per lifetime."""
    idp.lifetime = LIFETIME
    sidecar = await make_sidecar(refresh={"lead_time": 0.4, "lead_fraction": 0.2, "jitter": 0.1})
    await eventually(lambda: sidecar.session.usable() is not None)
    statuses: collections.Counter[int] = collections.Counter()
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + DURATION

    async def caller() -> None:
        while loop.time() < stop_at:
            async with http.get(proxy_url(sidecar, "/x")) as resp:
                await resp.read()
                statuses[resp.status] += 1
            await asyncio.sleep(0.005)

    await asyncio.gather(*(caller() for _ in range(WORKERS)))
    total = sum(statuses.values())
    assert statuses[200] == total, statuses
    assert upstream.rejected == 0
    assert total > 1000  # the traffic really was steady
    calls = len(idp.token_calls)
    lifetimes = DURATION / LIFETIME
    # refresh at ~1.6 s of a 2 s life: between 1 and 1.4 token calls per lifetime
    assert lifetimes <= calls <= lifetimes * 1.4 + 2, calls
    assert idp.grants()[0] == "client_credentials"
    assert set(idp.grants()[1:]) == {"refresh_token"}
