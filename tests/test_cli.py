"""The command line: the ``status`` line and its durations, ``sidecar status`` against a running
sidecar, and ``sidecar run`` as a real process (demo config, SIGTERM, exit codes)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.cli import event_loop, human_duration, main, status_line, usable_cpus
from sidecar.compiled import describe
from sidecar.session.manager import State
from tests.conftest import MakeSidecar, admin_url, proxy_url
from tests.fakes.idp import FakeIdP
from tests.helpers import eventually, free_port

# ----------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0, "0s"),
        (0.4, "0s"),
        (5.9, "5s"),
        (59, "59s"),
        (60, "1m00s"),
        (300, "5m00s"),
        (1450, "24m10s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (7380, "2h03m"),
        (90061, "25h01m"),
        (-5, "-5s"),
        (-1450, "-24m10s"),
    ],
)
def test_human_duration(seconds: float | None, text: str) -> None:
    """Durations read as ``5s``, ``24m10s`` or ``2h03m`` (seconds truncated), ``-`` for none."""
    assert human_duration(seconds) == text


def test_status_line_has_the_design_shape() -> None:
    """A valid session prints exactly the DESIGN.md example line, fields in that order."""
    summary = {
        "state": "VALID",
        "expires_in": 1450.7,
        "last_refreshed_ago": 300.2,
        "last_api_call_ago": 2.5,
        "store": "file",
        "last_error": None,
    }
    assert status_line(summary) == (
        "session: VALID | token expires in 24m10s | refreshed 5m00s ago | last call 2s ago "
        "| store: file"
    )


def test_status_line_without_token_refresh_or_calls() -> None:
    """A sidecar that has no token yet says so instead of printing numbers it does not have."""
    summary: dict[str, Any] = {
        "state": "NONE",
        "store": "memory",
        "last_api_call_ago": None,
        "last_error": None,
    }
    assert status_line(summary) == (
        "session: NONE | no token | never refreshed | no calls yet | store: memory"
    )


def test_status_line_expired_with_error() -> None:
    """An expired token reads as ``expired ... ago``; the last error comes before the store."""
    summary = {
        "state": "EXPIRED",
        "expires_in": -90,
        "last_refreshed_ago": 7380,
        "last_api_call_ago": 0,
        "last_error": "identity provider answered error='invalid_client'",
        "store": "redis",
    }
    assert status_line(summary) == (
        "session: EXPIRED | token expired 1m30s ago | refreshed 2h03m ago | last call 0s ago "
        "| last error: identity provider answered error='invalid_client' | store: redis"
    )


def test_status_line_tolerates_an_empty_summary() -> None:
    """A summary from another version missing every field still gives a line, not a KeyError."""
    assert status_line({}) == "session: ? | no token | never refreshed | no calls yet | store: ?"


# ----------------------------------------------------------------- sidecar status


async def test_status_against_a_running_sidecar(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``sidecar status --admin URL`` reads /session of a running sidecar and prints one line that
    starts with ``session: VALID`` and reflects the token, the last call and the store."""
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.state() is State.VALID, what="first login")
    async with http.get(proxy_url(sidecar, "/anything")) as resp:
        assert resp.status == 200
    # the CLI blocks on urllib: run it off the loop that serves the admin port
    code = await asyncio.to_thread(main, ["status", "--admin", admin_url(sidecar)])
    assert code == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1, captured.out
    line = lines[0]
    assert line.startswith("session: VALID | token expires in "), line
    assert "| last call 0s ago |" in line or "| last call 1s ago |" in line, line
    assert line.endswith("| store: memory"), line
    assert captured.err == ""


