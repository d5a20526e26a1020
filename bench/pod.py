"""What one pod pays before it serves: the commands' time and memory, start to ready, idle RSS.

- ``sidecar --version`` and ``sidecar check-config``: wall time (median of a few runs) and peak
  RSS of the process;
- ``sidecar run`` with a file store: start to ``/readyz`` answering 200, once with a login at
  the token endpoint (a fresh store) and once without an identity call (a restart that finds a
  valid session in the store), and the resident memory of the idle process.

``make bench`` reports these with its other figures; ``python bench/pod.py`` measures them
alone (it starts its own token endpoint).

The sidecar measured runs from compiled bytecode, as the image does (pip compiles what it
installs): without it each start would compile the sidecar's sources again (where
PYTHONDONTWRITEBYTECODE is set, as in the image), which costs start time and leaves about 1 MB
more resident.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from run import free_port, process, save_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
GNU_TIME = "/usr/bin/time"


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float | None]:
    """Wall seconds and peak RSS (MB) of one run of ``argv``, which must succeed.

    The peak comes from GNU time (None without it): a child's own ru_maxrss starts at its
    parent's size (the fork before the exec), so it is read by a small process that forks it.
    """
    gnu_time = Path(GNU_TIME).exists()
    started = time.perf_counter()
    out = subprocess.run(
        [GNU_TIME, "-f", "%M", *argv] if gnu_time else argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    )
    took = time.perf_counter() - started
    return took, int(out.stderr.split()[-1]) / 1024 if gnu_time else None


def command_figures(argv: list[str], env: dict[str, str], runs: int = 5) -> dict[str, Any]:
    samples = [timed(argv, env) for _ in range(runs)]
    peaks = [s[1] for s in samples if s[1] is not None]
    return {
        "ms": round(statistics.median(s[0] for s in samples) * 1000, 1),
        "peak_rss_mb": round(statistics.median(peaks), 1) if peaks else None,
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def ready(admin: int) -> bool:
    url = f"http://127.0.0.1:{admin}/readyz"
    with (
        contextlib.suppress(urllib.error.URLError, OSError),
        urllib.request.urlopen(url, timeout=1) as resp,
    ):
        return bool(resp.status == 200)
    return False


def identity_calls(idp_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{idp_port}/calls", timeout=2) as resp:
        return int(json.load(resp)["n"])


def start_to_ready(
    sidecar: list[str],
    config: Path,
    admin: int,
    idp_port: int,
    env: dict[str, str],
    idle: float = 2.0,
) -> dict[str, float]:
    """Start ``sidecar run``, poll /readyz every 2 ms until 200; then idle ``idle`` seconds and
    read its RSS. Also counts the token endpoint's calls during the start."""
    calls = identity_calls(idp_port)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*sidecar, "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        while not ready(admin):
            if proc.poll() is not None or time.perf_counter() - started > 30:
                raise RuntimeError("sidecar did not become ready")
            time.sleep(0.002)
        took = time.perf_counter() - started
        time.sleep(idle)
        return {
            "ms": round(took * 1000, 1),
            "identity_calls": identity_calls(idp_port) - calls,
            "rss_idle_mb": rss_mb(proc.pid),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def compile_sidecar(python: str, env: dict[str, str]) -> None:
    """Compile the sidecar package that ``python`` with ``env`` imports to bytecode, in place
    (its ``__pycache__``), as ``pip install`` does in the image."""
    found = subprocess.run(
        [python, "-P", "-c", "import sidecar; print(sidecar.__path__[0])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    subprocess.run(
        [python, "-m", "compileall", "-q", found.stdout.strip()],
        env=env,
        stdout=subprocess.DEVNULL,
        check=True,
    )


def bench_config(port: int, admin: int, idp_port: int, session: dict[str, Any]) -> dict[str, Any]:
    """A client_credentials sidecar on ``port`` (admin ``admin``) logging in at the token
    endpoint on ``idp_port``, with ``session`` as its session section; its upstream is never
    called."""
    return {
        "listen": {"port": port},
        "admin": {"port": admin},
        "upstream": {"url": "http://127.0.0.1:9"},
        "identity": {
            "kind": "oauth2",
            "token_url": f"http://127.0.0.1:{idp_port}/token",
            "client_id": "bench",
            "client_secret": "bench-secret",
        },
        "session": session,
    }


def pod_figures(
    work: Path, idp_port: int, env: dict[str, str], starts: int = 3, python: str = PY
) -> dict[str, Any]:
    """The figures of the module docstring, against the token endpoint on ``idp_port``, of the
    sidecar that ``python`` (with ``env``) imports."""
    # -P: the sidecar on PYTHONPATH (``env``), never the current directory's
    sidecar = [python, "-P", "-m", "sidecar"]
    compile_sidecar(python, env)
    print("  pod: --version, check-config, start to /readyz, idle RSS ...", flush=True)
    admin = free_port()
    config = work / f"pod-{admin}.yaml"
    session = {"store": "file", "path": str(work / f"pod-session-{admin}.json")}
    config.write_text(json.dumps(bench_config(free_port(), admin, idp_port, session)))
    figures: dict[str, Any] = {
        "version": command_figures([*sidecar, "--version"], env),
        "check_config": command_figures([*sidecar, "check-config", "-c", str(config)], env),
    }
    # the first start logs in; the next ones find the session in the file store
    first = start_to_ready(sidecar, config, admin, idp_port, env)
    restarts = [start_to_ready(sidecar, config, admin, idp_port, env) for _ in range(starts)]
    figures["start_with_login"] = first
    figures["start_from_store"] = {
        "ms": statistics.median(r["ms"] for r in restarts),
        "identity_calls": sum(r["identity_calls"] for r in restarts),
        "rss_idle_mb": statistics.median(r["rss_idle_mb"] for r in restarts),
    }
    figures["rss_idle_mb"] = figures["start_from_store"]["rss_idle_mb"]
    return figures


def report(figures: dict[str, Any], title: str = "sidecar") -> None:
    print(f"\nper pod, {title} (wall time; peak or idle resident memory):")
    for name, label in (("version", "sidecar --version"), ("check_config", "check-config")):
        f = figures[name]
        peak = "-" if f["peak_rss_mb"] is None else f"{f['peak_rss_mb']:.1f}"
        print(f"  {label:34} {f['ms']:7.0f} ms  {peak:>5} MB peak (GNU time)")
    for name, label in (
        ("start_with_login", "run: start to /readyz, with login"),
        ("start_from_store", "run: start to /readyz, from store"),
    ):
        f = figures[name]
        print(
            f"  {label:34} {f['ms']:7.0f} ms  {f['rss_idle_mb']:5.1f} MB idle"
            f"  ({f['identity_calls']} identity calls)"
        )


@contextlib.contextmanager
def token_endpoint(env: dict[str, str]) -> Iterator[int]:
    port = free_port()
    with process([PY, str(HERE / "token_server.py"), str(port)], port, env):
        yield port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="restarts from the store")
    args = parser.parse_args()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
        "PYTHONPATH": str(ROOT),
    }
    with tempfile.TemporaryDirectory(prefix="sidecar-pod-") as tmp, token_endpoint(env) as idp:
        figures = pod_figures(Path(tmp), idp, env, args.starts)
    report(figures)
    save_results("pod", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
