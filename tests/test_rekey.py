"""A reload (SIGHUP) applies new session encryption keys, with no restart and no new login."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

from sidecar.app import Sidecar
from sidecar.config.models import Config
from sidecar.errors import ConfigError, StoreError
from sidecar.store.crypto import Sealer
from tests.conftest import MakeSidecar, base_config, merge
from tests.fakes.idp import FakeIdP
from tests.helpers import events, eventually, new_key
from tests.redis_server import RedisServer


def opens_with(key: Path, sidecar: Sidecar, sealed: bytes) -> bool:
    """Whether ``key`` alone opens ``sealed`` (the sidecar's identity is the sealing context)."""
    try:
        Sealer.from_file(key, sidecar.session.identity.fingerprint).open(sealed)
    except StoreError:
        return False
    return True


async def until_stored(sidecar: Sidecar) -> None:
    """Until the login's record is in the store: the session is usable a moment before its
    first write lands."""
    deadline = asyncio.get_running_loop().time() + 5
    while await sidecar.session.store.load() is None:
        assert asyncio.get_running_loop().time() < deadline, "the login's record was not written"
        await asyncio.sleep(0.01)


def reloaded(idp_url: str, upstream_url: str, idp: FakeIdP, session: dict[str, Any]) -> Config:
    return Config.model_validate(
        merge(base_config(idp_url, upstream_url, idp), {"session": session})
    )


async def test_file_store_is_sealed_with_the_new_key_at_once(
    make_sidecar: MakeSidecar,
    idp: FakeIdP,
    idp_url: str,
    upstream_url: str,
    tmp_path: Path,
    log_output: io.StringIO,
) -> None:
    """Key A, then a reload naming key B (A as a previous key): the session file is sealed with
    B at once and A no longer opens it; the same path with new contents (a rotated Secret) counts
    too; a key file that cannot be used fails the reload and the running keys stay. One login
    throughout, and the key files are not reported as needing a restart."""
    a, b = new_key(tmp_path / "a.key"), new_key(tmp_path / "b.key")
    path = tmp_path / "session.json"
    session = {"store": "file", "path": str(path), "encryption_key_file": str(a)}
    sidecar = await make_sidecar(session=session)
    await eventually(path.exists, what="the login's record written")
    assert opens_with(a, sidecar, path.read_bytes())

    rotated = {**session, "encryption_key_file": str(b), "previous_encryption_key_files": [str(a)]}
    await sidecar.reload(reloaded(idp_url, upstream_url, idp, rotated))
    assert opens_with(b, sidecar, path.read_bytes())
    assert not opens_with(a, sidecar, path.read_bytes())

    new_key(b)  # the Secret behind the same path changed; the config did not
    await sidecar.reload(reloaded(idp_url, upstream_url, idp, rotated))
    assert opens_with(b, sidecar, path.read_bytes())
    second_b = b.read_text()

    running = sidecar.config
    b.write_text("not a key")
    with pytest.raises(ConfigError, match=r"session\.encryption_key_file"):
        await sidecar.reload(reloaded(idp_url, upstream_url, idp, rotated))
    assert sidecar.config is running  # nothing of that reload was applied
    b.write_text(second_b)
    assert opens_with(b, sidecar, path.read_bytes())  # and the file was not written

    assert idp.grants() == ["client_credentials"]
    changed = [e for e in events(log_output) if e["event"] == "session.encryption_keys_changed"]
    assert [(e["encrypted"], e["resealed"]) for e in changed] == [(True, True), (True, True)]
    restart = [e for e in events(log_output) if e["event"] == "sidecar.reload_needs_restart"]
    assert restart == []


async def test_redis_store_takes_the_new_key_at_the_next_write(
    make_sidecar: MakeSidecar,
    idp: FakeIdP,
    idp_url: str,
    upstream_url: str,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    """With a shared store the record is not written again at the reload (peers may not know the
    new key yet): it is still sealed with A until the next refresh writes it with B."""
    import redis.asyncio as aioredis

    a, b = new_key(tmp_path / "a.key"), new_key(tmp_path / "b.key")
    session = {"store": "redis", "redis_url": redis_server.url, "encryption_key_file": str(a)}
    sidecar = await make_sidecar(session=session)
    await until_stored(sidecar)
    raw = aioredis.from_url(redis_server.url)
    try:
        (key,) = [k async for k in raw.scan_iter("sidecar:*:session")]

        async def stored() -> bytes:
            value = await raw.get(key)
            assert isinstance(value, bytes)
            return value

        rotated = {
            **session,
            "encryption_key_file": str(b),
            "previous_encryption_key_files": [str(a)],
        }
        await sidecar.reload(reloaded(idp_url, upstream_url, idp, rotated))
        assert opens_with(a, sidecar, await stored())
        await sidecar.session.force_refresh()
        await sidecar.session.flush_saves()
        assert opens_with(b, sidecar, await stored())
        assert not opens_with(a, sidecar, await stored())
    finally:
        await raw.aclose()
    assert idp.grants() == ["client_credentials", "refresh_token"]


async def test_a_reseal_that_cannot_be_written_keeps_the_running_keys_until_the_next_reload(
    make_sidecar: MakeSidecar,
    idp: FakeIdP,
    idp_url: str,
    upstream_url: str,
    tmp_path: Path,
    log_output: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file store cannot take the resealed record (a full disk; simulated, as root cannot be
    refused a write here): the running key stays, the file still opens with it, and the next
    reload with the same config tries again and succeeds."""
    a, b = new_key(tmp_path / "a.key"), new_key(tmp_path / "b.key")
    path = tmp_path / "session.json"
    session = {"store": "file", "path": str(path), "encryption_key_file": str(a)}
    sidecar = await make_sidecar(session=session)
    await eventually(path.exists, what="the login's record written")
    rotated = reloaded(idp_url, upstream_url, idp, {**session, "encryption_key_file": str(b)})

    async def disk_full(record: object) -> None:
        raise StoreError("cannot write the session file: No space left on device")

    monkeypatch.setattr(sidecar.session.store, "save", disk_full)
    await sidecar.reload(rotated)
    assert opens_with(a, sidecar, path.read_bytes())
    assert [e["event"] for e in events(log_output)].count("session.encryption_keys_unchanged") == 1
    monkeypatch.undo()
    await sidecar.reload(rotated)
    assert opens_with(b, sidecar, path.read_bytes())


async def test_redis_keys_that_cannot_open_the_stored_session_are_refused(
    make_sidecar: MakeSidecar,
    idp: FakeIdP,
    idp_url: str,
    upstream_url: str,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    """Peers still read the shared record: new keys that leave out the one it is sealed with (or
    switch encryption off) fail the reload, naming the key, and the running keys stay."""
    a, b = new_key(tmp_path / "a.key"), new_key(tmp_path / "b.key")
    session = {"store": "redis", "redis_url": redis_server.url, "encryption_key_file": str(a)}
    sidecar = await make_sidecar(session=session)
    await until_stored(sidecar)
    for changed in ({"encryption_key_file": str(b)}, {"encryption_key_file": None}):
        config = reloaded(idp_url, upstream_url, idp, {**session, **changed})
        with pytest.raises(ConfigError, match="cannot open the session in redis"):
            await sidecar.reload(config)
        stored = await sidecar.session.store.load()
        assert stored is not None  # still read with key A


async def test_a_peer_sealing_with_another_key_is_reported_as_unreadable_not_as_an_outage(
    make_sidecar: MakeSidecar, tmp_path: Path, redis_server: RedisServer, log_output: io.StringIO
) -> None:
    """Two replicas on one Redis with different keys (a botched rotation): the one that cannot
    open the shared record logs session.store_unreadable, once per problem, never
    session.store_unavailable (Redis is up), and both keep serving with their own tokens."""
    a, b = new_key(tmp_path / "a.key"), new_key(tmp_path / "b.key")
    shared = {"store": "redis", "redis_url": redis_server.url, "poll_interval": 0.1}
    first = await make_sidecar(session={**shared, "encryption_key_file": str(a)})
    await eventually(lambda: first.session.usable() is not None)
    second = await make_sidecar(session={**shared, "encryption_key_file": str(b)})
    await eventually(lambda: second.session.usable() is not None)
    await second.session.force_refresh()  # writes the record sealed with B

    def logged(name: str) -> list[dict[str, object]]:
        return [e for e in events(log_output) if e["event"] == name]

    await eventually(lambda: len(logged("session.store_unreadable")) >= 2, what="both noticed")
    await asyncio.sleep(0.5)  # several more polls of the same record
    unreadable = logged("session.store_unreadable")
    assert len(unreadable) <= 3, unreadable  # once per problem and process, not once per poll
    assert all("cannot decrypt" in str(e["error"]) for e in unreadable)
    assert logged("session.store_unavailable") == []
    assert first.session.usable() is not None
    assert second.session.usable() is not None
