"""The Redis store with a real redis-server: fencing, locks, outages, Sentinel, URLs. What every
store does (round trip, clear, sealing, identities) is in test_store_conformance.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.app import Sidecar
from sidecar.config.models import Session
from sidecar.errors import ConfigError, StoreError
from sidecar.store import SessionRecord
from sidecar.store.crypto import Sealer
from sidecar.store.opening import open_store
from sidecar.store.redis import RedisStore
from tests.conftest import MakeSidecar
from tests.helpers import eventually, new_key
from tests.redis_server import RedisServer
from tests.test_store_file import record as file_record


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    opened = RedisStore(redis_server.url, "test-identity")
    yield opened
    await opened.aclose()


def record(obtained_at: float = 1000.0, access: str = "at-secret-value") -> SessionRecord:
    """The file store's complete record (fields and cookies included), under the id "sid"."""
    return file_record(obtained_at, access, session_id="sid", identity="test-identity")


async def test_fenced_write_refuses_an_older_fence(store: RedisStore) -> None:
    """A process whose lease ran out (older fencing token) cannot overwrite a newer session."""
    assert await store.save_fenced(record(2000.0, "newer"), fence=5)
    assert not await store.save_fenced(record(1000.0, "stale"), fence=4)
    loaded = await store.load()
    assert loaded is not None
    assert loaded.token.access_token == "newer"


async def test_lock_is_exclusive_fenced_and_leased(store: RedisStore) -> None:
    """One holder at a time; each acquisition has a larger fence; the lease frees a dead holder;
    only the owner can unlock."""
    first = await store.try_lock("a", lease=0.3)
    assert first is not None
    assert await store.try_lock("b", lease=0.3) is None
    await store.unlock("b")  # not the owner: no effect
    assert await store.lock_owner() == "a"
    import asyncio

    await asyncio.sleep(0.4)
    second = await store.try_lock("b", lease=5)
    assert second is not None
    assert second > first
    await store.unlock("b")
    assert await store.lock_owner() is None


async def test_unreachable_redis_is_a_store_error(tmp_path: Path) -> None:
    """Connection failures surface as StoreError, which the session manager survives."""
    server = RedisServer(tmp_path)  # never started: nothing listens on its port
    dead = RedisStore(server.url, "x", timeout=0.5)
    with pytest.raises(StoreError, match="redis read failed"):
        await dead.load()
    await dead.aclose()


def test_key_file_must_be_32_bytes_of_base64(tmp_path: Path) -> None:
    """A key file that is not base64 of 32 bytes is a config error naming the key."""
    from sidecar.errors import ConfigError

    bad = tmp_path / "k"
    bad.write_text("not base64!!")
    with pytest.raises(ConfigError, match=r"session\.encryption_key_file"):
        Sealer.from_file(bad, "x")
    short = tmp_path / "short"
    short.write_text(base64.b64encode(b"x" * 16).decode())
    with pytest.raises(ConfigError, match="32 bytes"):
        Sealer.from_file(short, "x")


async def test_sentinel_url_finds_the_master(redis_server: RedisServer, tmp_path: Path) -> None:
    """redis+sentinel://host:port/mymaster/0 asks a real Sentinel for the master and stores the
    session there."""
    import redis.asyncio as aioredis

    from tests.redis_server import SentinelServer

    sentinel = SentinelServer(tmp_path, redis_server)
    sentinel.start()
    try:
        store = RedisStore(f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0", "via-sentinel")
        await store.save(record())
        loaded = await store.load()
        assert loaded is not None
        assert loaded.session_id == "sid"
        direct = aioredis.from_url(redis_server.url)
        assert await direct.exists("sidecar:via-sentinel:session") == 1
        await direct.aclose()
        await store.aclose()
    finally:
        sentinel.stop()


@pytest.mark.parametrize(
    "url",
    ["redis+sentinel://127.0.0.1:26379", "redis+sentinel:///mymaster", "redis+sentinel://h:x/m"],
)
def test_malformed_sentinel_urls_are_refused(url: str) -> None:
    """A Sentinel URL without hosts or service name (or with a bad port) is a clear error."""
    with pytest.raises(ValueError, match=r"Sentinel URL|Sentinel host's port"):
        RedisStore(url, "x")


def test_redis_password_is_redacted_in_check_config() -> None:
    """check-config masks the password inside redis_url (plain and Sentinel forms)."""
    from sidecar.config.load import redacted
    from sidecar.config.models import Config

    for url in (
        "redis://:hunter2@127.0.0.1:6379/0",
        "redis+sentinel://:hunter2@10.0.0.1:26379,10.0.0.2:26379/mymaster/0",
    ):
        config = Config.model_validate(
            {
                "upstream": {"url": "https://api.example.com"},
                "identity": {"kind": "demo"},
                "demo": {"enabled": True},
                "session": {"store": "redis", "redis_url": url},
            }
        )
        shown = redacted(config)["session"]["redis_url"]
        assert "hunter2" not in shown
        assert shown.endswith(url.rpartition("@")[2])


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw/with/slashes-71@127.0.0.1:6379/0",
        "redis://:pw?query-71@127.0.0.1:6379/0",
        "redis+sentinel://:pw-71@h:x/mymaster",
        "redis+sentinel://:pw-71@h:26379/mymaster/db",
    ],
)
def test_a_bad_redis_url_is_described_without_quoting_it(url: str) -> None:
    """redis-py's parse errors quote the part they could not read, which can be a password with
    an unescaped / or ?; url_problem names what is wrong and never repeats the URL."""
    from sidecar.store.redis import url_problem

    problem = url_problem(url)
    assert problem is not None
    assert "pw" not in problem
    assert "71" not in problem
    assert url_problem("redis://:pw%2Fok@127.0.0.1:6379/0") is None


