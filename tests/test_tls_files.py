"""The one watcher of a tls section's files (sidecar/tls.py ``TLSFiles``), on a fake clock."""

from __future__ import annotations

from pathlib import Path

import trustme

from sidecar.config.sections import TLS
from sidecar.tls import TLSFiles
from tests.fakes.clock import FakeClock


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
