"""Logs: one JSON object per line, secrets scrubbed, an access line per proxied request.

Log calls name a stable event (``session.refreshed``) as the message and put details in ``extra``.
Token objects redact themselves; as a second line of defence, :class:`JsonFormatter` scrubs anything
that looks like a bearer token, a JWT or a ``secret=...`` pair from every rendered line.
On a terminal (``log.format: auto``, or ``text``) the same records are human-readable lines,
:class:`TextFormatter`, scrubbed alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import queue
import re
import sys
import threading
import time as _time
from json.encoder import encode_basestring_ascii as _quote  # C, no json.dumps overhead
from typing import Any, TextIO
from urllib.parse import unquote

# attributes every LogRecord has; anything else came from ``extra=``
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}

_SCRUBBERS = (
    # Authorization values: Bearer/Basic followed by a credential
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9\-._~+/]+=*"), r"\1 [REDACTED]"),
    # anything shaped like a JWT (three base64url parts, the first starting like a JSON header)
    (re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "[REDACTED-JWT]"),
    # key=value / "key": "value" pairs whose key names a secret
    (
        re.compile(
            r"(?i)((?:access_token|refresh_token|id_token|client_secret|password|secret|assertion)"
            r"[\"']?\s*[:=]\s*[\"']?)[^\"'&\s,}]+"
        ),
        r"\1[REDACTED]",
    ),
)


#: every scrubbed shape contains one of these; text without any is returned as it is (fast path)
_HINTS = re.compile(r"(?i)bearer|basic|eyJ|token|secret|password|assertion")


def scrub(text: str) -> str:
    """Replace anything that looks like a credential in ``text``."""
    if _HINTS.search(text) is None:
        return text
    for pattern, replacement in _SCRUBBERS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    """Renders a record as one JSON object: ts, level, logger, event, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return scrub(json.dumps(out, default=str, separators=(",", ":")))


class RateLimit(logging.Filter):
    """At most ``burst`` records of one event per second; the rest are dropped and counted, and
    the next record of that event that passes carries ``suppressed``: how many were dropped
    before it. A flood (a refused request per packet, accept errors at the descriptor limit)
    then costs a few lines a second instead of filling the disk or the log pipe.

    An event is the logger name and the first line of the message (the stable event name for
    our own records; asyncio's messages carry details after their first line). The record's own
    timestamp is the time, so no clock is read here. Access lines do not come through here.
    """

    #: distinct events remembered; past this, the table starts over (it only bounds a flood)
    MAX_EVENTS = 1024

    def __init__(self, burst: int = 10) -> None:
        super().__init__()
        self.burst = burst
        # event -> [start of its one-second window, records passed in it, records dropped]
        self._events: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else str(record.msg)
        key = (record.name, msg.split("\n", 1)[0][:200])
        state = self._events.get(key)
        now = record.created
        if state is None:
            if len(self._events) >= self.MAX_EVENTS:
                self._events.clear()
            self._events[key] = [now, 1, 0]
            return True
        if now - state[0] >= 1.0:
            dropped = int(state[2])
            state[0], state[1], state[2] = now, 1, 0
            if dropped:
                record.suppressed = dropped
            return True
        if state[1] < self.burst:
            state[1] += 1
            return True
        state[2] += 1
        return False


class TextFormatter(logging.Formatter):
    """Renders a record as one human-readable line: local time, level, event, ``key=value``
    fields (values with spaces or quotes JSON-quoted), then any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(record.created))
        parts = [f"{when}.{int(record.msecs):03d}", f"{record.levelname:<7}", record.getMessage()]
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                parts.append(f"{key}={_text_value(value)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' "=\\\n'):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


def use_text(fmt: str, stream: TextIO) -> bool:
    """``log.format``: text when asked for, or for ``auto`` when ``stream`` is a terminal."""
    if fmt == "auto":
        try:
            return stream.isatty()
        except (OSError, ValueError):
            return False
    return fmt == "text"


class _Writer(threading.Thread):
    """Writes log text to a stream from a thread of its own, so that a stalled stderr (a log
    pipe nobody reads, a blocking container log driver) never stops the event loop.

    At most ``MAX_QUEUED`` writes wait; past that, lines are dropped and counted, and the count
    is logged (``log.lines_dropped``) once the stream takes text again.
    """

    MAX_QUEUED = 1024

    def __init__(self, stream: TextIO) -> None:
        super().__init__(name="sidecar-log-writer", daemon=True)
        self._stream = stream
        self._queue: queue.Queue[str | None] = queue.Queue(self.MAX_QUEUED)
        self._lock = threading.Lock()
        self._dropped = 0

    def put(self, text: str, lines: int) -> bool:
        """Queue ``text`` (``lines`` lines); False when it had to be dropped."""
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            with self._lock:
                self._dropped += lines
            return False
        return True

    def run(self) -> None:
        while (text := self._queue.get()) is not None:
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):
                continue  # nowhere to say it: the stream itself is failing
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                with contextlib.suppress(OSError, ValueError):
                    self._stream.write(
                        f'{{"ts":{_wall():.3f},"level":"warning","logger":"sidecar.logs",'
                        f'"event":"log.lines_dropped","lines":{dropped}}}\n'
                    )
                    self._stream.flush()

    def stop(self, within: float = 5.0) -> None:
        """Write what is queued (for at most ``within`` seconds), then end the thread."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=within)
        self.join(within)


