"""The identity HTTP client: backups, error translation, Retry-After, size cap, request ids."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from sidecar.config.sections import TLS
from sidecar.errors import IdentityUnavailable, OAuthError
from sidecar.identity.http import MAX_RESPONSE_BYTES, IdentityHTTP, parse_retry_after
from tests.conftest import Serve
from tests.fakes.clock import FakeClock
from tests.helpers import count_tls_contexts


class Endpoint:
    """A tiny server answering every request with a scripted response; records request ids."""

    def __init__(
        self, status: int = 200, body: str = '{"ok": true}', headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.request_ids: list[str] = []
        self.hang = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        self.request_ids.append(request.headers.get("X-Request-ID", ""))
        if self.hang:
            await asyncio.sleep(3600)
        return web.Response(
            status=self.status,
            text=self.body,
            headers=self.headers,
            content_type="application/json",
        )


async def test_default_tls_settings_build_no_context_of_their_own(
    serve: Serve, ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With identity.tls at its defaults the client parses no CA bundle of its own: a provider
    on http:// needs no TLS, and for https:// aiohttp's verified context is the one those
    defaults would build (each context holds its own copy of the bundle, about 1 MB). A section
    naming a file still gets its own context, built at the first call."""
    built = count_tls_contexts(monkeypatch)
    url = await serve(Endpoint().app())
    for tls, contexts in ((TLS(), 0), (TLS(ca_file=Path(ca_file)), 1)):
        http = IdentityHTTP(FakeClock(), timeout=2, tls=tls)
        try:
            assert (await http.request("POST", url + "/token")).status == 200
            assert (await http.request("POST", url + "/token")).status == 200
        finally:
            await http.aclose()
        assert len(built) == contexts
        built.clear()


def closed_port_url() -> str:
    """A loopback URL nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/token"


@pytest.fixture
async def client() -> AsyncIterator[IdentityHTTP]:
    http = IdentityHTTP(FakeClock(), timeout=0.5)
    yield http
    await http.aclose()


async def test_answer_carries_json_cookies_and_a_fresh_request_id(
    serve: Serve, client: IdentityHTTP
) -> None:
    """A 2xx gives status, decoded JSON and the raw Set-Cookie headers; every call has its own
    uuid4 X-Request-ID."""
    endpoint = Endpoint(headers={"Set-Cookie": "sid=abc; HttpOnly"})
    url = await serve(endpoint.app())
    first = await client.request("POST", url + "/login", json={"u": "x"})
    await client.request("GET", url + "/again")
    assert first.status == 200
    assert first.json == {"ok": True}
    assert first.set_cookies == ("sid=abc; HttpOnly",)
    assert len(set(endpoint.request_ids)) == 2
    assert all(len(rid) == 36 for rid in endpoint.request_ids)


@pytest.mark.parametrize("failure", ["refused", "503", "hang"])
async def test_a_backup_answers_when_the_primary_does_not_and_stays_preferred(
    serve: Serve, client: IdentityHTTP, failure: str
) -> None:
    """Unreachable, 5xx or timeout on the primary: the backup is tried, and after it answered it
    is tried first on the next call."""
    primary = Endpoint(status=503, body="{}")
    primary.hang = failure == "hang"
    backup = Endpoint(body='{"from": "backup"}')
    primary_url = closed_port_url() if failure == "refused" else await serve(primary.app())
    urls = [primary_url, await serve(backup.app())]
    answer = await client.request("POST", urls, form={"a": "b"})
    assert answer.json == {"from": "backup"}
    assert answer.url == urls[1]
    calls_before = len(primary.request_ids)
    await client.request("POST", urls, form={"a": "b"})
    assert len(primary.request_ids) == calls_before
    assert len(backup.request_ids) == 2


async def test_an_oauth_error_is_final_and_no_backup_is_tried(
    serve: Serve, client: IdentityHTTP
) -> None:
    """invalid_client from the primary is an answer: OAuthError, the backup is never called."""
    primary = Endpoint(status=401, body='{"error": "invalid_client"}')
    backup = Endpoint()
    urls = [await serve(primary.app()), await serve(backup.app())]
    with pytest.raises(OAuthError) as info:
        await client.request("POST", urls, form={})
    assert info.value.error == "invalid_client"
    assert backup.request_ids == []


async def test_all_endpoints_down_raises_the_last_failure(client: IdentityHTTP) -> None:
    """When every URL fails, the last failure is raised with its reason."""
    with pytest.raises(IdentityUnavailable) as info:
        await client.request("POST", [closed_port_url(), closed_port_url()], form={})
    assert info.value.reason == "unreachable"


@pytest.mark.parametrize(
    ("status", "body", "reason", "text"),
    [
        (200, "<!DOCTYPE html><html>sign in</html>", "malformed_response", "HTML page"),
        (200, "not json", "malformed_response", "not JSON"),
        (502, "<html>bad gateway</html>", "http_502", "HTML error page"),
        (404, '{"detail": "nope"}', "http_404", "HTTP 404"),
        (200, " " * (MAX_RESPONSE_BYTES + 10), "malformed_response", "larger than"),
    ],
)
async def test_bad_answers_become_identity_unavailable(
    serve: Serve, client: IdentityHTTP, status: int, body: str, reason: str, text: str
) -> None:
    """Each bad answer is IdentityUnavailable with a low-cardinality reason and a clear message."""
    url = await serve(Endpoint(status=status, body=body).app())
    with pytest.raises(IdentityUnavailable) as info:
        await client.request("POST", url, form={})
    assert info.value.reason == reason
    assert text in str(info.value)


async def test_retry_after_is_passed_on(serve: Serve, client: IdentityHTTP) -> None:
    """A 429 with Retry-After carries the delay to the backoff."""
    url = await serve(Endpoint(status=429, body="{}", headers={"Retry-After": "7"}).app())
    with pytest.raises(IdentityUnavailable) as info:
        await client.request("POST", url, form={})
    assert info.value.reason == "http_429"
    assert info.value.retry_after == 7


def test_retry_after_forms() -> None:
    """Delta-seconds and HTTP-dates (relative to the given now) are understood; junk is not."""
    now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after("Fri, 15 Jan 2027 08:00:30 GMT", now) == 30
    assert parse_retry_after("Fri, 15 Jan 2027 07:00:00 GMT", now) == 0
    for junk in (None, "", "-5", "soon"):
        assert parse_retry_after(junk, now) is None


async def test_client_errors_are_answers_for_vendor_json_apis(
    serve: Serve, client: IdentityHTTP
) -> None:
    """With client_errors (json_login), a 4xx comes back as a response for the caller to read,
    even with an OAuth-looking or non-JSON body; 429 and 5xx still raise as transient."""
    endpoint = Endpoint(status=401, body='{"error": "invalid_client", "code": "X"}')
    url = await serve(endpoint.app())
    answer = await client.request("POST", url, json={}, client_errors=True)
    assert answer.status == 401
    assert answer.json == {"error": "invalid_client", "code": "X"}
    endpoint.body = "not json"
    assert (await client.request("POST", url, json={}, client_errors=True)).json is None
    endpoint.status = 429
    with pytest.raises(IdentityUnavailable) as caught:
        await client.request("POST", url, json={}, client_errors=True)
    assert caught.value.reason == "http_429"
