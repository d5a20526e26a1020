"""HTTP/1.1 framing as bytes, and the stateless pieces of HTTP the proxy builds or checks.

Framing: the request line, the fields that delimit a body (Content-Length, chunked
Transfer-Encoding, the last chunk), ``Expect: 100-continue``, the protocol switch (Upgrade), and
the hop-by-hop fields with those a Connection header lists, which are never passed on. The other
pieces: the proxy's own error answers, the check of a request's target, the upstream's response
header lines as passed on (Location turned back toward the caller), and the size limit for
chunked uploads. :mod:`sidecar.proxy.forward` decides when each applies and names no framing bytes
itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, Iterable
from http import HTTPStatus
from urllib.parse import unquote_to_bytes

from yarl import URL

from sidecar.errors import RefusedRequest

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

#: a response's status line and header lines: ``% (status, reason, header lines)``
STATUS_HEAD = b"HTTP/1.1 %d %b\r\n%b\r\n"
#: a whole response with its Content-Length, in one formatting: ``% (status, reason, header
#: lines, body length, the Connection line or nothing, body)``
WHOLE = b"HTTP/1.1 %d %b\r\n%bContent-Length: %d\r\n%b\r\n%b"
#: a body's framing line: its length (``% length``), streamed chunked, or none (RFC 9112 6)
CONTENT_LENGTH = b"Content-Length: %d\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
NO_BODY = CONTENT_LENGTH % 0
#: the framing line of a body relayed under the upstream's other transfer codings (``% codings``)
CODED = b"Transfer-Encoding: %b, chunked\r\n"
#: one chunk of a chunked body, ``% (len(data), data)``, and the last (no trailer fields),
#: RFC 9112 7.1
CHUNK = b"%x\r\n%b\r\n"
LAST_CHUNK = b"0\r\n\r\n"
#: whether the connection stays open after an answer (RFC 9112 9.3; HTTP/1.0 keeps it only
#: when told so, appendix C.2.2)
CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"
#: RFC 9110 10.1.1: the upstream is asked to say whether it wants the body before it is sent,
#: and the interim answer that tells a waiting caller to send its body
EXPECT_CONTINUE = b"Expect: 100-continue\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: RFC 9110 7.8: the fields asking for (or confirming) a switch to another protocol
UPGRADE_TO = b"Connection: Upgrade\r\nUpgrade: %b\r\n"


def request_line(prefix: str, host: str) -> str:
    """The request line and Host field toward one upstream as a ``%`` template of the method and
    the target (``template % (method, target)``, then encoded latin-1): built once per upstream,
    filled per request. ``prefix`` is the upstream's path prefix the target is appended to."""
    prefix, host = prefix.replace("%", "%%"), host.replace("%", "%%")
    return f"%s {prefix}%s HTTP/1.1\r\nHost: {host}\r\n"


def body_head(length: int | None) -> bytes:
    """A request head that carries only the framing of a body of ``length`` bytes (None:
    chunked): fed to a parser of its own, it makes it read just such a body."""
    framing = CHUNKED if length is None else CONTENT_LENGTH % length
    return b"POST / HTTP/1.1\r\n" + framing + b"\r\n"


def listed_fields(connection: bytes) -> set[bytes]:
    """The field names a Connection value lists (lower case): hop-by-hop like Connection itself,
    never passed on (RFC 9110 7.6.1). ``close`` and ``keep-alive`` name no field, and neither
    does ``content-length``: it frames the message sidecar passes on (a response's is how the
    caller finds its end; a request's is sidecar's own), whatever a peer lists."""
    names = set()
    for token in connection.split(b","):
        name = token.strip().lower()
        if name not in _NEVER_LISTED:
            names.add(name)
    return names


def without_fields(lines: Iterable[bytes], names: set[bytes]) -> list[bytes]:
    """Header lines (``name: value``, with or without their CRLF) except those named in
    ``names``."""
    return [line for line in lines if line.split(b":", 1)[0].lower() not in names]


