"""Hostile input, fuzzed: request lines, header names and values sent raw to the real proxy over
a socket, and token-endpoint answers fed to the real client and parser.

Whatever arrives, the process keeps serving (the next well-formed request gets 200), nothing
reaches a second "attacker" server, everything the upstream received carried a valid token and
stayed under its path prefix, and no token appears in a response or a log line. Examples are
derandomized (fixed seed) and bounded, so the suite cannot flake and stays well under 30 s.
"""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.app import Sidecar
from sidecar.clock import SystemClock
from sidecar.config.oauth2 import OAuth2Section
from sidecar.errors import IdentityError, IdentityUnavailable
from sidecar.identity.oauth2 import OAuth2Identity
from sidecar.tokens import Token, parse_token_response
from tests.conftest import MakeSidecar, Serve, proxy_url
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import eventually, exchange

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

PREFIX = "/api"


class Target:
    """The sidecar under attack, the attacker's server, and what each must (not) see."""

    def __init__(self, sidecar: Sidecar, upstream: FakeUpstream, attacker: FakeUpstream) -> None:
        self.sidecar = sidecar
        self.upstream = upstream
        self.attacker = attacker
        self.attacker_at = ""

    def secrets(self) -> list[str]:
        record = self.sidecar.session.record
        assert record is not None
        return [s for s in (record.token.access_token, record.token.refresh_token) if s]

    async def send(self, raw: bytes) -> bytes:
        """Send raw bytes and collect whatever comes back until the proxy closes (the requests
        ask it to) or a short time passes (a request that waits for a body it never gets)."""
        return await exchange(self.sidecar.proxy_port, raw, within=0.5)

    async def check(self, answer: bytes, http: aiohttp.ClientSession) -> None:
        for secret in self.secrets():
            assert secret.encode() not in answer
        async with http.get(proxy_url(self.sidecar, "/still-alive")) as resp:
            assert resp.status == 200, "the next request is still served"
        assert self.attacker.seen == [], "nothing reached another origin"
        for seen in self.upstream.seen:
            assert seen.token_valid
            assert seen.path_qs.startswith(PREFIX + "/"), seen.path_qs


@pytest.fixture
async def target(
    make_sidecar: MakeSidecar, serve: Serve, upstream_url: str, upstream: FakeUpstream
) -> Target:
    upstream.echo_authorization = False
    attacker = FakeUpstream()
    attacker_url = await serve(attacker.app())
    sidecar = await make_sidecar(upstream={"url": upstream_url + PREFIX})
    await eventually(lambda: sidecar.session.usable() is not None)
    t = Target(sidecar, upstream, attacker)
    t.attacker_at = attacker_url.removeprefix("http://")
    return t


def assert_no_secret_logged(log_output: io.StringIO, idp: FakeIdP) -> None:
    logged = log_output.getvalue()
    for secret in [*idp.issued, *idp.refresh_tokens, idp.client_secret]:
        assert secret not in logged


ATTACKER = "ATTACKER"  # replaced by the attacker's host:port in each example
TARGETS = st.one_of(
    st.sampled_from(
        [
            f"http://{ATTACKER}/steal",
            f"https://{ATTACKER}/steal",
            f"//{ATTACKER}/steal",
            ATTACKER,
            "*",
            "/x/../../steal",
            "/%2e%2e/steal",
            "/x/%252e%252e/steal",
            "/x/..%2fsteal",
            "/x\\..\\steal",
            "/x?q=../../steal",
            "/x#frag",
            "/x/\x00",
        ]
    ),
    st.text(alphabet=st.sampled_from("/.%2e5cfA\\?#@:;&=+ -_~!$'()*,"), max_size=40).map(
        lambda t: "/" + t
    ),
    st.text(max_size=40),
)
METHODS = st.one_of(
    st.sampled_from(["GET", "POST", "HEAD", "CONNECT", "OPTIONS", "TRACE", "PRI", "get", "G\tT"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12),
)
VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.1 x", ""])


@FUZZ
@given(method=METHODS, request_target=TARGETS, version=VERSIONS)
async def test_fuzzed_request_lines(
    target: Target,
    http: aiohttp.ClientSession,
    log_output: io.StringIO,
    idp: FakeIdP,
    method: str,
    request_target: str,
    version: str,
) -> None:
    """Any request line: refused or forwarded under the prefix with a valid token, never to the
    attacker, never a token in the answer; the proxy keeps serving."""
    path = request_target.replace(ATTACKER, target.attacker_at)
    line = f"{method} {path} {version}".encode("utf-8", "surrogateescape")
    tail = f"\r\nHost: {target.attacker_at}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    raw = line + tail.encode()
    await target.check(await target.send(raw), http)
    assert_no_secret_logged(log_output, idp)


HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            b"Host",
            b"Content-Length",
            b"Transfer-Encoding",
            b"Authorization",
            b"Connection",
            b"Upgrade",
            b"X-Forwarded-Host",
            b"Forwarded",
            b"Expect",
            b"X Bad",
            b"X-A ",
            b"",
            b"X-\x00",
        ]
    ),
    st.binary(min_size=1, max_size=20),
)
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            ATTACKER.encode(),
            b"chunked",
            b"chunked, identity",
            b" chunked",
            b"5",
            b"5, 6",
            b"-1",
            b"Bearer stolen",
            b"keep-alive, Authorization",
            b"websocket",
            b"a\r\nX-Injected: 1",
            b"a\nX-Injected: 1",
            b"a\x00b",
            b"a\r b",
            b"100-continue",
        ]
    ),
    st.binary(max_size=60),
)


