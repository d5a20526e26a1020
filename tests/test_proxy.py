"""The proxy on real loopback sockets: forwarding, header rules on the wire, errors, refusals."""

from __future__ import annotations

import asyncio
import re
import socket
import uuid

import aiohttp

from tests.conftest import MakeSidecar, Serve, proxy_url
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream, header_values

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


async def test_forwards_method_path_query_body_and_injects_headers(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream, idp: FakeIdP
) -> None:
    """Method, raw path, query and body arrive intact, with every managed header added."""
    sidecar = await make_sidecar(headers={"static": {"X-Api-Version": "2"}})
    async with http.post(
        proxy_url(sidecar, "/v1/items/a%2Fb?q=1&q=2&x=%20y"),
        data=b'{"k": 1}',
        headers={"Content-Type": "application/json", "X-Custom": "kept"},
    ) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert echoed["method"] == "POST"
    assert echoed["query_string"] == "q=1&q=2&x= y"
    assert echoed["body"] == '{"k": 1}'
    seen = upstream.seen[-1]
    assert seen.path_qs.startswith("/v1/items/a%2Fb?")
    assert seen.headers["X-Custom"] == "kept"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["X-Api-Version"] == "2"
    assert seen.headers["X-Tenant-ID"] == "1234567"
    token = seen.headers["Authorization"].removeprefix("Bearer ")
    assert idp.is_valid(token)
    assert UUID4.fullmatch(seen.headers["X-Request-ID"])
    assert UUID4.fullmatch(seen.headers["X-Correlation-ID"])
    assert UUID4.fullmatch(seen.headers["X-Activity-ID"])
    assert UUID4.fullmatch(seen.headers["X-Session-ID"])
    assert TRACEPARENT.fullmatch(seen.headers["traceparent"])
    assert seen.headers["Host"] == sidecar.upstream_url.removeprefix("http://")


async def test_callers_authorization_is_replaced_not_appended(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream, idp: FakeIdP
) -> None:
    """A caller's own Authorization (even several) never reaches the upstream."""
    sidecar = await make_sidecar()
    headers = [("Authorization", "Bearer caller-token"), ("authorization", "Basic Zm9vOmJhcg==")]
    async with http.get(proxy_url(sidecar, "/x"), headers=headers) as resp:
        assert resp.status == 200
    values = header_values(upstream.seen[-1], "Authorization")
    assert len(values) == 1
    assert idp.is_valid(values[0].removeprefix("Bearer "))


