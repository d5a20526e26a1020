"""The file store: one JSON file, written atomically with mode 0600 in a 0700 directory.

Writes go to a temporary file in the same directory, are fsynced, then renamed over the old file,
so a crash leaves either the old record or the new one, never half of either. Saves from one
process run one at a time, in the order they were asked for (they share the temporary file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.errors import StoreError, StoreUnreadable
from sidecar.store import SessionRecord

if TYPE_CHECKING:
    from sidecar.store.crypto import Sealer

#: a session file larger than this is not a session file
MAX_FILE_BYTES = 1 << 20


class FileStore:
    """Persists the session record to ``path``."""

    kind = "file"
    shared = False

    def __init__(self, path: Path, sealer: Sealer | None = None) -> None:
        self.path = path
        self._sealer = sealer
        #: saves run one at a time, in call order: concurrent ones (a background save after a
        #: refresh, then another) would share the temporary file and could leave it corrupt, or
        #: land an older record after a newer one
        self._save_lock = asyncio.Lock()

    def use_sealer(self, sealer: Sealer | None) -> None:
        self._sealer = sealer

    def check_writable(self) -> None:
        """Create the directory (0700) and prove it is writable: fail at start, not on save."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            probe = self.path.parent / f".{self.path.name}.probe-{os.getpid()}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            probe.unlink()
        except OSError as exc:
            raise StoreError(
                f"session directory {self.path.parent} is not writable: {exc.strerror}"
            ) from exc

    async def load(self) -> SessionRecord | None:
        record, stale_key = await asyncio.to_thread(self._read)
        if record is not None and stale_key:
            await self.save(record)  # a key rotation: from now on the file opens with the new key
        return record

    def _read(self) -> tuple[SessionRecord | None, bool]:
        """The stored record, and whether it was sealed with a previous key."""
        try:
            with self.path.open("rb") as fh:
                raw = fh.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return None, False
        except OSError as exc:
            raise StoreError(f"cannot read session file {self.path}: {exc.strerror}") from exc
        if len(raw) > MAX_FILE_BYTES:
            raise StoreUnreadable(f"session file {self.path} is larger than {MAX_FILE_BYTES} bytes")
        if not raw.strip():
            raise StoreUnreadable(f"session file {self.path} is empty")
        stale_key = False
        if self._sealer is not None:
            raw, stale_key = self._sealer.unseal(raw)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreUnreadable(
                f"session file {self.path} is not valid JSON (truncated or corrupt)"
            ) from exc
        return SessionRecord.from_dict(data), stale_key

    async def save(self, record: SessionRecord) -> None:
        payload = json.dumps(record.to_dict()).encode()
        if self._sealer is not None:
            payload = self._sealer.seal(payload)
        async with self._save_lock:
            await asyncio.to_thread(self._save, payload)

    def _save(self, payload: bytes) -> None:
        directory = self.path.parent
        tmp = directory / f".{self.path.name}.tmp-{os.getpid()}"
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # the umask must not widen it, nor an old file's mode
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot write session file {self.path}: {exc.strerror}") from exc

    async def clear(self) -> None:
        await asyncio.to_thread(self._clear)

    def _clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot remove session file {self.path}: {exc.strerror}") from exc

    async def aclose(self) -> None:
        return None
