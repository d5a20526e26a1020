"""Client TLS contexts built from a ``tls`` config section (``upstream.tls``, ``identity.tls``).

One function, so the upstream and the identity provider follow the same model: verification on
unless switched off on purpose, an optional private CA bundle, an optional client certificate for
mutual TLS, and a floor on the protocol version.
"""

from __future__ import annotations

import ssl

from sidecar.config import TLS


def tls_context(tls: TLS) -> ssl.SSLContext:
    """A client context for ``tls``. Reads files: call it off the event loop (``to_thread``).

    Raises OSError or ssl.SSLError when a file is missing or not a usable certificate or key.
    """
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
