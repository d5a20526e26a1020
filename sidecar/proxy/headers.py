"""Header rules, compiled once from config and applied per request as a pure function.

Outgoing headers = the caller's headers, minus hop-by-hop headers (RFC 9110 7.6.1), minus
Host and Authorization and every header the sidecar manages, plus the managed headers:
Authorization, X-Request-ID, X-Correlation-ID, traceparent, X-Activity-ID, X-Session-ID,
X-Tenant-ID and the static extras. Values may use ``{{ session.<field> }}``: those are rendered once
per credentials snapshot (see :mod:`sidecar.proxy.header_values`), as is the session's Cookie
header when
``upstream.send_cookies`` is on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from multidict import istr

from sidecar.config.headers import Headers, header_templates
from sidecar.http.wire import HOP_BY_HOP, listed_fields, without_fields
from sidecar.proxy.header_values import SessionCookies, SessionValues, templated
from sidecar.tokens import Credentials

if TYPE_CHECKING:
    from sidecar.http.exchange import Request

REQUEST_ID = istr("X-Request-ID")
CORRELATION_ID = istr("X-Correlation-ID")
TRACEPARENT = istr("traceparent")
ACTIVITY_ID = istr("X-Activity-ID")
SESSION_ID = istr("X-Session-ID")
TENANT_ID = istr("X-Tenant-ID")

# W3C Trace Context level 1, section 3.2: version-traceid-parentid-flags, lower-case hex
_TRACEPARENT = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)

#: builds one managed header's value from the caller's values (looked up by lower-case name) and
#: the session's credentials; None leaves the header out
Getter = Callable[[Mapping[str, str], Credentials], str | None]
#: an empty mapping: what a getter of a per-session value is called with (it reads no caller value)
_NO_VALUES: Mapping[str, str] = {}


class _RandomPool:
    """Random bytes from ``source`` (``os.urandom``), fetched 4 KiB at a time: ids and trace ids
    take several small slices per request, and one getrandom call each would cost more than the
    rest of building them. A forked child starts with a fresh pool (never a copy of the
    parent's). A refill that fails (``source`` raising) fails the one call that needed it: the
    next call tries again."""

    def __init__(self, source: Callable[[int], bytes] = os.urandom) -> None:
        self._source = source
        self._buffer = b""
        self._pos = 0
        #: request ids and traceparents without their flags made ahead, a batch at a time
        self._ids: list[str] = []
        self._traces: list[str] = []
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        """Forget the buffered bytes and ids (a forked child must not reuse its parent's)."""
        self._buffer = b""
        self._pos = 0
        self._ids.clear()
        self._traces.clear()

    def take(self, n: int) -> bytes:
        """The next ``n`` random bytes."""
        pos = self._pos
        if pos + n > len(self._buffer):
            self._buffer = self._source(4096)
            pos = 0
        self._pos = pos + n
        return self._buffer[pos : pos + n]

    def new_id(self, _values: object = None, _creds: object = None) -> str:
        """A random UUID (version 4, RFC 9562 5.4) as text, from a batch of 64 made from 1 KiB
        of random bytes: ``str(uuid.uuid4())`` costs several times more, and this runs once or
        twice per proxied request. Also a :data:`Getter` of a generated header (its arguments
        unused): called as it is, without a lambda around it."""
        ids = self._ids
        if not ids:
            ids.extend(_uuid_texts(self._source(16 * _BATCH)))
        return ids.pop()

    def new_traceparent(self, sampled: bool = True) -> str:
        """A new W3C traceparent with random trace and span ids (32 and 16 hex digits, made 64 at
        a time); the flags say ``sampled``."""
        heads = self._traces
        if not heads:
            heads.extend(_traceparent_heads(self._source(27 * _BATCH)))
        return heads.pop() + ("01" if sampled else "00")


#: ids made per batch
_BATCH = 64
#: a byte with the version bits of a random UUID (4) set, and with the variant bits (10)
_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT_10 = bytes((b & 0x3F) | 0x80 for b in range(256))
_SPACES = b" " * _BATCH
_ZEROS = b"0" * _BATCH
_DASHES = b"-" * _BATCH


def _uuid_texts(raw: bytes) -> list[str]:
    """Random UUIDs as text, one per 16 bytes of ``raw``: a few operations on the whole batch
    instead of slicing and formatting each id (several times cheaper per id)."""
    count = len(raw) // 16
    buf = bytearray(raw)
    buf[6::16] = buf[6::16].translate(_VERSION_4)
    buf[8::16] = buf[8::16].translate(_VARIANT_10)
    # per id: 8 groups of 4 hex digits, each followed by "-" (but the last id's last): the dashes
    # between groups 1|2, 6|7 and 7|8 go (from the right, so the earlier offsets hold), the one
    # after each id becomes a space to split at
    text = bytearray(buf.hex("-", 2), "ascii")
    del text[34::40]
    del text[29::39]
    del text[4::38]
    text[36::37] = _SPACES[: count - 1]
    return text.decode("ascii").split()


def _traceparent_heads(raw: bytes) -> list[str]:
    """``00-<32 hex>-<16 hex>-`` strings, one per 27 bytes of ``raw`` (54 hex digits, of which
    the version, the dashes and a separator overwrite 6)."""
    count = len(raw) // 27
    text = bytearray(raw.hex(), "ascii")
    text[0::54] = text[1::54] = _ZEROS[:count]
    text[2::54] = text[35::54] = text[52::54] = _DASHES[:count]
    text[53::54] = _SPACES[:count]
    return text.decode("ascii").split()


_pool = _RandomPool()
_random = _pool.take
#: a fresh random UUID (version 4) as text
new_id = _pool.new_id


#: a new W3C traceparent with random trace and span ids; the flags say ``sampled``
new_traceparent = _pool.new_traceparent


def caller_sampled(value: str | None, default: bool) -> bool:
    """The caller's sampling decision (W3C Trace Context 3.2.2.5: bit 0 of the flags) from its
    traceparent, or ``default`` when it sent no valid one."""
    if value is None or not valid_traceparent(value.strip()):
        return default
    return int(value.strip()[53:55], 16) & 1 == 1


def caller_traceparent(request: Request) -> str | None:
    """The caller's traceparent when it is a valid one."""
    raw = request.header(b"traceparent")
    if raw is None:
        return None
    value = raw.decode("latin-1").strip()
    return value if valid_traceparent(value) else None


def trace_id(request: Request) -> str | None:
    """The trace id an access line reports: of the traceparent sent upstream, else of the
    caller's (a request refused, or answered 503 without a session), else None."""
    sent = request.traceparent or caller_traceparent(request)
    return sent[3:35] if sent is not None else None


def valid_traceparent(value: str) -> bool:
    """True for a well-formed traceparent whose ids are not all zero."""
    return _TRACEPARENT.fullmatch(value) is not None


class HeaderRules:
    """The compiled rules: which caller headers to drop (lower-case names), which caller values
    the managed headers read, and how to build each managed header."""

    __slots__ = (
        "_cookies",
        "_plan_for",
        "_sizes",
        "_steps",
        "_tail",
        "_values",
        "captured",
        "dropped_b",
        "managed_b",
        "static_block",
        "static_session",
    )

    def __init__(
        self,
        dropped: frozenset[str],
        managed: tuple[tuple[str, Getter, bool], ...],
        static: tuple[tuple[str, str], ...],
        captured: frozenset[str],
        *,
        values: SessionValues | None = None,
        static_session: tuple[tuple[str, str], ...] = (),
        cookies: SessionCookies | None = None,
    ) -> None:
        self.dropped_b = frozenset(n.encode() for n in dropped)
        #: the lengths of the dropped names: a caller's header of any other length is passed on
        #: without lower-casing its name (its "_" spelling is as long as its "-" one)
        self._sizes = frozenset(len(n) for n in self.dropped_b)
        #: (header prefix, getter, 1 for X-Request-ID, 2 for traceparent, else 0, and whether
        #: the value is the same for every request of one credentials snapshot)
        self.managed_b = tuple(
            (n.encode() + b": ", g, _ID_KINDS.get(n.lower(), 0), per_session)
            for n, g, per_session in managed
        )
        self.static_block = b"".join(f"{n}: {v}\r\n".encode() for n, v in static)
        self.captured = frozenset(n.encode() for n in captured)
        #: static headers whose values come from the session: (name, template key)
        self.static_session = static_session
        self._values = values or SessionValues({})
        self._cookies = cookies
        #: the lines after the caller's for one credentials snapshot: those the same for each of
        #: its requests rendered once, before each line made per request (the lines before it,
        #: its prefix, getter and kind) and after the last (the tail)
        self._plan_for: Credentials | None = None
        self._steps: tuple[tuple[bytes, bytes, Getter, int], ...] = ()
        self._tail = b""

    @classmethod
    def compile(
        cls,
        config: Headers,
        *,
        cookies: SessionCookies | None = None,
        sample: bool = True,
        new_span: bool = False,
    ) -> HeaderRules:
        """Turn the headers section into rules; nothing is decided per request that can be here.

        ``cookies`` (when ``upstream.send_cookies`` is on) adds the session's cookies to the
        caller's Cookie header. ``sample`` (``tracing.sample``) is the sampled flag of a
        traceparent sidecar starts when the caller sent none; a caller's own decision is kept.
        With ``new_span`` (span export on) a caller's traceparent goes on with sidecar's own span
        id as the parent id, so the upstream's span is a child of sidecar's."""
        managed: list[tuple[str, Getter, bool]] = []
        dropped = {"host", "authorization", "expect", "content-length", *HOP_BY_HOP}
        captured: set[str] = set()
        values = SessionValues(templated(header_templates(config)))

        def fixed(key: str, value: str) -> Getter:
            if values.has(key):
                return lambda _h, c: values.get(key, c)
            return _fixed(value)

        def own(
            name: str, getter: Getter, reads_caller: bool = False, per_session: bool = False
        ) -> None:
            """``per_session``: the value depends on the credentials alone (rendered once per
            snapshot, not per request)."""
            dropped.add(name.lower())
            managed.append((name, getter, per_session))
            if reads_caller:
                captured.add(name.lower())

        if config.request_id == "generate":
            own(REQUEST_ID, _pool.new_id)
        elif config.request_id == "propagate":
            own(REQUEST_ID, lambda h, _c: h.get("x-request-id") or new_id(), True)

        if config.correlation_id is not None:
            own(
                CORRELATION_ID,
                _propagate_or_generate(
                    config.correlation_id,
                    "x-correlation-id",
                    fixed("headers.correlation_id", config.correlation_id),
                ),
                config.correlation_id == "propagate",
                per_session=config.correlation_id not in ("propagate", "generate"),
            )

        if config.traceparent == "generate":
            dropped.add("tracestate")  # a new trace starts without the caller's vendor state
            own(
                TRACEPARENT,
                lambda h, _c: new_traceparent(caller_sampled(h.get("traceparent"), sample)),
                True,
            )
        elif config.traceparent == "propagate":
            own(TRACEPARENT, _propagated_traceparent(sample, new_span), True)

        if config.activity_id == "auto":
            own(ACTIVITY_ID, lambda _h, c: c.activity_id, per_session=True)
        elif config.activity_id is not None:
            own(ACTIVITY_ID, fixed("headers.activity_id", config.activity_id), per_session=True)

        if config.session_id == "auto":
            own(SESSION_ID, lambda _h, c: c.session_id, per_session=True)
        elif config.session_id is not None:
            own(SESSION_ID, fixed("headers.session_id", config.session_id), per_session=True)

        if config.tenant_id is not None:
            own(TENANT_ID, fixed("headers.tenant_id", config.tenant_id), per_session=True)

        if cookies is not None:
            dropped.add("cookie")  # re-added, merged with the session's cookies
            captured.add("cookie")

        dropped.update(name.lower() for name in config.static)
        static = {n: f"headers.static.{n}" for n in config.static}
        return cls(
            dropped=frozenset(dropped),
            managed=tuple(managed),
            static=tuple((n, v) for n, v in config.static.items() if not values.has(static[n])),
            captured=frozenset(captured),
            values=values,
            static_session=tuple((n, k) for n, k in static.items() if values.has(k)),
            cookies=cookies,
        )

    def _session_static(self, creds: Credentials) -> list[tuple[str, str]]:
        out = []
        for name, key in self.static_session:
            value = self._values.get(key, creds)
            if value is not None:
                out.append((name, value))
        return out

    def _plan_of(self, creds: Credentials) -> None:
        """Authorization, the managed headers and the static ones for ``creds``, in their order:
        runs of lines the same for every request rendered into one bytes each."""
        steps: list[tuple[bytes, bytes, Getter, int]] = []
        run = [f"Authorization: {creds.authorization}\r\n".encode()]
        for prefix, getter, kind, per_session in self.managed_b:
            if not per_session:
                steps.append((b"".join(run), prefix, getter, kind))
                run = []
                continue
            made = getter(_NO_VALUES, creds)
            if made is not None:
                run.append(prefix + made.encode("latin-1") + b"\r\n")
        run.append(self.static_block)
        for header, text in self._session_static(creds):
            run.append(f"{header}: {text}\r\n".encode("latin-1"))
        self._steps = tuple(steps)
        self._tail = b"".join(run)
        self._plan_for = creds

    def head(
        self,
        request_line: bytes,
        raw_headers: Iterable[tuple[bytes, bytes]],
        creds: Credentials,
        framing: bytes,
    ) -> tuple[bytes, str | None, str | None]:
        """The complete request head for the upstream, and the X-Request-ID and traceparent it
        carries.

        ``request_line`` holds the request line and the Host header; ``framing`` is the
        Content-Length or Transfer-Encoding line the body needs (or nothing).
        """
        parts = [request_line]
        append = parts.append
        dropped = self.dropped_b
        captured_names = self.captured
        captured: dict[str, str] = {}
        listed: bytes | None = None
        sizes = self._sizes
        for name, value in raw_headers:
            if len(name) not in sizes:
                append(name + b": " + value + b"\r\n")
                continue
            lname = name.lower()
            if lname in dropped:
                if lname in captured_names:
                    key, text = lname.decode(), value.decode("latin-1")
                    if lname == b"cookie" and key in captured:
                        text = f"{captured[key]}; {text}"  # several Cookie lines are one list
                    captured[key] = text
                elif lname == b"connection":
                    # every Connection line counts (RFC 9110 7.6.1: one list over all lines)
                    listed = value if listed is None else listed + b"," + value
                continue
            if b"_" in lname and lname.replace(b"_", b"-") in dropped:
                # Transfer_Encoding, Content_Length, X_Request_ID...: servers that map "_" to
                # "-" (CGI, WSGI, some frameworks) would take them for framing or managed headers
                continue
            append(name + b": " + value + b"\r\n")
        if listed is not None and (names := listed_fields(listed)):
            # the caller's Connection header names more hop-by-hop fields (RFC 9110 7.6.1); the
            # first part, the request line and Host, is ours
            parts = [parts[0], *without_fields(parts[1:], names)]
            append = parts.append
        if creds is not self._plan_for:
            self._plan_of(creds)
        request_id = traceparent = None
        for before, prefix, getter, kind in self._steps:
            if before:
                append(before)
            made = getter(captured, creds)
            if made is not None:
                if kind == 1:
                    request_id = made
                elif kind == 2:
                    traceparent = made
                append(prefix)  # (three parts for the join: cheaper than two concatenations)
                append(made.encode("latin-1"))
                append(b"\r\n")
        append(self._tail)
        if self._cookies is not None:
            path = request_line.split(b" ", 2)[1].split(b"?", 1)[0].decode("latin-1")
            cookie = self._cookies.header(captured.get("cookie"), creds, path)
            if cookie is not None:
                append(b"Cookie: " + cookie.encode("latin-1") + b"\r\n")
        append(framing)
        append(b"\r\n")
        return b"".join(parts), request_id, traceparent


def _fixed(value: str) -> Getter:
    return lambda _h, _c: value


def _propagate_or_generate(mode: str, name: str, otherwise: Getter) -> Getter:
    """``name`` is the lower-case header name (the caller's values are looked up by it);
    ``otherwise`` builds a value that is neither mode."""
    if mode == "propagate":
        return lambda h, _c: h.get(name) or new_id()
    if mode == "generate":
        return _pool.new_id
    return otherwise


def _propagated_traceparent(sample: bool, new_span: bool) -> Getter:
    """The caller's valid traceparent (with a new parent id: sidecar's span, when ``new_span``),
    else a new one sampled as ``sample`` says."""

    def getter(incoming: Mapping[str, str], _creds: Credentials) -> str:
        value = incoming.get("traceparent")
        if value is not None and valid_traceparent(value := value.strip()):
            if new_span:
                return f"00-{value[3:35]}-{_random(8).hex()}-{value[53:55]}"
            return value
        return new_traceparent(sample)

    return getter


#: managed headers whose values the access log reports: 1 X-Request-ID, 2 traceparent
_ID_KINDS = {"x-request-id": 1, "traceparent": 2}