def has_length(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """The head declares the body's length (a Content-Length field)."""
    for name, _ in headers:  # noqa: SIM110 - no generator object per streamed answer
        if name.lower() == b"content-length":
            return True
    return False


def upgrade_protocol(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The protocol an Upgrade field names (the first one), or None."""
    for name, value in headers:
        if name.lower() == b"upgrade":
            return value
    return None


def error_parts(
    status: int, code: str, detail: str, request_id: str | None = None
) -> tuple[bytes, bytes]:
    """A proxy-made error's header lines and JSON body (``X-Sidecar-Error: 1`` marks it)."""
    extra = b"" if request_id is None else b"X-Request-ID: %b\r\n" % request_id.encode("latin-1")
    body = json.dumps({"error": code, "detail": detail}).encode()
    return b"Content-Type: application/json; charset=utf-8\r\nX-Sidecar-Error: 1\r\n" + extra, body


def refusal_bytes(status: int, code: str, detail: str) -> bytes:
    """A whole error response for a request the front refused; the connection closes after it."""
    head, body = error_parts(status, code, detail)
    return b"HTTP/1.1 %d %s\r\n%bContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (
        status,
        reason_phrase(status).encode(),
        head,
        len(body),
        body,
    )


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def check_target(raw_path: str) -> None:
    """Refuse request targets that are not origin-form or that climb out of the path prefix.

    Absolute-form (``GET http://other/``) and asterisk-form targets would make us an open proxy or
    are meaningless here; ``.`` and ``..`` segments, also percent-encoded, could leave the
    upstream's path prefix once the upstream normalises them.
    """
    if not raw_path.startswith("/"):
        raise RefusedRequest(
            "only origin-form request targets (/path?query) are accepted: sidecar forwards to its "
            "one configured upstream and is not a forward proxy",
            status=400,
            code="target_refused",
        )
    if raw_path.startswith("//"):
        # kept refused rather than merged: an upstream (or a redirect built from the path) may
        # read //name/... as a host; see docs/http-semantics.md
        raise RefusedRequest(
            "a path starting with // is refused: usually a client base URL ending in / joined "
            "with a path starting with / (send /v1/x, not //v1/x)",
            status=400,
            code="target_refused",
        )
    path = raw_path.split("?", 1)[0] if "?" in raw_path else raw_path
    if "." not in path and "%" not in path and path.isascii():
        return  # no dot segment can hide in it (the common case, checked without decoding)
    # twice: %252e%252e decodes to .. at a lenient upstream; then the overlong UTF-8 forms of
    # ".", "/" and "\\" (%c0%ae...) that lenient decoders still map to them
    raw = path.encode("latin-1", "replace")  # the bytes as received (the front decodes latin-1)
    decoded = _OVERLONG.sub(_shortest, unquote_to_bytes(unquote_to_bytes(raw)))
    for seg in decoded.replace(b"\\", b"/").split(b"/"):
        # "..;x" is ".." to servlet containers (Tomcat strips path parameters before resolving)
        if seg.split(b";", 1)[0] in (b".", b".."):
            raise RefusedRequest(
                "dot segments are not allowed in the path",
                status=400,
                code="path_traversal_refused",
            )


#: overlong (invalid) UTF-8 encodings of the ASCII characters that make up a dot segment
_OVERLONG = re.compile(
    rb"\xc0[\xae\xaf]|\xc1\x9c|\xe0\x80[\xae\xaf]|\xe0\x81\x9c|\xf0\x80\x80[\xae\xaf]|\xf0\x80\x81\x9c"
)


def _shortest(match: re.Match[bytes]) -> bytes:
    """The ASCII character an overlong sequence stands for (its low six bits, plus the bits the
    second-to-last byte holds)."""
    raw = match.group()
    return bytes([((raw[-2] & 0x03) << 6) | (raw[-1] & 0x3F)])


#: response headers never passed on (hop-by-hop), and those too when the answer is re-framed
DROP = frozenset(h.encode() for h in HOP_BY_HOP)
DROP_WITH_LENGTH = DROP | {b"content-length"}


#: Connection tokens that name no other header (they are hop-by-hop themselves)
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b""})
#: what a Connection list cannot make hop-by-hop (see listed_fields)
_NEVER_LISTED = _PLAIN_CONNECTION | {b"content-length"}


