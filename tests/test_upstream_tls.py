"""TLS toward the upstream, against real TLS servers with certificates made by trustme:
verification on by default, a custom CA bundle, client certificates (mTLS), minimum version."""

from __future__ import annotations

import io
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from tests.conftest import MakeSidecar, Serve, proxy_url
from tests.fakes.upstream import FakeUpstream
from tests.helpers import events, eventually


def server_context(
    ca: trustme.CA, *, require_client_cert: bool = False, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 issued by ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(ctx)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


Through = Callable[[ssl.SSLContext, dict[str, Any]], Awaitable[tuple[int, str]]]


@pytest.fixture
def through(
    make_sidecar: MakeSidecar, serve: Serve, upstream: FakeUpstream, http: aiohttp.ClientSession
) -> Through:
    """Serve the fake upstream with a server context, start a sidecar with ``upstream.tls``
    settings toward it, and return what a GET through the sidecar answered (status, body)."""

    async def _through(server: ssl.SSLContext, tls: dict[str, Any]) -> tuple[int, str]:
        url = await serve(upstream.app(), ssl_context=server)
        sidecar = await make_sidecar(upstream={"url": url, "tls": tls})
        await eventually(lambda: sidecar.session.usable() is not None)
        async with http.get(proxy_url(sidecar, "/x")) as resp:
            return resp.status, await resp.text()

    return _through


async def test_unknown_ca_is_refused_with_a_clear_502(
    through: Through, upstream: FakeUpstream, ca: trustme.CA, log_output: io.StringIO
) -> None:
    """Verification is on by default: a certificate from an unknown CA gives 502, nothing is
    forwarded, and the answer and the log say the certificate was not trusted and which key to
    set."""
    status, body = await through(server_context(ca), {})
    assert status == 502
    assert "certificate verify failed" in body
    assert "upstream.tls.ca_file" in body
    assert upstream.seen == []
    assert "upstream.tls.ca_file" in log_output.getvalue()


async def test_custom_ca_file_is_trusted(
    through: Through, upstream: FakeUpstream, ca: trustme.CA, ca_file: str
) -> None:
    """upstream.tls.ca_file: the same server is trusted and the request carries a valid token."""
    assert (await through(server_context(ca), {"ca_file": ca_file}))[0] == 200
    assert upstream.seen[-1].token_valid


async def test_client_certificate_for_a_server_that_requires_one(
    through: Through, upstream: FakeUpstream, ca: trustme.CA, ca_file: str, tmp_path: Path
) -> None:
    """mTLS: with cert_file and key_file the request passes; without them the server refuses the
    handshake and the caller gets 502 naming the setting."""
    client = ca.issue_cert("sidecar-client@example.test")
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    mtls = server_context(ca, require_client_cert=True)
    tls = {"ca_file": ca_file, "cert_file": str(cert_file), "key_file": str(key_file)}
    assert (await through(mtls, tls))[0] == 200
    status, body = await through(mtls, {"ca_file": ca_file})
    assert status == 502
    assert "upstream.tls.cert_file" in body
    assert len(upstream.seen) == 1


@pytest.mark.parametrize(("min_version", "status"), [("1.2", 200), ("1.3", 502)])
async def test_minimum_version_against_a_server_capped_at_tls_1_2(
    through: Through, ca: trustme.CA, ca_file: str, min_version: str, status: int
) -> None:
    """A server that speaks at most TLS 1.2 is reached with the default minimum (1.2) and refused
    with min_version "1.3"."""
    capped = server_context(ca, max_version=ssl.TLSVersion.TLSv1_2)
    tls = {"ca_file": ca_file, "min_version": min_version}
    assert (await through(capped, tls))[0] == status


async def test_verification_can_be_switched_off_on_purpose(
    through: Through, ca: trustme.CA
) -> None:
    """verify: false reaches a server whose CA is unknown (for local development only)."""
    assert (await through(server_context(ca), {"verify": False}))[0] == 200


async def test_rotated_client_certificate_is_used_without_a_sighup(
    make_sidecar: MakeSidecar,
    serve: Serve,
    upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    ca: trustme.CA,
    ca_file: str,
    tmp_path: Path,
    log_output: io.StringIO,
) -> None:
    """As cert-manager renews one: the client certificate and key files are replaced on disk and
    the next requests use them, with no SIGHUP. A rotation to a file that is not a certificate is
    logged, and the last good certificate stays in use."""
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"

    def install(issuer: trustme.CA) -> None:
        leaf = issuer.issue_cert("sidecar-client@example.test")
        leaf.cert_chain_pems[0].write_to_path(str(cert_file))
        leaf.private_key_pem.write_to_path(str(key_file))

    def logged(event: str) -> int:
        return sum(1 for e in events(log_output) if e["event"] == event)

    install(trustme.CA())  # a certificate the server does not trust
    url = await serve(upstream.app(), ssl_context=server_context(ca, require_client_cert=True))
    tls_keys = {"ca_file": ca_file, "cert_file": str(cert_file), "key_file": str(key_file)}
    sidecar = await make_sidecar(upstream={"url": url, "tls": tls_keys}, tls_recheck_every=0.05)
    await eventually(lambda: sidecar.session.usable() is not None)

    async def status() -> int:
        async with http.get(proxy_url(sidecar, "/x")) as resp:
            return resp.status

    assert await status() == 502
    install(ca)
    await eventually(lambda: logged("proxy.tls_reloaded") >= 1, what="the new certificate")
    assert await status() == 200
    failed = logged("proxy.tls_reload_failed")
    cert_file.write_text("not a certificate\n")
    await eventually(lambda: logged("proxy.tls_reload_failed") > failed, what="a refusal")
    assert await status() == 200
    assert len(upstream.seen) == 2
