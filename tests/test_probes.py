"""The admin port's probes as the Kubernetes Component uses them: the startup probe cannot fail
while the identity provider is down, and readiness with ``outage=keep-serving`` keeps a replica
in service when its token expires during a provider outage (a replica without any token yet is
not ready)."""

from __future__ import annotations

import aiohttp

from sidecar.app import Sidecar
from sidecar.session.manager import State
from tests.conftest import MakeSidecar, admin_url
from tests.fakes.clock import FakeClock
from tests.fakes.idp import FakeIdP
from tests.helpers import eventually

KEEP_SERVING = "/readyz?outage=keep-serving"


async def status(http: aiohttp.ClientSession, sidecar: Sidecar, path: str) -> int:
    async with http.get(admin_url(sidecar, path)) as resp:
        await resp.read()
        return resp.status


async def test_probes_while_the_provider_is_down_from_the_start(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP
) -> None:
    """A sidecar started while the provider is down: /healthz (the startup and liveness probe)
    is 200, so the kubelet does not restart it in a loop; it is not ready either way (it never
    had a token to serve with); once the provider answers, both readiness forms are 200."""
    idp.down = "503"
    sidecar = await make_sidecar()
    await eventually(lambda: len(idp.token_calls) >= 2, what="failed logins")
    assert await status(http, sidecar, "/healthz") == 200
    assert await status(http, sidecar, "/readyz") == 503
    assert await status(http, sidecar, KEEP_SERVING) == 503
    idp.down = None
    await eventually(lambda: sidecar.session.state() is State.VALID, what="login")
    assert await status(http, sidecar, "/readyz") == 200
    assert await status(http, sidecar, KEEP_SERVING) == 200


async def test_keep_serving_readiness_outlasts_an_expired_token(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP, clock: FakeClock
) -> None:
    """The provider goes down and the token expires: plain /readyz turns 503 (the contract),
    /readyz?outage=keep-serving stays 200 with state EXPIRED; a logout (a deliberate act) and
    an unknown outage value are not ready / a 400."""
    idp.lifetime = 60
    sidecar = await make_sidecar(clock=clock, refresh={"lead_time": 10, "jitter": 0})
    await eventually(lambda: sidecar.session.state() is State.VALID, what="login")
    idp.down = "503"
    await clock.advance(61)
    await eventually(lambda: sidecar.session.state() is State.EXPIRED, what="expiry")
    assert await status(http, sidecar, "/readyz") == 503
    async with http.get(admin_url(sidecar, KEEP_SERVING)) as resp:
        assert resp.status == 200
        assert await resp.json() == {"ready": True, "state": "EXPIRED"}
    assert await status(http, sidecar, "/readyz?outage=ignore") == 400
    await sidecar.session.logout()
    assert await status(http, sidecar, KEEP_SERVING) == 503
