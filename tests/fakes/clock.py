"""A clock the test moves by hand: hours of token lifetimes pass in milliseconds."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class FakeClock:
    """Implements sidecar.clock.Clock; time stands still until :meth:`advance` moves it."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self._origin = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._ids = itertools.count()

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now - self._origin

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:  # the deadline has passed already (time may have moved meanwhile)
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._ids), future))
        await future

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (cancelled ones excluded)."""
        return sum(1 for *_, f in self._sleepers if not f.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline passes, in deadline order."""
        target = self.now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, deadline)
            if not future.done():
                future.set_result(None)
            for _ in range(5):
                await asyncio.sleep(0)
        self.now = target
        for _ in range(5):
            await asyncio.sleep(0)
