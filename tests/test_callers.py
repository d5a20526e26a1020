"""Who may call the proxy (``listen`` section): loopback Host names or those listed, no browser
requests from unlisted origins, the optional caller header and the Unix-socket listener; every
refusal a JSON answer that is counted, with nothing reaching the upstream."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.app import Sidecar
from sidecar.config.load import load_config
from sidecar.config.models import Config
from sidecar.errors import ConfigError
from tests.conftest import MakeSidecar, admin_url, base_config, merge
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import sample
from tests.processes import SidecarProcess


async def exchange(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one raw request (``head`` without the blank line) and read its answer: status,
    headers (lower-case names) and body."""
    return await converse(*await asyncio.open_connection("127.0.0.1", port), head)


async def converse(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
) -> tuple[int, dict[str, str], bytes]:
    """:func:`exchange` on a connection already open (closed afterwards)."""
    try:
        writer.write(head + b"\r\n")
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


def assert_refusal(
    status: int, headers: dict[str, str], body: bytes, expected: int, code: str
) -> None:
    """A proxy-made refusal: the status, ``X-Sidecar-Error: 1`` and a JSON error with detail."""
    assert status == expected, body
    assert headers["x-sidecar-error"] == "1"
    answer = json.loads(body)
    assert answer["error"] == code
    assert answer["detail"]


async def refused_count(sidecar: Sidecar, http: aiohttp.ClientSession, reason: str) -> float:
    async with http.get(admin_url(sidecar, "/metrics")) as resp:
        text = await resp.text()
    return sample(text, f'sidecar_refused_requests_total{{reason="{reason}"}}') or 0.0


async def assert_refused_once(
    sidecar: Sidecar,
    upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    head: bytes,
    expected: int,
    code: str,
) -> None:
    """``head``, sent to a fresh sidecar, is refused (see :func:`assert_refusal`), nothing reached
    the upstream, and the refusal is counted once under ``code``."""
    answer = await exchange(sidecar.proxy_port, head)
    assert_refusal(*answer, expected, code)
    assert upstream.seen == []
    assert await refused_count(sidecar, http, code) == 1


FOREIGN_HOSTS = [
    b"evil.example",
    b"evil.example:8080",
    b"localhost.evil.example",
    b"127.0.0.1.nip.io",
    b"127.1",
    b"2130706433",
    b"0x7f.0.0.1",
    b"[::2]",
    b"localhost:http",
    b"localhost..",
    b"",
]


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
async def test_a_foreign_host_is_refused_with_421(
    make_sidecar: MakeSidecar, upstream: FakeUpstream, http: aiohttp.ClientSession, host: bytes
) -> None:
    """A Host that is not a loopback name (what a page sends after rebinding its own name to
    127.0.0.1) is 421 with a JSON error; nothing reaches the upstream and sidecar keeps serving."""
    sidecar = await make_sidecar()
    head = b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\n"
    await assert_refused_once(sidecar, upstream, http, head, 421, "host_not_allowed")
    status, _, _ = await exchange(sidecar.proxy_port, b"GET /x HTTP/1.1\r\nHost: localhost\r\n")
    assert status == 200


LOOPBACK_HOSTS = [
    b"localhost",
    b"LocalHost:8080",
    b"localhost.",
    b"localhost.:8080",
    b"localhost:",
    b"127.0.0.1",
    b"127.0.0.1:8080",
    b"127.1.2.3:1",
    b"[::1]",
    b"[::1]:8080",
    b"[0:0:0:0:0:0:0:1]:80",
]


