"""`make bench`: sidecar against nginx and a minimal aiohttp proxy, measured in one run.

Layout (2 cores): the nginx upstream and wrk share core 0; each proxy runs alone on core 1.
For every target: req/s at 50 connections, p50/p99 latency at 1 and 50 connections, 1 MiB
streaming MB/s, the CPU time each proxy spent per request and per MiB (with the cores it got),
and (for the Python proxies) RSS idle and after the run. Every figure is also given as a ratio
to nginx and to the minimal aiohttp proxy. Results go to bench/results/*.json.

Before them, what one pod pays (bench/pod.py): the time and memory of ``sidecar --version`` and
``check-config``, start to /readyz with and without a login, and the idle RSS.

Usage: python bench/run.py [--seconds 5] [--only sidecar,minimal,pod]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
BODY = '{"status":"ok","items":[1,2,3],"message":"a small JSON answer of about 100 bytes"}'
UPSTREAM_CORE, PROXY_CORE = "0", "1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (workers), in MB."""
    total = 0
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return round(total / 1024, 1)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) spent so far by a process and its children (workers)."""
    total = 0
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (in clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def taskset(core: str) -> list[str]:
    return ["taskset", "-c", core] if shutil.which("taskset") else []


def nginx_conf(work: Path, port: int, body: str) -> str:
    return f"""
