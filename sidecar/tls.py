"""Client TLS contexts built from a ``tls`` config section (``upstream.tls``, ``identity.tls``).

One function, so the upstream and the identity provider follow the same model: verification on
unless switched off on purpose, an optional private CA bundle, an optional client certificate for
mutual TLS, and a floor on the protocol version.
"""

from __future__ import annotations

import os
import ssl

from sidecar.config.sections import TLS

#: seconds between looks at a tls section's files for a rotation (cert-manager, a renewed
#: Kubernetes Secret): a changed file is read again without a SIGHUP
RECHECK_EVERY = 10.0

#: what identifies the files' current contents: (inode, size, mtime) each, None when missing
Stamp = tuple[tuple[int, int, int] | None, ...]


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


def has_files(tls: TLS) -> bool:
    """True when the section names a file that can be rotated."""
    return any(f is not None for f in (tls.ca_file, tls.cert_file, tls.key_file))


def file_stamp(tls: TLS) -> Stamp:
    """The stamp of the section's files; a rotation changes it. Blocking: run it off the event
    loop. A Kubernetes Secret volume swaps a symlink, which stat follows: a new inode."""
    stamp: list[tuple[int, int, int] | None] = []
    for path in (tls.ca_file, tls.cert_file, tls.key_file):
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            stamp.append(None)
            continue
        stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamp)
