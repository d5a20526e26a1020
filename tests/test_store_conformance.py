"""The store conformance suite: the same cases run against every session store (memory, file, and
Redis on a real redis-server), as oauth2-proxy's ``RunSessionStoreTests`` runs its cases against
each of its stores.

A store that cannot support a case (the memory store keeps nothing at rest, so there is nothing to
seal) is not skipped: its backend names the reason, and the case asserts the behaviour that reason
implies. What only one store has (file modes and symlinks, Redis locks, fencing and outages) is
tested in that store's own file.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from sidecar.errors import StoreUnreadable
from sidecar.store import SessionRecord, SessionStore
from sidecar.store.crypto import Sealer
from sidecar.store.file import FileStore
from sidecar.store.memory import MemoryStore
from sidecar.store.redis import RedisStore
from sidecar.tokens import Token
from tests.redis_server import RedisServer
from tests.test_store_file import record

#: the identity ``record()`` names
IDENTITY = "test-identity"


@dataclass
class Backend:
    """One kind of store, and what it promises beyond load, save and clear."""

    kind: str
    #: a store over this backend's storage for an identity, sealing with ``sealer``: a second
    #: call is a second process (or restart) looking at the same storage
    open: Callable[[str, Sealer | None], SessionStore]
    #: the bytes kept at rest for ``identity`` (None when nothing is)
    raw: Callable[[str], Awaitable[bytes | None]]
    #: None when the store encrypts at rest; otherwise why it does not
    not_sealed: str | None = None
    #: None when the store keeps each identity's record apart; otherwise what does instead
    not_scoped: str | None = None


def memory_backend() -> Backend:
    """The memory store: its storage is the one instance a process has."""
    store = MemoryStore()

    def open_(identity: str, sealer: Sealer | None) -> SessionStore:
        store.use_sealer(sealer)
        return store

    async def raw(identity: str) -> bytes | None:
        return None

    return Backend(
        "memory",
        open_,
        raw,
        not_sealed="nothing is kept at rest: the record lives in the process, unsealed",
        not_scoped=(
            "one store per process: the session manager refuses a record whose identity is "
            "not its own"
        ),
    )


def file_backend(path: Path) -> Backend:
    """The file store: its storage is one file (the path ``session.path`` names)."""

    def open_(identity: str, sealer: Sealer | None) -> SessionStore:
        return FileStore(path, sealer)

    def read() -> bytes | None:
        return path.read_bytes() if path.exists() else None

    async def raw(identity: str) -> bytes | None:
        return await asyncio.to_thread(read)

    return Backend(
        "file",
        open_,
        raw,
        not_scoped=(
            "one file per session.path: the session manager refuses a record whose identity is "
            "not its own, and a sealed one does not even open for another identity"
        ),
    )


def redis_backend(server: RedisServer, opened: list[SessionStore]) -> Backend:
    """The Redis store: its storage is one redis-server, namespaced by identity."""

    def open_(identity: str, sealer: Sealer | None) -> SessionStore:
        store = RedisStore(server.url, identity, sealer)
        opened.append(store)
        return store

    async def raw(identity: str) -> bytes | None:
        client = aioredis.from_url(server.url)
        try:
            value = await client.get(f"sidecar:{identity}:session")
        finally:
            await client.aclose()
        assert not isinstance(value, str)  # the client decodes nothing: bytes or None
        return value

    return Backend("redis", open_, raw)


@pytest.fixture(params=["memory", "file", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each store in turn (Redis on a real redis-server of its own)."""
    opened: list[SessionStore] = []
    if request.param == "memory":
        chosen = memory_backend()
    elif request.param == "file":
        chosen = file_backend(tmp_path / "state" / "session.json")
    else:
        chosen = redis_backend(request.getfixturevalue("redis_server"), opened)
    yield chosen
    for store in opened:
        await store.aclose()


def sealer(key: bytes, identity: str = IDENTITY) -> Sealer:
    """A sealer bound to ``identity``, as the composition root builds one."""
    return Sealer(key, identity)


def minimal() -> SessionRecord:
    """A record with every optional field left unset."""
    return SessionRecord(
        identity=IDENTITY,
        session_id="s",
        activity_id="a",
        token=Token(access_token="at", expires_at=2.0, obtained_at=1.0),
        created_at=1.0,
    )


async def test_an_empty_store_loads_none(backend: Backend) -> None:
    """A store nothing was saved to loads None, not an error: there is no session yet."""
    assert await backend.open(IDENTITY, None).load() is None


async def test_save_then_load_returns_an_equal_record(backend: Backend) -> None:
    """What is saved loads back equal, every field included: the token's secrets, its session
    fields and cookies, the record's times, count and extra data; and a record whose optional
    fields are unset loads with them still unset."""
    store = backend.open(IDENTITY, None)
    saved = record()
    await store.save(saved)
    loaded = await backend.open(IDENTITY, None).load()
    assert loaded == saved
    assert loaded is not None
    assert loaded.token.refresh_token == "rt-secret-value"
    assert loaded.token.fields == {"tenant_id": "1234567"}
    assert loaded.token.cookies == saved.token.cookies
    assert loaded.extra == {"cookies": {"a": "b"}}
    await store.save(minimal())
    assert await backend.open(IDENTITY, None).load() == minimal()


