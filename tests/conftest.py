"""Shared fixtures: servers on loopback port 0 that are closed after each test, a clean environment,
and a factory that starts a real sidecar against our test identity provider and upstream.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from blockbuster import BlockBuster, blockbuster_ctx

from sidecar.app import Sidecar
from sidecar.clock import Clock, SystemClock
from sidecar.compiled import PURE_PYTHON, stale, wanted_pure
from sidecar.config.models import Config
from sidecar.logs import setup_logging
from sidecar.tls import RECHECK_EVERY
from tests.fakes.clock import FakeClock
from tests.fakes.finhub import FinHub
from tests.fakes.idp import FakeIdP
from tests.fakes.oidc import OIDCProvider
from tests.fakes.upstream import FakeUpstream
from tests.redis_server import RedisServer

Serve = Callable[..., Awaitable[str]]


#: the event loop the tests run on: ``TEST_LOOP=uvloop`` runs the in-process sidecars (and
#: passes ``--loop uvloop`` to the sidecar processes tests start); ``TEST_LOOP=asyncio`` the
#: standard loop everywhere. Unset: asyncio in process, and the processes on their default
#: (uvloop where installed).
TEST_LOOP = os.environ.get("TEST_LOOP", "")
if TEST_LOOP not in ("", "asyncio", "uvloop"):
    raise pytest.UsageError(f"TEST_LOOP={TEST_LOOP!r}: 'asyncio' or 'uvloop'")

if TEST_LOOP == "uvloop":
    import uvloop

    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        """Every async test and fixture on uvloop (pytest-asyncio's hook)."""
        return {"uvloop": uvloop.new_event_loop}


#: variables that would route the tests' loopback traffic elsewhere (sidecar honours them)
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY")


def _scrubbed(name: str) -> bool:
    """SIDECAR_PURE_PYTHON (which build of the data path runs) is kept for the tests' processes."""
    return (name.startswith("SIDECAR_") and name != PURE_PYTHON) or name.upper() in PROXY_VARIABLES


if stale() and not wanted_pure():
    # a compiled module is imported in place of its source: the tests would test old code
    raise pytest.UsageError(
        f"compiled modules older than their sources: {', '.join(stale())}; build them again "
        f"(make venv), or run the sources with {PURE_PYTHON}=1"
    )


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """No SIDECAR_* or proxy variable of the developer's shell leaks into a test."""
    saved = {k: v for k, v in os.environ.items() if _scrubbed(k)}
    for key in saved:
        del os.environ[key]
    yield
    for key in [k for k in os.environ if _scrubbed(k)]:
        del os.environ[key]
    os.environ.update(saved)


#: where a blocking call in the event loop is allowed, by file and function, each with its reason
BLOCKING_ALLOWED = [
    # /metrics: prometheus_client's process collector reads /proc/self (stat, status, limits, fd);
    # the kernel makes those files from memory, no read of them waits on a disk
    ("prometheus_client/process_collector.py", "collect"),
    # redis-py looks its own version up in the package metadata at its first connection, once
    # per process (the answer is cached)
    ("redis/utils.py", "get_lib_version"),
    # the tests' own setup and inspection, before a sidecar serves or between its requests:
    # a key or config written, a stored file or sealed record looked at
    ("tests/fakes/oidc.py", "write_key"),
    ("tests/test_finhub.py", "load_finhub"),
    ("tests/test_rekey.py", "opens_with"),
    ("tests/test_store_file.py", "stored"),
]


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """A blocking call (file, socket, sleep, lock) that sidecar's code or the tests' fake servers
    make in a running event loop fails the test: it would stall every connection the loop serves.
    The tests' own setup (writing a config or a key before anything serves) is not scanned."""
    with blockbuster_ctx(["sidecar", "tests.fakes"]) as detector:
        for function in detector.functions.values():
            for filename, name in BLOCKING_ALLOWED:
                function.can_block_in(filename, name)
        yield detector


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an aiohttp app on 127.0.0.1 (port 0 unless given, TLS with ``ssl_context``);
    returns its base URL."""
    runners: list[web.AppRunner] = []

    async def _serve(
        app: web.Application, port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()
        scheme = "https" if ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"

    yield _serve
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Everything logged during the test, rendered exactly as production renders it."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("debug", stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, stopped after the test."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def idp() -> FakeIdP:
    return FakeIdP()


@pytest.fixture
def clock(idp: FakeIdP) -> FakeClock:
    """One fake clock shared by the sidecar and the identity provider."""
    fake = FakeClock()
    idp.clock = fake
    return fake


@pytest.fixture
def upstream(idp: FakeIdP) -> FakeUpstream:
    return FakeUpstream(idp=idp)


@pytest.fixture
async def idp_url(serve: Serve, idp: FakeIdP) -> str:
    url = await serve(idp.app())
    if isinstance(idp, OIDCProvider):
        idp.issuer = url  # its discovery document and tokens name where it is served
    return url


@pytest.fixture
async def upstream_url(serve: Serve, upstream: FakeUpstream) -> str:
    return await serve(upstream.app())


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base``."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def base_config(idp_url: str, upstream_url: str, idp: FakeIdP) -> dict[str, Any]:
    """A sidecar config pointing at the test servers, listening on free ports."""
    return {
        "listen": {"port": 0, "drain_timeout": 1},
        "admin": {"port": 0},
        "upstream": {"url": upstream_url, "timeout": {"connect": 2, "total": 5}},
        "identity": {
            "kind": "oauth2",
            "token_url": f"{idp_url}/token",
            "client_id": idp.client_id,
            "client_secret": idp.client_secret,
            "revocation_url": f"{idp_url}/revoke",
            "timeout": 3,
        },
        "refresh": {"retry": {"initial": 0.05, "max": 0.5}},
        "headers": {"tenant_id": "1234567"},
        "session": {"store": "memory"},
    }


MakeSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def make_sidecar(idp_url: str, upstream_url: str, idp: FakeIdP) -> AsyncIterator[MakeSidecar]:
    """Start real sidecars (proxy and admin on free loopback ports); stopped after the test."""
    started: list[Sidecar] = []

    async def _make(
        clock: Clock | None = None, tls_recheck_every: float = RECHECK_EVERY, **overrides: Any
    ) -> Sidecar:
        config = Config.model_validate(merge(base_config(idp_url, upstream_url, idp), overrides))
        sidecar = Sidecar(config, clock=clock or SystemClock(), tls_recheck_every=tls_recheck_every)
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield _make
    for sidecar in reversed(started):
        await sidecar.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client, as a service calling the sidecar would be."""
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        yield client


def proxy_url(sidecar: Sidecar, path: str = "/") -> str:
    return f"http://127.0.0.1:{sidecar.proxy_port}{path}"


def admin_url(sidecar: Sidecar, path: str = "/") -> str:
    return f"http://127.0.0.1:{sidecar.admin_port}{path}"


@pytest.fixture
def finhub() -> FinHub:
    """The FinHub-shaped fake on its own fake clock (``finhub.clock``), production lifetime."""
    return FinHub(clock=FakeClock())


@pytest.fixture
async def finhub_url(serve: Serve, finhub: FinHub) -> str:
    return await serve(finhub.app())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A private CA that no system trust store knows, for TLS test servers."""
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    """The private CA's certificate as a PEM file (for ``tls.ca_file``)."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)