def _has_fd(stream: TextIO) -> bool:
    """Only a stream on a file descriptor (a pipe, a tty, a file) can block a write."""
    try:
        stream.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return True


class JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that also takes ready-made access lines, written in batches.

    Access lines are the one per-request log; going through ``logging`` for each costs as much
    as proxying the request. They are buffered and written at most every 0.2 s (or every 256
    lines), and any other record flushes them first, so the stream stays in order. On a file
    descriptor (stderr) the writing itself happens in a thread (:class:`_Writer`).
    """

    FLUSH_AFTER = 0.2
    FLUSH_LINES = 256

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        #: records render as text: access lines go through the formatter too
        self.text = False
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writer: _Writer | None = None
        if _has_fd(stream):
            self._writer = _Writer(stream)
            self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:
            self.flush_pending()
        writer = self._writer
        if writer is None or not writer.is_alive():
            super().emit(record)
            return
        try:
            writer.put(self.format(record) + self.terminator, 1)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)

    def write_line(self, line: str) -> None:
        self._pending.append(line)
        if len(self._pending) >= self.FLUSH_LINES:
            self.flush_pending()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush_pending()
                return
            self._timer = loop.call_later(self.FLUSH_AFTER, self.flush_pending)

    def flush_pending(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        text = "".join(self._pending)
        count = len(self._pending)
        self._pending.clear()
        writer = self._writer
        if writer is not None and writer.is_alive():
            writer.put(text, count)
            return
        self.acquire()
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.handleError(logging.makeLogRecord({"msg": "access log write failed"}))
        finally:
            self.release()

    def flush(self) -> None:
        """With a writer thread, the stream is its alone (it flushes after every write)."""
        if self._writer is not None and self._writer.is_alive():
            self.flush_pending()
            return
        super().flush()

    def close(self) -> None:
        self.flush_pending()
        if self._writer is not None:
            self._writer.stop()
        super().close()


#: the handler access lines are written to directly, once setup_logging has run
_lines: JsonLinesHandler | None = None


def setup_logging(level: str = "info", stream: TextIO | None = None, fmt: str = "json") -> None:
    """Route every log record of the process to ``stream`` (stderr) as JSON lines, or as text
    lines (``fmt``: ``json``, ``text``, or ``auto``: text on a terminal)."""
    global _lines
    stream = stream or sys.stderr
    handler = JsonLinesHandler(stream)
    handler.text = use_text(fmt, stream)
    handler.setFormatter(TextFormatter() if handler.text else JsonFormatter())
    handler.addFilter(RateLimit())
    _lines = handler
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, JsonLinesHandler):
            old.close()  # writes what it still holds and ends its writer thread
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp serves only the admin port (without an access log); its server logger stays
    logging.getLogger("aiohttp.access").propagate = False


_QUOTED_METHODS = {
    m: f'"{m}"' for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
}

_access = logging.getLogger("sidecar.access")


def write_access(
    method: str,
    target: str,
    status: int,
    seconds: float,
    request_id: str | None,
    sent: int,
    trace_id: str | None = None,
) -> None:
    """One JSON line per proxied request: method, path (without the query), status, duration,
    request id, body bytes sent and trace id (of the traceparent sent upstream, else the
    caller's; null without either)."""
    lines = _lines
    if lines is not None and not lines.text:
        quoted = _QUOTED_METHODS.get(method) or _quote(method)
        # a target without a query is its own path, already rendered when seen before (the
        # cache's keys have no "?", so a target with one never matches)
        path = _PATHS.get(target) or _json_path(target.split("?", 1)[0])
        lines.write_line(
            f'{{"ts":{_wall():.3f},"level":"info","logger":"sidecar.access",'
            f'"event":"http.access","method":{quoted},'
            f'"path":{path},"status":{status},'
            f'"duration_ms":{seconds * 1000:.3f},'
            f'"request_id":{"null" if request_id is None else _quote(request_id)},'
            f'"bytes":{sent},'
            f'"trace_id":{"null" if trace_id is None else _quote(trace_id)}}}\n'
        )
        return
    _access.info(
        "http.access",
        extra={
            "method": method,
            "path": unquote(target.split("?", 1)[0]),
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "request_id": request_id,
            "bytes": sent,
            "trace_id": trace_id,
        },
    )


#: rendered (decoded, scrubbed, JSON-quoted) paths: services call a few paths over and over
_PATHS: dict[str, str] = {}


def _json_path(path: str) -> str:
    rendered = _PATHS.get(path)
    if rendered is None:
        rendered = _quote(scrub(unquote(path) if "%" in path else path))
        if len(_PATHS) >= 4096:
            _PATHS.clear()
        _PATHS[path] = rendered
    return rendered


#: wall time for log timestamps only (what logging itself stamps records with); the C function
#: itself, no Python call around it, as an access line is written per request
_wall = _time.time
