"""``sidecar run --workers N``: N proxy processes on one port (SO_REUSEPORT), one session.

The supervisor (the process started by the user) owns everything that must exist once: the
session (login, refresh, store), the admin port and the metrics. Each worker is a child process
that only proxies; it talks to the supervisor over a private socket pair, one JSON object a line:

    supervisor → worker   {"config": {...}, "unix_fd": n}   once, first (n: the inherited
                                                     listen.unix_socket, or null)
                          {"creds": {...} | null}        whenever the session changes
                          {"reload": {...}}              after SIGHUP: the new config
    worker → supervisor   {"need": "request"}            no valid token here: renew or resend
                          {"need": "reactive", "token": fingerprint}   the upstream said 401
                          {"metrics": {...}}             per-request metrics, every second
                          {"cookies": [...], "host", "path"}   upstream.capture_cookies

So the identity provider sees one call per lifetime however many workers run, and /metrics on
the one admin port sums what the workers counted. A worker that dies is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError
from yarl import URL

from sidecar.app import Sidecar
from sidecar.clock import Clock, SystemClock
from sidecar.config.models import Config
from sidecar.errors import ConfigError, NoSessionError, SidecarError
from sidecar.http.unix_socket import UnixListener
from sidecar.lifecycle import Reloads, freeze_startup_objects, signals_handled
from sidecar.metrics import Metrics, WorkerTotals
from sidecar.tls import tls_context
from sidecar.tokens import Credentials, Token

log = logging.getLogger(__name__)

#: seconds between a worker's metric reports
REPORT_EVERY = 1.0
#: seconds before a worker that died is started again
RESTART_AFTER = 1.0


def creds_to_dict(creds: Credentials | None) -> dict[str, Any] | None:
    """The credentials a worker needs (never the refresh token)."""
    if creds is None:
        return None
    out: dict[str, Any] = {}
    for f in dataclasses.fields(creds):
        value = getattr(creds, f.name)
        if isinstance(value, Token):
            value = {**value.to_dict(), "refresh_token": None}
        out[f.name] = value
    return out


def creds_from_dict(data: dict[str, Any]) -> Credentials:
    values = dict(data)
    values["token"] = Token.from_dict(values["token"])
    return Credentials(**values)


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


# ------------------------------------------------------------------------------ worker side


class RemoteSession:
    """A worker's view of the supervisor's session (implements proxy.CredentialSource)."""

    def __init__(self, writer: asyncio.StreamWriter, wait: float, clock: Clock) -> None:
        self._clock = clock
        self.current: Credentials | None = None
        self.last_api_call_at: float | None = None
        self._writer = writer
        self._wait = wait
        self._changed = asyncio.Event()
        self._error = "no session yet"

    def update(self, creds: Credentials | None, error: str | None) -> None:
        self.current = creds
        if error:
            self._error = error
        self._changed.set()
        self._changed = asyncio.Event()

    async def _await_change(self, ask: dict[str, Any]) -> None:
        changed = self._changed
        self._writer.write(_line(ask))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._wait):
                await changed.wait()

    def _valid(self) -> Credentials | None:
        creds = self.current
        if creds is not None and creds.usable_at(self._clock.time()):
            return creds
        return None

    async def credentials(self) -> Credentials:
        creds = self._valid()
        if creds is None:
            await self._await_change({"need": "request"})
            creds = self._valid()
        if creds is None:
            raise NoSessionError(f"no valid token: {self._error}")
        return creds

    async def reactive_refresh(self, used: Credentials) -> Credentials | None:
        creds = self.current
        if creds is not None and creds.token.fingerprint == used.token.fingerprint:
            await self._await_change({"need": "reactive", "token": used.token.fingerprint})
        creds = self._valid()
        if creds is None or creds.token.fingerprint == used.token.fingerprint:
            return None
        return creds

    def capture_cookies(self, set_cookies: Sequence[str], host: str, path: str) -> None:
        """The supervisor keeps the jar: the cookies go there, and come back with the next
        credentials it sends."""
        self._writer.write(_line({"cookies": list(set_cookies), "host": host, "path": path}))


async def _worker_main(fd: int) -> int:
    from sidecar.logs import setup_logging

    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    first = json.loads(await reader.readline())
    config = Config.model_validate(first["config"])
    setup_logging(config.log.level, fmt=config.log.format)
    clock = SystemClock()
    session = RemoteSession(writer, wait=config.identity.timeout * 2 + 1, clock=clock)
    sidecar = Sidecar(config, clock=clock, serve_proxy=False)
    sidecar.use_upstream(first["upstream_url"])
    # the supervisor's listen.unix_socket, inherited: every worker accepts on the one socket
    unix_fd = first.get("unix_fd")
    unix_sock = None if unix_fd is None else socket.socket(fileno=unix_fd)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()
    one_at_a_time = asyncio.Lock()

    async def listen() -> None:
        while line := await reader.readline():
            message = json.loads(line)
            if "reload" in message:
                task = loop.create_task(_worker_reload(sidecar, message, one_at_a_time))
                reloads.add(task)
                task.add_done_callback(reloads.discard)
            elif "creds" in message:
                creds = message["creds"]
                session.update(
                    None if creds is None else creds_from_dict(creds), message.get("error")
                )
        stop.set()  # the supervisor is gone

    async def report() -> None:
        while True:
            await clock.sleep(REPORT_EVERY)
            writer.write(
                _line(
                    {
                        "metrics": sidecar.metrics.snapshot(),
                        "last_api_call_at": session.last_api_call_at,
                    }
                )
            )

    with signals_handled(stop.set):  # a worker reloads when the supervisor says so
        listener = loop.create_task(listen())
        await sidecar.open_proxy(session, reuse_port=True, unix_sock=unix_sock)
        freeze_startup_objects()
        reporter = loop.create_task(report())
        writer.write(_line({"ready": True}))
        try:
            await stop.wait()
            # as one process does: no new connections, the requests in flight answered within
            # listen.drain_timeout (the supervisor keeps the session until every worker is gone)
            await sidecar.drain()
        finally:
            reporter.cancel()
            await sidecar.stop()
            with contextlib.suppress(OSError):
                writer.write(_line({"metrics": sidecar.metrics.snapshot()}))
                await writer.drain()
            listener.cancel()
            writer.close()
    return 0


async def _worker_reload(sidecar: Sidecar, message: dict[str, Any], lock: asyncio.Lock) -> None:
    """A worker's share of a SIGHUP: the proxy's sections (the supervisor did the rest)."""
    async with lock:
        try:
            config = Config.model_validate(message["reload"])
            await sidecar.reload_proxy(config, message["upstream_url"])
        except (ValidationError, ConfigError, OSError) as exc:
            log.error(
                "sidecar.reload_failed",
                extra={"error": str(exc), "kept": "running config", "worker": os.getpid()},
            )
            return
        log.info("sidecar.worker_reloaded", extra={"worker": os.getpid()})


def worker_entry(fd: int, loop: str = "asyncio") -> int:
    """Entry point of a worker process (``python -m sidecar _worker FD [LOOP]``); ``loop`` is the
    supervisor's ``--loop``."""
    run = asyncio.run
    if loop == "uvloop":
        import uvloop  # the supervisor runs on it, so it is installed

        run = uvloop.run
    try:
        return run(_worker_main(fd))
    except KeyboardInterrupt:
        return 0