async def test_status_admin_url_with_trailing_slash(
    make_sidecar: MakeSidecar, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trailing slash on ``--admin`` does not break the /session URL."""
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.state() is State.VALID, what="first login")
    url = admin_url(sidecar, "/")
    assert url.endswith("/")
    assert await asyncio.to_thread(main, ["status", "--admin", url]) == 0
    assert capsys.readouterr().out.startswith("session: VALID |")


def test_status_against_a_closed_port_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """With nothing listening on the admin port, status exits 2 (no answer: not the same as a
    sidecar saying its session is not valid) with a message naming the URL."""
    port = free_port()
    assert main(["status", "--admin", f"http://127.0.0.1:{port}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"http://127.0.0.1:{port}/session" in captured.err


async def test_status_exits_1_while_the_session_is_not_valid(
    make_sidecar: MakeSidecar, idp: FakeIdP, capsys: pytest.CaptureFixture[str]
) -> None:
    """While the identity provider is down and no token was ever had, ``sidecar status`` still
    prints its line (state NONE, the last error) and exits 1, so an exec probe or a script sees
    the session is not usable; once the session is VALID it exits 0."""
    idp.down = "503"
    sidecar = await make_sidecar()
    await eventually(lambda: len(idp.token_calls) >= 1, what="a failed login")
    assert await asyncio.to_thread(main, ["status", "--admin", admin_url(sidecar)]) == 1
    line = capsys.readouterr().out
    assert line.startswith("session: NONE | no token |"), line
    assert "last error:" in line
    idp.down = None
    await eventually(lambda: sidecar.session.state() is State.VALID, what="recovery")
    assert await asyncio.to_thread(main, ["status", "--admin", admin_url(sidecar)]) == 0


def test_status_refuses_a_non_http_admin_url(capsys: pytest.CaptureFixture[str]) -> None:
    """``--admin`` must be an http(s) URL (urllib would also open file:// URLs): usage error 2."""
    assert main(["status", "--admin", "file:///etc/passwd"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--admin" in captured.err


# ----------------------------------------------------------------- sidecar run


def test_run_with_missing_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sidecar run -c FILE`` with a file that does not exist exits 2 naming the file, before
    anything is started."""
    missing = tmp_path / "missing.yaml"
    assert main(["run", "-c", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "cannot read config file" in err


def test_run_with_bad_config_exits_2_naming_key_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sidecar run`` with an invalid config exits 2 with a message naming the key and file."""
    path = tmp_path / "bad.yaml"
    path.write_text("listen: {port: 8080, hots: 127.0.0.1}\nupstream: {url: ftp://x}\n")
    assert main(["run", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert "listen.hots: unknown key" in err
    assert "upstream.url:" in err


def test_run_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown command or a bad ``--workers`` value is a usage error (2), not a crash."""
    assert main(["frobnicate"]) == 2
    assert main(["run", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["run", "--workers", "many"]) == 2
    assert "'many' is not a number or 'auto'" in capsys.readouterr().err


def test_run_with_uvloop_missing_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--loop uvloop`` without uvloop installed: a one-line message, not a traceback."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert main(["run", "--loop", "uvloop"]) == 2
    err = capsys.readouterr().err
    assert err == "sidecar: --loop uvloop: uvloop is not installed (pip install uvloop)\n"


def test_loop_auto_is_uvloop_where_installed_else_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--loop auto`` (the default) runs on uvloop when it imports and falls back to asyncio;
    ``--loop asyncio`` forces asyncio; ``--loop uvloop`` without it is an error (None)."""
    pytest.importorskip("uvloop")
    assert event_loop("auto") == "uvloop"
    assert event_loop("uvloop") == "uvloop"
    assert event_loop("asyncio") == "asyncio"
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert event_loop("auto") == "asyncio"
    assert event_loop("uvloop") is None
    assert event_loop("asyncio") == "asyncio"


async def test_the_suite_runs_on_the_loop_test_loop_names() -> None:
    """``TEST_LOOP=uvloop`` (tests/conftest.py) puts the async tests on uvloop; otherwise they
    run on asyncio's loop."""
    module = type(asyncio.get_running_loop()).__module__
    if os.environ.get("TEST_LOOP") == "uvloop":
        assert module.startswith("uvloop")
    else:
        assert module.startswith("asyncio")


@pytest.mark.parametrize(
    ("cpu_max", "limit"),
    [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("garbage", None)],
)
def test_workers_auto_counts_usable_cpus_under_a_cgroup_quota(
    tmp_path: Path, cpu_max: str, limit: int | None
) -> None:
    """``--workers auto``: the CPUs of the affinity mask, capped by a cgroup v2 quota (a
    Kubernetes CPU limit of 1.5 makes 2 workers, of 0.5 one); no quota, or an unreadable one,
    leaves the affinity's count."""
    cpus = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text(cpu_max)
    expected = cpus if limit is None else min(cpus, limit)
    assert usable_cpus(str(tmp_path / "cpu.max")) == expected
    assert usable_cpus(str(tmp_path / "missing")) == cpus


@pytest.fixture
def child_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; any still running at the end are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def spawn(
    argv: list[str], env: dict[str, str], log: Path, started: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """``python -m sidecar ARGV`` with its output in ``log``."""
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and argv
            [sys.executable, "-m", "sidecar", *argv], stdout=out, stderr=out, env=env
        )
    started.append(proc)
    return proc


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without any SIDECAR_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(extra)
    return env


async def test_run_demo_process_serves_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    child_processes: list[subprocess.Popen[bytes]],
) -> None:
    """``python -m sidecar run`` with the embedded demo (ports moved by environment overrides)
    forwards ``/echo/anything`` with a valid token and the tracing headers, and on SIGTERM exits 0
    within 10 s."""
    proxy_port, admin_port = free_port(), free_port()
    log = tmp_path / "sidecar.log"
    proc = spawn(
        ["run"],
        child_env(SIDECAR_LISTEN_PORT=str(proxy_port), SIDECAR_ADMIN_PORT=str(admin_port)),
        log,
        child_processes,
    )
    answer: dict[str, Any] = {}

    async def echo_ok() -> bool:
        assert proc.poll() is None, f"sidecar exited early:\n{log.read_text()[-3000:]}"
        try:
            async with http.get(
                f"http://127.0.0.1:{proxy_port}/echo/anything?x=1",
                timeout=aiohttp.ClientTimeout(total=2),
            ) as resp:
                if resp.status != 200:
                    return False
                answer.update(await resp.json())
                return True
        except (TimeoutError, aiohttp.ClientError):
            return False

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not await echo_ok():
        assert loop.time() < deadline, f"demo never answered:\n{log.read_text()[-3000:]}"
        await asyncio.sleep(0.05)

    assert answer["token"]["valid"] is True
    assert answer["path"] == "/echo/anything"
    assert answer["query"] == {"x": "1"}
    headers = {k.lower(): v for k, v in answer["headers"].items()}
    assert "x-request-id" in headers
    assert headers["x-tenant-id"] == "1234567"
    assert "x-session-id" in headers
    assert headers["authorization"] == "Bearer <verified token, not shown>"

    # the admin port moved too
    async with http.get(f"http://127.0.0.1:{admin_port}/readyz") as resp:
        assert resp.status == 200

    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 10)
    assert code == 0, log.read_text()[-3000:]
    logged = log.read_text()
    assert "sidecar.stopped" in logged
    assert "Traceback" not in logged
    # no --loop: uvloop, which the dev environment (and the image) installs
    assert '"loop":"uvloop"' in logged


async def test_run_process_with_missing_config_exits_2(
    tmp_path: Path, child_processes: list[subprocess.Popen[bytes]]
) -> None:
    """The real process (``python -m sidecar run -c missing.yaml``) exits with status 2."""
    log = tmp_path / "sidecar.log"
    missing = tmp_path / "missing.yaml"
    proc = spawn(["run", "-c", str(missing)], child_env(), log, child_processes)
    assert await asyncio.to_thread(proc.wait, 10) == 2
    assert str(missing) in log.read_text()


# ----------------------------------------------------------------- sidecar --version


def test_version_is_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``sidecar --version`` prints the version the package was installed with (pyproject.toml
    reads it from the one place it is written) and how it runs the data path, and exits 0."""
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"sidecar {version('sidecar')} (data path {describe()})\n"


# ----------------------------------------------------------------- sidecar schema


def test_schema_is_a_json_schema_that_shipped_configs_pass_and_typos_fail(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``sidecar schema`` prints a JSON Schema (2020-12) of the YAML configuration: the demo and
    every config shipped under deploy/ validate against it, and a misspelt key or a wrong type
    does not, as ``sidecar check-config`` would refuse them."""
    import json

    import jsonschema
    import yaml

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    root = Path(__file__).resolve().parent.parent
    configs = [yaml.safe_load((root / "sidecar" / "demo.yaml").read_text())]
    for path in sorted((root / "deploy" / "kubernetes").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ConfigMap" and "config.yaml" in doc.get("data", {}):
                configs.append(yaml.safe_load(doc["data"]["config.yaml"]))
    assert len(configs) >= 4
    for config in configs:
        validator.validate(config)
    assert not validator.is_valid({"upstream": {"url": "https://api.example.com", "timout": {}}})
    assert not validator.is_valid({"listen": {"port": "not a port"}})
    assert not validator.is_valid({"identity": {"kind": "kerberos"}})


def test_an_unknown_key_names_the_key_it_probably_meant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt key is refused with the closest key of its own section as a suggestion, at any
    depth; a key like nothing in its section gets no suggestion."""
    config = tmp_path / "typo.yaml"
    config.write_text(
        "upstream: {url: https://api.example.com, timout: {total: 3}, tls: {verfy: false}}\n"
        "identity: {kind: oauth2, token_url: https://idp.example.com/t, client_id: x,\n"
        "           client_secert: y, zzz: 1}\n"
        "sesion: {store: memory}\n"
    )
    assert main(["check-config", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "upstream.timout: unknown key (did you mean timeout?)" in err
    assert "upstream.tls.verfy: unknown key (did you mean verify?)" in err
    assert "identity.client_secert: unknown key (did you mean client_secret?)" in err
    assert "sesion: unknown key (did you mean session?)" in err
    assert "identity.zzz: unknown key\n" in err
