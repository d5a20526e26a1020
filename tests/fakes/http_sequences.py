"""Generated caller traffic for the differential fuzz suite: sequences of HTTP/1.1 requests as raw
bytes, each request paired with what a correct proxy may do with it.

A :class:`Sent` is one request on the wire and its *fate*: it must be forwarded (well-formed), it
must be refused (ambiguous or broken framing: RFC 9112 6.1 and 6.3), or either (a lenient reading
the RFC allows, such as a bare LF line ending). When forwarded, the upstream must get exactly
``method``, the proxy's path prefix plus ``target``, and ``body``.

:func:`sequences` draws a :class:`Sequence`: requests written back to back (pipelined), cut at
random byte boundaries, each piece optionally followed by a short pause, and optionally a
half-close. The last request asks for ``Connection: close`` (or, when it is left unfinished, the
caller half-closes), so a proxy that behaves always ends the connection, and a harness never has
to guess how long to wait for more.

``features`` selects what may be generated (see :data:`WELL_FORMED` and :data:`HOSTILE`); the
environment variables ``FUZZ_ONLY`` and ``FUZZ_WITHOUT`` (comma-separated feature names) narrow
it, to find which feature a failure needs.
"""

from __future__ import annotations

import enum
import itertools
import os
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from hypothesis import strategies as st

#: well-formed traffic: every request must reach the upstream exactly as sent
WELL_FORMED = frozenset(
    {
        "bodies",  # Content-Length bodies, on any method but HEAD
        "chunked",  # chunked bodies (random sizes, upper-case hex, leading zeros)
        "extensions",  # chunk extensions (token and quoted values)
        "trailers",  # trailer fields after the last chunk
        "head",  # HEAD requests (the answer has a length and no body)
        "auth",  # the caller sends its own Authorization (sidecar must replace it)
        "pauses",  # tiny pauses between the pieces
        "half_close",  # the caller shuts its sending side down after the last byte
    }
)
#: everything else: protocol switches and framing a proxy must refuse or read one safe way
HOSTILE = frozenset(
    {
        "upgrade_websocket",  # Upgrade: websocket, then more bytes before any 101
        "upgrade_other",  # Upgrade: h2c on a request with a body
        "junk",  # bytes that are not HTTP/1.1 (a WebSocket frame, the HTTP/2 preface)
        "cl_te",  # Content-Length and Transfer-Encoding together
        "dup_cl",  # two Content-Length values
        "bad_cl",  # a Content-Length that is not a decimal number
        "bad_chunk",  # a chunk size line or chunk framing that is broken
        "obfuscated_te",  # a Transfer-Encoding that is not plainly chunked
        "bare_lf",  # head lines ending in LF alone
        "underscore",  # Content_Length / Transfer_Encoding look-alike header names
        "truncated",  # a last request whose body never ends (the caller half-closes instead)
    }
)
ALL = WELL_FORMED | HOSTILE


def selected(features: frozenset[str]) -> frozenset[str]:
    """``features`` narrowed by ``FUZZ_ONLY`` and ``FUZZ_WITHOUT`` (unknown names are an error)."""

    def names(var: str) -> frozenset[str] | None:
        raw = os.environ.get(var, "").strip()
        if not raw:
            return None
        out = frozenset(n.strip() for n in raw.split(",") if n.strip())
        unknown = out - ALL
        if unknown:
            raise ValueError(
                f"{var}: unknown fuzz features {sorted(unknown)}; known: {sorted(ALL)}"
            )
        return out

    only, without = names("FUZZ_ONLY"), names("FUZZ_WITHOUT")
    out = features if only is None else features & only
    return out - (without or frozenset())


class Fate(enum.Enum):
    """What a correct proxy does with a request."""

    FORWARD = "must be forwarded"
    REFUSE = "must be refused"
    EITHER = "may be forwarded (as read here) or refused"


@dataclass(frozen=True)
class Sent:
    """One request (or non-HTTP bytes) as the caller writes it, and what may become of it."""

    kind: str
    wire: bytes
    fate: Fate
    method: str = "GET"
    target: str = "/"
    #: the body the upstream must receive when this request is forwarded
    body: bytes = b""
    #: nothing after it may be forwarded (Connection: close; CL+TE, RFC 9112 6.1)
    closes: bool = False
    #: after answering it the proxy may close instead of reading on (an Upgrade not switched)
    may_close_after: bool = False
    #: the caller's trailer fields, name and value (never to become header fields upstream)
    trailers: tuple[tuple[str, str], ...] = ()
    #: the Authorization value the caller sent itself (never to reach the upstream)
    caller_auth: bytes | None = None

    def describe(self) -> str:
        return f"{self.kind} {self.method} {self.target} ({self.fate.value}): {self.wire!r}"


