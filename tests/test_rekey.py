"""A reload (SIGHUP) applies new session encryption keys, with no restart and no new login."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

import pytest

from sidecar.app import Sidecar
from sidecar.config import Config
from sidecar.errors import ConfigError, StoreError
from sidecar.store.crypto import Sealer
from tests.conftest import MakeSidecar, base_config, merge
from tests.fakes.idp import FakeIdP
from tests.helpers import events, eventually
from tests.redis_server import RedisServer


def new_key(path: Path) -> Path:
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


def opens_with(key: Path, sidecar: Sidecar, sealed: bytes) -> bool:
    """Whether ``key`` alone opens ``sealed`` (the sidecar's identity is the sealing context)."""
    try:
        Sealer.from_file(key, sidecar.session.identity.fingerprint).open(sealed)
    except StoreError:
        return False
    return True


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

    old_b = b.read_text()
    new_key(b)  # the Secret behind the same path changed; the config did not
    await sidecar.reload(reloaded(idp_url, upstream_url, idp, rotated))
    assert opens_with(b, sidecar, path.read_bytes())

    b.write_text("not a key")
    with pytest.raises(ConfigError, match=r"session\.encryption_key_file"):
        await sidecar.reload(reloaded(idp_url, upstream_url, idp, rotated))
    b.write_text(old_b)  # neither the broken file nor this older key was taken up
    assert not opens_with(b, sidecar, path.read_bytes())

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
    await eventually(lambda: sidecar.session.usable() is not None)
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
