"""The :8080 listener and its connections (:class:`~sidecar.front.FrontProtocol` each): the
deadline sweep (head, body, idle keep-alive), the connection cap, and what a graceful shutdown
needs: stop accepting, drain, close.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
from collections.abc import Callable

from sidecar.clock import Clock
from sidecar.config import Listen
from sidecar.front import FrontProtocol, Handler, Overloaded

log = logging.getLogger(__name__)

#: the sweep looks this many times per shortest deadline (a deadline fires at most 1/5 late)
TICKS_PER_DEADLINE = 5
#: descriptors kept back from the caller connections' share: the listening sockets, the admin
#: port and its callers, the identity provider, the store, log files, the event loop's own
RESERVED_FDS = 48


def default_max_connections(upstream_pool: int = 0) -> int:
    """``listen.max_connections`` when the config leaves it out: what the descriptor limit allows.

    Every caller connection being answered also holds an upstream connection, so each costs two
    descriptors. Kept back from that share: :data:`RESERVED_FDS` for the rest of the process
    (the admin port answers probes and the identity provider stays reachable while callers fill
    their share) plus ``upstream_pool`` idle upstream connections, but never more than a quarter
    of a small limit. With the soft limit at 1024 and the default pool of 100: 438; at 64: 24.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20
    reserve = min(RESERVED_FDS + upstream_pool, soft // 4)
    return max(1, (soft - reserve) // 2)


class FrontServer:
    """The listener and its connections: what graceful shutdown needs to see and stop.

    The lifecycle's view of it: :meth:`listen`, then :meth:`stop_accepting`, :meth:`drain` (in
    flight requests get up to ``within`` seconds of ``clock`` time) and :meth:`close`.
    """

    def __init__(
        self,
        handler: Handler,
        error_bytes: Callable[[int, str, str], bytes],
        clock: Clock,
        limits: Listen | None = None,
        *,
        upstream_pool: int = 0,
    ) -> None:
        limits = limits or Listen()
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        self.error_bytes = error_bytes
        self.clock = clock
        self.connections: set[FrontProtocol] = set()
        #: requests being answered right now
        self.in_flight = 0
        self.idle: asyncio.Future[None] | None = None
        self.draining = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.max_connections = limits.max_connections or default_max_connections(upstream_pool)
        #: connections turned away with 503 because max_connections were open
        self.overloaded = 0
        #: of those, how many are still open (their 503 sent, lingering before the close)
        self.lingering = 0
        self.head_timeout = limits.head_timeout
        self.body_timeout = limits.body_timeout
        shortest = min(limits.head_timeout, limits.body_timeout, limits.idle_timeout)
        self.tick_seconds = shortest / TICKS_PER_DEADLINE
        # each deadline in sweeps; a phase that began between two sweeps gets up to one more
        self.head_ticks = _ticks(limits.head_timeout, self.tick_seconds)
        self.body_ticks = _ticks(limits.body_timeout, self.tick_seconds)
        self.idle_ticks = _ticks(limits.idle_timeout, self.tick_seconds)
        #: sweeps so far: connections mark when a phase began with it (no clock read per request)
        self.ticks = 0

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Start accepting on ``host:port`` (0: any free port); returns the port."""
        self._server = await self.loop.create_server(
            self._protocol,
            host,
            port,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
        self._sweeper = self.loop.call_later(self.tick_seconds, self._sweep)
        return int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> FrontProtocol | Overloaded:
        """A new caller connection, or, with max_connections open already, one answered 503."""
        if len(self.connections) >= self.max_connections:
            self.overloaded += 1
            log.warning(
                "proxy.connection_refused",
                extra={"reason": "max_connections", "max_connections": self.max_connections},
            )
            return Overloaded(self)
        return FrontProtocol(self)

    def _sweep(self) -> None:
        """Enforce the callers' deadlines (head, body, idle keep-alive): one timer for every
        connection rather than one per request; connections note the sweep count when a phase
        begins, and each sweep compares."""
        self.ticks += 1
        for conn in list(self.connections):
            conn.check_deadlines(self.ticks)
        self._sweeper = self.loop.call_later(self.tick_seconds, self._sweep)

    async def stop_accepting(self) -> None:
        """Close the listening socket: new connections are refused; open ones go on."""
        if self._server is not None:
            self._server.close()

    async def drain(self, within: float) -> None:
        """Let the requests in flight finish for up to ``within`` seconds, then cut the rest.
        Idle keep-alive connections close at once, busy ones after their current answer."""
        idle = asyncio.ensure_future(self.wait_idle())
        timeout = asyncio.ensure_future(self.clock.sleep(within))
        try:
            await asyncio.wait((idle, timeout), return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            timeout.cancel()
        self._abort_all()

    async def wait_idle(self) -> None:
        """Until no request is being answered, closing each connection once it is idle."""
        self.draining = True
        for conn in list(self.connections):
            conn.closing_after_response = True
            if not conn.has_work and conn.transport is not None:
                conn.transport.close()
        while self.in_flight > 0:
            self.idle = self.loop.create_future()
            try:
                await self.idle
            finally:
                self.idle = None

    async def close(self) -> None:
        """Release everything: the listener, the idle sweep, every connection still open."""
        await self.stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._abort_all()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let the aborted transports report connection_lost

    def _abort_all(self) -> None:
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()


def _ticks(seconds: float, tick: float) -> int:
    """Sweeps that make up ``seconds`` (at least one)."""
    return max(1, math.ceil(seconds / tick - 1e-9))
