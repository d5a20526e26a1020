"""The Redis store: one session shared by every sidecar process of the same identity.

Keys, namespaced by the identity's fingerprint (``sidecar:<fp>:...``):

* ``session``  the record (JSON, or an AES-GCM envelope when a key is configured)
* ``lock``     the renewal lock: ``SET NX PX <lease>`` holding the owner's id
* ``fence``    a counter; each lock acquisition takes the next value as its fencing token
* ``written``  the fencing token of the last fenced write
* ``events``   a pub/sub channel announcing every write

Every Redis failure is translated into :class:`~sidecar.errors.StoreError` here, so the session
manager can keep serving with its in-memory token while Redis is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel
from redis.credentials import CredentialProvider
from redis.exceptions import RedisError

from sidecar.config.models import REDIS_SCHEME_RULE, REDIS_SCHEMES, Session
from sidecar.errors import ConfigError, StoreError, StoreUnreadable
from sidecar.store import SessionRecord
from sidecar.store.crypto import Sealer

# Write the record only if no newer fencing token has written (KEYS: session, written, events;
# ARGV: payload, fence). Returns 1 when written.
_SAVE_FENCED = """
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[2]) < last then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[2])
return 1
"""

# Delete the lock only if we still own it (KEYS: lock; ARGV: owner).
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


SENTINEL_SCHEME = "redis+sentinel://"


def connect(
    url: str, timeout: float, url_file: Path | None = None
) -> tuple[aioredis.Redis, list[aioredis.Redis]]:
    """A client for ``redis://``, ``rediss://``, ``unix://`` or a Sentinel-managed master:
    ``redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]``.

    With ``url_file`` (where ``url`` was read from), each new connection takes its username and
    password from that file as it is then: a rotated Secret is used from the next reconnect on.
    Also returns the Sentinel clients, which must be closed with the master's client.
    """
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    credentials = None
    if url_file is not None and _credentials(url) != ("",):
        credentials = UrlFileCredentials(url_file)
    if not url.startswith(SENTINEL_SCHEME):
        pool = aioredis.ConnectionPool.from_url(url, health_check_interval=10, **options)
        if credentials is not None:  # instead of the URL's, which redis-py refuses alongside
            pool.connection_kwargs.pop("username", None)
            pool.connection_kwargs.pop("password", None)
            pool.connection_kwargs["credential_provider"] = credentials
        return aioredis.Redis.from_pool(pool), []  # the client owns the pool: aclose closes it
    hosts, service, db, password = parse_sentinel_url(url)
    sentinel = Sentinel(hosts, sentinel_kwargs=dict(options), **options)
    auth: dict[str, Any] = {"password": password}
    if credentials is not None:
        auth = {"credential_provider": credentials}
    master: aioredis.Redis = sentinel.master_for(service, db=db, **auth)
    return master, list(sentinel.sentinels)


def _credentials(url: str) -> tuple[str] | tuple[str, str]:
    """``(password,)`` or ``(username, password)`` of a redis URL, as AUTH takes them."""
    if url.startswith(SENTINEL_SCHEME):
        username, password = None, parse_sentinel_url(url)[3]
    else:
        parts = parse_url(url)
        username, password = parts.get("username"), parts.get("password")
    return (username, password or "") if username else (password or "",)


class UrlFileCredentials(CredentialProvider):
    """The credentials of the redis URL in a file, read again for every new connection."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        url = self._path.read_text(encoding="utf-8").strip()
        try:
            return _credentials(url)
        except ValueError:
            # a rotated file that no longer parses: never redis-py's message (it quotes the part
            # it could not read, the password perhaps); a RedisError becomes a StoreError
            raise RedisError(f"{self._path}: {url_problem(url)}") from None

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return await asyncio.to_thread(self.get_credentials)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """Split a ``redis+sentinel://`` URL; raises ValueError naming what is wrong."""
    rest = url[len(SENTINEL_SCHEME) :]
    userinfo, _, rest = rest.rpartition("@")
    netloc, _, path = rest.partition("/")
    service, _, db = path.strip("/").partition("/")
    if not netloc or not service:
        raise ValueError(
            "a Sentinel URL needs hosts and a service name: "
            "redis+sentinel://host:26379[,host:26379]/mymaster[/0]"
        )
    hosts = []
    for item in netloc.split(","):
        host, sep, port = item.rpartition(":")
        if sep and not port.isdigit():
            raise ValueError("a Sentinel host's port is not a number")
        hosts.append((host, int(port)) if sep else (item, 26379))
    if db and not db.isdigit():
        raise ValueError("the database number after the service name is not a number")
    password = unquote(userinfo.partition(":")[2]) if userinfo else None
    return hosts, service, int(db or 0), password or None


def url_problem(url: str) -> str | None:
    """What is wrong with a redis URL, if anything, in words that never repeat the URL (it may
    carry a password; redis-py's own messages quote the part they could not read)."""
    try:
        _credentials(url)  # parses the whole URL
    except ValueError as exc:
        if url.startswith(SENTINEL_SCHEME):
            return str(exc)  # parse_sentinel_url names the part, never its text
        return (
            "not a valid redis URL (check its port and database number, and that a password "
            "with / ? # or @ in it is percent-encoded)"
        )
    return None


