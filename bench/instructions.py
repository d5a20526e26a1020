"""`make bench-ir`: instructions per request and per MiB, counted by callgrind (noise-free).

req/s on a shared virtual machine drifts with the neighbours (a fixed Python loop here takes
anywhere between 0.29 and 0.49 s from one run to the next), so two builds cannot be compared by
throughput unless they differ a lot. Instructions executed in user space do not drift: the same
code serving the same requests counts the same to within a few hundredths of a percent. The kernel's
share (socket calls, loopback TCP) is not counted, so these figures measure our code, not the whole
cost of a request.

Each proxy runs under ``valgrind --tool=callgrind``; after a warm-up, ``callgrind_control -d``
dumps (and zeroes) the counters around N sequential small requests on one keep-alive connection
and around M downloads of the 1 MiB file. The nginx upstream and the token endpoint run natively.

Usage: python bench/instructions.py [--requests 1000] [--downloads 20] [--only sidecar,nginx]
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from run import (
    HERE,
    PY,
    bench_world,
    free_port,
    process,
    proxy_conf,
    save_results,
    sidecar_config,
)

TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)


def get_many(port: int, path: str, count: int) -> int:
    """``count`` sequential GETs on one keep-alive connection; returns the body bytes read."""
    received = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
        pending = b""
        for _ in range(count):
            sock.sendall(request)
            while b"\r\n\r\n" not in pending:
                pending += _recv(sock)
            head, pending = pending.split(b"\r\n\r\n", 1)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{path}: {head[:60]!r}")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(pending) < length:
                pending += _recv(sock)
            received += length
            pending = pending[length:]
    return received


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(1 << 20)
    if not data:
        raise RuntimeError("the proxy closed the connection")
    return data


def dump(pid: int, out: Path, seen: int) -> int:
    """Dump and zero the counters; returns the instructions since the previous dump."""
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    target = Path(f"{out}.{seen + 1}")
    while time.monotonic() < deadline:
        if target.exists():
            match = TOTALS.search(target.read_text(errors="replace"))
            if match:
                return int(match.group(1))
        time.sleep(0.2)
    raise RuntimeError(f"callgrind wrote no dump {target}")


def count(
    name: str, argv: list[str], port: int, env: dict[str, str], work: Path, args: argparse.Namespace
) -> dict[str, float]:
    print(f"  {name} (under callgrind) ...", flush=True)
    out = work / f"callgrind-{name}.out"
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    with process([*valgrind, *argv], port, env, within=180.0) as pid:
        get_many(port, "/", 50)  # warm up: connections, caches, first-call paths
        get_many(port, "/big", 2)
        dump(pid, out, 0)
        get_many(port, "/", args.requests)
        small = dump(pid, out, 1)
        got = get_many(port, "/big", args.downloads)
        big = dump(pid, out, 2)
    return {
        "instructions_per_request": round(small / args.requests),
        "instructions_per_mib": round(big / (got / (1 << 20))),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--downloads", type=int, default=20)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"bench-ir: {tool} is not installed (make bench-ir installs it)", file=sys.stderr)
            return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    only = set(filter(None, args.only.split(",")))
    results: dict[str, dict[str, float]] = {}
    with bench_world("sidecar-bench-ir-", nginx, pin=False) as world:
        work, up, idp = world.work, world.up_port, world.idp_port
        ng_port, mini_port, sc_port, as_port = (free_port() for _ in range(4))
        (work / "proxy.conf").write_text(proxy_conf(work, ng_port, up, world.token))
        sidecar = [PY, "-m", "sidecar", "run", "-c"]
        targets = {
            "nginx": ([nginx, "-c", str(work / "proxy.conf")], ng_port),
            "minimal_aiohttp": (
                [
                    PY,
                    str(HERE / "minimal_proxy.py"),
                    str(mini_port),
                    world.upstream,
                    str(world.token_file),
                ],
                mini_port,
            ),
            "sidecar": ([*sidecar, str(sidecar_config(work, sc_port, up, idp, True))], sc_port),
            # "sidecar" runs on its default loop: uvloop, as in the image
            "sidecar_asyncio": (
                [*sidecar, str(sidecar_config(work, as_port, up, idp, True)), "--loop", "asyncio"],
                as_port,
            ),
        }
        for name, (argv, port) in targets.items():
            if not only or name in only:
                results[name] = count(name, argv, port, world.env, work, args)
    print(f"\n{'target':18} {'instr/request':>14} {'instr/MiB':>12}")
    for name, figures in results.items():
        print(
            f"{name:18} {figures['instructions_per_request']:>14,.0f} "
            f"{figures['instructions_per_mib']:>12,.0f}"
        )
    print()
    save_results("instructions", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