class Relocation:
    """Turns an absolute ``Location``/``Content-Location`` that names the upstream (its origin and
    path prefix) into the address the caller used, ``http://<caller's Host>`` + the rest, as
    nginx's ``proxy_redirect default`` does; a client following it comes back through sidecar
    instead of calling the upstream without the token. Other values pass untouched."""

    __slots__ = ("origins", "prefix")

    def __init__(self, upstream: URL) -> None:
        host = upstream.raw_host or ""
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        base = f"{upstream.scheme}://{host}".lower()
        origins = {f"{base}:{upstream.port}"}
        if upstream.is_default_port():
            origins.add(base)
        self.origins = frozenset(o.encode() for o in origins)
        self.prefix = upstream.raw_path.rstrip("/").encode()

    def head(self, head: bytes, request_headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """Header lines (each ending in CRLF) with their Location values pointed back."""
        lines = head.split(b"\r\n")
        for i, line in enumerate(lines):
            name, sep, value = line.partition(b":")
            if sep and name.lower() in _RELOCATED:
                lines[i] = name + b": " + self.apply(value.strip(), request_headers)
        return b"\r\n".join(lines)

    def apply(self, value: bytes, request_headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """``value`` pointed back at the caller, or unchanged."""
        start = value.find(b"://")
        if start < 0:
            return value  # relative: already resolves against the caller's address
        end = len(value)
        for sep in (b"/", b"?", b"#"):
            at = value.find(sep, start + 3)
            if 0 <= at < end:
                end = at
        if value[:end].lower() not in self.origins:
            return value
        rest = value[end:]
        prefix = self.prefix
        if prefix:
            if not rest.startswith(prefix) or rest[len(prefix) : len(prefix) + 1] not in _AFTER:
                return value  # the upstream's origin but outside what sidecar forwards to
            rest = rest[len(prefix) :]
        host = next((v for n, v in request_headers if n.lower() == b"host"), None)
        if not host:
            return value  # no address the caller used to point at
        if not rest.startswith(b"/"):
            rest = b"/" + rest
        return b"http://" + host.strip() + rest


#: what may follow the path prefix in a Location that is under it
_AFTER = frozenset({b"", b"/", b"?", b"#"})
_RELOCATED = frozenset({b"location", b"content-location"})


def response_head(
    raw: list[tuple[bytes, bytes]],
    drop: frozenset[bytes],
    relocation: Relocation | None = None,
    request_headers: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """The upstream's response header lines minus ``drop`` (lower-case names) and minus those the
    upstream's Connection header names (RFC 9110 7.6.1); with ``relocation``, Location values
    naming the upstream point at the caller's Host (from ``request_headers``) instead."""
    lines: list[bytes] = []
    append = lines.append
    listed: set[bytes] | None = None
    relocated = False
    # a name whose length is none of those looked for is passed on without lower-casing it
    sizes = _SIZES.get(drop) or _sizes(drop)
    for field in raw:
        if len(field[0]) in sizes:
            lname = field[0].lower()
            if lname in drop:
                # "keep-alive" and "close" (as nearly every upstream writes them) name no field
                if lname == b"connection" and field[1] not in _PLAIN_CONNECTION:
                    tokens = listed_fields(field[1])
                    if tokens:
                        listed = tokens if listed is None else listed | tokens
                continue
            if lname in _RELOCATED:
                relocated = True
        append(b": ".join(field))
    if listed:
        lines = without_fields(lines, listed)
    lines.append(b"")  # each line ends in CRLF (none at all without a line)
    head = b"\r\n".join(lines)
    if relocated and relocation is not None:
        return relocation.head(head, request_headers)
    return head


#: the lengths of the names response_head lowers and looks up, per set of names dropped (the
#: module's DROP and DROP_WITH_LENGTH in practice)
_SIZES: dict[frozenset[bytes], frozenset[int]] = {}


def _sizes(drop: frozenset[bytes]) -> frozenset[int]:
    sizes = frozenset(len(name) for name in drop | _RELOCATED)
    if len(_SIZES) < 16:
        _SIZES[drop] = sizes
    return sizes


#: RFC 6750 3.1: the upstream says the token itself was refused (expired, revoked, malformed)
_INVALID_TOKEN = re.compile(rb'(?:^|[\s,])error\s*=\s*"?invalid_token"?(?:$|[\s,])', re.IGNORECASE)


def says_invalid_token(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True when a ``WWW-Authenticate`` challenge carries ``error="invalid_token"``."""
    return any(
        n.lower() == b"www-authenticate" and _INVALID_TOKEN.search(v) is not None
        for n, v in headers
    )


class Limited:
    """A chunked body passed through until it grows past ``limit`` bytes, then refused (the
    upstream connection is aborted, so the upstream never takes it for complete)."""

    def __init__(self, body: AsyncIterable[bytes], limit: int) -> None:
        self._chunks = body.__aiter__()
        self._limit = limit
        self._seen = 0

    def __aiter__(self) -> Limited:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._chunks.__anext__()
        self._seen += len(chunk)
        if self._seen > self._limit:
            raise RefusedRequest(
                f"request body larger than {self._limit} bytes", status=413, code="body_too_large"
            )
        return chunk
