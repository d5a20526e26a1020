"""Header rules, compiled once from config and applied per request as a pure function.

Outgoing headers = the caller's headers, minus hop-by-hop headers (RFC 9110 7.6.1), minus
Host and Authorization and every header the sidecar manages, plus the managed headers:
Authorization, X-Request-ID, X-Correlation-ID, traceparent, X-Activity-ID, X-Session-ID,
X-Tenant-ID and the static extras.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy, istr

from sidecar.config import Headers
from sidecar.session import Credentials

#: RFC 9110 7.6.1 and RFC 9112: meaningful for one connection only, never forwarded
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)

AUTHORIZATION = istr("Authorization")
HOST = istr("Host")
REQUEST_ID = istr("X-Request-ID")
CORRELATION_ID = istr("X-Correlation-ID")
TRACEPARENT = istr("traceparent")
TRACESTATE = istr("tracestate")
ACTIVITY_ID = istr("X-Activity-ID")
SESSION_ID = istr("X-Session-ID")
TENANT_ID = istr("X-Tenant-ID")
EXPECT = istr("Expect")

# W3C Trace Context level 1, section 3.2: version-traceid-parentid-flags, lower-case hex
_TRACEPARENT = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)

Getter = Callable[[CIMultiDictProxy[str], Credentials], str | None]


def new_id() -> str:
    """A fresh random UUID (version 4) as text."""
    return str(uuid.uuid4())


def new_traceparent() -> str:
    """A new W3C traceparent with random trace and span ids, sampled flag set."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def valid_traceparent(value: str) -> bool:
    """True for a well-formed traceparent whose ids are not all zero."""
    return _TRACEPARENT.fullmatch(value) is not None


def connection_listed(headers: CIMultiDictProxy[str]) -> set[str]:
    """Header names that the Connection header declares hop-by-hop (RFC 9110 7.6.1)."""
    listed: set[str] = set()
    for value in headers.getall("Connection", ()):
        listed.update(name.strip().lower() for name in value.split(",") if name.strip())
    return listed


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """The compiled rules: which caller headers to drop (lower-case names) and how to build each
    managed one."""

    dropped: frozenset[str]
    managed: tuple[tuple[str, Getter], ...]
    static: tuple[tuple[str, str], ...]

    @classmethod
    def compile(cls, config: Headers) -> HeaderRules:
        """Turn the headers section into rules; nothing is decided per request that can be here."""
        managed: list[tuple[str, Getter]] = []
        dropped = {"host", "authorization", "expect", *HOP_BY_HOP}

        def own(name: str, getter: Getter) -> None:
            dropped.add(name.lower())
            managed.append((name, getter))

        if config.request_id == "generate":
            own(REQUEST_ID, lambda _h, _c: new_id())
        elif config.request_id == "propagate":
            own(REQUEST_ID, lambda h, _c: h.get(REQUEST_ID) or new_id())

        if config.correlation_id is not None:
            own(CORRELATION_ID, _propagate_or_generate(config.correlation_id, CORRELATION_ID))

        if config.traceparent == "generate":
            dropped.add("tracestate")  # a new trace starts without the caller's vendor state
            own(TRACEPARENT, lambda _h, _c: new_traceparent())
        elif config.traceparent == "propagate":
            own(TRACEPARENT, _propagated_traceparent)

        if config.activity_id == "auto":
            own(ACTIVITY_ID, lambda _h, c: c.activity_id)
        elif config.activity_id is not None:
            own(ACTIVITY_ID, _fixed(config.activity_id))

        if config.session_id == "auto":
            own(SESSION_ID, lambda _h, c: c.session_id)
        elif config.session_id is not None:
            own(SESSION_ID, _fixed(config.session_id))

        if config.tenant_id is not None:
            own(TENANT_ID, _fixed(config.tenant_id))

        dropped.update(name.lower() for name in config.static)
        return cls(
            dropped=frozenset(dropped),
            managed=tuple(managed),
            static=tuple(config.static.items()),
        )

    def apply(self, incoming: CIMultiDictProxy[str], creds: Credentials) -> CIMultiDict[str]:
        """The headers to send upstream for one request."""
        dropped = self.dropped
        if "Connection" in incoming:
            dropped = dropped | connection_listed(incoming)
        out: CIMultiDict[str] = CIMultiDict(
            (name, value) for name, value in incoming.items() if name.lower() not in dropped
        )
        out[AUTHORIZATION] = creds.authorization
        for name, getter in self.managed:
            value = getter(incoming, creds)
            if value is not None:
                out[name] = value
        if self.static:
            out.extend(self.static)
        return out


def _fixed(value: str) -> Getter:
    return lambda _h, _c: value


def _propagate_or_generate(mode: str, name: str) -> Getter:
    if mode == "propagate":
        return lambda h, _c: h.get(name) or new_id()
    if mode == "generate":
        return lambda _h, _c: new_id()
    return _fixed(mode)


def _propagated_traceparent(incoming: CIMultiDictProxy[str], _creds: Credentials) -> str:
    value = incoming.get(TRACEPARENT)
    if value is not None and valid_traceparent(value.strip()):
        return value.strip()
    return new_traceparent()


def strip_hop_by_hop(headers: Iterable[tuple[str, str]], extra: set[str]) -> CIMultiDict[str]:
    """A copy of ``headers`` without hop-by-hop headers and without ``extra`` (lower-case) names."""
    return CIMultiDict(
        (n, v) for n, v in headers if n.lower() not in HOP_BY_HOP and n.lower() not in extra
    )