@dataclass(frozen=True)
class Sequence:
    """A caller's whole conversation: the requests, how the bytes are cut, and the ending."""

    requests: tuple[Sent, ...]
    #: the bytes as written: each piece, then a pause in seconds (None: no pause at all)
    pieces: tuple[tuple[bytes, float | None], ...] = field(default=())
    half_close: bool = False

    @property
    def wire(self) -> bytes:
        return b"".join(s.wire for s in self.requests)

    def describe(self) -> str:
        lines = [f"  [{i}] {s.describe()}" for i, s in enumerate(self.requests)]
        cuts = [len(p) for p, _ in self.pieces]
        lines.append(f"  written in pieces of {cuts}, half-close: {self.half_close}")
        return "\n".join(lines)


HOSTS = ("localhost", "127.0.0.1", "localhost:8080", "[::1]")
EXTRA_HEADERS = (
    (b"Accept", b"*/*"),
    (b"User-Agent", b"fuzz/1.0"),
    (b"X-Fuzz", b"a b\tc"),
    (b"Cache-Control", b"no-cache"),
    (b"Cookie", b"a=b; c=d"),
)
TARGET_TAILS = ("", "?q=1", "/a-b_c~d", "?x=y&z=", "/deep/er/path?k=v&k=w")
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE", "OPTIONS", "GET")
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def head(line: bytes, headers: Seq[tuple[bytes, bytes]], eol: bytes = b"\r\n") -> bytes:
    """A request head from its line and header fields."""
    return line + eol + b"".join(n + b": " + v + eol for n, v in headers) + eol


