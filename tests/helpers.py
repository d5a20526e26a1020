"""Small helpers for tests that wait on real I/O."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(predicate: Callable[[], bool], within: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` (real time) until it holds; fail with ``what`` after ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what or predicate}")
        await asyncio.sleep(0.01)


def sample(metric_text: str, name: str) -> float | None:
    """The value of one sample line (``name`` including labels) in Prometheus text."""
    for line in metric_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None
