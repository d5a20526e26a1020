"""The file store in a directory others might reach: temporary files under random names created
with O_EXCL | O_NOFOLLOW, no symlink followed whatever name it is planted at, and a session
directory that another user owns or can write refused at start (exit 2, naming session.path)."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sidecar import cli
from sidecar.errors import ConfigError, StoreError, StoreUnreadable
from sidecar.store.file import FileStore
from tests.test_store_file import record

OTHER_UID = 4242


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the session directory that a planted symlink points at."""
    target = tmp_path / "victim.txt"
    target.write_text("precious\n")
    target.chmod(0o644)
    return target


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def untouched(victim: Path) -> bool:
    """The planted link's target still has its content and mode."""
    return victim.read_text() == "precious\n" and mode(victim) == 0o644


def private_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    return directory


async def test_symlinks_at_the_old_predictable_names_are_not_followed(
    tmp_path: Path, victim: Path
) -> None:
    """Symlinks planted where earlier versions put their probe and temporary files (a name
    derived from the pid) are neither followed nor removed: the target keeps its content and
    mode, and the record is written."""
    directory = private_dir(tmp_path)
    path = directory / "session.json"
    planted = [
        directory / f".session.json.tmp-{os.getpid()}",
        directory / f".session.json.probe-{os.getpid()}",
    ]
    for link in planted:
        link.symlink_to(victim)
    store = FileStore(path)
    await asyncio.to_thread(store.check_writable)
    await store.save(record())
    assert untouched(victim)
    assert all(link.is_symlink() for link in planted)
    assert await store.load() == record()


async def test_a_name_taken_by_a_symlink_is_never_opened_through_it(
    tmp_path: Path, victim: Path
) -> None:
    """Were the random name guessed and a symlink planted there first, O_EXCL | O_NOFOLLOW make
    the save fail (StoreError) rather than write through the link."""
    directory = private_dir(tmp_path)
    (directory / ".session.json.guessed.tmp").symlink_to(victim)
    with pytest.raises(StoreError, match="cannot write session file"):
        await FileStore(directory / "session.json", tag=lambda: "guessed").save(record())
    assert untouched(victim)
    assert (directory / ".session.json.guessed.tmp").is_symlink()


async def test_a_symlink_at_the_session_file_is_not_followed(tmp_path: Path, victim: Path) -> None:
    """A symlink at the session file's own name is not read through (the store is unreadable,
    so the sidecar logs in afresh) and the next save replaces the link, not its target."""
    directory = private_dir(tmp_path)
    path = directory / "session.json"
    path.symlink_to(victim)
    store = FileStore(path)
    with pytest.raises(StoreUnreadable, match="symbolic link"):
        await store.load()
    await store.save(record())
    assert not path.is_symlink()
    assert untouched(victim)


async def test_two_stores_on_one_file_never_share_a_temporary_file(tmp_path: Path) -> None:
    """Saves from two store objects of one process (a reload's new store while the old one
    still writes) each use their own temporary file: all succeed and leave no leftovers."""
    path = private_dir(tmp_path) / "session.json"
    stores = [FileStore(path) for _ in range(4)]
    await asyncio.gather(
        *(s.save(record(1000.0 + i, access=f"at-{i}")) for i, s in enumerate(stores * 5))
    )
    assert os.listdir(path.parent) == ["session.json"]
    assert await stores[0].load() is not None


def test_missing_directories_are_created_0700_whatever_the_umask(
    tmp_path: Path, umask_zero: None
) -> None:
    """The session directory and any missing parent are created 0700, even under umask 0."""
    path = tmp_path / "a" / "b" / "session.json"
    FileStore(path).check_writable()
    assert mode(tmp_path / "a") == 0o700
    assert mode(tmp_path / "a" / "b") == 0o700
    assert os.listdir(path.parent) == []


@pytest.mark.parametrize(
    ("dir_mode", "owner", "why"),
    [
        (0o777, None, "writable by other users"),
        (0o1777, None, "writable by other users"),  # the sticky bit is not enough: see docs
        (0o770, None, "writable by other users"),
        (0o700, OTHER_UID, "belongs to another user"),
    ],
    ids=["world-writable", "sticky", "group-writable", "other-owner"],
)
def test_an_unsafe_session_directory_is_a_start_error(
    tmp_path: Path, dir_mode: int, owner: int | None, why: str
) -> None:
    """At start the store refuses a directory that others can write (sticky or not) or that
    another user owns, with a ConfigError (exit 2) naming session.path; nothing is written."""
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(dir_mode)
    if owner is not None:
        os.chown(directory, owner, -1)
    with pytest.raises(ConfigError, match=why) as caught:
        FileStore(directory / "session.json").check_writable()
    assert "session.path" in str(caught.value)
    assert caught.value.exit_code == 2
    assert os.listdir(directory) == []


def write_config(tmp_path: Path, session_path: Path) -> Path:
    config = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "identity": {
            "kind": "oauth2",
            "token_url": "http://127.0.0.1:9/token",
            "client_id": "c",
            "client_secret": "s",
        },
        "session": {"store": "file", "path": str(session_path)},
    }
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_sidecar_run_and_check_config_exit_2_naming_session_path(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sidecar run` and `sidecar check-config` with a world-writable session directory: exit 2
    and a message naming session.path and what is wrong, before anything starts."""
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    config = write_config(tmp_path, directory / "session.json")
    assert cli.main([command, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "session.path" in err
    assert "writable by other users" in err
    assert os.listdir(directory) == []
