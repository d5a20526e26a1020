"""What real clients see through sidecar, compared with talking to the upstream directly (issue
"HTTP semantics"): redirects come back through sidecar, slow uploads are not cut while they move,
``Expect: 100-continue`` is the upstream's to answer for streamed bodies, and a 401 is replayed
only when that is harmless. docs/http-semantics.md says what differs by design.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from tests.conftest import MakeSidecar, Serve, proxy_url
from tests.fakes.scripted_upstream import RawRequest, Wire, ok, scripted_upstream
from tests.fakes.upstream import FakeUpstream
from tests.helpers import sample


def every_path(handle: Handler) -> web.Application:
    """An upstream app that answers every method on every path with ``handle``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def redirecting_app(seen: list[str]) -> web.Application:
    """An upstream that builds absolute redirects from the Host it was called with (as nginx's
    ``return 301``, trailing-slash redirects and frameworks' ``201 Created`` do)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.path_qs)
        own = f"http://{request.host}"
        parts = request.path.split("/")  # /base/<what>/<n>
        what = parts[2] if len(parts) > 2 else ""
        if what == "absolute-redirect":
            left = int(parts[3])
            target = "/base/get" if left <= 1 else f"/base/absolute-redirect/{left - 1}"
            raise web.HTTPFound(f"{own}{target}?n={left}")
        if what == "created":
            return web.Response(
                status=201,
                headers={"Location": f"{own}/base/items/7", "Content-Location": f"{own}/base"},
            )
        if what == "elsewhere":
            raise web.HTTPFound("http://elsewhere.invalid/base/x")
        if what == "other-port":
            raise web.HTTPFound(f"http://{request.url.host}:1/base/x")
        if what == "outside-prefix":
            raise web.HTTPFound(f"{own}/basement/x")
        return web.Response(text=f"at {request.path_qs}")

    return every_path(handle)


async def test_redirects_naming_the_upstream_come_back_through_sidecar(
    serve: Serve, make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """``curl -L localhost:8080/absolute-redirect/2``: every hop of a redirect-following client
    goes through sidecar (Location pointed at the caller's Host, path prefix taken off), so the
    upstream sees every request with the token and the client never calls it directly."""
    seen: list[str] = []
    url = await serve(redirecting_app(seen))
    sidecar = await make_sidecar(upstream={"url": url + "/base"})
    async with http.get(proxy_url(sidecar, "/absolute-redirect/3")) as resp:
        assert resp.status == 200
        assert await resp.text() == "at /base/get?n=1"
        assert str(resp.url) == proxy_url(sidecar, "/get?n=1")
        hops = [h.headers["Location"] for h in resp.history]
    base = proxy_url(sidecar, "")
    assert hops == [
        f"{base}/absolute-redirect/2?n=3",
        f"{base}/absolute-redirect/1?n=2",
        f"{base}/get?n=1",
    ]
    assert seen == [
        "/base/absolute-redirect/3",
        "/base/absolute-redirect/2?n=3",
        "/base/absolute-redirect/1?n=2",
        "/base/get?n=1",
    ]
    async with http.post(proxy_url(sidecar, "/created")) as resp:
        assert resp.status == 201
        assert resp.headers["Location"] == f"{base}/items/7"
        assert resp.headers["Content-Location"] == f"{base}/"


async def test_other_locations_pass_untouched_and_the_rewrite_can_be_switched_off(
    serve: Serve, make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """Another origin, the upstream's host on another port, and a path outside the prefix are
    not the upstream sidecar forwards to: those Locations pass as they are; with
    ``upstream.rewrite_location: false`` nothing is rewritten."""
    url = await serve(redirecting_app([]))
    host = url.removeprefix("http://").split(":")[0]
    sidecar = await make_sidecar(upstream={"url": url + "/base"})
    for path, expected in (
        ("/elsewhere", "http://elsewhere.invalid/base/x"),
        ("/other-port", f"http://{host}:1/base/x"),
        ("/outside-prefix", f"{url}/basement/x"),
    ):
        async with http.get(proxy_url(sidecar, path), allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == expected, path
    plain = await make_sidecar(upstream={"url": url + "/base", "rewrite_location": False})
    async with http.get(proxy_url(plain, "/absolute-redirect/2"), allow_redirects=False) as resp:
        assert resp.headers["Location"] == f"{url}/base/absolute-redirect/1?n=2"


async def test_a_slow_upload_that_keeps_moving_gets_the_upstreams_answer(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """The answer deadline (``upstream.timeout.total``) starts after the last body byte: an upload
    taking three times that long, never silent for long, gets the upstream's 200, not 504."""
    sidecar = await make_sidecar(upstream={"timeout": {"total": 0.4}, "replay_body_limit": 0})

    async def slowly() -> AsyncIterator[bytes]:
        for _ in range(12):
            yield b"x" * 10_000
            await asyncio.sleep(0.1)

    async with http.post(proxy_url(sidecar, "/upload"), data=slowly()) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["bytes"] == 120_000


async def test_an_upload_that_stalls_still_meets_the_idle_deadline(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """While a body streams, a silence longer than ``upstream.timeout.total`` ends the exchange
    with 504: a stalled upload does not hold the upstream connection forever."""
    sidecar = await make_sidecar(upstream={"timeout": {"total": 0.3}, "replay_body_limit": 0})
    stop = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await stop.wait()
        yield b"never"

    try:
        async with http.post(proxy_url(sidecar, "/upload"), data=stalls()) as resp:
            assert resp.status == 504
    finally:
        stop.set()


async def open_raw(port: int, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to the proxy that has sent ``head``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    return reader, writer


async def test_an_expectation_on_a_streamed_body_gets_the_upstreams_early_refusal(
    make_sidecar: MakeSidecar,
) -> None:
    """``Expect: 100-continue`` on a body sidecar does not buffer is the upstream's to answer:
    its early 413 reaches the caller before any body byte was sent, and no 100 precedes it."""

    async def refuse(request: RawRequest, _wire: Wire, writer: asyncio.StreamWriter) -> bool:
        body = b'{"error": "too large"}'
        writer.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
            % (len(body), body)
        )
        return True

    async with scripted_upstream(on_head=refuse) as upstream:
        sidecar = await make_sidecar(upstream={"url": upstream.url})
        reader, writer = await open_raw(
            sidecar.proxy_port,
            b"PUT /big HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000000\r\n"
            b"Expect: 100-continue\r\n\r\n",
        )
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        writer.close()
    assert first.startswith(b"HTTP/1.1 413"), first
    (seen,) = upstream.requests
    assert seen.header("expect") == "100-continue"


async def test_the_upstreams_100_continue_is_relayed_and_the_body_follows(
    make_sidecar: MakeSidecar,
) -> None:
    """The upstream's interim 100 reaches the caller, which then sends its body; the upstream's
    final answer follows."""

    async def continue_then_read(
        request: RawRequest, wire: Wire, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.body = await wire.readexactly(int(request.header("content-length") or 0))
        writer.write(await ok(request))
        return True

    async with scripted_upstream(on_head=continue_then_read) as upstream:
        sidecar = await make_sidecar(upstream={"url": upstream.url, "replay_body_limit": 10})
        reader, writer = await open_raw(
            sidecar.proxy_port,
            b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n"
            b"Expect: 100-continue\r\n\r\n",
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"b" * 100)
        await writer.drain()
        final = await asyncio.wait_for(reader.readuntil(b"POST /x 100"), 3)
        writer.close()
    assert final.startswith(b"HTTP/1.1 200"), final
    (seen,) = upstream.requests
    assert seen.header("expect") == "100-continue"
    assert seen.body == b"b" * 100


async def test_an_http_1_0_caller_never_gets_an_interim_answer(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """HTTP/1.0 has no 1xx answers (RFC 9110 15.2): an HTTP/1.0 request carrying
    ``Expect: 100-continue`` gets only its final answer."""
    sidecar = await make_sidecar()
    reader, writer = await open_raw(
        sidecar.proxy_port,
        b"POST /x HTTP/1.0\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    with contextlib.suppress(TimeoutError):
        early = await asyncio.wait_for(reader.read(100), 0.3)
        assert early == b"", early
    writer.write(b"hello")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    assert b" 100 " not in answer.split(b"\r\n", 1)[0]
    assert upstream.seen[-1].method == "POST"


def counting_401_app(calls: Counter[str]) -> web.Application:
    """/app401 always refuses (an application's own 401, no token error); /expired refuses
    once with ``error="invalid_token"``, then answers."""

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        calls[f"{request.method} {request.path}"] += 1
        if request.path == "/app401":
            return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer realm="api"'})
        if request.path == "/expired" and calls[f"{request.method} {request.path}"] == 1:
            return web.Response(
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="api", error="invalid_token"'},
            )
        return web.Response(text="done")

    return every_path(handle)


async def test_a_401_is_replayed_only_for_idempotent_methods_or_a_refused_token(
    serve: Serve, make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """A POST answered 401 without ``error="invalid_token"`` reaches the upstream once, the 401
    goes to the caller and the token is not refreshed; a GET is refreshed and replayed; a POST
    whose token the upstream says is invalid is refreshed and replayed."""
    calls: Counter[str] = Counter()
    url = await serve(counting_401_app(calls))
    sidecar = await make_sidecar(upstream={"url": url}, refresh={"reactive_min_interval": 0})

    async def reactive() -> float | None:
        async with http.get(f"http://127.0.0.1:{sidecar.admin_port}/metrics") as resp:
            return sample(await resp.text(), "sidecar_reactive_refreshes_total")

    async with http.post(proxy_url(sidecar, "/app401"), data=b"order=1") as resp:
        assert resp.status == 401
    assert calls["POST /app401"] == 1
    assert await reactive() == 0
    async with http.get(proxy_url(sidecar, "/app401")) as resp:
        assert resp.status == 401
    assert calls["GET /app401"] == 2
    async with http.post(proxy_url(sidecar, "/expired"), data=b"order=2") as resp:
        assert resp.status == 200
        assert await resp.text() == "done"
    assert calls["POST /expired"] == 2
    assert await reactive() == 2


async def test_a_double_slash_path_is_refused_with_a_detail_naming_the_likely_mistake(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """``//v1/x`` (a base URL ending in ``/`` joined with ``/v1/x``) stays refused, with a detail
    that names that mistake rather than calling sidecar a forward proxy."""
    sidecar = await make_sidecar()
    reader, writer = await open_raw(
        sidecar.proxy_port, b"GET //v1/x HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    answer = await asyncio.wait_for(reader.readuntil(b"}"), 3)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"base URL ending in /" in answer
    assert b"forward proxy" not in answer
    assert upstream.seen == []
