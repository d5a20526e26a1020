"""The :8080 listener and its connections (:class:`~sidecar.http.connection.FrontProtocol` each):
the deadline sweep (head, body, idle keep-alive), the connection cap, and what a graceful shutdown
needs: stop accepting, drain, close.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import resource
import socket
from collections.abc import Callable
from typing import Any

from sidecar.clock import Clock
from sidecar.config.models import Listen
from sidecar.errors import RefusedRequest
from sidecar.http.connection import FrontProtocol, Handler

log = logging.getLogger("sidecar.http")

#: the sweep looks this many times per shortest deadline (a deadline fires at most 1/5 late)
TICKS_PER_DEADLINE = 5
#: descriptors kept back from the caller connections' share: the listening sockets, the admin
#: port and its callers, the identity provider, the store, log files, the event loop's own
RESERVED_FDS = 48
#: connections accepted per readiness of a listening socket before other work gets a turn
ACCEPT_BURST = 64
#: seconds accepting pauses after the process ran out of descriptors (as asyncio's own retry)
ACCEPT_RETRY = 1.0
#: accept errors that mean "out of resources for now": pause instead of spinning
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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
        refusal: Callable[[RefusedRequest], bytes],
        clock: Clock,
        limits: Listen | None = None,
        *,
        upstream_pool: int = 0,
    ) -> None:
        limits = limits or Listen()
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        #: the whole answer to a refused request or connection (counted and logged by the
        #: proxy, with its own refusals); the connection closes after it
        self.refusal = refusal
        self.clock = clock
        self.connections: set[FrontProtocol] = set()
        #: requests being answered right now
        self.in_flight = 0
        self.idle: asyncio.Future[None] | None = None
        self.draining = False
        self._sockets: list[socket.socket] = []
        #: accepted connections whose transport is still being set up
        self._starting = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self.max_connections = limits.max_connections or default_max_connections(upstream_pool)
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
        """Start accepting on ``host:port`` (0: any free port; every address of ``host`` gets the
        same one); returns the port.

        The accepting is ours rather than ``loop.create_server``'s: asyncio accepts as long as
        connections wait, before any of them is seen, so a flood took every descriptor (the admin
        port's too) however few connections were then served. Here a connection beyond
        ``max_connections`` is answered 503 and closed at once, and running out of descriptors
        pauses accepting for :data:`ACCEPT_RETRY` seconds.
        """
        infos = await self.loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen: set[tuple[int, object]] = set()
        try:
            for family, kind, proto, _name, address in infos:
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                port = sock.getsockname()[1]  # a port 0 chosen once is used for every address
                sock.listen(1024)
                sock.setblocking(False)
        except BaseException:
            self._close_sockets()
            raise
        self._start_accepting()
        return port

    async def listen_on(self, sock: socket.socket) -> None:
        """Start accepting on a socket already bound and listening (``listen.unix_socket``;
        whoever bound it removes its file), with the same cap and deadlines as :meth:`listen`."""
        sock.setblocking(False)
        self._sockets.append(sock)
        self._start_accepting()

    def _start_accepting(self) -> None:
        for sock in self._sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)
        self._sweeper = self.loop.call_later(self.tick_seconds, self._sweep)

    def _accept(self, sock: socket.socket) -> None:
        """The listening socket is readable: take up to ACCEPT_BURST connections."""
        for _ in range(ACCEPT_BURST):
            try:
                conn, _address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._pause_accepting(sock, exc)
                    return
                continue  # ECONNABORTED and the like: that caller is gone already
            if len(self.connections) + self._starting >= self.max_connections:
                self._turn_away(conn)
                continue
            conn.setblocking(False)
            self._starting += 1
            self.loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        protocol = FrontProtocol(self)
        # the loop asks for an asyncio.Protocol, which a compiled class may not subclass
        # (sidecar/errors.py says why); it only calls the protocol's methods
        factory: Any = lambda: protocol  # noqa: E731
        try:
            await self.loop.connect_accepted_socket(factory, conn)
        except (OSError, RuntimeError):
            conn.close()  # the caller left before the transport was set up, or we are closing
            if protocol.transport is None:
                self._starting -= 1  # never admitted: it no longer counts as starting

    def admit(self, protocol: FrontProtocol) -> None:
        """A connection :meth:`_accept` took is set up (``connection_made``): from now on it
        counts among the connections, no longer among those starting. Counted once at every
        moment: uvloop resumes :meth:`_connect` later than asyncio does, and a connection counted
        twice in between turned the next one away below ``max_connections``."""
        self.connections.add(protocol)
        self._starting -= 1

    def _turn_away(self, conn: socket.socket) -> None:
        """Beyond max_connections: the 503 (it fits any socket buffer) and the close, at once,
        so the descriptors stay free for the connections being served and for the admin port."""
        refused = RefusedRequest(
            f"the proxy serves at most {self.max_connections} connections at once; "
            "try again shortly",
            status=503,
            code="too_many_connections",
        )
        try:
            conn.setblocking(False)
            # made (and counted and logged as a refusal) per connection turned away: a rare path
            conn.send(self.refusal(refused))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the caller is gone already
        finally:
            conn.close()

    def _pause_accepting(self, sock: socket.socket, exc: OSError) -> None:
        """Out of descriptors: stop accepting on ``sock`` for a while instead of spinning."""
        log.error(
            "proxy.accept_paused",
            extra={
                "error": os.strerror(exc.errno or 0),
                "retry_in": ACCEPT_RETRY,
                "connections": len(self.connections),
            },
        )
        self.loop.remove_reader(sock.fileno())
        self.loop.call_later(ACCEPT_RETRY, self._resume_accepting, sock)

    def _resume_accepting(self, sock: socket.socket) -> None:
        if sock in self._sockets and sock.fileno() != -1:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            if sock.fileno() != -1:
                self.loop.remove_reader(sock.fileno())
                sock.close()
        self._sockets.clear()

    def _sweep(self) -> None:
        """Enforce the callers' deadlines (head, body, idle keep-alive): one timer for every
        connection rather than one per request; connections note the sweep count when a phase
        begins, and each sweep compares."""
        self.ticks += 1
        for conn in list(self.connections):
            conn.check_deadlines(self.ticks)
        self._sweeper = self.loop.call_later(self.tick_seconds, self._sweep)

    async def stop_accepting(self) -> None:
        """Close the listening sockets: new connections are refused; open ones go on."""
        self._close_sockets()

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
        await asyncio.sleep(0)  # let the aborted transports report connection_lost

    def _abort_all(self) -> None:
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()


def _ticks(seconds: float, tick: float) -> int:
    """Sweeps that make up ``seconds`` (at least one)."""
    return max(1, math.ceil(seconds / tick - 1e-9))
