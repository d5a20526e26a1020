"""What each command imports: a pod pays in memory and start time for every module loaded.

Each check runs in a fresh interpreter (this one has imported everything already) and reads its
``sys.modules`` after the command.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.fakes.idp import FakeIdP
from tests.helpers import free_port, python_output

ROOT = Path(__file__).resolve().parent.parent

#: the data path and the libraries only a running proxy needs
DATA_PATH = ("sidecar.http", "sidecar.proxy", "sidecar.app", "httptools", "aiohttp", "uvloop")


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code`` (stdout discarded)."""
    script = (
        "import io, json, sys, contextlib\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    out = python_output(script, env)
    return set(json.loads(out.splitlines()[-1]))


def loaded(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(
        m for m in modules if m in prefixes or m.startswith(tuple(p + "." for p in prefixes))
    )


def test_version_loads_no_config_machinery_and_no_data_path() -> None:
    """``sidecar --version`` answers without pydantic, YAML or any of the data path."""
    mods = modules_after(
        "from sidecar.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass"
    )
    assert "sidecar.cli" in mods
    assert loaded(mods, (*DATA_PATH, "pydantic", "yaml", "sidecar.config", "asyncio")) == []


def test_check_config_loads_no_data_path(tmp_path: Path) -> None:
    """``sidecar check-config`` validates with the config models only: no HTTP code, no aiohttp,
    no identity kind, no session."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "upstream: {url: 'http://127.0.0.1:9'}\n"
        "identity: {kind: oauth2, token_url: 'http://127.0.0.1:9/t', client_id: a,"
        " client_secret: b}\n"
    )
    mods = modules_after(
        f"from sidecar.cli import main\nassert main(['check-config', '-c', {str(path)!r}]) == 0"
    )
    assert "sidecar.config.models" in mods
    assert loaded(mods, (*DATA_PATH, "sidecar.identity", "sidecar.session")) == []


@pytest.mark.parametrize(
    ("identity", "store", "unused"),
    [
        (
            "{kind: oauth2, token_url: 'http://127.0.0.1:9/t', client_id: a, client_secret: b}",
            "{store: memory}",
            ("sidecar.identity.json_login", "sidecar.store.file", "sidecar.store.redis", "redis"),
        ),
        (
            "{kind: json_login, login: {url: 'http://127.0.0.1:9/login', json: {}},"
            " response: {access_token: token}}",
            "{store: memory}",
            ("sidecar.identity.oauth2", "sidecar.store.file", "sidecar.store.redis", "redis"),
        ),
    ],
)
def test_a_sidecar_imports_only_the_identity_kind_and_store_it_uses(
    tmp_path: Path, identity: str, store: str, unused: tuple[str, ...]
) -> None:
    """The composition root imports identity kinds and stores by kind: building a sidecar for
    one config leaves the others (and the redis client library) unloaded."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        f"upstream: {{url: 'http://127.0.0.1:9'}}\nidentity: {identity}\nsession: {store}\n"
    )
    mods = modules_after(
        "from sidecar.config.load import load_config\n"
        "from sidecar.app import Sidecar\n"
        f"sidecar = Sidecar(load_config({str(path)!r}))\n"
        "sidecar._provider(sidecar.config.identity)\n"
        "from sidecar.store.opening import open_store\n"
        "open_store(sidecar.config.session, 'x', None)"
    )
    assert "sidecar.app" in mods
    assert loaded(mods, unused) == []


def test_a_started_client_credentials_sidecar_loads_no_signing_and_no_other_store(
    tmp_path: Path,
) -> None:
    """A sidecar started with plain client_credentials (a client secret: no signed assertion, no
    token validation) and a file store runs without PyJWT, cryptography, the demo, the redis
    client, the store's encryption, the shared session, the tracing exporter, nor what only a
    config error needs: each of them costs a pod memory it would never use
    (cryptography alone about 8 MB resident)."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "listen: {port: 0}\nadmin: {port: 0}\nupstream: {url: 'http://127.0.0.1:9'}\n"
        "identity: {kind: oauth2, token_url: 'http://127.0.0.1:9/t', client_id: a,"
        " client_secret: b}\n"
        f"session: {{store: file, path: {str(tmp_path / 'session.json')!r}}}\n"
    )
    mods = modules_after(
        "import asyncio\n"
        "from sidecar.cli import without_pydantic_plugins\n"
        "without_pydantic_plugins()  # as the command line does\n"
        "from sidecar.config.load import load_config\n"
        "from sidecar.app import Sidecar\n"
        "async def started_and_stopped():\n"
        f"    sidecar = Sidecar(load_config({str(path)!r}))\n"
        "    await sidecar.start()\n"
        "    await sidecar.stop()\n"
        "asyncio.run(started_and_stopped())"
    )
    assert {"sidecar.app", "sidecar.identity.oauth2", "sidecar.store.file"} <= mods
    unused = (
        "jwt",
        "cryptography",
        "sidecar.demo",
        "sidecar.identity.assertions",
        "sidecar.identity.validation",
        "sidecar.identity.json_login",
        "redis",
        "sidecar.store.redis",
        "sidecar.store.memory",
        "sidecar.store.crypto",
        "sidecar.session.shared",
        "sidecar.proxy.tracing",
        "difflib",  # suggestions for an unknown key
        "importlib.resources",  # reads the embedded demo's config
    )
    assert loaded(mods, unused) == []


#: what pydantic's plugin lookup imports (the entry points of every installed distribution) and
#: nothing else in a running sidecar needs
PLUGIN_LOOKUP = ("importlib.metadata", "zipfile", "csv")


async def test_a_started_sidecar_has_looked_up_no_pydantic_plugin(
    tmp_path: Path, idp_url: str, idp: FakeIdP, http: aiohttp.ClientSession
) -> None:
    """``sidecar run`` logged in at a token endpoint on http:// (ready) and stopped has not
    imported ``importlib.metadata``, ``zipfile`` nor ``csv``: sidecar uses no pydantic plugin,
    and pydantic's lookup of them would keep about 0.8 MB resident for nothing."""
    admin = free_port()
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        f"listen: {{port: {free_port()}}}\nadmin: {{port: {admin}}}\n"
        "upstream: {url: 'http://127.0.0.1:9'}\n"
        f"identity: {{kind: oauth2, token_url: '{idp_url}/token', client_id: {idp.client_id},"
        f" client_secret: {idp.client_secret}}}\n"
    )
    modules = tmp_path / "modules.json"
    script = (
        "import json, sys\n"
        "from sidecar.cli import main\n"
        f"code = main(['run', '-c', {str(path)!r}])\n"
        f"open({str(modules)!r}, 'w').write(json.dumps(sorted(sys.modules)))\n"
        "sys.exit(code)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "PYDANTIC_"))}
    log = tmp_path / "sidecar.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603, ASYNC220 - our own interpreter and script
            [sys.executable, "-c", script], stdout=out, stderr=out, env=env, cwd=ROOT
        )
    try:

        async def ready() -> bool:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                async with http.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        deadline = asyncio.get_running_loop().time() + 20
        while not await ready():
            assert asyncio.get_running_loop().time() < deadline, log.read_text()[-2000:]
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert [call.grant_type for call in idp.calls] == ["client_credentials"]
    mods = set(json.loads(modules.read_text()))
    assert {"sidecar.app", "pydantic", "aiohttp"} <= mods
    assert loaded(mods, PLUGIN_LOOKUP) == []


