"""What /metrics of a running sidecar tells an operator beyond the contract's session and request
metrics: the build, the process and the runtime."""

from __future__ import annotations

import asyncio
import platform
import socket
import struct
import sys
from importlib.metadata import version

import aiohttp

from sidecar.session.manager import State
from tests.conftest import MakeSidecar, admin_url, proxy_url
from tests.fakes.idp import FakeIdP
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


async def test_process_and_python_collectors_are_served(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """/metrics carries the standard process_* (CPU, memory, file descriptors) and python_*
    (interpreter, garbage collector) families every Python exporter has."""
    sidecar = await make_sidecar()
    text = await scrape(http, admin_url(sidecar, "/metrics"))
    assert (sample(text, "process_cpu_seconds_total") or 0) > 0, text
    assert (sample(text, "process_resident_memory_bytes") or 0) > 0, text
    assert (sample(text, "process_open_fds") or 0) > 0, text
    assert f'python_info{{implementation="CPython",major="{sys.version_info.major}"' in text
    assert 'python_gc_objects_collected_total{generation="0"}' in text


async def test_identity_calls_are_timed_by_endpoint_and_outcome(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP
) -> None:
    """Each call to the identity provider lands in sidecar_identity_request_duration_seconds
    under its endpoint and outcome: a 503 is a server_error, a refused client a rejected call, a
    token a success."""
    idp.failures = ["503", "invalid_client"]
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.state() is State.VALID, what="login after failures")
    text = await scrape(http, admin_url(sidecar, "/metrics"))
    name = "sidecar_identity_request_duration_seconds_count"
    for outcome in ("server_error", "rejected", "success"):
        labels = f'{{endpoint="token",outcome="{outcome}"}}'
        assert sample(text, name + labels) == 1.0, (outcome, text)
    bucket = 'sidecar_identity_request_duration_seconds_bucket{endpoint="token",le="+Inf",'
    assert bucket + 'outcome="success"} 1.0' in text


async def test_consecutive_refresh_failures_counts_up_and_resets(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP
) -> None:
    """sidecar_consecutive_refresh_failures counts the failed renewals in a row while the
    provider is down, and is 0 again after the next success."""
    idp.down = "503"
    sidecar = await make_sidecar()
    await eventually(lambda: len(idp.token_calls) >= 3, what="three failed logins")
    text = await scrape(http, admin_url(sidecar, "/metrics"))
    assert (sample(text, "sidecar_consecutive_refresh_failures") or 0) >= 2, text
    idp.down = None
    await eventually(lambda: sidecar.session.state() is State.VALID, what="recovery")
    text = await scrape(http, admin_url(sidecar, "/metrics"))
    assert sample(text, "sidecar_consecutive_refresh_failures") == 0.0, text


async def test_requests_say_whether_sidecar_or_the_upstream_made_the_status(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """An upstream's 502 is counted with source="upstream"; the 502 sidecar answers itself when
    the upstream drops the connection is counted with source="sidecar"."""
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.state() is State.VALID, what="first login")
    async with http.get(proxy_url(sidecar, "/status/502")) as resp:
        assert resp.status == 502
        assert "X-Sidecar-Error" not in resp.headers
    async with http.get(proxy_url(sidecar, "/drop")) as resp:
        assert resp.status == 502
        assert resp.headers["X-Sidecar-Error"] == "1"
    text = await scrape(http, admin_url(sidecar, "/metrics"))
    name = 'sidecar_upstream_requests_total{code="502",method="GET",source="%s"}'
    assert sample(text, name % "upstream") == 1.0, text
    assert sample(text, name % "sidecar") == 1.0, text


async def test_a_caller_that_leaves_before_the_answer_is_499_not_500(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """A caller that drops its connection (a reset) while the upstream is still thinking is
    counted as code="499" (nginx's "client closed request"), not as a 500 sidecar failed with.
    (A caller that only half-closes still gets its answer: see test_front_protocol.)"""
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.state() is State.VALID, what="first login")
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    writer.write(b"GET /slow/3 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    await eventually(lambda: sidecar.metrics.in_flight_now() == 1, what="request in flight")
    # linger 0: the close resets the connection, as a killed client's kernel does
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: sidecar.metrics.in_flight_now() == 0, what="request given up")
    text = await scrape(http, admin_url(sidecar, "/metrics"))
    name = 'sidecar_upstream_requests_total{code="%s",method="GET",source="sidecar"}'
    assert sample(text, name % "499") == 1.0, text
    assert 'code="500"' not in text
    del reader
