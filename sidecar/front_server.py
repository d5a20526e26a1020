"""The :8080 listener and its connections (:class:`~sidecar.front.FrontProtocol` each): the idle
keep-alive sweep, and what a graceful shutdown needs: stop accepting, drain, close.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from sidecar import front
from sidecar.clock import Clock
from sidecar.front import FrontProtocol, Handler


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
    ) -> None:
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

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Start accepting on ``host:port`` (0: any free port); returns the port."""
        self._server = await self.loop.create_server(
            lambda: FrontProtocol(self),
            host,
            port,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
        self._sweeper = self.loop.call_later(_tick(), self._sweep_idle)
        return int(self._server.sockets[0].getsockname()[1])

    async def listen_on(self, sock: socket.socket) -> None:
        """Start accepting on a Unix socket already bound and listening (``listen.unix_socket``;
        whoever bound it removes its file)."""
        self._server = await self.loop.create_unix_server(
            lambda: FrontProtocol(self), sock=sock, backlog=1024
        )
        self._sweeper = self.loop.call_later(_tick(), self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close connections that answered nothing for a while (idle keep-alive, or a head
        arriving too slowly): one timer for all of them rather than one per request."""
        for conn in list(self.connections):
            if not conn.has_work:
                conn.idle_ticks += 1
                if conn.idle_ticks >= front.IDLE_TICKS and conn.transport is not None:
                    conn.transport.close()
        self._sweeper = self.loop.call_later(_tick(), self._sweep_idle)

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


def _tick() -> float:
    """Seconds between idle sweeps (read at each sweep: tests shorten the keep-alive timeout)."""
    return front.KEEPALIVE_TIMEOUT / front.IDLE_TICKS
