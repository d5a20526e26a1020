"""Opening the configured session store, with its encryption at rest.

The composition root (:mod:`sidecar.app`) opens the store at start and, on a SIGHUP, builds the
sealer again from the key files as they are then: a changed ``session.encryption_key_file`` (or a
rotated Secret behind the same path) is applied without a restart.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sidecar.errors import ConfigError
from sidecar.store import SessionStore

if TYPE_CHECKING:
    from sidecar.config.models import Session
    from sidecar.store.crypto import Sealer


def sealer_for(cfg: Session, namespace: str) -> Sealer | None:
    """The sealer of ``cfg``'s key files as they are now (None: no encryption at rest); a key
    file that cannot be used is a ConfigError naming its key."""
    if cfg.encryption_key_file is None:
        return None
    from sidecar.store.crypto import Sealer  # the cryptography package, only when used

    return Sealer.from_file(cfg.encryption_key_file, namespace, cfg.previous_encryption_key_files)


def same_keys(a: Sealer | None, b: Sealer | None) -> bool:
    """True when both seal with the same key and open with the same keys (or both are None)."""
    if a is None or b is None:
        return a is b
    return a.keys == b.keys


def store_problems(cfg: Session) -> list[str]:
    """What makes the configured store unusable, found without connecting to it (for
    ``check-config`` and start): a file store's directory that is not sidecar's alone, a redis
    URL the client cannot use. One ``"dotted.key: message"`` line each, never quoting a URL."""
    if cfg.store == "file":
        from sidecar.store.file import directory_problem

        problem = directory_problem(cfg.path.parent)
        return [] if problem is None else [f"session.path: {problem}"]
    if cfg.store == "redis":
        from sidecar.store.redis import url_problems  # the redis client library, only when used

        return url_problems(cfg)
    return []


async def open_store(cfg: Session, namespace: str, sealer: Sealer | None) -> SessionStore:
    """The store ``cfg`` names, for the identity ``namespace``; problems are ConfigErrors that
    never quote a redis URL (it may carry a password). Only the module of that store is
    imported; the file checks and reads run in a thread: a reload opens a store while the proxy
    serves."""
    if cfg.store == "file":
        from sidecar.store.file import FileStore

        store = FileStore(cfg.path, sealer)
        await asyncio.to_thread(store.check_writable)
        return store
    if cfg.store == "redis":
        from sidecar.store.redis import RedisStore, url_problem

        source = cfg.redis_source()
        key = source.where
        try:
            url = await asyncio.to_thread(source.read)
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {source.file}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{key}: {source.file} is not UTF-8 text") from exc
        try:
            return RedisStore(url, namespace, sealer, url_file=cfg.redis_url_file)
        except ValueError:
            # never the library's message: it quotes the part of the URL it could not read
            raise ConfigError(f"{key}: {url_problem(url) or 'not a valid redis URL'}") from None
    from sidecar.store.memory import MemoryStore

    return MemoryStore()