def url_problems(session: Session) -> list[str]:
    """The redis URL, inline or in ``redis_url_file``, must be one this store can use; one
    ``"dotted.key: message"`` line when it is not, never quoting the URL (it may carry a
    password). A file that cannot be read gives nothing here: the configuration's own file check
    names it."""
    source = session.secret("redis_url")
    if source is None:
        return []
    key, where = source.where, "" if source.file is None else f"the URL in {source.file} "
    try:
        url = source.read()
    except OSError:
        return []
    except UnicodeDecodeError:
        return [f"{key}: {source.file} is not UTF-8 text"]
    if source.file is not None and not url.startswith(REDIS_SCHEMES):
        return [f"{key}: {where}{REDIS_SCHEME_RULE}"]  # inline: the model checked the scheme
    problem = url_problem(url)
    return [f"{key}: {where}{'is ' if where else ''}{problem}"] if problem else []


def _decode(raw: bytes, sealer: Sealer | None) -> SessionRecord:
    if sealer is not None:
        raw = sealer.open(raw)
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreUnreadable("session record in redis is not valid JSON") from exc
    return SessionRecord.from_dict(data)


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # redis-py can turn a cancellation that reaches it mid-reconnect into an error of
            # its own; passed on as a StoreError, a retrying loop would go on forever
            raise asyncio.CancelledError from exc
        raise StoreError(f"redis {action} failed: {type(exc).__name__}: {exc}") from exc


class RedisStore:
    """Shared session record with a leased, fenced renewal lock."""

    kind = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        namespace: str,
        sealer: Sealer | None = None,
        *,
        timeout: float = 2.0,
        url_file: Path | None = None,
    ) -> None:
        self._redis, self._sentinels = connect(url, timeout, url_file)
        prefix = f"sidecar:{namespace}:"
        self._key = prefix + "session"
        self._lock = prefix + "lock"
        self._fence = prefix + "fence"
        self._written = prefix + "written"
        self._channel = prefix + "events"
        self._sealer = sealer
        self._save_fenced = self._redis.register_script(_SAVE_FENCED)
        self._unlock = self._redis.register_script(_UNLOCK)

    def use_sealer(self, sealer: Sealer | None) -> None:
        # the record is not written again here: peers may not know a new key yet (the rotation
        # in docs/sessions.md adds it everywhere as a previous key first); the next refresh writes
        self._sealer = sealer

    def _encode(self, record: SessionRecord) -> bytes:
        payload = json.dumps(record.to_dict()).encode()
        return self._sealer.seal(payload) if self._sealer is not None else payload

    async def check_sealer(self, sealer: Sealer | None) -> None:
        with _translated("read"):
            raw = await self._redis.get(self._key)
        if raw is None:
            return
        try:
            _decode(_as_bytes(raw), sealer)
        except StoreError as exc:
            raise ConfigError(
                "session.encryption_key_file: the new keys cannot open the session in redis"
                f" ({exc}); keep the key it is sealed with under"
                " session.previous_encryption_key_files until a refresh has written it with the"
                " new one"
            ) from exc

    def _decode(self, raw: bytes) -> SessionRecord:
        return _decode(raw, self._sealer)

    async def load(self) -> SessionRecord | None:
        with _translated("read"):
            raw = await self._redis.get(self._key)
        return None if raw is None else self._decode(_as_bytes(raw))

    async def save(self, record: SessionRecord) -> None:
        """An unfenced write (used when Redis came back after a local renewal)."""
        with _translated("write"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key, self._encode(record))
                pipe.publish(self._channel, "0")
                await pipe.execute()

    async def save_fenced(self, record: SessionRecord, fence: int) -> bool:
        with _translated("write"):
            written = await self._save_fenced(
                keys=[self._key, self._written, self._channel], args=[self._encode(record), fence]
            )
        return bool(written)

    async def clear(self) -> None:
        with _translated("delete"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key)
                pipe.publish(self._channel, "cleared")
                await pipe.execute()

    async def try_lock(self, owner: str, lease: float) -> int | None:
        with _translated("lock"):
            taken = await self._redis.set(self._lock, owner, nx=True, px=max(1, int(lease * 1000)))
            if not taken:
                return None
            return int(await self._redis.incr(self._fence))

    async def unlock(self, owner: str) -> None:
        with _translated("unlock"):
            await self._unlock(keys=[self._lock], args=[owner])

    async def lock_owner(self) -> str | None:
        """Who holds the renewal lock now (for tests and diagnostics)."""
        with _translated("read"):
            owner = await self._redis.get(self._lock)
        return None if owner is None else _as_bytes(owner).decode()

    async def changes(self, interval: float) -> AsyncGenerator[None, None]:
        with _translated("subscribe"):
            pubsub = self._redis.pubsub()
            await pubsub.subscribe(self._channel)
        try:
            while True:
                with _translated("subscribe"):
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=interval)
                yield
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def aclose(self) -> None:
        for client in (self._redis, *self._sentinels):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