# ------------------------------------------------------------------------------ supervisor side


@dataclasses.dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    writer: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class Supervisor:
    """Owns the session and admin port; starts, feeds and restarts the workers."""

    def __init__(self, config: Config, count: int, loop: str = "asyncio") -> None:
        self.config = config
        self.count = count
        self.loop = loop
        self.metrics = Metrics()
        self.totals: WorkerTotals = self.metrics.take_requests_from_workers()
        self.sidecar = Sidecar(config, serve_proxy=False, metrics=self.metrics)
        self.workers: list[_Worker] = []
        self._stopping = False
        #: listen.unix_socket, bound here once and inherited by every worker
        self._unix: UnixListener | None = None

    async def start(self) -> None:
        await self.sidecar.start()
        if self.config.listen.unix_socket is not None:
            self._unix = await asyncio.to_thread(UnixListener.bind, self.config.listen.unix_socket)
        self.sidecar.session.notify(self._broadcast)
        for index in range(self.count):
            worker = _Worker(index)
            self.workers.append(worker)
            await self._spawn(worker)
        async with asyncio.timeout(30):
            for worker in self.workers:
                await worker.ready.wait()
        self.sidecar.mark_listening()  # /readyz: every worker accepts on the port
        log.info(
            "sidecar.workers_started",
            extra={"workers": self.count, "port": self.config.listen.port},
        )

    async def _spawn(self, worker: _Worker) -> None:
        parent, child = socket.socketpair()
        worker.ready = asyncio.Event()
        unix_fd = None if self._unix is None else self._unix.sock.fileno()
        worker.process = subprocess.Popen(  # noqa: S603, ASYNC220 - our own module; Popen returns at once
            [sys.executable, "-m", "sidecar", "_worker", str(child.fileno()), self.loop],
            pass_fds=(child.fileno(),) if unix_fd is None else (child.fileno(), unix_fd),
        )
        child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        worker.writer = writer
        config = self.config.model_dump(mode="json")
        first = {"config": config, "upstream_url": self.sidecar.upstream_url, "unix_fd": unix_fd}
        writer.write(_line(first))
        writer.write(_line({"creds": creds_to_dict(self.sidecar.session.usable())}))
        worker.task = asyncio.get_running_loop().create_task(self._serve(worker, reader))

    def _broadcast(self, creds: Credentials | None) -> None:
        message = _line({"creds": creds_to_dict(creds)})
        for worker in self.workers:
            if worker.writer is not None and not worker.writer.is_closing():
                worker.writer.write(message)

    async def _serve(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        pid = worker.process.pid if worker.process else -1
        try:
            while line := await reader.readline():
                message = json.loads(line)
                if "metrics" in message:
                    self.totals.update(pid, message["metrics"])
                    last_call = message.get("last_api_call_at")
                    if last_call is not None:
                        self.sidecar.session.note_api_call(last_call)
                elif message.get("ready"):
                    worker.ready.set()
                    log.info("sidecar.worker_ready", extra={"worker": worker.index, "pid": pid})
                elif "need" in message:
                    asyncio.get_running_loop().create_task(self._answer(worker, message))
                elif "cookies" in message:
                    self.sidecar.session.capture_cookies(
                        message["cookies"], message["host"], message["path"]
                    )
        finally:
            self.totals.gone(pid)
            if not self._stopping:
                asyncio.get_running_loop().create_task(self._restart(worker))

    async def _answer(self, worker: _Worker, message: dict[str, Any]) -> None:
        """A worker lacks a valid token: renew (single flight) or resend the current one."""
        session = self.sidecar.session
        error = None
        try:
            current = session.current
            if (
                message["need"] == "reactive"
                and current is not None
                and current.token.fingerprint == message.get("token")
            ):
                await session.reactive_refresh(current)
            else:
                await session.credentials()
        except SidecarError as exc:
            error = str(exc)
        if worker.writer is not None and not worker.writer.is_closing():
            worker.writer.write(_line({"creds": creds_to_dict(session.usable()), "error": error}))

    async def reload(self, config: Config) -> None:
        """SIGHUP under ``--workers``: the supervisor applies the session's share (identity,
        refresh, log level; restart-only keys are named in the log) and every worker the
        proxy's share; a worker started later gets the new config."""
        upstream_url = config.upstream.url or self.sidecar.upstream_url
        if URL(upstream_url).scheme == "https":
            # refused here, before any worker sees it: unreadable certificate or key files
            await asyncio.to_thread(tls_context, config.upstream.tls)
        await self.sidecar.reload(config)
        self.config = config
        message = _line(
            {"reload": config.model_dump(mode="json"), "upstream_url": self.sidecar.upstream_url}
        )
        for worker in self.workers:
            if worker.writer is not None and not worker.writer.is_closing():
                worker.writer.write(message)

    async def _restart(self, worker: _Worker) -> None:
        code = worker.process.wait() if worker.process else None
        log.error("sidecar.worker_exited", extra={"worker": worker.index, "code": code})
        await self.sidecar.clock.sleep(RESTART_AFTER)
        if not self._stopping:
            await self._spawn(worker)

    async def drain(self) -> None:
        """Graceful shutdown, first half, as one process does it: /readyz says 503 from now on,
        then every worker stops accepting and answers its requests in flight within
        ``listen.drain_timeout`` (each drains on its SIGTERM); :meth:`stop` waits for them."""
        self._stopping = True  # a worker exiting now is not restarted
        await self.sidecar.drain()  # /readyz: 503 (the supervisor has no proxy port to drain)
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)

    async def stop(self) -> None:
        self._stopping = True
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            if worker.process is not None:
                await asyncio.to_thread(
                    _wait_or_kill, worker.process, self.sidecar.drain_seconds + 5
                )
            if worker.task is not None:
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await asyncio.wait_for(worker.task, 2)
        if self._unix is not None:
            await self._unix.remove()
        await self.sidecar.stop()


def _wait_or_kill(process: subprocess.Popen[bytes], within: float) -> None:
    try:
        process.wait(timeout=within)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def serve_workers(
    config: Config, count: int, load: Callable[[], Config] | None = None, loop_name: str = "asyncio"
) -> int:
    """Run a supervisor with ``count`` workers until SIGTERM/SIGINT; returns the exit code.
    SIGHUP calls ``load`` and applies the result to the supervisor and every worker; the workers
    run on the event loop named ``loop_name`` (``--loop``), as the supervisor does."""
    supervisor = Supervisor(config, count, loop_name)
    stop = asyncio.Event()
    reloads = Reloads(load, supervisor.reload)
    with signals_handled(stop.set, reloads.on_hup):
        try:
            await supervisor.start()
            await stop.wait()
            log.info(
                "sidecar.stopping",
                extra={"workers": count, "drain_timeout": supervisor.sidecar.drain_seconds},
            )
            await reloads.finish()
            await supervisor.drain()
        finally:
            await supervisor.stop()
    return 0
