"""The proxy's Unix socket (``listen.unix_socket``): bound safely, mode 0660, removed at the end.

A socket file left by an earlier run that nothing listens on any more is replaced; anything else
at the path (a live socket, a regular file, a directory, a symlink) is left alone and refused at
start, naming the key. The mode is set before ``listen()``, so no one can connect while the
file still has the process umask's permissions.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

from sidecar.errors import ConfigError

#: owner and group may connect (the service beside sidecar shares its group in a pod)
SOCKET_MODE = 0o660
_KEY = "listen.unix_socket"


class UnixListener:
    """A listening Unix socket bound at ``path`` by this process."""

    def __init__(self, path: Path, sock: socket.socket, inode: int) -> None:
        self.path = path
        self.sock = sock
        self._inode = inode

    @classmethod
    def bind(cls, path: Path, backlog: int = 1024) -> UnixListener:
        """Listen at ``path``, replacing a stale socket file; a ConfigError naming
        ``listen.unix_socket`` when the path is taken or cannot be bound."""
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, SOCKET_MODE)
            inode = os.lstat(path).st_ino
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"{_KEY}: cannot listen on {path}: {exc.strerror or exc}") from exc
        return cls(path, sock, inode)

    async def remove(self) -> None:
        """Close the socket and remove its file, unless another process replaced it since."""
        self.sock.close()
        await asyncio.to_thread(self._unlink_own)

    def _unlink_own(self) -> None:
        with contextlib.suppress(OSError):
            info = os.lstat(self.path)
            if stat.S_ISSOCK(info.st_mode) and info.st_ino == self._inode:
                os.unlink(self.path)


def _clear_stale(path: Path) -> None:
    """Remove ``path`` when it is a socket nothing listens on; refuse anything else there."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"{_KEY}: cannot look at {path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"{_KEY}: {path} exists and is not a socket; it is left alone")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a live listener with a full backlog answers EAGAIN, not a wait
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        pass  # stale: nothing listens behind it
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # gone meanwhile: nothing to remove
            raise ConfigError(f"{_KEY}: {path} is in use: {exc.strerror}") from exc
        return
    else:
        raise ConfigError(f"{_KEY}: another process is listening on {path}")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
