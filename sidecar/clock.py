"""Time as a dependency: the only module that reads the clock or sleeps.

Everything that schedules (refresh loop, backoff, expiry checks) receives a :class:`Clock`, so tests
can drive hours of token lifetimes in milliseconds with a fake clock.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """What the sidecar needs to know about time."""

    def time(self) -> float:
        """Seconds since the Unix epoch (wall clock: token expiry is stated in it)."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes backwards (for durations)."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