async def test_a_rotated_password_in_the_url_file_is_used_from_the_next_connection(
    tmp_path: Path,
) -> None:
    """session.redis_url_file: after Redis takes a new password and the Secret's file changes,
    the store reconnects with the new one (a store given the URL itself stays on the old one)."""
    import redis.asyncio as aioredis

    server = RedisServer(tmp_path, password="old-pw-1")
    server.start()
    try:
        url_file = tmp_path / "redis-url"
        url_file.write_text(server.url + "\n")
        from_file = RedisStore(server.url, "rotation", url_file=url_file)
        pinned = RedisStore(server.url, "rotation")
        await from_file.save(record())
        assert await pinned.load() is not None
        admin = aioredis.from_url(server.url)
        await admin.config_set("requirepass", "new-pw-2")
        url_file.write_text(server.url.replace("old-pw-1", "new-pw-2") + "\n")
        await admin.client_kill_filter(_type="normal", skipme=True)  # every other connection
        await admin.aclose()

        async def load_within(store: RedisStore, attempts: int) -> SessionRecord | None:
            for _ in range(attempts):
                with contextlib.suppress(StoreError):
                    return await store.load()
            raise AssertionError("the store did not reconnect")

        loaded = await load_within(from_file, 3)
        assert loaded is not None
        assert loaded.session_id == "sid"
        with pytest.raises(AssertionError, match="did not reconnect"):
            await load_within(pinned, 3)
        await from_file.aclose()
        await pinned.aclose()
    finally:
        server.stop()


async def test_stop_is_prompt_while_redis_is_down(
    make_sidecar: MakeSidecar, tmp_path: Path
) -> None:
    """SIGTERM while Redis is down: the watchers, reconnecting over and over, are cancelled
    inside redis-py, which can turn the cancellation into a connection error of its own. That
    must still end them (a watcher once slept and retried forever, and the stop never returned).
    Two replicas with different keys keep their watchers busiest; six rounds, as the race was
    lost in about one round in three."""
    for attempt in range(6):
        work = tmp_path / str(attempt)
        work.mkdir()
        server = RedisServer(work)
        server.start()
        shared = {"store": "redis", "redis_url": server.url, "poll_interval": 0.1}
        replicas = []
        for key in (new_key(work / "a.key"), new_key(work / "b.key")):
            replica = await make_sidecar(session={**shared, "encryption_key_file": str(key)})
            await eventually(functools.partial(has_token, replica))
            replicas.append(replica)
        await replicas[1].session.force_refresh()  # sealed with b: replica 0 cannot read it
        await asyncio.sleep(0.5)
        server.stop()
        for replica in reversed(replicas):
            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(replica.stop(), 10)
            assert asyncio.get_running_loop().time() - started < 5, attempt


def has_token(sidecar: Sidecar) -> bool:
    return sidecar.session.usable() is not None


def test_a_rotated_url_file_that_no_longer_parses_fails_without_showing_it(tmp_path: Path) -> None:
    """The credentials come from the file at every new connection: a new content that is not a
    redis URL is a RedisError (a StoreError at the store's boundary) naming the file, never the
    password, and not redis-py's ValueError, which nothing would have translated."""
    from redis.exceptions import RedisError

    from sidecar.store.redis import UrlFileCredentials

    url_file = tmp_path / "redis-url"
    url_file.write_text("redis://:p4ss/w0rd@127.0.0.1:6379/0\n")
    with pytest.raises(RedisError) as exc:
        UrlFileCredentials(url_file).get_credentials()
    assert str(url_file) in str(exc.value)
    assert "p4ss" not in str(exc.value)
    assert exc.value.__cause__ is None
    assert exc.value.__suppress_context__  # the ValueError quoting it is not chained
    url_file.write_text("redis://:pw%2Fok@127.0.0.1:6379/0\n")
    assert UrlFileCredentials(url_file).get_credentials() == ("pw/ok",)


async def test_a_redis_url_file_that_is_not_text_is_a_config_error_naming_the_key(
    tmp_path: Path,
) -> None:
    """The URL file read again at start or reload holds bytes that are not UTF-8 (a binary
    Secret mounted by mistake): a ConfigError naming the key and the file, never a traceback."""
    url_file = tmp_path / "redis-url"
    url_file.write_bytes(b"redis://127.0.0.1:6379/0\xff\xfe")
    session = Session.model_validate({"store": "redis", "redis_url_file": str(url_file)})
    with pytest.raises(ConfigError, match=r"session\.redis_url_file: .* is not UTF-8 text"):
        await open_store(session, "ns", None)