async def test_a_saved_record_is_a_snapshot(backend: Backend) -> None:
    """What is loaded is what was saved at the time of the save: changing the saved record's
    mutable parts afterwards (its extra data, its token's fields) changes nothing stored."""
    store = backend.open(IDENTITY, None)
    saved = record(extra={"note": "as saved"})
    await store.save(saved)
    saved.extra["note"] = "changed after the save"
    saved.token.fields["tenant_id"] = "changed"  # type: ignore[index]
    loaded = await store.load()
    assert loaded is not None
    assert loaded.extra == {"note": "as saved"}
    assert loaded.token.fields == {"tenant_id": "1234567"}


async def test_a_second_save_replaces_the_first(backend: Backend) -> None:
    """A second save replaces the first record entirely (no field of the first survives)."""
    store = backend.open(IDENTITY, None)
    await store.save(record(access="first"))
    second = record(2000.0, access="second", session_id="sid-2", extra={}, refresh_count=0)
    await store.save(second)
    assert await backend.open(IDENTITY, None).load() == second


async def test_clear_removes_the_record(backend: Backend) -> None:
    """After ``clear`` the store loads None; clearing a store that is empty is not an error, and
    a save after a clear is loaded again."""
    store = backend.open(IDENTITY, None)
    await store.save(record())
    await store.clear()
    assert await backend.open(IDENTITY, None).load() is None
    await store.clear()
    assert await store.load() is None
    await store.save(minimal())
    assert await store.load() == minimal()


async def test_a_sealed_record_round_trips_and_another_key_cannot_read_it(
    backend: Backend,
) -> None:
    """With an encryption key the record loads back equal, nothing at rest shows the token or
    the key, and a store opened with another key (or with none) reports StoreUnreadable instead
    of returning garbage. The memory store keeps nothing at rest: the key plays no part, and the
    record it holds is the one saved, whatever key the store is given."""
    key, other = os.urandom(32), os.urandom(32)
    saved = record()
    await backend.open(IDENTITY, sealer(key)).save(saved)
    assert await backend.open(IDENTITY, sealer(key)).load() == saved
    if backend.not_sealed is not None:
        assert backend.kind == "memory", backend.not_sealed
        assert await backend.raw(IDENTITY) is None
        assert await backend.open(IDENTITY, sealer(other)).load() == saved
        return
    raw = await backend.raw(IDENTITY)
    assert raw is not None
    for secret in (b"at-secret-value", b"rt-secret-value", b"cookie-secret", b"1234567"):
        assert secret not in raw
    assert key not in raw
    assert base64.b64encode(key) not in raw
    with pytest.raises(StoreUnreadable, match="wrong encryption key"):
        await backend.open(IDENTITY, sealer(other)).load()
    await backend.open(IDENTITY, None).save(saved)
    with pytest.raises(StoreUnreadable, match="not encrypted"):
        await backend.open(IDENTITY, sealer(key)).load()


async def test_a_record_of_another_identity_is_not_returned(backend: Backend) -> None:
    """A store opened for another identity does not return this identity's record (Redis keeps
    each identity under its own keys). A store with one record for whoever opens it (memory,
    file) returns it with its own identity, which the session manager refuses; sealed, the file
    store does not open it for another identity at all."""
    saved = record()
    await backend.open(IDENTITY, None).save(saved)
    if backend.not_scoped is None:
        assert await backend.open("another-identity", None).load() is None
        assert await backend.open(IDENTITY, None).load() == saved
        return
    assert backend.kind in ("memory", "file"), backend.not_scoped
    loaded = await backend.open("another-identity", None).load()
    assert loaded is not None
    assert loaded.identity == IDENTITY
    if backend.kind == "file":
        key = os.urandom(32)
        await backend.open(IDENTITY, sealer(key)).save(saved)
        with pytest.raises(StoreUnreadable, match="wrong encryption key"):
            await backend.open("another-identity", sealer(key, "another-identity")).load()


async def test_concurrent_saves_leave_one_whole_record(backend: Backend) -> None:
    """Saves issued together, from one store and from two stores on the same storage, of records
    of different sizes, leave exactly one of them, whole: never a mix, a truncation, or a
    failure."""
    first, second = backend.open(IDENTITY, None), backend.open(IDENTITY, None)
    for round_ in range(3):
        records = [
            record(3000.0 + i, access="x" * (10 + 97 * i % 800), session_id=f"sid-{round_}-{i}")
            for i in range(12)
        ]
        await asyncio.gather(
            *(s.save(r) for s, r in zip([first, second] * 6, records, strict=True))
        )
        loaded = await first.load()
        assert loaded in records