worker_processes 1;
daemon off;
master_process off;
user root;
error_log {work}/error.log crit;
pid {work}/nginx-{port}.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  keepalive_requests 1000000;
  {body}
}}
"""


def upstream_conf(work: Path, port: int) -> str:
    return nginx_conf(
        work,
        port,
        f"""
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type application/json; return 200 '{BODY}'; }}
    location /big {{ alias {work}/big.bin; }}
  }}""",
    )


def proxy_conf(work: Path, port: int, upstream: int, token: str) -> str:
    return nginx_conf(
        work,
        port,
        f"""
  upstream backend {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {token}";
      proxy_set_header X-Request-ID $request_id;
      proxy_buffering off;
    }}
  }}""",
    )


WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
WRK_COUNT = re.compile(r"(\d+) requests in")
WRK_TRANSFER = re.compile(r"Transfer/sec:\s+([\d.]+)(\w+)")
WRK_PCT = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
WRK_ERRORS = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
UNIT = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}
BYTES = {"B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1000.0}


def wrk(url: str, connections: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            *taskset(UPSTREAM_CORE),
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = {
        "rps": float(WRK_RPS.search(out).group(1)),  # type: ignore[union-attr]
        "requests": float(WRK_COUNT.search(out).group(1)),  # type: ignore[union-attr]
    }
    for pct, value, unit in WRK_PCT.findall(out):
        result[f"p{pct}_us"] = round(float(value) * UNIT[unit], 1)
    transfer = WRK_TRANSFER.search(out)
    if transfer:
        result["mb_s"] = round(float(transfer.group(1)) * BYTES[transfer.group(2)], 1)
    errors = WRK_ERRORS.search(out)
    result["non_2xx"] = float(errors.group(1)) if errors else 0.0
    return result


@contextlib.contextmanager
def process(
    argv: list[str], port: int, env: dict[str, str] | None = None, within: float = 15.0
) -> Iterator[int]:
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_port(port, within)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclasses.dataclass(frozen=True)
class World:
    """What every proxy under test is measured against: a work directory (with the 1 MiB file
    and the token), the nginx upstream and the token endpoint, and the environment to run in."""

    work: Path
    up_port: int
    idp_port: int
    token: str
    token_file: Path
    env: dict[str, str]
    #: the nginx upstream's process (its CPU time is part of every request's cost)
    up_pid: int = 0

    @property
    def upstream(self) -> str:
        return f"http://127.0.0.1:{self.up_port}"


@contextlib.contextmanager
def bench_world(prefix: str, nginx: str, *, pin: bool) -> Iterator[World]:
    """Start the upstream and the token endpoint (on core 0 when ``pin``); yields a World."""
    core = taskset(UPSTREAM_CORE) if pin else []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # noqa: S103 - nginx workers read the static file
        (work / "big.bin").write_bytes(os.urandom(1 << 20))
        up_port, idp_port = free_port(), free_port()
        token = "x" * 900
        token_file = work / "token"
        token_file.write_text(token)
        (work / "up.conf").write_text(upstream_conf(work, up_port))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
            "PYTHONPATH": str(ROOT),
        }
        with (
            process([*core, nginx, "-c", str(work / "up.conf")], up_port) as up_pid,
            process([*core, PY, str(HERE / "token_server.py"), str(idp_port)], idp_port),
        ):
            # taskset execs nginx: up_pid is nginx's (master_process off: the one process)
            yield World(work, up_port, idp_port, token, token_file, env, up_pid)


def sidecar_config(
    work: Path, port: int, upstream: int, idp: int, access_log: bool, workers_note: str = ""
) -> Path:
    path = work / f"sidecar-{port}.yaml"
    path.write_text(
        json.dumps(
            {
                "listen": {"port": port},
                "admin": {"port": free_port()},
                "upstream": {"url": f"http://127.0.0.1:{upstream}"},
                "identity": {
                    "kind": "oauth2",
                    "token_url": f"http://127.0.0.1:{idp}/token",
                    "client_id": "bench",
                    "client_secret": "bench-secret",
                },
                "headers": {"tenant_id": "1234567"},
                "session": {"store": "file", "path": str(work / f"session-{port}.json")},
                "log": {"access_log": access_log},
            }
        )
    )
    return path


def measure(
    name: str, url: str, pid: int | None, seconds: float, rss: bool = True
) -> dict[str, Any]:
    """The figures of one target; with its ``pid``, also its CPU time per request and per MiB
    (summed over its worker processes), and with ``rss`` its memory."""
    print(f"  {name} ...", flush=True)
    wrk(url + "/", 10, 1)  # warm up connections and code paths
    figures: dict[str, Any] = {}
    if pid is not None and rss:
        figures["rss_idle_mb"] = rss_mb(pid)
    cpu = [cpu_seconds(pid) if pid is not None else 0.0]
    c50 = wrk(url + "/", 50, seconds)
    cpu.append(cpu_seconds(pid) if pid is not None else 0.0)
    c1 = wrk(url + "/", 1, seconds)
    cpu.append(cpu_seconds(pid) if pid is not None else 0.0)
    big = wrk(url + "/big", 4, max(2.0, seconds / 2))
    cpu.append(cpu_seconds(pid) if pid is not None else 0.0)
    if pid is not None:
        # CPU per unit of work: unlike req/s, it does not depend on how much CPU the proxy got
        figures["cpu_us_per_req_50"] = round((cpu[1] - cpu[0]) / c50["requests"] * 1e6, 1)
        figures["cpu_cores_50"] = round((cpu[1] - cpu[0]) / max(1, round(seconds)), 2)
        figures["cpu_ms_per_mib"] = round((cpu[3] - cpu[2]) / max(1.0, big["requests"]) * 1e3, 3)
    figures.update(
        rps_50=c50["rps"],
        p50_50_us=c50.get("p50_us"),
        p99_50_us=c50.get("p99_us"),
        p50_1_us=c1.get("p50_us"),
        p99_1_us=c1.get("p99_us"),
        stream_mb_s=big.get("mb_s"),
        non_2xx=c50["non_2xx"] + c1["non_2xx"],
    )
    if pid is not None and rss:
        figures["rss_after_mb"] = rss_mb(pid)
    return figures


#: the targets measured again in alternation, all running at once, for the ratios that matter
#: (sidecar_before: another build, with ``--against``)
PAIRED = ("nginx", "sidecar", "sidecar_workers2", "sidecar_before")
#: (figure, target, base target, wrk path, connections) of the paired rounds
RATIOS = (
    ("sidecar/nginx req/s", "sidecar", "nginx", "/", 50),
    ("sidecar/nginx 1 MiB MB/s", "sidecar", "nginx", "/big", 4),
    ("sidecar_before/nginx req/s", "sidecar_before", "nginx", "/", 50),
    ("sidecar/sidecar_before req/s", "sidecar", "sidecar_before", "/", 50),
    ("sidecar/sidecar_before 1 MiB MB/s", "sidecar", "sidecar_before", "/big", 4),
)


def paired_rounds(
    urls: dict[str, str],
    rounds: int,
    seconds: float,
    pids: dict[str, int] | None = None,
    upstream_pid: int = 0,
) -> dict[str, Any]:
    """Measure nginx, sidecar and sidecar --workers 2 back to back, ``rounds`` times over.

    On a shared (virtual) machine the CPU's speed drifts by tens of percent within minutes, so
    two figures taken a minute apart can disagree more than two proxies do. Each ratio here
    comes from measurements seconds apart; the median over the rounds is the figure to quote.
    With the targets' ``pids``, each run also gives the CPU time the target spent per request;
    every run at 50 connections also gives what wrk and the upstream (``upstream_pid``) spent
    per request, the rest of the cost of a request on this machine.
    """
    print(f"paired rounds ({rounds} x {len(urls)} targets, {seconds:g} s each) ...", flush=True)
    pids = pids or {}
    runs: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    rest: dict[str, list[float]] = {}  # wrk's and the upstream's CPU per request, run by run
    foreign: dict[str, list[float]] = {}  # cores the machine's other work took, run by run
    for n in range(rounds):
        for path, conns in (("/", 50), ("/big", 4)):
            # every other round in reverse order: no target is always the one after a pause
            for name, url in list(urls.items())[:: 1 if n % 2 == 0 else -1]:
                if name == "direct" and path != "/":
                    continue
                pid = pids.get(name)
                before = cpu_seconds(pid) if pid else 0.0
                load = _wrk_seconds() + (cpu_seconds(upstream_pid) if upstream_pid else 0.0)
                machine, started = busy_seconds(), time.monotonic()
                got = wrk(url + path, conns, seconds)
                runs.setdefault((name, path), []).append(got["mb_s" if path == "/big" else "rps"])
                if path != "/":
                    continue
                machine = busy_seconds() - machine
                elapsed = time.monotonic() - started
                requests = max(1.0, got["requests"])
                spent = cpu_seconds(pid) - before if pid else 0.0
                if pid:
                    cpu.setdefault((name, path), []).append(spent / requests * 1e6)
                if upstream_pid:
                    load = _wrk_seconds() + cpu_seconds(upstream_pid) - load
                    rest.setdefault(name, []).append(load / requests * 1e6)
                    # what the machine spent besides the target, wrk and the upstream
                    other = max(0.0, machine - spent - load) / elapsed
                    foreign.setdefault(name, []).append(other)
    out: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "runs": {}, "ratios": {}}
    for (name, path), values in runs.items():
        out["runs"][f"{name} {path}"] = values
    out["cpu_us_per_req"] = {f"{name} {path}": values for (name, path), values in cpu.items()}
    out["wrk_upstream_us_per_req"] = rest
    out["other_work_cores"] = foreign
    for label, target, base, path, _ in RATIOS:
        mine, theirs = runs.get((target, path)), runs.get((base, path))
        if mine and theirs:
            out["ratios"][label] = spread([a / b for a, b in zip(mine, theirs, strict=True)])
    out["ratios"].update(_workers_figures(runs, cpu, rest, foreign))
    return out


def busy_seconds() -> float:
    """CPU time the whole machine has spent so far, all cores (user, system, interrupts, and the
    time the hypervisor took: steal), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _wrk_seconds() -> float:
    """CPU time (user + system) of the wrk runs so far: the children this process waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def workers_ceiling(one_us: float, rest_us: float, cores: int) -> float:
    """The req/s two workers can reach at most, each request costing ``one_us`` of CPU in the
    workers (one worker's cost) and ``rest_us`` in wrk and the upstream, which share core 0.

    Three limits: two workers use at most a core each; wrk and the upstream, pinned, one core;
    and the cost of a request, all parts together, cannot exceed the machine's ``cores``. On
    two cores the last one binds: 2 / (one_us + rest_us).
    """
    return min(2 / one_us, 1 / rest_us, cores / (one_us + rest_us)) * 1e6


def _workers_figures(
    runs: dict[tuple[str, str], list[float]],
    cpu: dict[tuple[str, str], list[float]],
    rest: dict[str, list[float]],
    foreign: dict[str, list[float]],
) -> dict[str, Any]:
    """How much of what the CPU left them two workers took, round by round.

    The ceiling is what two workers would serve on the cores the machine's other work left
    (measured during their run): the workers at one worker's CPU per request (measured in the
    same round), wrk and the upstream at the CPU per request they spent while the two workers
    ran (measured, not assumed).

    Until 2026-12-07 the second was taken from the upstream measured directly (``1 / direct``:
    wrk and nginx fill core 0 alone at direct's rate). That is not what they spend through a
    proxy: direct, at ~60,000 req/s, wrk and nginx spent 15-17 us per request; through one
    worker, at 13,000-20,000 req/s, 27-34 us, and 23-32 us while two workers ran (each of their
    wakeups serves a few requests instead of dozens, and nginx parses the 900-byte token and
    the headers the proxy adds). The old ceiling was 14-21 % too high in the rounds where
    nothing else ran; its figure stays, labelled, for comparison with earlier runs.
    """
    out: dict[str, Any] = {}
    one, two = runs.get(("sidecar", "/")), runs.get(("sidecar_workers2", "/"))
    direct = runs.get(("direct", "/"))
    if one and two and direct:
        # the model before 2026-12-07: wrk and the upstream at direct's cost per request
        old = [2 / (1 + a / d) for a, d in zip(one, direct, strict=True)]
        out["workers2 / ceiling at direct's cost (old model)"] = spread(
            [b / a / c for a, b, c in zip(one, two, old, strict=True)]
        )
    cpu_one, cpu_two = cpu.get(("sidecar", "/")), cpu.get(("sidecar_workers2", "/"))
    rest_two, other_two = rest.get("sidecar_workers2"), foreign.get("sidecar_workers2")
    if one and two and cpu_one and rest_two and other_two:
        cores = os.cpu_count() or 2
        ceilings = [
            workers_ceiling(s, w, cores - b)
            for s, w, b in zip(cpu_one, rest_two, other_two, strict=True)
        ]
        out["workers2 ceiling (CPU left)"] = spread(
            [c / a for a, c in zip(one, ceilings, strict=True)]
        )
        out["workers2 / its ceiling"] = spread([b / c for b, c in zip(two, ceilings, strict=True)])
    if cpu_one and cpu_two:
        # the cost of a request with two workers (supervisor included) over one worker's: what
        # the second worker adds besides throughput, measured whatever CPU the machine left
        out["workers2/sidecar CPU per req"] = spread(
            [b / a for a, b in zip(cpu_one, cpu_two, strict=True)]
        )
    if other_two:
        out["other work during workers2 (cores)"] = spread(other_two)
    for name, label in (("direct", "direct"), ("sidecar", "one worker")):
        if rest.get(name) and rest_two:
            out[f"wrk+upstream CPU per req, two workers / {label}"] = spread(
                [b / a for a, b in zip(rest[name], rest_two, strict=True)]
            )
    return out


#: a fixed piece of work, run on each core at once: sample i starts at wall time t0 + i * period
#: on both, so the samples of the two cores are taken at the same moments (milliseconds each)
_SPEED_PROBE = """
import sys, time
samples, t0, period = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
def work():
    x = 0
    for i in range(300_000):
        x += i
for n in range(samples):
    time.sleep(max(0.0, t0 + n * period - time.time()))
    t = time.perf_counter()
    work()
    print(round((time.perf_counter() - t) * 1000, 2), end=" ", flush=True)
"""


def core_speeds(samples: int = 12) -> dict[str, Any]:
    """Time the same loop on core 0 and core 1 at the same moments.

    On a virtual machine each core's speed can drift on its own (its host thread is shared with
    other tenants). sidecar/nginx is measured on core 1 alone, but --workers 2 against one
    worker compares both cores with core 1, so a drift between the cores lands in that ratio.
    """
    t0 = time.time() + 0.5  # both interpreters are up by then
    procs = [
        subprocess.Popen(
            [*taskset(core), PY, "-c", _SPEED_PROBE, str(samples), str(t0), "0.15"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for core in (UPSTREAM_CORE, PROXY_CORE)
    ]
    times = [[float(v) for v in proc.communicate()[0].split()] for proc in procs]
    return {
        "ms_core0": times[0],
        "ms_core1": times[1],
        # time, not speed: above 1, core 0 was the slower one at that moment
        "core0_over_core1": spread([a / b for a, b in zip(times[0], times[1], strict=True)]),
    }


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--only", default="")
    parser.add_argument("--rounds", type=int, default=8, help="paired rounds (0: none)")
    parser.add_argument("--round-seconds", type=float, default=1.0)
    parser.add_argument(
        "--against",
        default="",
        help="another checkout of sidecar, with its own .venv (e.g. a git worktree of an older "
        "commit): measured as sidecar_before, in the paired rounds too (an A/B of two builds)",
    )
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: {tool} is not installed (make bench installs it)", file=sys.stderr)
            return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    only = set(filter(None, args.only.split(",")))
    results: dict[str, Any] = {"seconds": args.seconds, "cores": os.cpu_count(), "targets": {}}
    started = time.monotonic()
    with bench_world("sidecar-bench-", nginx, pin=True) as world:
        work, up_port, idp_port, env = world.work, world.up_port, world.idp_port, world.env
        token, token_file = world.token, world.token_file
        upstream = world.upstream
        targets: list[tuple[str, list[str] | None, int]] = []
        ng_port = free_port()
        (work / "proxy.conf").write_text(proxy_conf(work, ng_port, up_port, token))
        targets.append(
            ("nginx", [*taskset(PROXY_CORE), nginx, "-c", str(work / "proxy.conf")], ng_port)
        )
        mp = free_port()
        targets.append(
            (
                "minimal_aiohttp",
                [
                    *taskset(PROXY_CORE),
                    PY,
                    str(HERE / "minimal_proxy.py"),
                    str(mp),
                    upstream,
                    str(token_file),
                ],
                mp,
            )
        )
        port = free_port()
        cfg = sidecar_config(work, port, up_port, idp_port, True)
        # "sidecar" runs on its default loop (uvloop, as in the image); this one on asyncio's
        targets.append(
            (
                "sidecar_asyncio",
                [
                    *taskset(PROXY_CORE),
                    PY,
                    "-m",
                    "sidecar",
                    "run",
                    "-c",
                    str(cfg),
                    "--loop",
                    "asyncio",
                ],
                port,
            )
        )
        for name, log in (("sidecar", True), ("sidecar_no_access_log", False)):
            port = free_port()
            cfg = sidecar_config(work, port, up_port, idp_port, log)
            targets.append(
                (name, [*taskset(PROXY_CORE), PY, "-m", "sidecar", "run", "-c", str(cfg)], port)
            )
        port = free_port()
        cfg = sidecar_config(work, port, up_port, idp_port, True)
        # two workers: one per core, not pinned (wrk and nginx share core 0 with one of them)
        targets.append(
            (
                "sidecar_workers2",
                [PY, "-m", "sidecar", "run", "-c", str(cfg), "--workers", "2"],
                port,
            )
        )
        envs: dict[str, dict[str, str]] = {}
        if args.against:
            before = Path(args.against).resolve()
            port = free_port()
            cfg = sidecar_config(work, port, up_port, idp_port, True)
            python = str(before / ".venv" / "bin" / "python")
            targets.append(
                (
                    "sidecar_before",
                    # -P: not the current directory's sidecar (this checkout's) but PYTHONPATH's
                    [*taskset(PROXY_CORE), python, "-P", "-m", "sidecar", "run", "-c", str(cfg)],
                    port,
                )
            )
            envs["sidecar_before"] = {**env, "PYTHONPATH": str(before)}
        if not only or "pod" in only:
            import pod  # here: pod.py imports this module

            results["pod"] = pod.pod_figures(work, idp_port, env)
            if args.against:
                results["pod_before"] = pod.pod_figures(
                    work, idp_port, envs["sidecar_before"], python=python
                )
        print(f"upstream direct ({upstream})")
        if not only or "direct" in only:
            results["targets"]["direct"] = measure("direct", upstream, None, args.seconds)
        for name, argv, port in targets:
            if only and name not in only:
                continue
            assert argv is not None
            with process(argv, port, envs.get(name, env)) as pid:
                time.sleep(0.5)
                results["targets"][name] = measure(
                    name, f"http://127.0.0.1:{port}", pid, args.seconds, rss=name != "nginx"
                )
        if args.rounds and not only:
            paired = [t for t in targets if t[0] in PAIRED]
            pids: dict[str, int] = {}
            with contextlib.ExitStack() as running:
                for name, argv, port in paired:
                    assert argv is not None
                    pids[name] = running.enter_context(process(argv, port, envs.get(name, env)))
                time.sleep(1.0)
                speeds = core_speeds()
                results["paired"] = paired_rounds(
                    {
                        "direct": upstream,
                        **{name: f"http://127.0.0.1:{port}" for name, _, port in paired},
                    },
                    args.rounds,
                    args.round_seconds,
                    pids,
                    world.up_pid,
                )
                results["paired"]["core_speeds"] = [speeds, core_speeds()]
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["ratios"] = ratios(results["targets"])
    report(results)
    print()
    save_results("bench", results)
    return 0


def save_results(kind: str, results: Any) -> Path:
    """Write ``results`` to bench/results/<kind>-<UTC time>.json, and say where."""
    out = HERE / "results" / time.strftime(f"{kind}-%Y%m%d-%H%M%S.json", time.gmtime())
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out.relative_to(ROOT)}")
    return out


#: the figures given as ratios to nginx and to the minimal proxy (in the JSON file too)
COMPARED = ("rps_50", "stream_mb_s", "p50_1_us", "p99_1_us", "p50_50_us", "p99_50_us")


def ratios(targets: dict[str, Any]) -> dict[str, Any]:
    """Every compared figure of every target over nginx's and over the minimal proxy's."""
    out: dict[str, Any] = {}
    for base in ("nginx", "minimal_aiohttp"):
        theirs = targets.get(base, {})
        out[f"over_{base}"] = {
            name: {
                key: round(f[key] / theirs[key], 3)
                for key in COMPARED
                if f.get(key) and theirs.get(key)
            }
            for name, f in targets.items()
        }
    return out


def report(results: dict[str, Any]) -> None:
    targets = results["targets"]
    ng = targets.get("nginx", {})
    mini = targets.get("minimal_aiohttp", {})

    def cells(f: dict[str, Any], key: str, fmt: str) -> str:
        """A figure with its ratios to nginx and to the minimal proxy."""
        value = f.get(key)
        if not value:
            return f"{'-':>{len(format(0, fmt))}} {'-':>5} {'-':>5}"
        by = [f"{value / b[key]:.2f}" if b.get(key) else "-" for b in (ng, mini)]
        return f"{value:{fmt}} {by[0]:>5} {by[1]:>5}"

    tables = (
        (
            "throughput and memory",
            (("req/s@50", "rps_50", ">9.0f"), ("MB/s 1MiB", "stream_mb_s", ">9.0f")),
        ),
        (
            "latency in us",
            (
                ("p50@1", "p50_1_us", ">7.0f"),
                ("p99@1", "p99_1_us", ">7.0f"),
                ("p50@50", "p50_50_us", ">7.0f"),
                ("p99@50", "p99_50_us", ">7.0f"),
            ),
        ),
    )
    for title, columns in tables:
        head = " ".join(
            f"{label:>{len(format(0, fmt))}} {'xngx':>5} {'xmini':>5}" for label, _, fmt in columns
        )
        extra = f" {'RSS idle/after MB':>18}" if title.startswith("throughput") else ""
        print(f"\n{title} (x: ratio to nginx, to the minimal aiohttp proxy)")
        print(f"{'target':24} {head}{extra}")
        for name, f in targets.items():
            row = " ".join(cells(f, key, fmt) for _, key, fmt in columns)
            if extra:
                row += f" {f.get('rss_idle_mb', '-')!s:>8}/{f.get('rss_after_mb', '-')!s:<9}"
            print(f"{name:24} {row}")
    print(
        "\nCPU (user + system, all of a target's processes) per unit of work; it does not "
        "depend on how much CPU the target got:"
    )
    print(f"  {'target':24} {'us/req@50':>9} {'cores@50':>8} {'ms/MiB':>7}")
    for name, f in targets.items():
        if "cpu_us_per_req_50" in f:
            print(
                f"  {name:24} {f['cpu_us_per_req_50']:>9.1f} {f['cpu_cores_50']:>8.2f} "
                f"{f['cpu_ms_per_mib']:>7.3f}"
            )
    paired = results.get("paired")
    if paired:
        print(
            f"\npaired rounds ({paired['rounds']} rounds, targets measured seconds apart; "
            "quote the median):"
        )
        for label, figure in paired["ratios"].items():
            print(
                f"  {label:28} median {figure['median']:.2f}  "
                f"(min {figure['min']:.2f}, max {figure['max']:.2f})"
            )
        for when, speeds in zip(("before", "after"), paired.get("core_speeds", []), strict=False):
            ms0, ms1 = speeds["ms_core0"], speeds["ms_core1"]
            ratio0 = speeds["core0_over_core1"]
            print(
                f"  core speeds {when}: the same loop took {min(ms0):.0f}-{max(ms0):.0f} ms on "
                f"core 0 and {min(ms1):.0f}-{max(ms1):.0f} ms on core 1; core 0's time over core "
                f"1's, started together: {ratio0['min']:.2f}-{ratio0['max']:.2f}"
            )
    if "pod" in results:
        import pod

        pod.report(results["pod"])
        if "pod_before" in results:
            pod.report(results["pod_before"], "sidecar_before")
    direct = targets.get("direct", {})
    if direct.get("p50_1_us"):
        print("\nadded p50 latency at 1 connection (proxy p50 - direct p50):")
        for name, f in targets.items():
            if name != "direct" and f.get("p50_1_us"):
                print(f"  {name:24} +{f['p50_1_us'] - direct['p50_1_us']:.0f} us")
    print(f"\nelapsed {results['elapsed_s']} s")


if __name__ == "__main__":
    sys.exit(main())
