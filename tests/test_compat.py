"""What real clients see: each request sent once straight to a real nginx and once through
sidecar, the answers compared. The table lists every case with the difference sidecar makes on
purpose (None: the answers must be the same); docs/http-semantics.md says why each one differs.
"""

from __future__ import annotations

import asyncio
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import h11
import pytest

from sidecar.app import Sidecar
from tests.conftest import MakeSidecar, proxy_url
from tests.fakes.nginx import HELLO, Nginx
from tests.helpers import eventually

#: the response headers compared (the rest are per connection or per moment: Date, Connection;
#: framing is compared through the body: sidecar sends a small answer that has fully arrived
#: with a Content-Length, whatever framing the upstream used)
COMPARED = (
    "content-type",
    "content-encoding",
    "content-range",
    "accept-ranges",
    "etag",
    "last-modified",
    "location",
    "vary",
    "server",
)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Case:
    """One request by one client; ``differs`` names the deliberate difference, if any."""

    name: str
    client: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    differs: str | None = None


CASES = [
    Case("static file", "curl", "GET", "/files/hello.txt"),
    Case("HEAD of a file", "curl", "HEAD", "/files/hello.txt"),
    Case("range", "urllib", "GET", "/files/hello.txt", (("Range", "bytes=0-9"),)),
    Case("suffix range", "aiohttp", "GET", "/files/hello.txt", (("Range", "bytes=-5"),)),
    Case("gzip", "aiohttp", "GET", "/files/hello.txt", (("Accept-Encoding", "gzip"),)),
    Case("not found", "urllib", "GET", "/files/missing.txt"),
    Case("POST with a body", "aiohttp", "POST", "/method", body=b"x" * 100),
    Case("PUT with a body", "curl", "PUT", "/method", body=b'{"a": 1}'),
    Case("DELETE", "raw", "DELETE", "/method"),
    Case("OPTIONS", "raw", "OPTIONS", "/method"),
    Case("body over nginx's limit", "curl", "POST", "/upload", body=b"y" * 4096),
    Case(
        "absolute redirect nginx makes",
        "curl",
        "GET",
        "/redirect",
        differs="location",
    ),
    Case(
        "trailing-slash redirect",
        "aiohttp",
        "GET",
        "/files/dir",
        differs="location",
    ),
    Case("directory index", "urllib", "GET", "/files/dir/"),
]


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.fail("nginx is not installed: `make test` installs it (nginx-light)")
    server = Nginx(tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


@pytest.fixture
async def through(make_sidecar: MakeSidecar, nginx: Nginx) -> Sidecar:
    """A sidecar in front of the nginx upstream, holding a token."""
    sidecar = await make_sidecar(upstream={"url": nginx.url})
    await eventually(lambda: sidecar.session.usable() is not None)
    return sidecar


def _compared(headers: list[tuple[str, str]], method: str) -> dict[str, str]:
    # a HEAD answer has no body to compare: its Content-Length is what says the size
    names = (*COMPARED, "content-length") if method == "HEAD" else COMPARED
    return {k.lower(): v for k, v in headers if k.lower() in names}


async def _curl(case: Case, url: str) -> Answer:
    argv = ["curl", "-s", "-i", "--max-time", "10", "-X", case.method, url]
    if case.method == "HEAD":
        argv[argv.index("-X") : argv.index("-X") + 2] = ["-I"]
    for name, value in case.headers:
        argv += ["-H", f"{name}: {value}"]
    if case.body is not None:
        argv += ["--data-binary", "@-", "-H", "Content-Type: application/octet-stream"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate(case.body)
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line]
    return Answer(status, _compared(headers, case.method), body)  # type: ignore[arg-type]


async def _urllib(case: Case, url: str) -> Answer:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    def fetch() -> Answer:
        opener = urllib.request.build_opener(NoRedirect)
        request = urllib.request.Request(  # noqa: S310 - loopback URLs the test built
            url, data=case.body, method=case.method, headers=dict(case.headers)
        )
        try:
            with opener.open(request, timeout=10) as resp:
                return Answer(resp.status, _compared(resp.getheaders(), case.method), resp.read())
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, _compared(list(exc.headers.items()), case.method), exc.read())

    return await asyncio.to_thread(fetch)


async def _aiohttp(case: Case, url: str) -> Answer:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as client,
        client.request(
            case.method, url, headers=case.headers, data=case.body, allow_redirects=False
        ) as resp,
    ):
        body = await resp.read()
        return Answer(resp.status, _compared(list(resp.headers.items()), case.method), body)


async def _raw(case: Case, url: str) -> Answer:
    host, port = url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    client = h11.Connection(h11.CLIENT)
    headers = [("Host", f"{host}:{port}"), *case.headers]
    if case.body is not None:
        headers.append(("Content-Length", str(len(case.body))))
    writer.write(client.send(h11.Request(method=case.method, target=case.path, headers=headers)))
    if case.body is not None:
        writer.write(client.send(h11.Data(data=case.body)))
    writer.write(client.send(h11.EndOfMessage()))
    response: h11.Response | None = None
    body = b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await asyncio.wait_for(reader.read(65536), 10))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    writer.close()
    assert response is not None
    pairs = [(k.decode(), v.decode("latin-1")) for k, v in response.headers]
    return Answer(response.status_code, _compared(pairs, case.method), body)


