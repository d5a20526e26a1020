"""Small helpers for tests that wait on real I/O."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import random
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from sidecar.app import Sidecar
from sidecar.config.json_login import JsonLoginSection
from sidecar.config.models import Config
from sidecar.config.oauth2 import OAuth2Section
from sidecar.proxy.headers import HeaderRules
from sidecar.tokens import Credentials
from tests.fakes.clock import FakeClock


async def eventually(predicate: Callable[[], bool], within: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` (real time) until it holds; fail with ``what`` after ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what or predicate}")
        await asyncio.sleep(0.01)


def python_output(script: str, env: dict[str, str]) -> str:
    """What a fresh interpreter prints running ``script`` from the repository's root with ``env``
    (the interpreter of the tests; an error fails the test)."""
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env=env,
    ).stdout


def sample(metric_text: str, name: str) -> float | None:
    """The value of ``name`` (with labels, as ``x{a="1",b="2"}``) in Prometheus text, as PromQL
    selects it: the sum of every series of that name carrying at least those labels (so a label
    added later, such as ``source``, does not break a test that does not ask for it); None when
    no series matches."""
    wanted_name, _, rest = name.partition("{")
    wanted = set(_labels(rest.rstrip("}")))
    total: float | None = None
    for line in metric_text.splitlines():
        if line.startswith("#") or not line.startswith(wanted_name):
            continue
        series, _, value = line.rpartition(" ")
        series_name, _, labels = series.partition("{")
        if series_name == wanted_name and wanted <= set(_labels(labels.rstrip("}"))):
            total = (total or 0.0) + float(value)
    return total


def _labels(text: str) -> list[str]:
    """``a="1",b="2"`` as ``['a="1"', 'b="2"']`` (label values here hold no commas)."""
    return [part for part in text.split(",") if part]


async def advance(clock: FakeClock, seconds: float) -> None:
    """Move the fake clock once the session's refresh loop is asleep on it: a jump made while
    the loop is between sleeps would leave it waiting on a deadline nobody moves past."""
    await eventually(lambda: clock.sleepers > 0, what="the refresh loop asleep on the clock")
    await clock.advance(seconds)


def events(stream: io.StringIO) -> list[dict[str, object]]:
    """The JSON log lines written to ``stream`` (the ``log_output`` fixture)."""
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


def new_key(path: Path) -> Path:
    """Write a fresh session encryption key (32 random bytes, base64) to ``path``."""
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


async def exchange(port: int, raw: bytes, *, half_close: bool = False, within: float = 3) -> bytes:
    """Send raw bytes to the proxy (then half-close when asked) and read until it closes or
    ``within`` seconds pass."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = b""
    try:
        writer.write(raw)
        await writer.drain()
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                answer += chunk
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return answer


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response with a Content-Length: its head and its body (each read within 5 s)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


def upstream_headers(
    rules: HeaderRules, raw: list[tuple[bytes, bytes]], creds: Credentials
) -> CIMultiDict[str]:
    """The header fields ``rules.head`` sends upstream for a GET whose caller sent ``raw`` (the
    proxy's own Host line is left out, so every field listed came through the rules)."""
    head, _request_id, _traceparent = rules.head(b"GET / HTTP/1.1\r\n", raw, creds, b"")
    fields = [line.decode("latin-1").split(": ", 1) for line in head.split(b"\r\n")[1:] if line]
    return CIMultiDict((name, value) for name, value in fields)


async def logged_in(sidecar: Sidecar) -> None:
    """Wait for a token, and for the login task to be over (a force_refresh would join it)."""
    await eventually(
        lambda: (
            sidecar.session.usable() is not None
            and not sidecar.session.summary()["refresh_in_progress"]
        ),
        what="a token",
    )


def oauth2_section(config: Config) -> OAuth2Section:
    """The config's identity section, which the test wrote as ``kind: oauth2``."""
    identity = config.identity
    assert isinstance(identity, OAuth2Section), f"identity.kind is {identity.kind}"
    return identity


def json_login_section(config: Config) -> JsonLoginSection:
    """The config's identity section, which the test wrote as ``kind: json_login``."""
    identity = config.identity
    assert isinstance(identity, JsonLoginSection), f"identity.kind is {identity.kind}"
    return identity


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections (and to ``bind(port 0)``)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now, for a server a test starts later (a child process
    that binds it itself). Taken below the kernel's ephemeral range: a port from ``bind(port
    0)`` is one the kernel may give the next outgoing connection's local end before the child
    binds it ("address already in use"). Never the same port twice in one test run."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    while True:
        port = rng.randrange(max(1024, low - 20000), low)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def count_tls_contexts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """From now on, every ``ssl.create_default_context`` call is listed (its arguments) in the
    list returned: how many CA bundles the code under test parsed."""
    built: list[tuple[Any, ...]] = []
    create = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(args)
        return create(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)
    return built
