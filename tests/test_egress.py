"""HTTPS_PROXY / HTTP_PROXY / NO_PROXY on both legs, through a real forward proxy on loopback."""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator

import aiohttp
import pytest
import trustme

from sidecar.errors import ConfigError
from sidecar.http.egress import Egress
from tests.conftest import MakeSidecar, Serve, proxy_url
from tests.fakes.forward_proxy import ForwardProxy
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import eventually


@pytest.fixture
async def forward_proxy() -> AsyncIterator[tuple[ForwardProxy, int]]:
    proxy = ForwardProxy()
    port = await proxy.start()
    yield proxy, port
    await proxy.stop()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


def test_no_proxy_entries_match_as_curl_reads_them() -> None:
    """NO_PROXY: names, domain suffixes with or without a dot, ports, addresses, networks and
    ``*``; the lower-case variable wins over the upper-case one; no proxy for a scheme means
    direct."""
    egress = Egress(
        {
            "HTTPS_PROXY": "http://upper:3128",
            "https_proxy": "http://lower:3128",
            "NO_PROXY": "internal.corp, .svc, 10.0.0.0/8, api.example.com:8443, [::1]",
        }
    )
    via = egress.proxy_for("https://api.example.com/x")
    assert via is not None
    assert via.host == "lower"
    assert egress.proxy_for("https://api.example.com:8443/x") is None
    assert egress.proxy_for("https://idp.internal.corp/token") is None
    assert egress.proxy_for("https://internal.corp/token") is None
    assert egress.proxy_for("https://notinternal.corp/token") is not None
    assert egress.proxy_for("https://redis.ns.svc/") is None
    assert egress.proxy_for("https://10.1.2.3/") is None
    assert egress.proxy_for("https://11.1.2.3/") is not None
    assert egress.proxy_for("https://[::1]:9/") is None
    assert egress.proxy_for("http://api.example.com/") is None  # no HTTP_PROXY set
    assert Egress({"https_proxy": "http://p:1", "no_proxy": "*"}).proxy_for("https://a/") is None
    assert not Egress({})


def test_a_proxy_url_that_cannot_be_used_is_a_config_error_without_its_password() -> None:
    """Only http:// proxies: another scheme names the variable, and never quotes credentials."""
    with pytest.raises(ConfigError) as caught:
        Egress({"HTTPS_PROXY": "socks5://user:hunter2@proxy:1080"})
    assert "HTTPS_PROXY" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    via = Egress({"HTTP_PROXY": "user:s3cret@proxy:8080"}).proxy_for("http://a/")
    assert via is not None
    assert (via.host, via.port) == ("proxy", 8080)
    assert via.authorization == "Basic " + base64.b64encode(b"user:s3cret").decode()
    assert "s3cret" not in repr(via)
    assert "s3cret" not in via.url


async def test_both_legs_tunnel_through_https_proxy(
    make_sidecar: MakeSidecar,
    serve: Serve,
    idp: FakeIdP,
    upstream: FakeUpstream,
    ca: trustme.CA,
    ca_file: str,
    forward_proxy: tuple[ForwardProxy, int],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With HTTPS_PROXY set, the login and the proxied request each go through a CONNECT tunnel
    to their own host and port, with the proxy's Basic credentials; TLS runs inside the tunnel
    (the upstream still verifies the token), so the proxy never sees the token."""
    proxy, port = forward_proxy
    proxy.authorization = "Basic " + base64.b64encode(b"egress:pw").decode()
    monkeypatch.setenv("HTTPS_PROXY", f"http://egress:pw@127.0.0.1:{port}")
    idp_tls = await serve(idp.app(), ssl_context=server_context(ca))
    upstream_tls = await serve(upstream.app(), ssl_context=server_context(ca))
    sidecar = await make_sidecar(
        identity={
            "token_url": f"{idp_tls}/token",
            "revocation_url": f"{idp_tls}/revoke",
            "tls": {"ca_file": ca_file},
        },
        upstream={"url": upstream_tls, "tls": {"ca_file": ca_file}},
    )
    await eventually(lambda: sidecar.session.usable() is not None, what="login through the proxy")
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 200, await resp.text()
    assert upstream.seen[-1].token_valid
    targets = {t.target for t in proxy.tunnels}
    assert targets == {idp_tls.split("//")[1], upstream_tls.split("//")[1]}, targets
    assert all(t.authorization == proxy.authorization for t in proxy.tunnels)
    assert proxy.others == []


async def test_no_proxy_sends_listed_hosts_direct(
    make_sidecar: MakeSidecar,
    idp_url: str,
    upstream_url: str,
    upstream: FakeUpstream,
    forward_proxy: tuple[ForwardProxy, int],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP_PROXY with NO_PROXY naming the identity provider's host and port: the login goes
    direct, and the plain-HTTP upstream is reached through a CONNECT tunnel (the token is never
    written into a request line the proxy could log)."""
    proxy, port = forward_proxy
    monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", idp_url.split("//")[1])
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.usable() is not None)
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 200, await resp.text()
    assert upstream.seen[-1].token_valid
    assert [t.target for t in proxy.tunnels] == [upstream_url.split("//")[1]]
    assert proxy.others == []


async def test_a_proxy_that_refuses_the_tunnel_is_a_clear_502(
    make_sidecar: MakeSidecar,
    idp_url: str,
    upstream: FakeUpstream,
    forward_proxy: tuple[ForwardProxy, int],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 403 to CONNECT: the caller gets sidecar's 502 naming the egress proxy and its answer,
    and nothing reaches the upstream."""
    proxy, port = forward_proxy
    proxy.refuse = True
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", idp_url.split("//")[1])
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.usable() is not None)
    async with http.get(proxy_url(sidecar, "/x")) as resp:
        assert resp.status == 502
        assert resp.headers["X-Sidecar-Error"] == "1"
        detail = (await resp.json())["detail"]
    assert "egress proxy" in detail, detail
    assert "403" in detail, detail
    assert upstream.seen == []