async def test_request_ids_are_fresh_per_request_and_session_headers_stable(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    """X-Request-ID is new each time (even if the caller sends one); session and activity ids
    stay the same."""
    sidecar = await make_sidecar()
    for _ in range(5):
        async with http.get(
            proxy_url(sidecar, "/x"), headers={"X-Request-ID": "caller-chosen"}
        ) as resp:
            assert resp.status == 200
    request_ids = {s.headers["X-Request-ID"] for s in upstream.seen}
    assert len(request_ids) == 5
    assert "caller-chosen" not in request_ids
    assert len({s.headers["X-Session-ID"] for s in upstream.seen}) == 1
    assert len({s.headers["X-Activity-ID"] for s in upstream.seen}) == 1


async def test_correlation_and_traceparent_are_propagated_when_valid(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    """The caller's correlation id and a valid traceparent pass through; a broken traceparent is
    replaced."""
    sidecar = await make_sidecar()
    good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with http.get(
        proxy_url(sidecar, "/x"), headers={"X-Correlation-ID": "corr-123", "traceparent": good}
    ) as resp:
        assert resp.status == 200
    assert upstream.seen[-1].headers["X-Correlation-ID"] == "corr-123"
    assert upstream.seen[-1].headers["traceparent"] == good
    bad = "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
    async with http.get(proxy_url(sidecar, "/x"), headers={"traceparent": bad}) as resp:
        assert resp.status == 200
    sent = upstream.seen[-1].headers["traceparent"]
    assert sent != bad
    assert TRACEPARENT.fullmatch(sent)


async def test_each_managed_header_can_be_switched_off_or_fixed(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    """null switches a header off; a literal value is sent as is; generate ignores the caller's."""
    sidecar = await make_sidecar(
        headers={
            "tenant_id": None,
            "activity_id": "activity-fixed",
            "correlation_id": "generate",
            "request_id": None,
            "traceparent": None,
            "session_id": None,
        }
    )
    async with http.get(
        proxy_url(sidecar, "/x"), headers={"X-Correlation-ID": "mine", "X-Tenant-ID": "spoofed"}
    ) as resp:
        assert resp.status == 200
    seen = upstream.seen[-1].headers
    assert "X-Request-ID" not in seen
    assert "traceparent" not in seen
    assert "X-Session-ID" not in seen
    assert seen["X-Activity-ID"] == "activity-fixed"
    assert seen["X-Correlation-ID"] != "mine"
    # tenant switched off: the caller's own header is passed through untouched
    assert seen["X-Tenant-ID"] == "spoofed"


async def test_hop_by_hop_headers_are_stripped_both_ways(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """Connection, Keep-Alive, TE, Proxy-* and Connection-listed headers are not forwarded."""
    sidecar = await make_sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    writer.write(
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive, X-Secret-Hop\r\n"
        b"X-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        b"Proxy-Authorization: Basic abc\r\nX-Kept: yes\r\n\r\n"
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    seen = {k.lower() for k in upstream.seen[-1].headers}
    assert "x-kept" in seen
    for name in ("x-secret-hop", "keep-alive", "te", "proxy-authorization"):
        assert name not in seen


async def test_no_session_gives_503_json_with_marker(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, idp: FakeIdP, upstream: FakeUpstream
) -> None:
    """With the identity provider refusing, nothing is forwarded and the caller gets a 503 JSON."""
    idp.down = "503"
    sidecar = await make_sidecar()
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 503
        assert resp.headers["X-Sidecar-Error"] == "1"
        body = await resp.json()
    assert body["error"] == "no_session"
    assert body["detail"]
    assert upstream.seen == []


async def test_upstream_refused_is_502_and_timeout_is_504(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """A closed upstream port gives 502; an upstream slower than the timeout gives 504."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    dead = await make_sidecar(upstream={"url": f"http://127.0.0.1:{dead_port}"})
    async with http.get(proxy_url(dead, "/x")) as resp:
        assert resp.status == 502
        assert resp.headers["X-Sidecar-Error"] == "1"
        assert (await resp.json())["error"] == "upstream_unavailable"
    slow = await make_sidecar(upstream={"timeout": {"total": 0.3}})
    async with http.get(proxy_url(slow, "/slow/2")) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"] == "upstream_timeout"


async def test_redirects_are_returned_not_followed(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    """A 302 from the upstream reaches the caller; the token never goes to the Location."""
    sidecar = await make_sidecar()
    async with http.get(proxy_url(sidecar, "/redirect"), allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "http://elsewhere.invalid/steal"
    assert len(upstream.seen) == 1


async def test_absolute_form_and_connect_are_refused(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """sidecar is not an open proxy: absolute-form targets and CONNECT never reach any upstream."""
    sidecar = await make_sidecar()
    for request_line in (
        b"GET http://elsewhere.invalid/steal HTTP/1.1",
        b"CONNECT elsewhere.invalid:443 HTTP/1.1",
        b"GET //elsewhere.invalid/x HTTP/1.1",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
        writer.write(request_line + b"\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        assert status_line.split()[1] in (b"400", b"405"), request_line
    assert upstream.seen == []


async def test_dot_segments_are_refused(make_sidecar: MakeSidecar, upstream: FakeUpstream) -> None:
    """/../ and its percent-encoded forms would climb out of the upstream's path prefix."""
    sidecar = await make_sidecar()
    for target in (b"/api/../admin", b"/api/%2e%2e/admin", b"/api/%252e%252e/admin", b"/a/..%2fb"):
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        assert status_line.split()[1] == b"400", target
    assert upstream.seen == []


async def test_upstream_path_prefix_is_kept(
    serve: Serve,
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    upstream: FakeUpstream,
    upstream_url: str,
) -> None:
    """upstream.url may carry a path prefix; the incoming path is appended to it."""
    sidecar = await make_sidecar(upstream={"url": upstream_url + "/base/v2/"})
    async with http.get(proxy_url(sidecar, "/items?id=7")) as resp:
        assert resp.status == 200
    assert upstream.seen[-1].path_qs == "/base/v2/items?id=7"


async def test_multiple_set_cookie_headers_survive(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """Repeated response headers such as Set-Cookie are all passed back."""
    sidecar = await make_sidecar()
    async with http.get(proxy_url(sidecar, "/cookies")) as resp:
        assert resp.status == 200
        assert len(resp.headers.getall("Set-Cookie")) == 2


async def test_status_codes_and_bodies_pass_through(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """Upstream 4xx/5xx are the upstream's, not ours: no X-Sidecar-Error marker."""
    sidecar = await make_sidecar()
    for code in (404, 418, 500, 503):
        async with http.get(proxy_url(sidecar, f"/status/{code}")) as resp:
            assert resp.status == code
            assert "X-Sidecar-Error" not in resp.headers
            assert (await resp.json())["status"] == code


async def test_request_id_is_unique_under_concurrency(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    """200 concurrent requests carry 200 distinct uuid4 request ids."""
    sidecar = await make_sidecar()

    async def one() -> int:
        async with http.get(proxy_url(sidecar, f"/x?{uuid.uuid4()}")) as resp:
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert set(statuses) == {200}
    assert len({s.headers["X-Request-ID"] for s in upstream.seen}) == 200


async def test_head_keeps_the_upstreams_content_length_without_a_body(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """HEAD answers carry the upstream's Content-Length and no body, and the connection to the
    caller stays usable for the next request."""
    sidecar = await make_sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    writer.write(b"HEAD /stream/12345 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    writer.write(b"GET /status/200 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 12345" in head
    second = await reader.readuntil(b"\r\n\r\n")
    assert second.startswith(b"HTTP/1.1 200"), second
    writer.close()
    assert [s.method for s in upstream.seen] == ["HEAD", "GET"]


async def test_expect_100_continue_is_answered(
    make_sidecar: MakeSidecar, upstream: FakeUpstream
) -> None:
    """A caller that waits for 100 Continue before its body gets it, and the body arrives."""
    sidecar = await make_sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    await writer.drain()
    final = await reader.readuntil(b"\r\n\r\n")
    assert final.startswith(b"HTTP/1.1 200")
    writer.close()
    assert "Expect" not in upstream.seen[-1].headers
