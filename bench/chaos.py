"""`make chaos`: steady traffic through a real sidecar while its identity provider fails.

A real ``sidecar run`` process holds 2-second tokens from our fault-injecting identity provider
(tests/fakes/idp.py, behind a TCP gate that can refuse connections) and forwards to our fake
upstream, which checks every token it receives. On a fixed schedule the provider answers 503,
resets connections, refuses them, or hangs, for a short spell (shorter than a token's life) and
a long one (longer than it), then recovers.

Printed at the end: requests sent, succeeded, failed by reason; failures while a valid token
existed (target: zero); requests the upstream received with an invalid token (must be zero);
tokens obtained; and for each outage the delay from the provider's return to the next token
(target: within one backoff step, ``refresh.retry.max``, plus the identity timeout for a hang).
Loopback only; about 60 s; stops by itself. Results also go to bench/results/chaos.json.

Usage: python bench/chaos.py [--seconds 60] [--clients 4]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.gate import Gate  # noqa: E402 - needs ROOT on the path first
from tests.fakes.idp import FakeIdP  # noqa: E402
from tests.fakes.upstream import FakeUpstream  # noqa: E402
from tests.redis_server import free_port  # noqa: E402

LIFETIME = 2.0
RETRY = {"initial": 0.25, "max": 1.0}
IDP_TIMEOUT = 0.5
#: (start second, fault, duration): each fault once shorter and once longer than a token's life
SCHEDULE = [
    (4.0, "503", 0.8),
    (8.0, "503", 4.0),
    (16.0, "reset", 0.8),
    (20.0, "reset", 4.0),
    (28.0, "refused", 0.8),
    (32.0, "refused", 4.0),
    (40.0, "hang", 0.8),
    (44.0, "hang", 4.0),
    (52.0, "429", 3.0),
]


@dataclass
class Outage:
    fault: str
    began: float
    duration: float
    ended: float = 0.0


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    #: (started, ended, reason) of every failed request
    failures: list[tuple[float, float, str]] = field(default_factory=list)
    invalid_forwarded: int = 0
    forwarded: int = 0


def sidecar_config(gate_port: int, upstream_port: int, idp: FakeIdP) -> dict[str, Any]:
    return {
        "listen": {"port": free_port(), "drain_timeout": 2},
        "admin": {"port": free_port()},
        "upstream": {
            "url": f"http://127.0.0.1:{upstream_port}",
            "timeout": {"connect": 1, "total": 5},
        },
        "identity": {
            "kind": "oauth2",
            "token_url": f"http://127.0.0.1:{gate_port}/token",
            "client_id": idp.client_id,
            "client_secret": idp.client_secret,
            "timeout": IDP_TIMEOUT,
        },
        "refresh": {"retry": RETRY},
        "session": {"store": "memory"},
        "log": {"level": "warning", "access_log": False},
    }


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


async def client(
    http: aiohttp.ClientSession, url: str, until: float, tally: Tally, pause: float
) -> None:
    """One caller: a request, a short pause, again, until ``until`` (wall time)."""
    while time.time() < until:
        started = time.time()
        tally.sent += 1
        reason = ""
        try:
            async with http.get(url) as resp:
                body = await resp.read()
                if resp.status == 200:
                    tally.ok += 1
                else:
                    code = ""
                    if resp.headers.get("X-Sidecar-Error"):
                        code = " " + str(json.loads(body).get("error", ""))
                    reason = f"{resp.status}{code}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = type(exc).__name__
        if reason:
            tally.failed[reason] += 1
            tally.failures.append((started, time.time(), reason))
        await asyncio.sleep(pause)


async def count_forwarded(upstream: FakeUpstream, tally: Tally, until: float) -> None:
    """Check what the upstream received every half second, then forget it (bounded memory)."""
    while True:
        seen, upstream.seen = upstream.seen, []
        tally.forwarded += len(seen)
        tally.invalid_forwarded += sum(1 for s in seen if not s.token_valid)
        if time.time() > until + 1:
            return
        await asyncio.sleep(0.5)


async def faults(
    idp: FakeIdP, gate: Gate, origin: float, seconds: float, outages: list[Outage]
) -> None:
    """Run the schedule: switch each fault on, then off again (those that fit in the run)."""
    for start, fault, duration in SCHEDULE:
        if start + duration + 2 > seconds:
            return
        await asyncio.sleep(max(0.0, origin + start - time.time()))
        outage = Outage(fault, time.time(), duration)
        outages.append(outage)
        if fault == "refused":
            await gate.refuse()
        else:
            idp.down = fault
        await asyncio.sleep(duration)
        if fault == "refused":
            await gate.open()
        else:
            idp.down = None
        outage.ended = time.time()


#: the sidecar's refresh.expiry_margin for these tokens (a tenth of their life)
MARGIN = 0.1 * LIFETIME


def valid_token_at(issued: list[tuple[float, float]], started: float, ended: float) -> bool:
    """True when some token issued so far was usable (outside its expiry margin) for the whole
    request."""
    return any(at <= started and ended < expires - MARGIN for at, expires in issued)


async def run(seconds: float, clients: int, work: Path) -> dict[str, Any]:
    idp = FakeIdP(lifetime=LIFETIME)
    upstream = FakeUpstream(idp=idp, echo_authorization=False)
    idp_runner, idp_port = await serve(idp.app())
    up_runner, up_port = await serve(upstream.app())
    gate = Gate(idp_port)
    await gate.open()
    config = sidecar_config(gate.port, up_port, idp)
    config_path = work / "chaos.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = work / "sidecar.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            "run",
            "-c",
            str(config_path),
            stdout=log,
            stderr=log,
            env=env,
        )
    proxy = f"http://127.0.0.1:{config['listen']['port']}/x"
    admin = f"http://127.0.0.1:{config['admin']['port']}"
    tally = Tally()
    outages: list[Outage] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            await wait_ready(http, admin + "/readyz", proc)
            origin = time.time()
            until = origin + seconds
            tasks = [client(http, proxy, until, tally, 0.02) for _ in range(clients)]
            await asyncio.gather(
                faults(idp, gate, origin, seconds, outages),
                count_forwarded(upstream, tally, until),
                *tasks,
            )
            async with http.get(admin + "/metrics") as resp:
                metrics = await resp.text()
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            code = await proc.wait()
        await gate.close()
        await up_runner.cleanup()
        await idp_runner.cleanup()
    issued = sorted((exp - LIFETIME, exp) for exp in idp.issued.values())
    return report(tally, outages, issued, metrics, code, origin)


async def wait_ready(
    http: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process
) -> None:
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.returncode is not None:
            raise SystemExit("sidecar exited before it was ready")
        try:
            async with http.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit("sidecar never became ready")


def report(
    tally: Tally,
    outages: list[Outage],
    issued: list[tuple[float, float]],
    metrics: str,
    exit_code: int,
    origin: float,
) -> dict[str, Any]:
    bad = [f for f in tally.failures if valid_token_at(issued, f[0], f[1])]
    recoveries = []
    for i, outage in enumerate(outages):
        after = [at for at, _ in issued if at >= outage.ended]
        delay = round(after[0] - outage.ended, 3) if after else None
        # failures from its start until the next outage (or 5 s after its end)
        until = outage.ended + 5
        if i + 1 < len(outages):
            until = min(until, outages[i + 1].began)
        failed_here = sum(1 for f in tally.failures if outage.began <= f[0] < until)
        bound = RETRY["max"] + (IDP_TIMEOUT if outage.fault == "hang" else 0.0)
        recoveries.append(
            {
                "fault": outage.fault,
                "at": round(outage.began - origin, 1),
                "seconds": outage.duration,
                "next_token_after_return": delay,
                "within_one_step": delay is not None and delay <= bound,
                "step_bound": bound,
                "failed_requests": failed_here,
            }
        )
    refresh_failures = {
        line.split('reason="')[1].split('"')[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("sidecar_token_refreshes_total{") and 'result="failure"' in line
    }
    return {
        "requests_sent": tally.sent,
        "succeeded": tally.ok,
        "failed_by_reason": dict(tally.failed.most_common()),
        "failed_while_a_valid_token_existed": len(bad),
        "failed_while_valid_examples": [
            (round(s - origin, 3), round(e - origin, 3), r) for s, e, r in bad[:5]
        ],
        "forwarded": tally.forwarded,
        "forwarded_with_an_invalid_token": tally.invalid_forwarded,
        "tokens_obtained": len(issued),
        "refresh_failures_by_reason": refresh_failures,
        "outages": recoveries,
        "sidecar_exit_code": exit_code,
    }


def show(result: dict[str, Any]) -> None:
    print(f"requests sent        {result['requests_sent']}")
    print(f"succeeded            {result['succeeded']}")
    failed = ", ".join(f"{k}: {v}" for k, v in result["failed_by_reason"].items()) or "none"
    print(f"failed by reason     {failed}")
    print(f"failed while a valid token existed   {result['failed_while_a_valid_token_existed']}")
    print(f"forwarded with an invalid token      {result['forwarded_with_an_invalid_token']}")
    print(f"tokens obtained      {result['tokens_obtained']}")
    print(f"refresh failures     {result['refresh_failures_by_reason']}")
    print("outage                      next token after return   failed requests")
    for o in result["outages"]:
        delay = "-" if o["next_token_after_return"] is None else f"{o['next_token_after_return']}s"
        ok = "ok" if o["within_one_step"] else f"SLOW (bound {o['step_bound']}s)"
        label = f"{o['fault']} for {o['seconds']}s at {o['at']}s"
        print(f"  {label:<26}{delay:>8} {ok:<18}{o['failed_requests']:>6}")
    print(f"sidecar exit code    {result['sidecar_exit_code']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sidecar-chaos-") as tmp:
        result = asyncio.run(run(args.seconds, args.clients, Path(tmp)))
    show(result)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(result, indent=2))
    good = (
        result["failed_while_a_valid_token_existed"] == 0
        and result["forwarded_with_an_invalid_token"] == 0
        and result["sidecar_exit_code"] == 0
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
