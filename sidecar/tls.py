"""Client TLS contexts built from a ``tls`` config section (``upstream.tls``, ``identity.tls``).

One function, so the upstream and the identity provider follow the same model: verification on
unless switched off on purpose, an optional private CA bundle, an optional client certificate for
mutual TLS, and a floor on the protocol version. One watcher (:class:`TLSFiles`), so both notice a
rotated certificate alike: by the files' stamp, looked at every ``RECHECK_EVERY`` seconds.
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import sys

from sidecar.clock import Clock
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


def system_defaults(tls: TLS) -> bool:
    """True when the section asks for nothing but the defaults: verification against the system
    CA bundle, no client certificate, TLS 1.2 at least. aiohttp's own verified context is exactly
    that (built when aiohttp is imported), so a client that uses aiohttp can take it instead of
    a context of its own: each holds its own parsed copy of the bundle, about 1 MB."""
    return tls.verify and tls.min_version == "1.2" and not has_files(tls)


@functools.cache
def system_context() -> ssl.SSLContext:
    """The one client context of this process for sections at :func:`system_defaults`.

    That is aiohttp's verified context when aiohttp is loaded and its context checks what
    :func:`tls_context` would (the system CA bundle, host names, TLS 1.2 at least): aiohttp
    builds it when imported, and a second one would parse the bundle again. Otherwise one is
    built here, once. Reads files the first time: call it off the event loop.
    """
    connector = sys.modules.get("aiohttp.connector")
    theirs = getattr(connector, "_SSL_CONTEXT_VERIFIED", None)
    if (
        isinstance(theirs, ssl.SSLContext)
        and theirs.verify_mode == ssl.CERT_REQUIRED
        and theirs.check_hostname
        and theirs.minimum_version == ssl.TLSVersion.TLSv1_2
    ):
        return theirs
    return tls_context(TLS())


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


class TLSFiles:
    """The files of one ``tls`` section: builds the context from them and tells when a rotation
    (cert-manager, a renewed Kubernetes Secret) changed them since. Every file access runs in a
    thread."""

    def __init__(self, tls: TLS, clock: Clock, recheck_every: float = RECHECK_EVERY) -> None:
        self.tls = tls
        #: seconds between looks at the files (:meth:`due`)
        self.recheck_every = recheck_every
        self._clock = clock
        #: the files as last looked at, and when
        self._stamp: Stamp = ()
        self._looked_at = clock.monotonic()

    @property
    def watched(self) -> bool:
        """True when the section names a file that can be rotated."""
        return has_files(self.tls)

    async def context(self) -> ssl.SSLContext:
        """A client context from the files as they are now; without files or other settings,
        the process's :func:`system_context`. The stamp is taken first: a file that changes
        while the context is built counts as changed at the next look. Raises OSError or
        ssl.SSLError (see :func:`tls_context`)."""
        self._stamp = await asyncio.to_thread(file_stamp, self.tls)
        self._looked_at = self._clock.monotonic()
        if system_defaults(self.tls):
            return await asyncio.to_thread(system_context)
        return await asyncio.to_thread(tls_context, self.tls)

    def due(self) -> bool:
        """True when there are files and ``recheck_every`` seconds passed since the last look."""
        return self.watched and self._clock.monotonic() - self._looked_at >= self.recheck_every

    async def changed(self) -> bool:
        """Look at the files now: True when they changed since the last look or context. A
        change counts once: files that cannot be used are tried again when they change again."""
        self._looked_at = self._clock.monotonic()
        stamp = await asyncio.to_thread(file_stamp, self.tls)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True
