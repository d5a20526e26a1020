"""What /metrics of a running sidecar tells an operator beyond the contract's session and request
metrics: the build, the process and the runtime."""

from __future__ import annotations

import platform
from importlib.metadata import version

import aiohttp

from sidecar.session import State
from tests.conftest import MakeSidecar, admin_url
from tests.helpers import eventually, sample


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


async def test_build_info_names_the_installed_version_and_python(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """sidecar_build_info is 1, labelled with the version the package is installed as (the one
    version source) and the running Python's version."""
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.state() is State.VALID, what="first login")
    text = await scrape(http, admin_url(sidecar, "/metrics"))
    name = (
        f'sidecar_build_info{{python="{platform.python_version()}",version="{version("sidecar")}"}}'
    )
    assert sample(text, name) == 1.0, text
