"""`make bench-shared`: how long a replica takes to see a token another replica refreshed.

Two sidecar processes share one session through a real redis-server. 50 times, replica A is
told to refresh (POST /session/refresh); we then poll replica B's /session every millisecond
until it reports A's new token, and record the delay from A's answer to B's adoption.

Usage: python bench/shared_refresh.py [--rounds 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pod import bench_config
from run import HERE, PY, ROOT, free_port, process, save_results


def get(url: str, method: str = "GET") -> dict[str, object]:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=10) as resp:
        data: dict[str, object] = json.load(resp)
        return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print(
            "bench: redis-server is not installed (make bench-shared installs it)", file=sys.stderr
        )
        return 2
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
        "PYTHONPATH": str(ROOT),
    }
    delays: list[float] = []
    with tempfile.TemporaryDirectory(prefix="sidecar-shared-") as tmp:
        work = Path(tmp)
        redis_port, idp_port = free_port(), free_port()
        argv_redis = [
            redis_server,
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(work),
        ]
        with (
            process(argv_redis, redis_port),
            process([PY, str(HERE / "token_server.py"), str(idp_port)], idp_port),
        ):
            replicas = []
            for name in ("a", "b"):
                port, admin = free_port(), free_port()
                cfg = work / f"{name}.yaml"
                redis = {"store": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0"}
                quiet = {"log": {"access_log": False, "level": "warning"}}
                cfg.write_text(json.dumps({**bench_config(port, admin, idp_port, redis), **quiet}))
                replicas.append((admin, [PY, "-m", "sidecar", "run", "-c", str(cfg)], port))
            (admin_a, argv_a, port_a), (admin_b, argv_b, port_b) = replicas
            with process(argv_a, port_a, env), process(argv_b, port_b, env):
                time.sleep(1)
                for _ in range(args.rounds):
                    fresh = get(f"http://127.0.0.1:{admin_a}/session/refresh", "POST")
                    done = time.perf_counter()
                    while (
                        get(f"http://127.0.0.1:{admin_b}/session")["token_fingerprint"]
                        != fresh["token_fingerprint"]
                    ):
                        if time.perf_counter() - done > 5:
                            raise RuntimeError("replica b never saw the new token")
                        time.sleep(0.001)
                    delays.append((time.perf_counter() - done) * 1000)
                calls = get(f"http://127.0.0.1:{idp_port}/calls")["n"]
    median, worst = statistics.median(delays), max(delays)
    print(
        f"{args.rounds} refreshes on replica A; replica B saw each new token after "
        f"median {median:.1f} ms, max {worst:.1f} ms (includes one /session poll, ~1 ms)"
    )
    print(f"token endpoint calls: {calls} (1 login + {args.rounds} refreshes expected)")
    save_results(
        "shared",
        {
            "rounds": args.rounds,
            "median_ms": round(median, 2),
            "max_ms": round(worst, 2),
            "token_calls": calls,
            "delays_ms": [round(d, 2) for d in delays],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
