"""The file store: atomic, private (0600 file in a 0700 directory), strict about what it reads;
and a sidecar that restarts on the same file keeps its session. What every store does (round
trip, replace, clear, sealing, concurrent saves) is in test_store_conformance.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.cookies import Cookie
from sidecar.errors import StoreError
from sidecar.session.manager import State
from sidecar.store import SessionRecord
from sidecar.store.crypto import Sealer
from sidecar.store.file import MAX_FILE_BYTES, FileStore
from sidecar.tokens import Token
from tests.conftest import MakeSidecar, proxy_url
from tests.fakes.idp import FakeIdP
from tests.fakes.upstream import FakeUpstream
from tests.helpers import eventually, new_key


def record(
    obtained_at: float = 1000.0,
    access: str = "at-secret-value",
    session_id: str = "sid-1",
    **changes: object,
) -> SessionRecord:
    """A complete record with every optional field set, so a round trip checks them all."""
    token = Token(
        access_token=access,
        refresh_token="rt-secret-value",
        expires_at=obtained_at + 60,
        obtained_at=obtained_at,
        scope="read write",
        fields={"tenant_id": "1234567"},
        cookies=(Cookie("sid", "cookie-secret", "api.example.com", "/", False, True, 2000.0),),
    )
    fields: dict[str, object] = {
        "identity": "test-identity",
        "session_id": session_id,
        "activity_id": "aid-1",
        "token": token,
        "created_at": obtained_at - 500,
        "last_refreshed_at": obtained_at,
        "last_api_call_at": obtained_at + 5,
        "refresh_count": 3,
        "extra": {"cookies": {"a": "b"}},
        **changes,
    }
    return SessionRecord(**fields)  # type: ignore[arg-type]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def stored(path: Path) -> SessionRecord | None:
    """What the file holds now, or None when it is missing or unreadable."""
    try:
        return FileStore(path)._read()[0]
    except StoreError:
        return None


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """A umask that would leave new files world-writable: the store must not rely on the umask."""
    old = os.umask(0)
    yield
    os.umask(old)


# ----------------------------------------------------------------- the store alone


async def test_file_is_0600_in_a_0700_directory_whatever_the_umask(
    tmp_path: Path, umask_zero: None
) -> None:
    """The directory the store creates is 0700 and the file 0600, even under umask 0."""
    path = tmp_path / "state" / "session.json"
    store = FileStore(path)
    await store.save(record())
    assert mode(path.parent) == 0o700
    assert mode(path) == 0o600


def test_check_writable_creates_the_private_directory(tmp_path: Path, umask_zero: None) -> None:
    """``check_writable`` (run at start) creates the 0700 directory and leaves no probe file."""
    path = tmp_path / "state" / "session.json"
    FileStore(path).check_writable()
    assert mode(path.parent) == 0o700
    assert os.listdir(path.parent) == []


async def test_an_old_files_wider_mode_is_not_kept(tmp_path: Path) -> None:
    """A session file that somebody made world-readable is 0600 again after the next save."""
    path = tmp_path / "session.json"
    path.write_text("{}")
    path.chmod(0o644)
    await FileStore(path).save(record())
    assert mode(path) == 0o600


async def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    """After saves (sequential and concurrent) only the session file remains in the directory."""
    path = tmp_path / "state" / "session.json"
    store = FileStore(path)
    for i in range(3):
        await store.save(record(1000.0 + i))
    await asyncio.gather(*(store.save(record(2000.0 + i)) for i in range(10)))
    assert os.listdir(path.parent) == ["session.json"]


async def test_concurrent_saves_never_corrupt_and_the_last_one_wins(tmp_path: Path) -> None:
    """Saves issued together (a background save after a refresh, then another) do not share a
    half-written temporary file: none fails, the file stays valid JSON, and it holds the record
    of the save that was asked for last."""
    path = tmp_path / "session.json"
    store = FileStore(path)
    for _round in range(5):
        # records of different sizes: interleaved writes would leave a tail of a longer one
        records = [record(3000.0 + i, access="x" * (10 + 97 * i % 800)) for i in range(20)]
        await asyncio.gather(*(store.save(r) for r in records))
        assert await store.load() == records[-1]
    assert os.listdir(tmp_path) == ["session.json"]


async def test_failed_save_raises_store_error_and_cleans_up(tmp_path: Path) -> None:
    """A save that cannot complete (here: the path is a directory) raises StoreError naming the
    file and removes its temporary file."""
    path = tmp_path / "session.json"
    path.mkdir()
    (path / "keep").write_text("x")  # a non-empty directory cannot be replaced by a rename
    with pytest.raises(StoreError, match="cannot write session file") as exc:
        await FileStore(path).save(record())
    assert str(path) in str(exc.value)
    assert sorted(os.listdir(tmp_path)) == ["session.json"]


async def test_missing_directory_loads_as_none(tmp_path: Path) -> None:
    """Not even the directory (nothing saved yet, never started) is not an error: no session."""
    assert await FileStore(tmp_path / "no" / "such" / "dir" / "session.json").load() is None


def valid_dict() -> dict[str, object]:
    return record().to_dict()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"  \n\t\n", "is empty"),
        (json.dumps(valid_dict()).encode()[:40], "not valid JSON"),
        (b"\x00\xff\xfe garbage \x89PNG", "not valid JSON"),
        (b"this is not json", "not valid JSON"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b'"a string"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (json.dumps({**valid_dict(), "version": 99}).encode(), "version 99 is newer"),
        (json.dumps({**valid_dict(), "version": "1"}).encode(), "no version"),
        (
            json.dumps({k: v for k, v in valid_dict().items() if k != "version"}).encode(),
            "no version",
        ),
        (json.dumps({"version": 1}).encode(), "malformed"),
        (json.dumps({**valid_dict(), "token": "at-abc"}).encode(), "malformed"),
        (json.dumps({**valid_dict(), "created_at": "yesterday"}).encode(), "malformed"),
        (
            json.dumps(
                {**valid_dict(), "token": {**record().token.to_dict(), "access_token": ""}}
            ).encode(),
            "malformed",
        ),
    ],
    ids=[
        "empty",
        "whitespace",
        "truncated",
        "binary-garbage",
        "text-garbage",
        "list",
        "string",
        "null",
        "newer-version",
        "string-version",
        "no-version",
        "missing-fields",
        "token-wrong-type",
        "time-wrong-type",
        "empty-access-token",
    ],
)
async def test_unreadable_files_raise_store_error(
    tmp_path: Path, content: bytes, message: str
) -> None:
    """Every kind of damaged or foreign file is a StoreError with a message saying what is wrong,
    never a crash with a JSON, Key or Type error, and never a half-read record."""
    path = tmp_path / "session.json"
    path.write_bytes(content)
    with pytest.raises(StoreError, match=message):
        await FileStore(path).load()


async def test_oversized_file_is_refused(tmp_path: Path) -> None:
    """A file larger than any session could be is refused without being parsed."""
    path = tmp_path / "session.json"
    path.write_bytes(b" " * (MAX_FILE_BYTES + 1))
    with pytest.raises(StoreError, match="larger than"):
        await FileStore(path).load()


# ----------------------------------------------------------------- a sidecar on the file store


def file_session(path: Path) -> dict[str, object]:
    return {"store": "file", "path": str(path)}


async def session_id_of_a_request(
    sidecar_port_url: str, http: aiohttp.ClientSession, upstream: FakeUpstream
) -> str:
    """Send one request through the proxy; the X-Session-ID the upstream received."""
    async with http.get(sidecar_port_url) as resp:
        assert resp.status == 200, await resp.text()
    return upstream.seen[-1].headers["X-Session-ID"]


async def test_restart_reuses_a_valid_stored_session(
    make_sidecar: MakeSidecar,
    idp: FakeIdP,
    upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A sidecar restarted on the same file with a still-valid token makes no token call and
    carries on with the same session: same X-Session-ID, same token, last-call time kept."""
    path = tmp_path / "s" / "session.json"
    first = await make_sidecar(session=file_session(path))
    await eventually(lambda: first.session.state() is State.VALID, what="login")
    session_id = await session_id_of_a_request(proxy_url(first, "/a"), http, upstream)
    first_auth = upstream.seen[-1].headers["Authorization"]
    await first.stop()
    assert len(idp.token_calls) == 1
    on_disk = stored(path)
    assert on_disk is not None
    assert on_disk.session_id == session_id
    assert on_disk.last_api_call_at is not None
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700

    second = await make_sidecar(session=file_session(path))
    # restored during start, before any background work: valid at once
    assert second.session.state() is State.VALID
    assert second.session.summary()["last_api_call_at"] == on_disk.last_api_call_at
    assert await session_id_of_a_request(proxy_url(second, "/b"), http, upstream) == session_id
    assert upstream.seen[-1].headers["Authorization"] == first_auth
    assert len(idp.token_calls) == 1, idp.grants()
    assert os.listdir(path.parent) == ["session.json"]


