"""The token file sink: the current access token in a file, for clients that cannot go through the
proxy (gRPC, database drivers), as Vault Agent's file sink does.

Every new token is written atomically: a temporary file beside the target, created with
``O_EXCL | O_NOFOLLOW`` and the configured mode (whatever the umask), flushed to disk, then renamed
over the target, so a reader sees the old token or the new one, never a torn write, and a
symbolic link planted at the temporary name cannot redirect the write. Writes run off the event
loop, one at a time, and only the newest token waiting is written. At logout the file is removed.
A write that fails is logged (``session.token_sink_failed``), never raised: the session goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from pathlib import Path

from sidecar.tokens import Token

log = logging.getLogger("sidecar.session")

#: the last token to write, or _REMOVE to remove the file
_REMOVE = object()


def write_atomically(path: Path, content: bytes, mode: int) -> None:
    """Replace ``path`` with ``content`` (temp file + rename, ``mode``); raises OSError."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits off at creation
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


class TokenSink:
    """Writes each token it is offered to ``path`` (mode ``mode``), one write at a time."""

    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        self.mode = mode
        self._pending: object = None
        self._task: asyncio.Task[None] | None = None

    def offer(self, token: Token) -> None:
        """Write ``token`` soon (a newer offer before the write starts replaces it)."""
        self._pending = token
        self._start()

    def discard(self) -> None:
        """Remove the file soon (after any write in flight)."""
        self._pending = _REMOVE
        self._start()

    async def remove(self) -> None:
        """Remove the file (after any write in flight), e.g. at logout."""
        self.discard()
        await self.flush()

    async def flush(self) -> None:
        """Wait until every offered token (or removal) is done."""
        while self._task is not None:
            await asyncio.shield(self._task)

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="token-sink")

    async def _drain(self) -> None:
        try:
            while self._pending is not None:
                pending, self._pending = self._pending, None
                try:
                    if isinstance(pending, Token):
                        content = pending.access_token.encode()
                        await asyncio.to_thread(write_atomically, self.path, content, self.mode)
                        log.debug(
                            "session.token_sink_written", extra={"token": pending.fingerprint}
                        )
                    else:
                        await asyncio.to_thread(self._unlink)
                except OSError as exc:
                    log.error(
                        "session.token_sink_failed",
                        extra={"path": str(self.path), "error": exc.strerror or str(exc)},
                    )
        finally:
            self._task = None

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        log.info("session.token_sink_removed", extra={"path": str(self.path)})
