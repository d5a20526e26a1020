"""identity.tls: TLS toward the identity provider, against a real TLS provider on loopback with
certificates from trustme (verification, a private CA, mutual TLS, the protocol floor)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from tests.conftest import MakeSidecar
from tests.fakes.oidc import OIDCProvider
from tests.helpers import eventually

ServeTLS = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve_tls(ca: trustme.CA) -> AsyncIterator[ServeTLS]:
    """Serve an app over TLS on 127.0.0.1 with a certificate of ``ca``; returns its https URL.

    ``client_ca`` makes the server demand a client certificate issued by that CA (mTLS);
    ``max_version`` caps the protocol version the server speaks.
    """
    runners: list[web.AppRunner] = []

    async def _serve(
        app: web.Application,
        *,
        client_ca: trustme.CA | None = None,
        max_version: ssl.TLSVersion | None = None,
    ) -> str:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
        if client_ca is not None:
            client_ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        if max_version is not None:
            ctx.maximum_version = max_version
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        return f"https://127.0.0.1:{runner.addresses[0][1]}"

    yield _serve
    for runner in reversed(runners):
        await runner.cleanup()


def tls_identity(url: str, **tls: Any) -> dict[str, Any]:
    """Identity settings for the TLS provider at ``url``, discovered from its issuer."""
    return {"issuer": url, "token_url": None, "revocation_url": None, "timeout": 2, "tls": tls}


async def test_a_private_ca_is_trusted_through_ca_file(
    make_sidecar: MakeSidecar, serve_tls: ServeTLS, ca_file: str
) -> None:
    """Discovery and the token call go over TLS, the provider's certificate verified against
    identity.tls.ca_file."""
    idp = OIDCProvider()
    idp.issuer = await serve_tls(idp.app())
    sidecar = await make_sidecar(identity=tls_identity(idp.issuer, ca_file=ca_file))
    await eventually(lambda: sidecar.session.usable() is not None, what="login over TLS")
    assert idp.paths() == ["/.well-known/openid-configuration", "/token"]


async def test_an_untrusted_certificate_is_refused(
    make_sidecar: MakeSidecar, serve_tls: ServeTLS
) -> None:
    """Verification is on by default: a certificate from an unknown CA fails the login with the
    reason tls, and nothing is sent to that server."""
    idp = OIDCProvider()
    idp.issuer = await serve_tls(idp.app())
    sidecar = await make_sidecar(identity=tls_identity(idp.issuer))
    await eventually(lambda: sidecar.session.summary()["consecutive_failures"] >= 1)
    assert "certificate" in sidecar.session.summary()["last_error"]
    assert idp.calls == []
    assert sidecar.session.usable() is None


async def test_verify_false_accepts_any_certificate(
    make_sidecar: MakeSidecar, serve_tls: ServeTLS
) -> None:
    """identity.tls.verify: false switches verification off (on purpose only)."""
    idp = OIDCProvider()
    idp.issuer = await serve_tls(idp.app())
    sidecar = await make_sidecar(identity=tls_identity(idp.issuer, verify=False))
    await eventually(lambda: sidecar.session.usable() is not None)


async def test_mutual_tls_with_a_client_certificate(
    make_sidecar: MakeSidecar, serve_tls: ServeTLS, ca: trustme.CA, ca_file: str, tmp_path: Path
) -> None:
    """A provider that demands a client certificate: without one no token is had; with
    identity.tls.cert_file/key_file the login succeeds."""
    client_ca = trustme.CA()
    client = client_ca.issue_cert("svc-client")
    cert_file, key_file = tmp_path / "client.crt", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    idp = OIDCProvider()
    idp.issuer = await serve_tls(idp.app(), client_ca=client_ca)

    without = await make_sidecar(identity=tls_identity(idp.issuer, ca_file=ca_file))
    await eventually(lambda: without.session.summary()["consecutive_failures"] >= 1)
    assert without.session.usable() is None
    assert "identity.tls.cert_file" in str(without.session.summary()["last_error"])

    with_cert = await make_sidecar(
        identity=tls_identity(
            idp.issuer, ca_file=ca_file, cert_file=str(cert_file), key_file=str(key_file)
        )
    )
    await eventually(lambda: with_cert.session.usable() is not None, what="login with mTLS")


async def test_min_version_1_3_refuses_a_tls_1_2_provider(
    make_sidecar: MakeSidecar, serve_tls: ServeTLS, ca_file: str
) -> None:
    """identity.tls.min_version: "1.3" against a provider capped at TLS 1.2 fails; the default
    floor (1.2) works with it."""
    idp = OIDCProvider()
    idp.issuer = await serve_tls(idp.app(), max_version=ssl.TLSVersion.TLSv1_2)
    strict = await make_sidecar(
        identity=tls_identity(idp.issuer, ca_file=ca_file, min_version="1.3")
    )
    await eventually(lambda: strict.session.summary()["consecutive_failures"] >= 1)
    assert strict.session.usable() is None
    assert strict.session.summary()["last_error"]  # the handshake is reset or refused
    assert idp.calls == []
    default = await make_sidecar(identity=tls_identity(idp.issuer, ca_file=ca_file))
    await eventually(lambda: default.session.usable() is not None)


async def test_a_rotated_client_certificate_is_used_at_the_next_call(
    make_sidecar: MakeSidecar,
    serve_tls: ServeTLS,
    ca_file: str,
    tmp_path: Path,
) -> None:
    """The client certificate for the provider is replaced on disk (a renewed Secret): the next
    login attempt uses the new files, with no SIGHUP and no restart."""
    client_ca = trustme.CA()
    cert_file, key_file = tmp_path / "client.crt", tmp_path / "client.key"

    def install(issuer: trustme.CA) -> None:
        leaf = issuer.issue_cert("svc-client")
        leaf.cert_chain_pems[0].write_to_path(str(cert_file))
        leaf.private_key_pem.write_to_path(str(key_file))

    install(trustme.CA())  # not the CA the provider trusts
    idp = OIDCProvider()
    idp.issuer = await serve_tls(idp.app(), client_ca=client_ca)
    sidecar = await make_sidecar(
        identity=tls_identity(
            idp.issuer, ca_file=ca_file, cert_file=str(cert_file), key_file=str(key_file)
        ),
        tls_recheck_every=0.05,
    )
    await eventually(lambda: sidecar.session.summary()["consecutive_failures"] >= 2)
    assert sidecar.session.usable() is None
    install(client_ca)
    await eventually(lambda: sidecar.session.usable() is not None, what="login after rotation")
