"""`make bench-soak`: the long-running figures of the performance issue.

1. RSS growth of one sidecar across 500,000 requests (after a 20,000-request warm-up).
2. RSS while a 1 GiB body streams through.
3. Full load with 2-second tokens for 30 s: every response must be 2xx, and the token endpoint
   sees about one call per refresh interval.

Usage: python bench/soak.py [--requests 500000] [--token-seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from run import (
    HERE,
    PY,
    ROOT,
    UPSTREAM_CORE,
    free_port,
    process,
    rss_mb,
    save_results,
    sidecar_config,
    taskset,
    upstream_conf,
    wrk,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500_000)
    parser.add_argument("--token-seconds", type=float, default=30.0)
    args = parser.parse_args()
    nginx = "/usr/sbin/nginx"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
        "PYTHONPATH": str(ROOT),
    }
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="sidecar-soak-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # noqa: S103 - nginx workers read the files
        (work / "big.bin").write_bytes(os.urandom(1 << 20))
        with (work / "huge.bin").open("wb") as fh:  # sparse: 1 GiB of zeros, no disk
            fh.truncate(1 << 30)
        up_port, idp_port, idp2_port = free_port(), free_port(), free_port()
        conf = upstream_conf(work, up_port).replace(
            "location /big", f"location /huge {{ alias {work}/huge.bin; }}\n    location /big"
        )
        (work / "up.conf").write_text(conf)
        with (
            process([*taskset(UPSTREAM_CORE), nginx, "-c", str(work / "up.conf")], up_port),
            process(
                [*taskset(UPSTREAM_CORE), PY, str(HERE / "token_server.py"), str(idp_port)],
                idp_port,
            ),
        ):
            port = free_port()
            cfg = sidecar_config(work, port, up_port, idp_port, access_log=True)
            argv = [*taskset("1"), PY, "-m", "sidecar", "run", "-c", str(cfg)]
            with process(argv, port, env) as pid:
                url = f"http://127.0.0.1:{port}/"
                print("warm-up: 20,000 requests", flush=True)
                run_requests(url, 20_000)
                before = rss_mb(pid)
                print(f"soak: {args.requests:,} requests", flush=True)
                started = time.monotonic()
                made = run_requests(url, args.requests)
                elapsed = time.monotonic() - started
                after = rss_mb(pid)
                results["soak"] = {
                    "requests": made,
                    "seconds": round(elapsed, 1),
                    "rss_before_mb": before,
                    "rss_after_mb": after,
                    "growth_mb": round(after - before, 1),
                }
                print(
                    f"  RSS {before} -> {after} MB ({after - before:+.1f} MB) in {elapsed:.0f} s",
                    flush=True,
                )
                print("1 GiB download through the proxy", flush=True)
                peak = stream_huge(f"http://127.0.0.1:{port}/huge", pid)
                results["stream_1gib"] = {"rss_peak_mb": peak}
                print(f"  RSS peak while streaming: {peak} MB", flush=True)
            with process(
                [*taskset(UPSTREAM_CORE), PY, str(HERE / "token_server.py"), str(idp2_port), "2"],
                idp2_port,
            ):
                port = free_port()
                cfg = sidecar_config(work, port, up_port, idp2_port, access_log=True)
                data = json.loads(cfg.read_text())
                data["refresh"] = {"lead_time": 0.4, "lead_fraction": 0.2, "jitter": 0.1}
                cfg.write_text(json.dumps(data))
                argv = [*taskset("1"), PY, "-m", "sidecar", "run", "-c", str(cfg)]
                with process(argv, port, env):
                    print(f"full load with 2 s tokens for {args.token_seconds:.0f} s", flush=True)
                    figures = wrk(f"http://127.0.0.1:{port}/", 50, args.token_seconds)
                    with urllib.request.urlopen(f"http://127.0.0.1:{idp2_port}/calls") as resp:
                        calls = json.load(resp)["n"]
                    results["short_tokens"] = {
                        "seconds": args.token_seconds,
                        "rps": figures["rps"],
                        "non_2xx": figures["non_2xx"],
                        "token_calls": calls,
                    }
                    print(
                        f"  {figures['rps']:.0f} req/s, non-2xx: {figures['non_2xx']:.0f}, "
                        f"token calls: {calls}",
                        flush=True,
                    )
    save_results("soak", results)
    return 0


def run_requests(url: str, count: int) -> int:
    """At least ``count`` requests, in 5-second wrk runs; returns how many were made."""
    done = 0
    while done < count:
        out = subprocess.run(
            [*taskset(UPSTREAM_CORE), "wrk", "-t1", "-c50", "-d5s", url],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        match = REQUESTS.search(out)
        assert match is not None, out
        done += int(match.group(1))
    return done


REQUESTS = re.compile(r"(\d+) requests in")


def stream_huge(url: str, pid: int) -> float:
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            total = 0
            while chunk := resp.read(1 << 20):
                total += len(chunk)
        assert total == 1 << 30, total
    finally:
        done.set()
        sampler.join()
    return peak


if __name__ == "__main__":
    sys.exit(main())