CLIENTS = {"curl": _curl, "urllib": _urllib, "aiohttp": _aiohttp, "raw": _raw}


def expected(case: Case, direct: Answer, nginx: Nginx, sidecar: Sidecar) -> Answer:
    """The direct answer, with the difference the case names applied."""
    headers = dict(direct.headers)
    if case.differs == "location":
        # upstream.rewrite_location: the upstream's own origin becomes the caller's address
        assert headers["location"].startswith(nginx.url), headers
        headers["location"] = proxy_url(sidecar, headers["location"][len(nginx.url) :])
    return Answer(direct.status, headers, direct.body)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.client}: {c.name}" for c in CASES])
async def test_through_sidecar_matches_direct(case: Case, nginx: Nginx, through: Sidecar) -> None:
    """The answer through sidecar equals the direct one (status, the compared headers, body),
    except for the difference the case names."""
    fetch = CLIENTS[case.client]
    direct = await fetch(case, nginx.url + case.path)
    proxied = await fetch(case, proxy_url(through, case.path))
    assert proxied == expected(case, direct, nginx, through)


async def test_curl_following_redirects_stays_on_sidecar(nginx: Nginx, through: Sidecar) -> None:
    """`curl -L` through sidecar ends at sidecar's address, not the upstream's: a redirect
    nginx makes absolute must not send the client (without the token) to the upstream."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-L", "--max-time", "10", "-w", "\n%{url_effective}",
        proxy_url(through, "/redirect"),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    body, _, final = out.decode().rpartition("\n")
    assert body == HELLO
    assert final == proxy_url(through, "/files/hello.txt")


async def test_http10_keep_alive_is_announced_or_the_connection_closes(
    nginx: Nginx, through: Sidecar
) -> None:
    """An HTTP/1.0 client asking for keep-alive (ApacheBench -k) gets a second answer on the
    same connection only after `Connection: keep-alive` was announced; otherwise the connection
    closes after the first answer, so the client never waits for an end that does not come."""
    reader, writer = await asyncio.open_connection("127.0.0.1", through.proxy_port)
    request = b"GET /files/hello.txt HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n"
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.")
    assert b" 200 " in head.split(b"\r\n", 1)[0]
    assert b"\r\n1" not in head.split(b"\r\n", 1)[0]  # no 1xx to an HTTP/1.0 client
    length = int(next(v for k, v in _fields(head) if k == b"content-length"))
    assert await asyncio.wait_for(reader.readexactly(length), 5) == HELLO.encode()
    announced = (b"connection", b"keep-alive") in [(k, v.lower()) for k, v in _fields(head)]
    if announced:
        writer.write(request)
        second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b" 200 " in second.split(b"\r\n", 1)[0]
    else:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_caller_that_half_closes_after_its_request_gets_the_answer(
    nginx: Nginx, through: Sidecar
) -> None:
    """`printf 'GET ...' | nc -N`: the request is complete, the caller shuts its sending side;
    it still gets the answer, then the connection ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", through.proxy_port)
    writer.write(b"GET /files/hello.txt HTTP/1.1\r\nHost: localhost\r\n\r\n")
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(HELLO.encode())


async def test_an_early_refusal_reaches_a_client_that_expects_100_continue(
    nginx: Nginx, through: Sidecar
) -> None:
    """A 1 MB upload with `Expect: 100-continue` to a location that takes 1 KiB: nginx refuses
    with 413 before the body; through sidecar the client gets that 413 without sending the body
    (sidecar must not answer `100 Continue` itself for a body it will not buffer)."""
    for port in (nginx.port, through.proxy_port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.split(b"\r\n", 1)[0].split(b" ")[1] == b"413", (port, head)
        writer.close()


async def test_apachebench_keep_alive_completes(nginx: Nginx, through: Sidecar) -> None:
    """`ab -k` (HTTP/1.0 with keep-alive) finishes 200 requests promptly with no failures."""
    if shutil.which("ab") is None:
        pytest.fail("ab is not installed: `make test` installs it (apache2-utils)")
    proc = await asyncio.create_subprocess_exec(
        "ab", "-k", "-q", "-n", "200", "-c", "4", "-s", "5",
        proxy_url(through, "/files/hello.txt"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode()
    assert proc.returncode == 0, (text, err.decode())
    assert "Failed requests:        0" in text, text
    assert "Complete requests:      200" in text, text


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:]
    return [
        (k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines) if k
    ]


@pytest.mark.parametrize(
    ("method", "status"), [("BAN", 501), ("TRACE", 405), ("TRACK", 405)], ids=str
)
async def test_methods_sidecar_refuses_by_design(
    nginx: Nginx, through: Sidecar, method: str, status: int
) -> None:
    """Differences by design (docs/http-semantics.md, docs/security.md): TRACE and TRACK are
    refused with 405 (an echo of the request would hand the caller the token); a method llhttp
    does not know (``BAN``, which nginx serves) gets sidecar's 501 naming it, not a bare 400."""
    case = Case(method, "raw", method, "/method")
    direct = await _raw(case, nginx.url + case.path)
    assert direct.status in (200, 405)  # nginx serves any token method; it refuses TRACE itself
    reader, writer = await asyncio.open_connection("127.0.0.1", through.proxy_port)
    writer.write(f"{method} /method HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.split(b"\r\n", 1)[0].split(b" ")[1] == str(status).encode(), answer
    assert b"X-Sidecar-Error: 1" in head
