"""Running a sidecar as a process: SIGTERM/SIGINT drain and stop, SIGHUP reloads the config, and
what is built at start is frozen out of the garbage collector's view.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator

from sidecar.app import Sidecar
from sidecar.config.models import Config
from sidecar.errors import ConfigError, StoreError

log = logging.getLogger("sidecar.app")  # the lifecycle's events keep the logger they always had


def freeze_startup_objects() -> None:
    """Move everything built while starting out of the garbage collector's view.

    A full collection otherwise walks the ~57,000 objects of a started sidecar (config models,
    imported modules), about 10 ms during which no request is answered: a latency spike, and
    none of those objects will ever be garbage.
    """
    gc.collect()
    gc.freeze()


async def serve(
    config: Config,
    *,
    ready: Callable[[Sidecar], None] | None = None,
    load: Callable[[], Config] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT, then drain and stop. Returns the process exit code.

    SIGHUP calls ``load`` (which reads the config file again) and applies the result; an invalid
    file is logged, naming the key and the file, and the running configuration stays in force.
    """
    sidecar = Sidecar(config)
    await sidecar.start()
    freeze_startup_objects()
    if ready is not None:
        ready(sidecar)
    stop = asyncio.Event()
    reloads = Reloads(load, sidecar.reload)
    try:
        with signals_handled(stop.set, reloads.on_hup):  # a signal during the stop is not ours
            await stop.wait()
            log.info("sidecar.stopping", extra={"drain_timeout": sidecar.drain_seconds})
            await reloads.finish()
            await sidecar.drain()
    finally:
        await sidecar.stop()
    return 0


@contextlib.contextmanager
def signals_handled(
    stop: Callable[[], None], reload: Callable[[], None] | None = None
) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT call ``stop`` and SIGHUP calls ``reload`` (when
    given, else SIGHUP keeps its default); the handlers are removed when it ends. The one place
    a sidecar process (one process, a supervisor, a worker) installs signal handlers."""
    loop = asyncio.get_running_loop()
    handlers = {signal.SIGTERM: stop, signal.SIGINT: stop}
    if reload is not None:
        handlers[signal.SIGHUP] = reload
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    try:
        yield
    finally:
        for sig in handlers:
            with contextlib.suppress(ValueError, RuntimeError):  # the loop is closing
                loop.remove_signal_handler(sig)


class Reloads:
    """SIGHUP handling: each signal reads the config again (``load``) and applies it (``apply``),
    one reload at a time; a bad file or a failure to apply it is logged and the running config
    stays in force."""

    def __init__(
        self, load: Callable[[], Config] | None, apply: Callable[[Config], Awaitable[None]]
    ) -> None:
        self._load = load
        self._apply = apply
        self._tasks: set[asyncio.Task[None]] = set()
        self._one_at_a_time = asyncio.Lock()  # a second SIGHUP waits for the first

    def on_hup(self) -> None:
        if self._load is None:
            log.warning("sidecar.reload_unavailable", extra={"why": "no config to read again"})
            return
        task = asyncio.get_running_loop().create_task(
            _reload(self._load, self._apply, self._one_at_a_time)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def finish(self) -> None:
        """Wait for the reloads under way (before a shutdown)."""
        for task in list(self._tasks):
            await task


async def _reload(
    load: Callable[[], Config], apply: Callable[[Config], Awaitable[None]], lock: asyncio.Lock
) -> None:
    async with lock:
        log.info("sidecar.reloading")
        try:
            config = await asyncio.to_thread(load)
        except ConfigError as exc:
            log.error("sidecar.reload_failed", extra={"error": str(exc), "kept": "running config"})
            return
        try:
            await apply(config)
        except (ConfigError, StoreError, OSError) as exc:
            log.error("sidecar.reload_failed", extra={"error": str(exc), "kept": "running config"})