@FUZZ
@given(headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), min_size=1, max_size=4))
async def test_fuzzed_header_names_and_values(
    target: Target,
    http: aiohttp.ClientSession,
    log_output: io.StringIO,
    idp: FakeIdP,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """Any header names and values, smuggling shapes included: the same guarantees; and a value
    the caller sent is never turned into a header line of its own upstream (a CRLF the caller
    wrote between two lines is two header lines, not an injection)."""
    attacker = target.attacker_at.encode()
    lines = b"".join(
        n + b": " + v.replace(ATTACKER.encode(), attacker) + b"\r\n" for n, v in headers
    )
    raw = b"POST /x HTTP/1.1\r\nHost: localhost\r\n" + lines + b"Connection: close\r\n\r\n"
    before = len(target.upstream.seen)
    await target.check(await target.send(raw), http)
    # "a\r\nX-Injected: 1" after a name is a header line of the caller's own: forwarded as such
    own_line = b"\r\nX-Injected: 1\r\n" in raw
    for seen in target.upstream.seen[before:]:
        assert own_line or "X-Injected" not in seen.headers
        sent = [v for k, v in seen.header_list if k.lower() == "authorization"]
        assert sent != ["Bearer stolen"]
    assert_no_secret_logged(log_output, idp)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
TOKEN_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "access_token": st.one_of(st.text(max_size=40), JSON),
        "token_type": st.one_of(st.sampled_from(["Bearer", "bearer", "mac", ""]), JSON),
        "expires_in": st.one_of(st.integers(-10, 10**12), st.floats(), st.text(max_size=8)),
        "refresh_token": st.one_of(st.text(max_size=20), JSON),
        "scope": JSON,
        "error": st.one_of(st.sampled_from(["invalid_grant", "invalid_client"]), JSON),
    },
)


@FUZZ
@given(body=st.one_of(TOKEN_FIELDS, JSON))
def test_fuzzed_token_responses_parse_or_fail_as_transient(body: Any) -> None:
    """parse_token_response on any JSON: a Token whose access token is safe in a header, or
    IdentityUnavailable(malformed_response); never another exception."""
    outcome: Token | IdentityUnavailable
    try:
        outcome = parse_token_response(body, 1_800_000_000.0)
    except IdentityUnavailable as exc:
        outcome = exc
    if isinstance(outcome, IdentityUnavailable):
        assert outcome.reason == "malformed_response"
    else:
        assert outcome.access_token
        assert not any(c in outcome.access_token for c in "\r\n\0")
        assert outcome.expires_at > outcome.obtained_at


@pytest.fixture
async def scripted_idp(serve: Serve) -> tuple[str, dict[str, Any]]:
    """A token endpoint that answers whatever the test scripts: status, headers, raw body."""
    script: dict[str, Any] = {"status": 200, "body": b"{}", "content_type": "application/json"}

    async def token(_request: web.Request) -> web.Response:
        return web.Response(
            status=script["status"], body=script["body"], content_type=script["content_type"]
        )

    app = web.Application()
    app.router.add_post("/token", token)
    return await serve(app) + "/token", script


@FUZZ
@given(
    status=st.sampled_from([200, 201, 204, 301, 400, 401, 403, 429, 500, 503]),
    body=st.one_of(
        st.binary(max_size=200),
        TOKEN_FIELDS.map(lambda d: json.dumps(d).encode()),
        JSON.map(lambda d: json.dumps(d).encode()),
    ),
    content_type=st.sampled_from(["application/json", "text/html", "application/octet-stream"]),
)
async def test_fuzzed_token_endpoint_answers_over_a_socket(
    scripted_idp: tuple[str, dict[str, Any]], status: int, body: bytes, content_type: str
) -> None:
    """The real token client on any answer of the endpoint: a Token or an IdentityError with a
    low-cardinality reason; never another exception, never a token in the error's text."""
    url, script = scripted_idp
    script.update(status=status, body=body, content_type=content_type)
    identity = OAuth2Identity(
        OAuth2Section(token_url=url, client_id="c", client_secret="s"), SystemClock()
    )
    outcome: Token | IdentityError
    try:
        outcome = await identity.login()
    except IdentityError as exc:
        outcome = exc
    finally:
        await identity.aclose()
    if isinstance(outcome, IdentityError):
        assert outcome.reason.replace("_", "").isalnum()
    else:
        assert 200 <= status < 300
        assert not any(c in outcome.access_token for c in "\r\n\0")
        assert outcome.access_token not in repr(outcome)
