"""The file store: one JSON file, written atomically with mode 0600 in a 0700 directory of its own.

Writes go to a temporary file in the same directory, are fsynced, then renamed over the old file,
so a crash leaves either the old record or the new one, never half of either. Saves from one
process run one at a time, in the order they were asked for.

The directory must be sidecar's alone (:func:`directory_problem`): owned by the user sidecar runs
as and writable by nobody else. The sticky bit is not enough: it stops others from removing
sidecar's files, not from creating the session file's name before sidecar does (a planted session
would be read at the next start). Missing directories are created 0700. No symlink is followed,
whatever name it is planted at: temporary and probe files get random names and are created with
``O_CREAT | O_EXCL | O_NOFOLLOW``, and the session file is opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.errors import ConfigError, StoreError, StoreUnreadable
from sidecar.store import SessionRecord

if TYPE_CHECKING:
    from sidecar.store.crypto import Sealer

#: a session file larger than this is not a session file
MAX_FILE_BYTES = 1 << 20

#: a new file that follows no symlink and never opens one that exists
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def directory_problem(directory: Path) -> str | None:
    """What makes ``directory`` unfit to hold the session, or None (also when it does not exist
    yet: it will be created 0700). Unfit: not a directory, owned by another user, or writable by
    the group or by others (sticky bit or not)."""
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot inspect the directory {directory}: {exc.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory"
    if info.st_uid != os.geteuid():
        return (
            f"the directory {directory} belongs to another user (uid {info.st_uid}); the session "
            "needs a directory of sidecar's own"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"the directory {directory} is writable by other users (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); the session needs a directory of sidecar's own "
            "(chmod 0700, or name a subdirectory that sidecar creates)"
        )
    return None


def _make_private(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each 0700 whatever the umask."""
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for candidate in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made by a concurrent start: checked next
            os.mkdir(candidate, 0o700)
            os.chmod(candidate, 0o700)


def random_tag() -> str:
    """The random part of a temporary or probe file's name."""
    return secrets.token_hex(8)


def _create_unique(directory: Path, stem: str, tag: Callable[[], str]) -> tuple[Path, int]:
    """A new file in ``directory`` under a random name (mode 0600): its path and descriptor."""
    path = directory / f".{stem}.{tag()}.tmp"
    fd = os.open(path, _CREATE, 0o600)
    return path, fd


class FileStore:
    """Persists the session record to ``path``."""

    kind = "file"
    shared = False

    def __init__(
        self, path: Path, sealer: Sealer | None = None, *, tag: Callable[[], str] = random_tag
    ) -> None:
        self.path = path
        self._sealer = sealer
        #: the random part of the temporary files' names (O_EXCL refuses a name already taken)
        self._tag = tag
        #: saves run one at a time, in call order: concurrent ones (a background save after a
        #: refresh, then another) could land an older record after a newer one
        self._save_lock = asyncio.Lock()

    def use_sealer(self, sealer: Sealer | None) -> None:
        self._sealer = sealer

    def check_writable(self) -> None:
        """Create the directory (0700), refuse one that is not sidecar's alone (ConfigError
        naming ``session.path``), and prove it is writable: fail at start, not on save."""
        directory = self.path.parent
        problem = directory_problem(directory)
        if problem is not None:
            raise ConfigError(f"session.path: {problem}")
        try:
            _make_private(directory)
            problem = directory_problem(directory)
            if problem is not None:
                raise ConfigError(f"session.path: {problem}")
            probe, fd = _create_unique(directory, f"{self.path.name}.probe", self._tag)
            os.close(fd)
            probe.unlink()
        except OSError as exc:
            raise StoreError(
                f"session directory {directory} is not writable: {exc.strerror}"
            ) from exc

    async def load(self) -> SessionRecord | None:
        record, stale_key = await asyncio.to_thread(self._read)
        if record is not None and stale_key:
            await self.save(record)  # a key rotation: from now on the file opens with the new key
        return record

    def _read(self) -> tuple[SessionRecord | None, bool]:
        """The stored record, and whether it was sealed with a previous key."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, False
        except OSError as exc:
            if os.path.islink(self.path):  # O_NOFOLLOW: ELOOP
                raise StoreUnreadable(
                    f"session file {self.path} is a symbolic link; it is not followed"
                ) from exc
            raise StoreError(f"cannot read session file {self.path}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "rb") as fh:
                raw = fh.read(MAX_FILE_BYTES + 1)
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
        await self._write(self._save, payload)

    async def _write(self, change: Callable[..., None], *args: Any) -> None:
        """Run one change of the file in a thread, one at a time. A cancelled caller still
        waits for its thread to finish (the thread cannot be stopped): otherwise a later write,
        the one at stop or a logout's removal, could land before this older one and be undone
        by it."""
        async with self._save_lock:
            running = asyncio.ensure_future(asyncio.to_thread(change, *args))
            try:
                await asyncio.shield(running)
            except asyncio.CancelledError:
                with contextlib.suppress(StoreError):
                    await running
                raise

    def _save(self, payload: bytes) -> None:
        directory = self.path.parent
        tmp: Path | None = None
        try:
            _make_private(directory)
            tmp, fd = _create_unique(directory, self.path.name, self._tag)
            try:
                os.fchmod(fd, 0o600)  # the umask must not narrow or widen it
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)  # a rename replaces a symlink, never writes through it
            tmp = None
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            if tmp is not None:  # only a file this save created is removed
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise StoreError(f"cannot write session file {self.path}: {exc.strerror}") from exc

    async def clear(self) -> None:
        await self._write(self._clear)

    def _clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot remove session file {self.path}: {exc.strerror}") from exc

    async def aclose(self) -> None:
        return None
