"""The one watcher of a tls section's files (sidecar/tls.py ``TLSFiles``), on a fake clock."""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

import pytest
import trustme

from sidecar.config.sections import TLS
from sidecar.tls import TLSFiles, system_context
from tests.fakes.clock import FakeClock
from tests.helpers import count_tls_contexts


async def test_a_rotation_is_seen_once_and_looks_wait_for_the_interval(tmp_path: Path) -> None:
    """After a context is built the files are looked at again only once ``recheck_every`` has
    passed; a renewed file counts as one change, and the next look sees none."""
    clock = FakeClock()
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    files = TLSFiles(TLS(ca_file=ca_file), clock, recheck_every=10)
    await files.context()
    await clock.advance(9.5)
    assert not files.due()
    await clock.advance(0.5)
    assert files.due()
    assert not await files.changed()
    assert not files.due(), "a look starts the interval again"
    renewed = tmp_path / "ca.new"
    trustme.CA().cert_pem.write_to_path(str(renewed))
    renewed.replace(ca_file)  # as a Secret volume swaps its files in: a new inode
    assert await files.changed()
    assert not await files.changed()


async def test_a_section_without_files_is_never_due(tmp_path: Path) -> None:
    """Verification against the system store names no file: nothing to watch, ever."""
    clock = FakeClock()
    files = TLSFiles(TLS(), clock, recheck_every=10)
    await files.context()
    await clock.advance(3600)
    assert not files.watched
    assert not files.due()


async def test_sections_at_the_defaults_share_one_verified_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every section asking only for the system trust store gets the process's one context
    (aiohttp's verified one, which aiohttp built at its import): no second copy of the CA bundle
    is parsed (about 1 MB each). It verifies as a context of its own would: certificate and
    host name required, TLS 1.2 at least. A section with a file or another setting still gets
    a context of its own each time."""
    built = count_tls_contexts(monkeypatch)
    clock = FakeClock()
    first = await TLSFiles(TLS(), clock).context()
    second = await TLSFiles(TLS(verify=True, min_version="1.2"), clock).context()
    assert first is second
    assert first.verify_mode == ssl.CERT_REQUIRED
    assert first.check_hostname
    assert first.minimum_version == ssl.TLSVersion.TLSv1_2
    assert first.cert_store_stats()["x509_ca"] > 0, "the system CA bundle"
    assert built == []

    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    others = [
        await TLSFiles(tls, clock).context()
        for tls in (TLS(ca_file=ca_file), TLS(min_version="1.3"), TLS(verify=False))
    ]
    assert len(built) == 3
    assert all(ctx is not first for ctx in others)
    assert others[1].minimum_version == ssl.TLSVersion.TLSv1_3
    assert others[2].verify_mode == ssl.CERT_NONE
    assert first.verify_mode == ssl.CERT_REQUIRED, "the shared context was not changed"


def test_without_aiohttp_the_shared_context_is_built_once_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where aiohttp is not loaded (or its context is not the strict one), the shared context is
    built from the system trust store with the same checks."""
    monkeypatch.delitem(sys.modules, "aiohttp.connector")
    ctx = system_context.__wrapped__()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.cert_store_stats()["x509_ca"] > 0
