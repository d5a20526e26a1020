"""Sidecar as a real child process (``python -m sidecar run -c FILE``), for multi-replica tests."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.helpers import free_port


class SidecarProcess:
    """One sidecar process on free ports, its log in a file."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str) -> None:
        self.proxy_port = free_port()
        self.admin_port = free_port()
        self.config_path = workdir / f"{name}.yaml"
        self.write_config(config)
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, extra_args: list[str] | None = None, *, nofile: int | None = None) -> None:
        """Start the process; ``extra_args`` go after ``run -c FILE`` (e.g. ``--loop uvloop``);
        ``nofile`` lowers its descriptor limit (RLIMIT_NOFILE, soft and hard)."""

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        argv = [sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path)]
        loop = os.environ.get("TEST_LOOP")  # see tests/conftest.py
        if loop and "--loop" not in (extra_args or []):
            argv += ["--loop", loop]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own argv
                [*argv, *(extra_args or [])],
                stdout=log,
                stderr=log,
                env=env,
                preexec_fn=limit if nofile is not None else None,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.proxy_port}{path}"

    def admin(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    async def wait_ready(self, http: aiohttp.ClientSession, within: float = 15.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"sidecar exited: {self.log_path.read_text()[-2000:]}")
            try:
                async with http.get(self.admin("/readyz")) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"sidecar not ready: {self.log_path.read_text()[-2000:]}")

    async def summary(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(self.admin("/session")) as resp:
            result: dict[str, Any] = await resp.json()
            return result

    def write_config(self, config: dict[str, Any]) -> None:
        """Replace the config file (on the same ports), e.g. before a SIGHUP."""
        config = {
            **config,
            "listen": {**config.get("listen", {}), "port": self.proxy_port},
            "admin": {**config.get("admin", {}), "port": self.admin_port},
        }
        self.config_path.write_text(yaml.safe_dump(config))

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines this process wrote."""
        lines = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines
