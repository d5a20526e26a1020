"""Logs: one JSON object per line, secrets scrubbed, an access line per proxied request.

Log calls name a stable event (``session.refreshed``) as the message and put details in ``extra``.
Token objects redact themselves; as a second line of defence, :class:`JsonFormatter` scrubs anything
that looks like a bearer token, a JWT or a ``secret=...`` pair from every rendered line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any, TextIO

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, RequestKey, StreamResponse

#: where the proxy leaves the X-Request-ID it sent, for the access log line
REQUEST_ID_KEY = RequestKey("request_id", str)

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


def scrub(text: str) -> str:
    """Replace anything that looks like a credential in ``text``."""
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


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Route every log record of the process to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's own access logger is replaced by ours; its server logger stays
    logging.getLogger("aiohttp.access").propagate = False


class AccessLogger(AbstractAccessLogger):
    """One JSON line per proxied request: method, path, status, duration, request id."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "http.access",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(time * 1000, 3),
                "request_id": request.get(REQUEST_ID_KEY),
                "bytes": response.body_length,
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def access_logger() -> logging.Logger:
    """The logger access lines go to (propagating to the root handler)."""
    return logging.getLogger("sidecar.access")
