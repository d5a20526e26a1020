"""session.token_sink: the current access token in a file for clients that cannot use the proxy,
written atomically at every new token and removed at logout (real sidecar, real provider)."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.config.load import load_config
from sidecar.errors import ConfigError
from tests.conftest import MakeSidecar, admin_url
from tests.fakes.clock import FakeClock
from tests.fakes.idp import FakeIdP
from tests.helpers import events, eventually


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """A umask that would leave the file group- and world-readable if the mode were not set."""
    saved = os.umask(0)
    yield
    os.umask(saved)


def contents(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


async def test_every_new_token_is_written_with_the_mode_and_removed_at_logout(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    idp: FakeIdP,
    clock: FakeClock,
    tmp_path: Path,
    loose_umask: None,
) -> None:
    """The login's token is in the file with exactly the configured mode (whatever the umask); a
    refresh replaces it (no temporary file left beside it); POST /session/logout removes it."""
    sink = tmp_path / "run" / "token"
    sink.parent.mkdir()
    sidecar = await make_sidecar(
        clock=clock, session={"store": "memory", "token_sink": {"path": str(sink), "mode": "0640"}}
    )
    await eventually(lambda: sidecar.session.usable() is not None, what="login")
    first = sidecar.session.usable()
    assert first is not None
    await eventually(lambda: contents(sink) == first.token.access_token, what="token written")
    assert stat.S_IMODE(sink.stat().st_mode) == 0o640
    second = await sidecar.session.force_refresh()
    assert second.token.access_token != first.token.access_token
    await eventually(lambda: contents(sink) == second.token.access_token, what="token replaced")
    assert sorted(p.name for p in sink.parent.iterdir()) == ["token"]
    async with http.post(admin_url(sidecar, "/session/logout")) as resp:
        assert resp.status == 200
    assert not sink.exists()


async def test_a_symlink_at_the_sink_path_is_replaced_not_followed(
    make_sidecar: MakeSidecar, tmp_path: Path
) -> None:
    """A symbolic link planted where the token goes is replaced by the file (rename), and the file
    it pointed to is left as it was."""
    victim = tmp_path / "victim"
    victim.write_text("do not overwrite")
    sink = tmp_path / "token"
    sink.symlink_to(victim)
    sidecar = await make_sidecar(session={"store": "memory", "token_sink": {"path": str(sink)}})
    await eventually(lambda: sidecar.session.usable() is not None, what="login")
    await eventually(lambda: not sink.is_symlink(), what="the link replaced")
    creds = sidecar.session.usable()
    assert creds is not None
    assert sink.read_text() == creds.token.access_token
    assert stat.S_IMODE(sink.stat().st_mode) == 0o600
    assert victim.read_text() == "do not overwrite"


async def test_a_failing_sink_is_logged_and_the_session_goes_on(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    log_output: io.StringIO,
) -> None:
    """The sink's directory is gone: the write fails with session.token_sink_failed logged (the
    token not in it), and requests through the proxy are still served."""
    sink = tmp_path / "gone" / "token"
    sidecar = await make_sidecar(session={"store": "memory", "token_sink": {"path": str(sink)}})
    await eventually(
        lambda: any(e["event"] == "session.token_sink_failed" for e in events(log_output)),
        what="the failure logged",
    )
    creds = sidecar.session.usable()
    assert creds is not None
    assert creds.token.access_token not in log_output.getvalue()
    async with http.get(f"http://127.0.0.1:{sidecar.proxy_port}/x") as resp:
        assert resp.status == 200


def test_token_sink_is_checked_at_load(tmp_path: Path) -> None:
    """A mode that lets others replace the token, a mode that is not octal, and a directory that
    does not exist are refused at load, each naming its key."""
    base = (
        "upstream: {url: 'https://api.example'}\n"
        "identity: {kind: oauth2, token_url: 'https://idp.example/token', client_id: c, "
        "client_secret: s}\n"
    )
    cases = {
        f"{{path: {tmp_path}/t, mode: '0666'}}": "session.token_sink.mode: '0666' lets group",
        f"{{path: {tmp_path}/t, mode: 'rw'}}": "session.token_sink.mode: 'rw' is not an octal",
        f"{{path: {tmp_path}/nowhere/t}}": (
            f"session.token_sink.path: the directory {tmp_path}/nowhere does not exist"
        ),
        "{mode: '0600'}": "session.token_sink.path: ",
    }
    for sink, expected in cases.items():
        path = tmp_path / "config.yaml"
        path.write_text(base + f"session: {{store: memory, token_sink: {sink}}}\n")
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert expected in str(exc.value), sink