def test_pydantic_plugins_load_when_pydantic_disable_plugins_asks_for_them(
    tmp_path: Path,
) -> None:
    """An installed pydantic plugin is left out by default (and with pydantic's own "none"
    values); with ``PYDANTIC_DISABLE_PLUGINS`` set to anything else, empty for example, pydantic
    looks plugins up as it does without sidecar, and the plugin sees the models built."""
    (tmp_path / "seen_plugin.py").write_text(
        "SEEN = []\n"
        "class Plugin:\n"
        "    def new_schema_validator(self, schema, schema_type, *rest):\n"
        "        SEEN.append(schema_type.__name__)\n"
        "        return None, None, None\n"
        "plugin = Plugin()\n"
    )
    dist = tmp_path / "seen_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: seen-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pydantic]\nseen = seen_plugin:plugin\n")
    script = (
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from sidecar.cli import without_pydantic_plugins\n"
        "skipped = without_pydantic_plugins()\n"
        "import pydantic, seen_plugin\n"
        "class Model(pydantic.BaseModel):\n"
        "    a: int = 1\n"
        "assert Model.model_validate({'a': '2'}).a == 2\n"
        "print(json.dumps([skipped, seen_plugin.SEEN, 'importlib.metadata' in sys.modules]))\n"
    )
    seen: dict[str | None, list[object]] = {}
    for value in (None, "__all__", "true", "", "other"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYDANTIC_")}
        if value is not None:
            env["PYDANTIC_DISABLE_PLUGINS"] = value
        out = subprocess.run(  # noqa: S603 - our own interpreter and script
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT
        )
        assert out.returncode == 0, out.stderr
        seen[value] = json.loads(out.stdout)
    off = [True, [], False]
    on = [False, ["Model"], True]
    assert seen == {None: off, "__all__": off, "true": off, "": on, "other": on}