async def test_restart_with_expired_stored_token_refreshes_the_same_session(
    make_sidecar: MakeSidecar,
    idp: FakeIdP,
    upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A stored token that expired while the sidecar was down but has a refresh token is
    refreshed (not replaced by a new login), so the session and its X-Session-ID continue."""
    path = tmp_path / "s" / "session.json"
    first = await make_sidecar(session=file_session(path))
    await eventually(lambda: first.session.state() is State.VALID, what="login")
    session_id = await session_id_of_a_request(proxy_url(first, "/a"), http, upstream)
    await first.stop()
    old = stored(path)
    assert old is not None
    now = time.time()
    expired = Token(
        access_token=old.token.access_token,
        refresh_token=old.token.refresh_token,
        obtained_at=now - 120,
        expires_at=now - 60,
    )
    await FileStore(path).save(dataclasses.replace(old, token=expired))

    second = await make_sidecar(session=file_session(path))
    await eventually(lambda: second.session.state() is State.VALID, what="refresh after restart")
    assert idp.grants() == ["client_credentials", "refresh_token"]
    assert await session_id_of_a_request(proxy_url(second, "/b"), http, upstream) == session_id
    await eventually(
        lambda: (r := stored(path)) is not None and r.refresh_count == old.refresh_count + 1,
        what="refreshed record saved",
    )


async def test_corrupt_file_at_start_is_logged_and_replaced_by_a_fresh_login(
    make_sidecar: MakeSidecar,
    idp: FakeIdP,
    upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A corrupt session file does not stop the sidecar: it logs a warning, logs in afresh,
    serves requests and overwrites the file with a good record."""
    caplog.set_level(logging.INFO, logger="sidecar")
    path = tmp_path / "s" / "session.json"
    path.parent.mkdir(mode=0o700)
    path.write_text('{"version": 1, "identity": "abc", "tok')
    sidecar = await make_sidecar(session=file_session(path))
    await eventually(lambda: sidecar.session.state() is State.VALID, what="fresh login")
    warnings = [r for r in caplog.records if r.getMessage() == "session.store_unreadable"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "not valid JSON" in warnings[0].__dict__["error"]
    assert idp.grants() == ["client_credentials"]
    session_id = await session_id_of_a_request(proxy_url(sidecar, "/a"), http, upstream)
    await eventually(lambda: stored(path) is not None, what="file replaced")
    replaced = stored(path)
    assert replaced is not None
    assert replaced.session_id == session_id
    assert mode(path) == 0o600


async def test_stored_session_of_another_identity_is_ignored(
    make_sidecar: MakeSidecar,
    idp: FakeIdP,
    upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file left by a different identity (another client_id) is not used: the sidecar logs in
    with its own credentials, starts its own session and overwrites the file with it."""
    caplog.set_level(logging.INFO, logger="sidecar")
    path = tmp_path / "s" / "session.json"
    first = await make_sidecar(session=file_session(path))
    await eventually(lambda: first.session.state() is State.VALID, what="login")
    first_session = await session_id_of_a_request(proxy_url(first, "/a"), http, upstream)
    await first.stop()
    first_record = stored(path)
    assert first_record is not None
    assert first_record.token.is_valid(time.time())  # still usable, were it the same identity

    idp.client_id = "another-client"  # make_sidecar configures the identity from the IdP
    second = await make_sidecar(session=file_session(path))
    await eventually(lambda: second.session.state() is State.VALID, what="own login")
    assert idp.grants() == ["client_credentials", "client_credentials"]
    assert idp.token_calls[-1].headers["Authorization"].startswith("Basic ")
    assert any(
        r.getMessage() == "session.store_ignored" and "another identity" in r.__dict__["why"]
        for r in caplog.records
    )
    second_session = await session_id_of_a_request(proxy_url(second, "/b"), http, upstream)
    assert second_session != first_session
    await eventually(
        lambda: (r := stored(path)) is not None and r.session_id == second_session,
        what="file rewritten by the new identity",
    )
    rewritten = stored(path)
    assert rewritten is not None
    assert rewritten.identity != first_record.identity


async def test_a_key_rotation_keeps_the_session_and_reseals_it(tmp_path: Path) -> None:
    """session.previous_encryption_key_files: a session sealed with the old key is read with the
    new key configured and the old one listed as previous, and written again at once with the new
    key, so the old key can be dropped at the next restart. Neither key alone, nor a wrong one in
    the list, opens what the other sealed."""
    path = tmp_path / "session.json"
    old, new = os.urandom(32), os.urandom(32)
    await FileStore(path, Sealer(old, "identity-a")).save(record())
    rotating = FileStore(path, Sealer(new, "identity-a", previous=[old]))
    assert await rotating.load() == record()
    assert await FileStore(path, Sealer(new, "identity-a")).load() == record()  # resealed
    with pytest.raises(StoreError, match="wrong encryption key"):
        await FileStore(path, Sealer(old, "identity-a")).load()
    with pytest.raises(StoreError, match="with the encryption key and the previous ones"):
        await FileStore(path, Sealer(os.urandom(32), "identity-a", [os.urandom(32)])).load()


async def test_restart_with_a_rotated_key_keeps_the_session(
    make_sidecar: MakeSidecar,
    idp: FakeIdP,
    upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Rotating session.encryption_key_file: restarted with the new key and the old one under
    previous_encryption_key_files, the sidecar carries on with its stored session (no login),
    and a third start with the new key alone still finds it."""
    path = tmp_path / "session.json"
    keys = [str(new_key(tmp_path / name)) for name in ("old.key", "new.key")]
    sealed = {**file_session(path), "encryption_key_file": keys[0]}
    first = await make_sidecar(session=sealed)
    await eventually(lambda: first.session.state() is State.VALID, what="login")
    session_id = await session_id_of_a_request(proxy_url(first, "/a"), http, upstream)
    await first.stop()
    rotated = {**sealed, "encryption_key_file": keys[1], "previous_encryption_key_files": [keys[0]]}
    second = await make_sidecar(session=rotated)
    assert second.session.state() is State.VALID
    assert await session_id_of_a_request(proxy_url(second, "/b"), http, upstream) == session_id
    await second.stop()
    third = await make_sidecar(session={**sealed, "encryption_key_file": keys[1]})
    assert third.session.state() is State.VALID
    assert await session_id_of_a_request(proxy_url(third, "/c"), http, upstream) == session_id
    assert idp.grants() == ["client_credentials"]


async def test_a_cancelled_save_lands_before_the_next_write(tmp_path: Path) -> None:
    """A save cancelled while its thread writes (a stop cancelling the refresh loop mid-save)
    returns only once that write landed, so the next save (the one at stop) is the one kept; a
    removal waits the same way, so a logged-out session never comes back."""
    path = tmp_path / "s" / "session.json"
    store = FileStore(path)
    write = store._save
    started = threading.Event()

    def slow_save(payload: bytes) -> None:
        started.set()
        time.sleep(0.3)
        write(payload)

    store._save = slow_save  # type: ignore[method-assign]
    older = asyncio.ensure_future(store.save(record(session_id="older")))
    await asyncio.to_thread(started.wait, 5)
    older.cancel()
    with pytest.raises(asyncio.CancelledError):
        await older
    store._save = write  # type: ignore[method-assign]
    await store.save(record(session_id="newer"))
    await asyncio.sleep(0.5)  # long past the slow write's end, had it still been running
    loaded = await store.load()
    assert loaded is not None
    assert loaded.session_id == "newer"
