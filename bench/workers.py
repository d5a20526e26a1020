"""How `sidecar run --workers 2` shares the work, process by process, against one worker.

``python bench/workers.py [--rounds 3] [--seconds 3]`` starts the bench's upstream (nginx, with
wrk, on core 0), one sidecar pinned to core 1 and a sidecar with two unpinned workers, then runs
``wrk -c50`` against each in turn, every other round in reverse order. For each run it counts,
per process (wrk from this process's children, the others from /proc):

- the connections each worker holds in the middle of the run;
- the requests each worker served: its write system calls over two (a worker writes the request
  to the upstream and the answer to the caller, one call each);
- CPU time per request, and the times it was preempted (involuntary context switches);
- each core's idle share, and the CPU time the machine's other work took.

Counts, not only req/s: on a shared machine req/s drift, and a count says where the time went.
Results go to bench/results/workers-*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from run import (
    PY,
    World,
    bench_world,
    busy_seconds,
    children,
    cpu_seconds,
    free_port,
    process,
    save_results,
    sidecar_config,
    taskset,
    wrk,
)


def _own_cpu(pid: int) -> float:
    """CPU time (user + system) of this one process, its children left out."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _status(pid: int) -> dict[str, int]:
    """The counters of a process: its write calls and the times it was preempted."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("syscw:"):
                out["writes"] = int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("nonvoluntary_ctxt_switches:"):
                out["preempted"] = int(line.split()[1])
    return out


def _cores() -> dict[str, tuple[int, int]]:
    """Each core's idle and total time so far, in ticks (/proc/stat)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in values[:8]]
            out[name] = (ticks[3] + ticks[4], sum(ticks))
    return out


def connections(port: int, pids: list[int]) -> dict[int, int]:
    """How many established TCP connections on local ``port`` each of ``pids`` holds."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    held = dict.fromkeys(pids, 0)
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = fd.readlink().name
                    held[pid] += target.startswith("socket:[") and target[8:-1] in inodes
    return held


def one_run(port: int, procs: dict[str, int], upstream: int, seconds: float) -> dict[str, Any]:
    """``wrk -c50`` against ``port`` for ``seconds``, with the counts of ``procs`` (name: pid)."""
    cpu = {name: _own_cpu(pid) for name, pid in procs.items()}
    status = {name: _status(pid) for name, pid in procs.items()}
    up, cores, machine = cpu_seconds(upstream), _cores(), busy_seconds()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    held: dict[int, int] = {}
    sample = threading.Timer(
        seconds / 2, lambda: held.update(connections(port, list(procs.values())))
    )
    sample.start()
    started = time.monotonic()
    got = wrk(f"http://127.0.0.1:{port}/", 50, seconds)
    elapsed = time.monotonic() - started
    sample.join()
    requests = max(1.0, got["requests"])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime  # wrk's
    spent_up = cpu_seconds(upstream) - up
    machine = busy_seconds() - machine
    ticks = _cores()
    out: dict[str, Any] = {
        "rps": got["rps"],
        "requests": requests,
        "wrk_us_per_req": round(spent / requests * 1e6, 1),
        "upstream_us_per_req": round(spent_up / requests * 1e6, 1),
        "idle_per_core": {
            core: round((ticks[core][0] - idle) / max(1, ticks[core][1] - total), 3)
            for core, (idle, total) in cores.items()
        },
        "processes": {},
    }
    spent += spent_up
    for name, pid in procs.items():
        used = _own_cpu(pid) - cpu[name]
        spent += used
        now = _status(pid)
        out["processes"][name] = {
            "pid": pid,
            "cpu_s": round(used, 3),
            "connections": held.get(pid, 0),
            "requests": (now.get("writes", 0) - status[name].get("writes", 0)) // 2,
            "preempted": now.get("preempted", 0) - status[name].get("preempted", 0),
        }
    out["other_work_cores"] = round(max(0.0, machine - spent) / elapsed, 3)
    return out


def _targets(world: World) -> tuple[list[str], list[str], int, int]:
    one_port, two_port = free_port(), free_port()
    one = sidecar_config(world.work, one_port, world.up_port, world.idp_port, True)
    two = sidecar_config(world.work, two_port, world.up_port, world.idp_port, True)
    return (
        [*taskset("1"), PY, "-m", "sidecar", "run", "-c", str(one)],
        [PY, "-m", "sidecar", "run", "-c", str(two), "--workers", "2"],
        one_port,
        two_port,
    )


def report(runs: list[dict[str, Any]]) -> None:
    for run in runs:
        idle = " ".join(f"{c} {v:.0%}" for c, v in run["idle_per_core"].items())
        print(
            f"\n{run['target']}: {run['rps']:.0f} req/s; wrk {run['wrk_us_per_req']} us/req, "
            f"upstream {run['upstream_us_per_req']} us/req; idle {idle}; other work "
            f"{run['other_work_cores']} cores"
        )
        for name, p in run["processes"].items():
            per = p["cpu_s"] / max(1, p["requests"]) * 1e6 if p["requests"] else 0.0
            print(
                f"  {name:10} {p['connections']:3} connections {p['requests']:7} requests "
                f"{p['cpu_s']:6.2f} s CPU ({per:5.1f} us/req) preempted {p['preempted']}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if shutil.which("wrk") is None or not Path(nginx).exists():
        print("bench: wrk and nginx are needed (make bench installs them)", file=sys.stderr)
        return 2
    runs: list[dict[str, Any]] = []
    with bench_world("sidecar-workers-", nginx, pin=True) as world:
        one_argv, two_argv, one_port, two_port = _targets(world)
        with (
            process(one_argv, one_port, world.env) as one,
            process(two_argv, two_port, world.env) as supervisor,
        ):
            time.sleep(1.0)
            workers = children(supervisor)
            two = {"supervisor": supervisor, **{f"worker{i}": p for i, p in enumerate(workers)}}
            for port in (one_port, two_port):
                wrk(f"http://127.0.0.1:{port}/", 10, 1)  # warm up
            targets = [("one worker", one_port, {"one": one}), ("two workers", two_port, two)]
            for n in range(args.rounds):
                for name, port, procs in targets[:: 1 if n % 2 == 0 else -1]:
                    print(f"  {name} ...", flush=True)
                    run = one_run(port, procs, world.up_pid, args.seconds)
                    runs.append({"target": name, **run})
    report(runs)
    save_results("workers", {"seconds": args.seconds, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
