"""The log stream: writing to a stalled stderr never blocks the proxy; what had to be dropped is
counted once the stream moves again."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator

import pytest

from sidecar.logs import setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_a_pipe_nobody_reads_does_not_block_logging(restore_logging: None) -> None:
    """stderr is a pipe whose reader has stalled (a blocking container log driver): 3,000 log
    lines, far more than the pipe holds, are logged without waiting; once the pipe is read
    again, every line is either there or counted in a ``log.lines_dropped``."""
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w")
    setup_logging("info", stream)
    log = logging.getLogger("sidecar.test")
    payload = "x" * 200

    def log_all() -> None:
        for n in range(3000):
            log.info("test.line", extra={"n": n, "payload": payload})

    logger_thread = threading.Thread(target=log_all)
    logger_thread.start()
    logger_thread.join(10)
    assert not logger_thread.is_alive(), "logging blocked on the stalled pipe"

    received = bytearray()

    def read_all() -> None:
        while chunk := os.read(read_fd, 1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    logging.getLogger().handlers[0].close()  # writes what is queued, ends the writer thread
    stream.close()
    reader.join(10)
    os.close(read_fd)
    records = [json.loads(line) for line in received.decode().splitlines()]
    lines = [r for r in records if r["event"] == "test.line"]
    dropped = [r for r in records if r["event"] == "log.lines_dropped"]
    assert dropped, "nothing was counted as dropped"
    assert len(lines) + sum(r["lines"] for r in dropped) == 3000
    numbers = [r["n"] for r in lines]
    assert numbers == sorted(numbers)  # what was written kept its order
