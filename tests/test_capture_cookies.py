"""upstream.capture_cookies: an API that rotates its session cookie on ordinary calls, through a
real sidecar to the fake upstream on loopback (its ``/setcookie/<name>/<value>[/<max-age>]``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from sidecar.app import Sidecar
from sidecar.config.models import Config
from tests.conftest import MakeSidecar, base_config, merge, proxy_url
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream, header_values
from tests.helpers import eventually
from tests.processes import SidecarProcess

CAPTURE: dict[str, Any] = {"send_cookies": True, "capture_cookies": True}


async def cookie_sent(sidecar: Sidecar, http: aiohttp.ClientSession, up: FakeUpstream) -> list[str]:
    """The Cookie header the upstream receives on a plain request through the proxy."""
    async with http.get(proxy_url(sidecar, "/echo")) as resp:
        assert resp.status == 200
    return header_values(up.seen[-1], "Cookie")


async def test_cookies_set_by_the_upstream_are_sent_back_rotated_and_deleted(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    """A Set-Cookie from the upstream goes into the session's jar and comes back on the next
    requests; a new value replaces it; Max-Age=0 deletes it (RFC 6265). (The test's client keeps
    no cookie for an IP-address host: what the upstream receives is the proxy's doing.)"""
    sidecar = await make_sidecar(upstream=CAPTURE)
    await eventually(lambda: sidecar.session.usable() is not None, what="login")
    assert await cookie_sent(sidecar, http, upstream) == []
    async with http.get(proxy_url(sidecar, "/setcookie/sid/v1")) as resp:
        assert resp.status == 200
    assert await cookie_sent(sidecar, http, upstream) == ["sid=v1"]
    async with http.get(proxy_url(sidecar, "/setcookie/sid/v2")) as resp:
        assert resp.status == 200
    assert await cookie_sent(sidecar, http, upstream) == ["sid=v2"]
    async with http.get(proxy_url(sidecar, "/setcookie/sid/gone/0")) as resp:
        assert resp.status == 200
    assert await cookie_sent(sidecar, http, upstream) == []


async def test_captured_cookies_are_persisted_with_the_session(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The jar is saved with the session (file store): a sidecar started after a restart sends
    the cookie the upstream set before it."""
    session = {"store": "file", "path": str(tmp_path / "session.json")}
    first = await make_sidecar(upstream=CAPTURE, session=session)
    await eventually(lambda: first.session.usable() is not None, what="login")
    async with http.get(proxy_url(first, "/setcookie/sid/kept")) as resp:
        assert resp.status == 200
    await first.session.flush_saves()
    await first.stop()
    second = await make_sidecar(upstream=CAPTURE, session=session)
    await eventually(lambda: second.session.usable() is not None, what="restored")
    assert await cookie_sent(second, http, upstream) == ["sid=kept"]


async def test_without_the_switch_upstream_cookies_are_not_kept(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    """capture_cookies off (the default): the Set-Cookie goes to the caller only and the session's
    jar stays empty."""
    sidecar = await make_sidecar(upstream={"send_cookies": True})
    await eventually(lambda: sidecar.session.usable() is not None, what="login")
    async with http.get(proxy_url(sidecar, "/setcookie/sid/v1")) as resp:
        assert resp.status == 200
        assert "sid=v1" in resp.headers.get("Set-Cookie", "")
    assert await cookie_sent(sidecar, http, upstream) == []
    record = sidecar.session.record
    assert record is not None
    assert record.token.cookies == ()


def test_capture_cookies_needs_send_cookies() -> None:
    """capture_cookies without send_cookies is refused, naming both keys."""
    with pytest.raises(ValidationError) as exc:
        Config.model_validate(
            {
                "upstream": {"url": "https://api.example", "capture_cookies": True},
                "identity": {
                    "kind": "oauth2",
                    "token_url": "https://idp.example/token",
                    "client_id": "c",
                    "client_secret": "s",
                },
            }
        )
    assert "upstream.capture_cookies: needs upstream.send_cookies: true" in str(exc.value)


async def test_workers_hand_captured_cookies_to_the_one_session(
    idp_url: str,
    upstream_url: str,
    idp: FakeIdP,
    upstream: FakeUpstream,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Under ``--workers 2`` the cookie a worker captures goes to the supervisor's jar and comes
    back to every worker: requests on fresh connections (spread over both) all carry it."""
    config = merge(base_config(idp_url, upstream_url, idp), {"upstream": CAPTURE})
    proc = SidecarProcess(config, tmp_path, "workers")
    proc.start(["--workers", "2"])
    try:
        await proc.wait_ready(http)
        async with http.get(proc.url("/setcookie/sid/shared")) as resp:
            assert resp.status == 200

        async def fresh() -> list[str]:
            async with aiohttp.ClientSession() as one, one.get(proc.url("/echo")) as resp:
                assert resp.status == 200
            return header_values(upstream.seen[-1], "Cookie")

        async def everywhere() -> bool:
            return all([await fresh() == ["sid=shared"] for _ in range(10)])

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await everywhere():
            assert loop.time() < deadline, proc.log_path.read_text()[-2000:]
            await asyncio.sleep(0.1)
    finally:
        assert proc.stop() == 0
