"""Where the idle memory of one pod goes: the resident memory each step of a start adds, and
what the resident memory of an idle ``sidecar run`` is made of.

- imports: a fresh interpreter imports what ``sidecar run`` imports, in the order a start does,
  and reads its RSS after each step (a step counts only what the steps before it did not
  import: the Python standard library lands in the first step that needs it);
- idle: ``sidecar run`` with the config of bench/pod.py (oauth2 client_credentials against a
  local token endpoint, a file store), idle for two seconds, its mappings read from
  /proc/PID/smaps: the shared libraries' pages it touched (file-backed), the ``malloc`` heap
  (C and Rust allocations: pydantic-core's validators, OpenSSL's certificate store, large
  Python objects) and the other anonymous memory (mostly Python's object arenas).

Usage: python bench/memory.py [--demo] (--demo: the embedded demo's config instead)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from pod import bench_config, compile_sidecar, ready, token_endpoint
from run import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable

#: (what, the statement that imports it): the order of ``sidecar run``'s imports
STEPS = [
    (
        "sidecar.cli (argparse, json, logging)",
        # as main() does before the config is loaded: no pydantic plugin lookup
        "import sidecar.cli\nsidecar.cli.without_pydantic_plugins()",
    ),
    ("yaml", "import yaml"),
    ("pydantic, pydantic-core, typing_extensions", "import pydantic"),
    ("pydantic.main (BaseModel)", "import pydantic.main"),
    ("pydantic.types (secrets, hmac, hashlib: libcrypto)", "import pydantic.types"),
    ("pydantic's first model", "class First(pydantic.BaseModel):\n    a: int = 1"),
    ("yarl, multidict, idna", "import yarl"),
    ("the config models (sidecar.config)", "import sidecar.config.models"),
    ("loading and validating the config (asyncio, ssl)", "import sidecar.checks"),
    ("attrs (aiohttp's)", "import attr"),
    (
        "a TLS client context with the system CA bundle (aiohttp makes two at import)",
        "import ssl\nssl.create_default_context()",
    ),
    ("aiohttp's client", "import aiohttp"),
    ("aiohttp.web (the admin port)", "import aiohttp.web"),
    ("prometheus_client", "import prometheus_client"),
    ("the data path, session, admin (sidecar.lifecycle)", "import sidecar.lifecycle"),
    ("uvloop", "import uvloop"),
    ("the identity kind and the store", "import sidecar.identity.oauth2, sidecar.store.file"),
]

_WATERFALL = """
import json, sys
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
out = [["python and site", rss()]]
for name, code in json.loads(sys.argv[1]):
    exec(code, globals())
    out.append([name, rss()])
print(json.dumps([out, len(sys.modules)]))
"""


def waterfall(env: dict[str, str]) -> tuple[list[tuple[str, float]], int]:
    """RSS (MB) after each of :data:`STEPS` in one fresh interpreter, and its module count."""
    out = subprocess.run(
        [PY, "-P", "-c", _WATERFALL, json.dumps(STEPS)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    steps, modules = json.loads(out.stdout)
    return [(name, mb) for name, mb in steps], modules


def mappings(pid: int) -> Counter[str]:
    """Resident KB of ``pid`` by mapping: each shared library by name, ``[heap]``, ``[stack]``,
    and ``[anon]`` for the other anonymous mappings."""
    rss: Counter[str] = Counter()
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$", line)
        if head:
            name = head.group(1).rsplit("/", 1)[-1] or "[anon]"
        elif line.startswith("Rss:"):
            rss[name] += int(line.split()[1])
    return rss


def idle_split(config: Path, admin: int, env: dict[str, str]) -> tuple[Counter[str], int]:
    """The resident KB by mapping of an idle ``sidecar run -c config``, and its thread count."""
    proc = subprocess.Popen(
        [PY, "-P", "-m", "sidecar", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        started = time.monotonic()
        while not ready(admin):
            if proc.poll() is not None or time.monotonic() - started > 30:
                raise RuntimeError("sidecar did not become ready")
            time.sleep(0.01)
        time.sleep(2)
        return mappings(proc.pid), len(os.listdir(f"/proc/{proc.pid}/task"))
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def report_waterfall(steps: list[tuple[str, float]], modules: int) -> None:
    print("resident memory after each step of the start's imports (MB):")
    previous = 0.0
    for name, mb in steps:
        print(f"  {name:66} {mb:5.1f}  +{mb - previous:4.1f}")
        previous = mb
    print(f"  ({modules} modules)")


def report_idle(split: Counter[str], threads: int) -> None:
    total = sum(split.values())
    anon = {"[heap]", "[anon]", "[stack]"}
    files = sum(kb for name, kb in split.items() if name not in anon)
    print(f"\nidle sidecar run: {total / 1024:.1f} MB resident, {threads} threads")
    print(f"  {'shared libraries (file-backed pages touched)':50} {files / 1024:5.1f} MB")
    for name, kb in split.most_common():
        if name not in anon and kb >= 400:
            print(f"    {name:48} {kb / 1024:5.1f}")
    print(f"  {'malloc heap ([heap])':50} {split['[heap]'] / 1024:5.1f} MB")
    print(f"  {'other anonymous (Python object arenas)':50} {split['[anon]'] / 1024:5.1f} MB")
    print(f"  {'main thread stack':50} {split['[stack]'] / 1024:5.1f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="the embedded demo's config")
    args = parser.parse_args()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
        "PYTHONPATH": str(ROOT),
    }
    compile_sidecar(PY, env)
    report_waterfall(*waterfall(env))
    with tempfile.TemporaryDirectory(prefix="sidecar-memory-") as tmp, token_endpoint(env) as idp:
        admin = free_port()
        config = Path(tmp) / "memory.yaml"
        if args.demo:
            text = (ROOT / "sidecar" / "demo.yaml").read_text()
            text = text.replace("port: 8080", f"port: {free_port()}")
            config.write_text(text.replace("port: 8081", f"port: {admin}"))
        else:
            session = {"store": "file", "path": str(Path(tmp) / "session.json")}
            config.write_text(json.dumps(bench_config(free_port(), admin, idp, session)))
        report_idle(*idle_split(config, admin, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