async def test_loopback_hosts_are_forwarded(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """localhost, 127.x.x.x and [::1], in any case, with or without a port or a trailing dot."""
    sidecar = await make_sidecar()
    for host in LOOPBACK_HOSTS:
        status, _, body = await exchange(
            sidecar.proxy_port, b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\n"
        )
        assert status == 200, (host, body)
    assert len(upstream.seen) == len(LOOPBACK_HOSTS)


async def test_allowed_hosts_are_forwarded_and_star_accepts_any(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """``listen.allowed_hosts`` adds names (any port, any case, trailing dot or not); ``*``
    switches the Host check off."""
    listed = await make_sidecar(listen={"allowed_hosts": ["sidecar.team.svc", "10.0.0.7"]})
    for host in (b"sidecar.team.svc", b"Sidecar.Team.Svc.:8080", b"10.0.0.7:8080"):
        status, _, _ = await exchange(
            listed.proxy_port, b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\n"
        )
        assert status == 200, host
    status, _, _ = await exchange(listed.proxy_port, b"GET /x HTTP/1.1\r\nHost: other.svc\r\n")
    assert status == 421
    anything = await make_sidecar(listen={"allowed_hosts": ["*"]})
    status, _, _ = await exchange(anything.proxy_port, b"GET /x HTTP/1.1\r\nHost: other.svc\r\n")
    assert status == 200
    assert len(upstream.seen) == 4


async def test_a_missing_or_repeated_host_is_400(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """RFC 9112 3.2: an HTTP/1.1 request without Host, or with two, is 400; HTTP/1.0 needs none."""
    sidecar = await make_sidecar()
    answer = await exchange(sidecar.proxy_port, b"GET /x HTTP/1.1\r\n")
    assert_refusal(*answer, 400, "host_missing")
    answer = await exchange(
        sidecar.proxy_port, b"GET /x HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n"
    )
    assert_refusal(*answer, 400, "host_invalid")
    assert upstream.seen == []
    status, _, _ = await exchange(sidecar.proxy_port, b"GET /x HTTP/1.0\r\n")
    assert status == 200


BROWSER_HEADERS = [
    b"Origin: https://evil.example",
    b"Origin: null",
    b"Origin: http://localhost:3000",
    b"Sec-Fetch-Site: cross-site",
    b"Sec-Fetch-Site: same-site",
    b"Sec-Fetch-Site: same-origin",
    b"Sec-Fetch-Site: none\r\nOrigin: https://evil.example",
]


@pytest.mark.parametrize("line", BROWSER_HEADERS)
async def test_browser_requests_from_unlisted_origins_are_403(
    make_sidecar: MakeSidecar, upstream: FakeUpstream, http: aiohttp.ClientSession, line: bytes
) -> None:
    """A request that a web page made (Origin, or Sec-Fetch-Site other than none) is 403 unless
    its origin is listed: a page must not spend the service's token (CSRF)."""
    sidecar = await make_sidecar()
    head = b"POST /x HTTP/1.1\r\nHost: localhost\r\n" + line + b"\r\n"
    await assert_refused_once(sidecar, upstream, http, head, 403, "origin_not_allowed")


async def test_listed_origins_and_own_navigation_are_forwarded(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """``Sec-Fetch-Site: none`` (the user typed the address) passes; a listed origin passes, in
    any case and with its default port written or not; a same-origin request without Origin
    passes when ``http://<Host>`` is listed."""
    sidecar = await make_sidecar(
        listen={"allowed_origins": ["https://App.example:443", "http://localhost:8080"]}
    )
    for lines in (
        b"Sec-Fetch-Site: none",
        b"Origin: https://app.example\r\nSec-Fetch-Site: cross-site",
        b"Origin: HTTPS://APP.EXAMPLE",
        b"Sec-Fetch-Site: same-origin",
    ):
        status, _, body = await exchange(
            sidecar.proxy_port, b"GET /x HTTP/1.1\r\nHost: localhost:8080\r\n" + lines + b"\r\n"
        )
        assert status == 200, (lines, body)
    status, _, _ = await exchange(
        sidecar.proxy_port,
        b"GET /x HTTP/1.1\r\nHost: localhost:8080\r\nOrigin: https://app.example:8443\r\n",
    )
    assert status == 403
    assert len(upstream.seen) == 4


def test_bad_entries_name_their_key(tmp_path: Path) -> None:
    """An allowed_hosts entry with a port or a path-like origin is a config error naming its key."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "listen: {allowed_hosts: ['sidecar:8080'], allowed_origins: ['https://a.example/app']}\n"
        "upstream: {url: 'http://127.0.0.1:1'}\nidentity: {kind: oauth2, token_url: "
        "'http://127.0.0.1:1/t', client_id: c, client_secret: s}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    text = str(caught.value)
    assert "listen.allowed_hosts: 'sidecar:8080'" in text
    assert "listen.allowed_origins: 'https://a.example/app'" in text


def caller_config(secret_file: Path, **listen: Any) -> dict[str, Any]:
    """``listen`` overrides requiring the X-Sidecar-Caller header with the value in the file."""
    return {
        "require_header": {"name": "X-Sidecar-Caller", "value_file": str(secret_file)},
        **listen,
    }


async def test_the_caller_header_is_required_and_never_forwarded(
    make_sidecar: MakeSidecar,
    upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    log_output: Any,
) -> None:
    """With ``listen.require_header`` a request without the exact value (missing, wrong, a
    prefix, sent twice) is 403 and reaches nothing; with it, the request is forwarded without
    the header, and the value appears in no answer and no log line."""
    secret = "s3cret-caller-value-0123456789"
    secret_file = tmp_path / "caller"
    secret_file.write_text(secret + "\n")
    sidecar = await make_sidecar(listen=caller_config(secret_file))
    base = b"GET /x HTTP/1.1\r\nHost: localhost\r\n"
    for extra in (
        b"",
        b"X-Sidecar-Caller: wrong\r\n",
        b"X-Sidecar-Caller: " + secret[:-1].encode() + b"\r\n",
        b"X-Sidecar-Caller: " + secret.encode() + b"x\r\n",
        b"X-Sidecar-Caller: " + secret.encode() + b"\r\nX-Sidecar-Caller: other\r\n",
    ):
        answer = await exchange(sidecar.proxy_port, base + extra)
        assert_refusal(*answer, 403, "caller_not_authenticated")
        assert secret.encode() not in answer[2]
    assert upstream.seen == []
    assert await refused_count(sidecar, http, "caller_not_authenticated") == 5
    status, _, body = await exchange(
        sidecar.proxy_port, base + b"x-sidecar-caller: " + secret.encode() + b"\r\n"
    )
    assert status == 200, body
    assert "x-sidecar-caller" not in {k.lower() for k in upstream.seen[-1].headers}
    assert secret not in log_output.getvalue()


async def test_the_caller_value_is_read_again_on_reload(
    make_sidecar: MakeSidecar, idp_url: str, upstream_url: str, idp: FakeIdP, tmp_path: Path
) -> None:
    """SIGHUP (Sidecar.reload) reads the value file again: the old value is refused from then
    on; a reload whose file cannot be read fails naming the key and keeps the value in force."""
    secret_file = tmp_path / "caller"
    secret_file.write_text("first-value")
    sidecar = await make_sidecar(listen=caller_config(secret_file))
    base = b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Sidecar-Caller: "
    status, _, _ = await exchange(sidecar.proxy_port, base + b"first-value\r\n")
    assert status == 200
    secret_file.write_text("second-value")
    data = merge(base_config(idp_url, upstream_url, idp), {"listen": caller_config(secret_file)})
    await sidecar.reload(Config.model_validate(data))
    status, _, _ = await exchange(sidecar.proxy_port, base + b"first-value\r\n")
    assert status == 403
    status, _, _ = await exchange(sidecar.proxy_port, base + b"second-value\r\n")
    assert status == 200
    gone = merge(data, {"listen": caller_config(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"listen\.require_header\.value_file"):
        await sidecar.reload(Config.model_validate(gone))
    status, _, _ = await exchange(sidecar.proxy_port, base + b"second-value\r\n")
    assert status == 200


@pytest.mark.parametrize("content", [None, "", "two words", "caf\u00e9"])
async def test_an_unusable_caller_value_file_is_a_config_error(
    tmp_path: Path, idp_url: str, upstream_url: str, idp: FakeIdP, content: str | None
) -> None:
    """A missing, empty or unsendable value file is refused at load (check-config) and at start,
    naming ``listen.require_header.value_file``, never quoting the content."""
    secret_file = tmp_path / "caller"
    if content is not None:
        secret_file.write_text(content)
    data = merge(base_config(idp_url, upstream_url, idp), {"listen": caller_config(secret_file)})
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"listen\.require_header\.value_file: ") as caught:
        await asyncio.to_thread(load_config, path, env={})  # as check-config, before any loop
    if content:
        assert content not in str(caught.value)
    sidecar = Sidecar(Config.model_validate(data))
    with pytest.raises(ConfigError, match=r"listen\.require_header\.value_file: "):
        await sidecar.start()


async def test_every_refusal_is_counted_by_reason(
    make_sidecar: MakeSidecar, upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """The front's refusals (malformed, too large) and the proxy's (dot segments, CONNECT) are
    JSON errors counted in sidecar_refused_requests_total under their error code, like the
    callers' refusals; sidecar keeps serving."""
    sidecar = await make_sidecar()
    answer = await exchange(
        sidecar.proxy_port, b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-A : 1\r\n"
    )
    assert_refusal(*answer, 400, "bad_request")
    answer = await exchange(sidecar.proxy_port, b"GET /a/../b HTTP/1.1\r\nHost: localhost\r\n")
    assert_refusal(*answer, 400, "path_traversal_refused")
    assert await refused_count(sidecar, http, "bad_request") == 1
    assert await refused_count(sidecar, http, "path_traversal_refused") == 1
    assert upstream.seen == []
    status, _, _ = await exchange(sidecar.proxy_port, b"GET /x HTTP/1.1\r\nHost: localhost\r\n")
    assert status == 200


async def test_workers_refusals_reach_the_supervisors_metrics(
    idp_url: str, upstream_url: str, idp: FakeIdP, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Under ``run --workers 2`` the refusals counted in each worker are summed on the one admin
    port's /metrics."""
    proc = SidecarProcess(base_config(idp_url, upstream_url, idp), tmp_path, "workers")
    proc.start(["--workers", "2"])
    try:
        await proc.wait_ready(http, within=30)
        for _ in range(6):  # fresh connections: both workers get some
            answer = await exchange(
                proc.proxy_port, b"GET /x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n"
            )
            assert answer[0] == 421

        async def counted() -> float | None:
            async with http.get(proc.admin("/metrics")) as resp:
                text = await resp.text()
            return sample(text, 'sidecar_refused_requests_total{reason="host_not_allowed"}')

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while await counted() != 6:
            assert loop.time() < deadline, await counted()
            await asyncio.sleep(0.2)
    finally:
        assert proc.stop() == 0


async def unix_exchange(path: Path, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """``exchange`` over a Unix socket."""
    return await converse(*await asyncio.open_unix_connection(str(path)), head)


async def test_the_unix_socket_serves_beside_tcp_with_the_same_checks(
    make_sidecar: MakeSidecar, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """``listen.unix_socket``: a socket file of mode 0660 that forwards like the TCP port; any
    Host is accepted there (no browser reaches it; clients name it in many ways), the Origin and
    caller-header checks apply; the file is removed at stop."""
    path = tmp_path / "sidecar.sock"
    secret_file = tmp_path / "caller"
    secret_file.write_text("let-me-in")
    sidecar = await make_sidecar(listen=caller_config(secret_file, unix_socket=str(path)))
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    proof = b"X-Sidecar-Caller: let-me-in\r\n"
    for host in (b"localhost", b"%2Frun%2Fsidecar.sock", b"unix"):
        status, _, body = await unix_exchange(
            path, b"GET /over-unix HTTP/1.1\r\nHost: " + host + b"\r\n" + proof
        )
        assert status == 200, body
    answer = await unix_exchange(path, b"GET /x HTTP/1.1\r\nHost: localhost\r\n")
    assert_refusal(*answer, 403, "caller_not_authenticated")
    answer = await unix_exchange(
        path, b"GET /x HTTP/1.1\r\nHost: localhost\r\nOrigin: https://evil.example\r\n" + proof
    )
    assert_refusal(*answer, 403, "origin_not_allowed")
    answer = await unix_exchange(path, b"GET /x HTTP/1.1\r\n" + proof)
    assert_refusal(*answer, 400, "host_missing")
    status, _, _ = await exchange(sidecar.proxy_port, b"GET /x HTTP/1.1\r\nHost: l\r\n" + proof)
    assert status == 421  # the TCP port keeps its Host check
    assert [s.path_qs for s in upstream.seen] == ["/over-unix"] * 3
    await sidecar.stop()
    assert not path.exists()


async def test_the_unix_socket_alone(
    make_sidecar: MakeSidecar, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """``listen.port: null`` with a unix_socket: no TCP listener, the socket serves; a stale
    socket file left by an earlier run is replaced."""
    path = tmp_path / "sidecar.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens behind it
    sidecar = await make_sidecar(listen={"port": None, "unix_socket": str(path)})
    assert sidecar.proxy_port == 0
    status, _, body = await unix_exchange(path, b"GET /only-unix HTTP/1.1\r\nHost: localhost\r\n")
    assert status == 200, body
    assert [s.path_qs for s in upstream.seen] == ["/only-unix"]


async def test_what_is_not_a_stale_socket_is_left_alone(
    make_sidecar: MakeSidecar, tmp_path: Path
) -> None:
    """A regular file, or a socket another process listens on, at the unix_socket path is a
    start error naming ``listen.unix_socket``; the file and the listener are untouched."""
    taken = tmp_path / "file.sock"
    taken.write_text("mine")
    with pytest.raises(ConfigError, match=r"listen\.unix_socket: .* not a socket"):
        await make_sidecar(listen={"unix_socket": str(taken)})
    assert taken.read_text() == "mine"
    live = tmp_path / "live.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(live))
    other.listen(1)
    try:
        with pytest.raises(ConfigError, match=r"listen\.unix_socket: another process"):
            await make_sidecar(listen={"unix_socket": str(live)})
        assert stat.S_ISSOCK(os.lstat(live).st_mode)
    finally:
        other.close()


def test_port_null_needs_a_unix_socket(tmp_path: Path) -> None:
    """Without a TCP port and without a Unix socket the proxy would listen nowhere."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "listen: {port: null}\nupstream: {url: 'http://127.0.0.1:1'}\nidentity: {kind: oauth2, "
        "token_url: 'http://127.0.0.1:1/t', client_id: c, client_secret: s}\n"
    )
    with pytest.raises(ConfigError, match=r"listen\.port: null needs unix_socket"):
        load_config(path, env={})


async def test_workers_share_the_unix_socket(
    idp_url: str, upstream_url: str, idp: FakeIdP, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Under ``run --workers 2`` the supervisor binds the Unix socket once and every worker
    accepts on it; the file is removed when the supervisor stops."""
    path = tmp_path / "w.sock"
    config = merge(base_config(idp_url, upstream_url, idp), {"listen": {"unix_socket": str(path)}})
    proc = SidecarProcess(config, tmp_path, "unix-workers")
    proc.start(["--workers", "2"])
    try:
        await proc.wait_ready(http, within=30)
        for _ in range(6):
            status, _, body = await unix_exchange(
                path, b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            )
            assert status == 200, body
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    finally:
        assert proc.stop() == 0
    assert not path.exists()