def _draw_chunked(
    draw: st.DrawFn, body: bytes, features: frozenset[str], index: int
) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """``body`` chunked: random chunk sizes and spellings, extensions, trailers."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=3))))
    bounds = [0, *(c for c in cuts if c < len(body)), len(body)]
    pieces = [body[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    out = b""
    for piece in pieces:
        size = draw(st.sampled_from(["%x", "%X", "%04x"])) % len(piece)
        out += size.encode() + _draw_extension(draw, features) + b"\r\n" + piece + b"\r\n"
    out += draw(st.sampled_from([b"0", b"000"])) + _draw_extension(draw, features) + b"\r\n"
    fields: tuple[tuple[str, str], ...] = ()
    if "trailers" in features and draw(st.booleans()):
        names = [f"X-Trailer-{index}", "X-Forwarded-For", f"X-Checksum-{index}"]
        chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True))
        fields = tuple((name, f"trailer-value-{index}") for name in chosen)
        out += b"".join(f"{n}: {v}\r\n".encode() for n, v in fields)
    return out + b"\r\n", fields


def _draw_extension(draw: st.DrawFn, features: frozenset[str]) -> bytes:
    if "extensions" not in features:
        return b""
    return bytes(
        draw(st.sampled_from([b"", b"", b";ext", b";name=value", b';q="a b;c"', b";a=1;b"]))
    )


def _plain(draw: st.DrawFn, index: int, last: bool, features: frozenset[str]) -> Sent:
    """A well-formed request: any method, maybe a body (length or chunked), maybe its own
    Authorization, headers in any order."""
    methods = BODY_METHODS + (("HEAD",) if "head" in features else ())
    method = draw(st.sampled_from(methods))
    target = f"/f/{index}" + draw(st.sampled_from(TARGET_TAILS))
    headers = [(b"Host", draw(st.sampled_from(HOSTS)).encode())]
    headers += draw(st.lists(st.sampled_from(EXTRA_HEADERS), max_size=3, unique=True))
    auth = None
    if "auth" in features and draw(st.booleans()):
        auth = b"Bearer caller-credential-%d" % index
        headers.append((b"Authorization", auth))
    body, payload = b"", b""
    trailers: tuple[tuple[str, str], ...] = ()
    has_body = method != "HEAD" and "bodies" in features and draw(st.booleans())
    if has_body:
        body = draw(st.binary(min_size=0, max_size=48))
        if "chunked" in features and body and draw(st.booleans()):
            payload, trailers = _draw_chunked(draw, body, features, index)
            headers.append((b"Transfer-Encoding", draw(st.sampled_from([b"chunked", b"Chunked"]))))
        else:
            payload = body
            name = draw(st.sampled_from([b"Content-Length", b"content-length"]))
            headers.append((name, draw(st.sampled_from([b"%d", b" %d ", b"0%d"])) % len(body)))
    if last:
        headers.append((b"Connection", b"close"))
    headers = list(draw(st.permutations(headers)))
    wire = head(f"{method} {target} HTTP/1.1".encode(), headers) + payload
    return Sent(
        "plain",
        wire,
        Fate.FORWARD,
        method,
        target,
        body,
        closes=last,
        trailers=trailers,
        caller_auth=auth,
    )


def _websocket(draw: st.DrawFn, index: int) -> Sent:
    """A WebSocket upgrade; what the caller writes after it is read before any 101 exists."""
    target = f"/ws/{index}"
    headers = [
        (b"Host", b"localhost"),
        (b"Connection", draw(st.sampled_from([b"Upgrade", b"keep-alive, Upgrade"]))),
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Version", b"13"),
        (b"Sec-WebSocket-Key", WS_KEY),
    ]
    wire = head(f"GET {target} HTTP/1.1".encode(), draw(st.permutations(headers)))
    return Sent("upgrade_websocket", wire, Fate.FORWARD, "GET", target, may_close_after=True)


def _upgrade_other(draw: st.DrawFn, index: int) -> Sent:
    """An upgrade sidecar does not tunnel (h2c) on a request with a body: the body is a body."""
    target = f"/h2c/{index}"
    body = draw(st.binary(min_size=1, max_size=24))
    headers = [
        (b"Host", b"localhost"),
        (b"Connection", b"Upgrade, HTTP2-Settings"),
        (b"Upgrade", b"h2c"),
        (b"HTTP2-Settings", b"AAMAAABkAAQCAAAAAAIAAAAA"),
        (b"Content-Length", b"%d" % len(body)),
    ]
    wire = head(f"POST {target} HTTP/1.1".encode(), draw(st.permutations(headers))) + body
    return Sent("upgrade_other", wire, Fate.FORWARD, "POST", target, body, may_close_after=True)


def _junk(draw: st.DrawFn, _index: int) -> Sent:
    """Bytes a caller that believes it switched protocols would send: not a request."""
    wire = draw(
        st.sampled_from(
            [
                b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58",  # a masked WebSocket "Hello"
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # the HTTP/2 connection preface
            ]
        )
    )
    return Sent("junk", wire, Fate.REFUSE)


def _truncated(draw: st.DrawFn, index: int) -> Sent:
    """A head announcing more body than ever comes: the caller half-closes mid-body."""
    target = f"/cut/{index}"
    sent = draw(st.binary(max_size=24))
    headers = [(b"Host", b"localhost"), (b"Content-Length", b"%d" % (len(sent) + 250))]
    wire = head(f"POST {target} HTTP/1.1".encode(), draw(st.permutations(headers))) + sent
    return Sent("truncated", wire, Fate.REFUSE, "POST", target)


def _bad(draw: st.DrawFn, index: int, last: bool, kind: str) -> Sent:
    """A request whose framing is broken or ambiguous (``kind`` is the feature's name)."""
    target = f"/bad/{index}"
    method = "POST"
    headers = [(b"Host", b"localhost")]
    if last:
        headers.append((b"Connection", b"close"))
    body = draw(st.binary(min_size=1, max_size=16))
    chunked, _ = _draw_chunked(draw, body, frozenset(), index)
    fate, closes, expected, payload = Fate.REFUSE, False, b"", chunked
    eol = b"\r\n"
    if kind == "cl_te":
        # RFC 9112 6.1: reject, or read the body as chunked and close the connection after it
        headers += [(b"Content-Length", b"%d" % draw(st.integers(0, 40)))]
        headers += [(b"Transfer-Encoding", b"chunked")]
        fate, closes, expected = Fate.EITHER, True, body
    elif kind == "dup_cl":
        a, b = draw(st.tuples(st.integers(1, 16), st.integers(1, 16)))
        payload = body.ljust(max(a, b), b"x")
        if a == b:  # RFC 9110 8.6: identical duplicates may be read as one
            fate, expected = Fate.EITHER, payload[:a]
        if draw(st.booleans()):
            headers += [(b"Content-Length", b"%d" % a), (b"Content-Length", b"%d" % b)]
        else:
            headers += [(b"Content-Length", b"%d, %d" % (a, b))]
    elif kind == "bad_cl":
        value = draw(st.sampled_from([b"+5", b"-5", b"5 5", b"0x5", b"5.0", b"", b"5a", b"9" * 25]))
        headers += [(b"Content-Length", value)]
        payload = body.ljust(5, b"x")
    elif kind == "bad_chunk":
        headers += [(b"Transfer-Encoding", b"chunked")]
        good = b"3\r\nabc\r\n" * draw(st.integers(0, 2))
        size = draw(
            st.sampled_from([b"zz", b"-1", b"0x5", b"+5", b"f" * 17, b"5 5", b"", b"mismatch"])
        )
        if size == b"mismatch":  # announces 2 bytes and sends more before the CRLF
            payload = good + b"2\r\n" + body.ljust(4, b"y") + b"\r\n0\r\n\r\n"
        else:
            payload = good + size + b"\r\n" + body + b"\r\n0\r\n\r\n"
    elif kind == "obfuscated_te":
        # RFC 9112 6.3: chunked not the final coding (or not recognisable) in a request: 400
        name, value = draw(
            st.sampled_from(
                [
                    (b"Transfer-Encoding", b"xchunked"),
                    (b"Transfer-Encoding", b"chunked, identity"),
                    (b"Transfer-Encoding", b"identity"),
                    (b"Transfer-Encoding", b"gzip"),
                    (b"Transfer-Encoding", b"chunk"),
                    (b"Transfer-Encoding ", b"chunked"),  # RFC 9112 5.1: whitespace before ':'
                    (b"Transfer-Encoding", b"\x0bchunked"),
                ]
            )
        )
        headers += [(name, value)]
    elif kind == "bare_lf":
        # RFC 9112 2.2: a recipient MAY take a lone LF as a line terminator
        eol = draw(st.sampled_from([b"\n", b"\r\n"]))
        headers += [(b"Content-Length", b"%d" % len(body))]
        fate, expected, payload = Fate.EITHER, body, body
        if eol == b"\r\n":  # only one line ends with a bare LF
            headers.append((b"X-Lone", b"lf\nX-After: 1"))
    elif kind == "underscore":
        # an ordinary header to HTTP, framing to upstreams that map '_' to '-' (CGI, some WSGI)
        method = "GET"
        headers += [
            draw(st.sampled_from([(b"Content_Length", b"5"), (b"Transfer_Encoding", b"chunked")]))
        ]
        fate, payload = Fate.EITHER, b""
    else:
        raise ValueError(f"unknown bad kind {kind!r}")
    headers = list(draw(st.permutations(headers)))
    wire = head(f"{method} {target} HTTP/1.1".encode(), headers, eol) + payload
    return Sent(kind, wire, fate, method, target, expected, closes=closes or last)


UPGRADES = {"upgrade_websocket": _websocket, "upgrade_other": _upgrade_other}
BAD = ("cl_te", "dup_cl", "bad_cl", "bad_chunk", "obfuscated_te", "bare_lf", "underscore")


@st.composite
def sequences(draw: st.DrawFn, features: frozenset[str], max_requests: int = 5) -> Sequence:
    """A pipelined conversation drawn from ``features``, cut into pieces."""
    kinds = ["plain"] + [k for k in (*UPGRADES, *BAD, "junk", "truncated") if k in features]
    count = draw(st.integers(1, max_requests))
    requests: list[Sent] = []
    truncated = False
    for index in range(count):
        last = index == count - 1
        kind = draw(st.sampled_from(kinds))
        if kind == "truncated" and last:
            requests.append(_truncated(draw, index))
            truncated = True
        elif kind in UPGRADES and not last:
            requests.append(UPGRADES[kind](draw, index))
        elif kind == "junk" and not last:
            requests.append(_junk(draw, index))
        elif kind in BAD:
            requests.append(_bad(draw, index, last, kind))
        else:
            requests.append(_plain(draw, index, last, features))
    wire = b"".join(s.wire for s in requests)
    pauses: list[float | None] = [None, 0.0]
    if "pauses" in features:
        pauses.append(0.002)
    if draw(st.booleans()):
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=12))))
        bounds = [0, *cuts, len(wire)]
        pieces = tuple(
            (wire[a:b], draw(st.sampled_from(pauses))) for a, b in itertools.pairwise(bounds)
        )
    else:  # every few bytes, each followed by the same pause: every parser state meets a boundary
        step, pause = draw(st.integers(1, 8)), draw(st.sampled_from(pauses[:2]))
        pieces = tuple((wire[a : a + step], pause) for a in range(0, len(wire), step))
    # a request left unfinished ends with a half-close: no proxy can be asked to guess more
    half_close = truncated or ("half_close" in features and draw(st.booleans()))
    return Sequence(tuple(requests), pieces, half_close)
