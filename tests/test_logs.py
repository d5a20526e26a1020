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
    logging.getLogger().handlers[0].filters.clear()  # no rate limit: 3,000 lines of one event
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


def test_a_repeated_event_is_rate_limited_and_the_dropped_lines_counted(
    restore_logging: None,
) -> None:
    """The same event logged hundreds of times within a second is written at most 10 times; the
    next line of that event after the second has passed says how many were dropped; other
    events are not held back by it."""
    import io
    import time

    stream = io.StringIO()
    setup_logging("info", stream)
    flood = logging.getLogger("sidecar.front")
    for _ in range(500):
        flood.warning("proxy.refused_request", extra={"status": 400})
    logging.getLogger("sidecar.session").info("session.refreshed")
    time.sleep(1.05)
    flood.warning("proxy.refused_request", extra={"status": 400})
    for handler in logging.getLogger().handlers:
        handler.flush()
    deadline = time.monotonic() + 5
    while stream.getvalue().count("\n") < 12 and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer thread (none for a StringIO, but cheap to allow)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    refused = [line for line in lines if line["event"] == "proxy.refused_request"]
    assert len(refused) == 11
    assert refused[-1]["suppressed"] == 490
    assert "suppressed" not in refused[0]
    assert [line["event"] for line in lines].count("session.refreshed") == 1


def _read_all(fd: int, until: bytes) -> bytes:
    """What arrives on ``fd`` until ``until`` was seen (the writer thread writes soon)."""
    import select

    data = b""
    while until not in data:
        ready, _, _ = select.select([fd], [], [], 5.0)
        assert ready, f"nothing more arrived; got {data!r}"
        data += os.read(fd, 65536)
    return data


def test_auto_format_is_text_on_a_terminal(restore_logging: None) -> None:
    """With ``log.format: auto`` and stderr on a terminal, records and access lines are
    human-readable: time, level, event name, then ``key=value`` fields (quoted when they hold
    spaces), secrets still scrubbed; no JSON."""
    from sidecar.logs import write_access

    controller, terminal = os.openpty()
    stream = os.fdopen(terminal, "w")
    try:
        setup_logging("info", stream, fmt="auto")
        logging.getLogger("sidecar.session").warning(
            "session.refresh_failed",
            extra={"error": "provider answered HTTP 503", "attempt": 2, "sent": "Bearer abc"},
        )
        write_access("GET", "/v1/orders?page=2", 200, 0.0125, "req-1", 42)
        logging.getLogger("sidecar.test").info("test.done")
        text = _read_all(controller, b"test.done").decode()
    finally:
        stream.close()
        os.close(controller)
    lines = [line for line in text.replace("\r\n", "\n").splitlines() if line]
    assert len(lines) == 3, lines
    assert " WARNING session.refresh_failed " in lines[0]
    assert 'error="provider answered HTTP 503" attempt=2 sent="Bearer [REDACTED]"' in lines[0]
    assert " INFO    http.access method=GET path=/v1/orders status=200 " in lines[1]
    assert "request_id=req-1 bytes=42" in lines[1]
    assert not any(line.lstrip().startswith("{") for line in lines)


@pytest.mark.parametrize(("fmt", "json_lines"), [("auto", True), ("json", True), ("text", False)])
def test_auto_format_is_json_on_a_pipe(restore_logging: None, fmt: str, json_lines: bool) -> None:
    """Off a terminal (a pipe, as a container runtime gives), ``auto`` writes JSON lines as
    ``json`` does; ``text`` writes text there too, when asked for."""
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w")
    try:
        setup_logging("info", stream, fmt=fmt)
        logging.getLogger("sidecar.test").info("test.done", extra={"n": 1})
        text = _read_all(read_fd, b"test.done").decode()
    finally:
        stream.close()
        os.close(read_fd)
    line = text.splitlines()[0]
    if json_lines:
        assert json.loads(line)["event"] == "test.done"
    else:
        assert line.endswith(" INFO    test.done n=1"), line
