"""Time as a dependency: the only module that reads the clock or sleeps.

Everything that schedules (refresh loop, backoff, expiry checks) receives a :class:`Clock`, so tests
can drive hours of token lifetimes in milliseconds with a fake clock.
"""

from __future__ import annotations

import asyncio
from time import monotonic as _monotonic
from time import time as _wall
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
    """The real clock: its ``time`` and ``monotonic`` are the C functions themselves, no Python
    frame around them (the proxy reads the clock three times per request)."""

    time = staticmethod(_wall)
    monotonic = staticmethod(_monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
