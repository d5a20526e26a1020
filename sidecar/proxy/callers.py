"""Who may call the proxy: the Host, Origin and caller-header checks, compiled once from ``listen``.

The proxy trusts whatever can open a connection to it: the service beside it in the pod. A web page
in a developer's browser can open one too, so requests that only a browser makes are refused:

- a ``Host`` that is not a loopback name (``localhost``, ``127.x.x.x``, ``[::1]``, any port) nor in
  ``listen.allowed_hosts`` is 421: after DNS rebinding a page's requests carry its own host name
  (RFC 9110 15.5.20, Misdirected Request); a missing ``Host`` on HTTP/1.1, or two, is 400
  (RFC 9112 3.2);
- a request with ``Origin``, or with ``Sec-Fetch-Site`` other than ``none`` (a user's own
  navigation), is 403 unless the origin is in ``listen.allowed_origins``: browsers add these to
  what pages send (CSRF). A same-origin request without ``Origin`` is judged as coming from
  ``http://<its Host>``;
- with ``listen.require_header``, a request without the exact secret value in that header is 403
  (compared in constant time); the header is removed before forwarding.

Requests over ``listen.unix_socket`` skip the Host check: no browser reaches a Unix socket, and
clients name it in many ways (``localhost``, the percent-encoded path, ``unix``).

The per-request check is a walk over the raw header list comparing a few bytes; what can be
decided in advance is decided in :meth:`CallerPolicy.compile`.
"""

from __future__ import annotations

import hmac
import ipaddress

from sidecar.config.callers import read_caller_secret
from sidecar.config.models import Listen
from sidecar.errors import RefusedRequest
from sidecar.http.exchange import Request

#: Host names that always reach this machine (RFC 6761 6.3, RFC 5735 3, RFC 4291 2.5.3)
LOOPBACK_NAMES = frozenset({b"localhost", b"127.0.0.1", b"[::1]"})
#: Host values found acceptable are remembered (a handful in practice), up to this many
_REMEMBERED = 256
#: longest Host value quoted in a refusal's detail
_QUOTED = 80


class CallerPolicy:
    """The compiled ``listen`` rules for callers; :meth:`check` applies them to one request."""

    __slots__ = (
        "_any_host",
        "_header",
        "_header_name",
        "_hosts",
        "_names",
        "_origins",
        "_secret",
        "_sizes",
    )

    def __init__(
        self,
        names: frozenset[bytes],
        origins: frozenset[bytes],
        *,
        any_host: bool = False,
        header: str | None = None,
        secret: bytes | None = None,
    ) -> None:
        #: acceptable host names (lower case, no port, no trailing dot)
        self._names = names
        #: acceptable Host values as sent (port included), learnt as requests arrive
        self._hosts: set[bytes] = set(names)
        self._any_host = any_host
        self._origins = origins
        #: the required header's name (as configured, and lower case) and its value, or None
        self._header_name = header
        self._header = None if header is None else header.lower().encode("ascii")
        self._secret = secret
        #: lengths of the header names looked at: any other header is passed over at once
        watched = [b"host", b"origin", b"sec-fetch-site"]
        if self._header is not None:
            watched.append(self._header)
        self._sizes = frozenset(len(name) for name in watched)

    @classmethod
    def compile(cls, listen: Listen) -> CallerPolicy:
        """The rules of a ``listen`` section; reads ``require_header.value_file`` now (a
        ConfigError naming the key when it cannot)."""
        hosts = {h.encode("ascii") for h in listen.allowed_hosts}
        header = secret = None
        if listen.require_header is not None:
            header = listen.require_header.name
            secret = read_caller_secret(listen.require_header.value_file)
        return cls(
            LOOPBACK_NAMES | (hosts - {b"*"}),
            frozenset(o.encode("ascii") for o in listen.allowed_origins),
            any_host=b"*" in hosts,
            header=header,
            secret=secret,
        )

    def check(self, request: Request, *, any_host: bool = False) -> None:
        """Refuse (RefusedRequest) a request these rules do not let through; remove the
        required caller header from it. ``any_host``: the request came over the Unix socket."""
        host: bytes | None = None
        hosts = 0
        origin_refused: bytes | None = None
        origin_seen = False
        site: bytes | None = None
        wanted = self._header
        proof: tuple[bytes, bytes] | None = None
        proofs = 0
        headers = request.headers
        sizes = self._sizes
        for field in headers:
            name = field[0]
            if len(name) not in sizes:
                continue  # most headers: one length lookup
            lname = name.lower()
            if lname == b"host":
                host = field[1]
                hosts += 1
            elif lname == b"origin":
                origin_seen = True
                if field[1].lower() not in self._origins:
                    origin_refused = field[1]
            elif lname == b"sec-fetch-site":
                site = field[1]
            elif lname == wanted:
                proof = field
                proofs += 1
        if hosts > 1:
            raise RefusedRequest("more than one Host header", status=400, code="host_invalid")
        if host is None:
            if request.version != "1.0":
                raise RefusedRequest(
                    "an HTTP/1.1 request needs a Host header", status=400, code="host_missing"
                )
        elif not (any_host or self._any_host or self.host_allowed(host)):
            raise RefusedRequest(
                f"Host {_quote(host)} is not a loopback name nor in listen.allowed_hosts (a web "
                "page that rebound its own name to this address sends its name)",
                status=421,
                code="host_not_allowed",
            )
        if origin_refused is not None:
            raise RefusedRequest(
                f"requests from origin {_quote(origin_refused)} are refused: a browser sent it "
                "(listen.allowed_origins lists the origins accepted)",
                status=403,
                code="origin_not_allowed",
            )
        if not origin_seen and site is not None and self._cross(site, host):
            raise RefusedRequest(
                f"a browser request (Sec-Fetch-Site: {_quote(site)}) from an origin not in "
                "listen.allowed_origins",
                status=403,
                code="origin_not_allowed",
            )
        if wanted is not None:
            # one value only: a second could pass a check made on the other
            secret = self._secret or b""
            if proof is None or proofs != 1 or not hmac.compare_digest(proof[1], secret):
                raise RefusedRequest(
                    f"this proxy needs its caller header ({self._header_name}) with the "
                    "expected value",
                    status=403,
                    code="caller_not_authenticated",
                )
            headers.remove(proof)  # never forwarded: the upstream has no use for the secret

    def host_allowed(self, value: bytes) -> bool:
        """A Host value (``name[:port]``) names this machine or an allowed host."""
        text = value.lower()
        if text in self._hosts:
            return True
        if text.startswith(b"["):
            end = text.find(b"]") + 1
            name, port = text[:end], text[end:]
        else:
            name, colon, digits = text.partition(b":")
            port = colon + digits
        if port and not (
            port[:1] == b":" and len(port) <= 6 and (port[1:].isdigit() or port == b":")
        ):
            return False
        if name.endswith(b"."):
            name = name[:-1]  # the fully qualified form of the same name
        ok = name in self._names or _is_loopback_address(name)
        if ok and len(self._hosts) < _REMEMBERED:
            self._hosts.add(text)
        return ok

    def _cross(self, site: bytes, host: bytes | None) -> bool:
        """A request a browser made for a page (not the user's own navigation) from an origin
        not listed; without ``Origin``, a same-origin one comes from ``http://<Host>``."""
        site = site.strip().lower()
        if site == b"none":
            return False
        if site == b"same-origin" and host is not None:
            return b"http://" + host.lower() not in self._origins
        return True


def _is_loopback_address(name: bytes) -> bool:
    """``name`` is an IPv4 address in 127.0.0.0/8 (dotted quad) or a bracketed IPv6 loopback."""
    if name.startswith(b"127."):
        try:
            return ipaddress.IPv4Address(name.decode("ascii")).is_loopback
        except ValueError:
            return False
    if name.startswith(b"[") and name.endswith(b"]"):
        try:
            return ipaddress.IPv6Address(name[1:-1].decode("ascii")).is_loopback
        except ValueError:
            return False
    return False


def _quote(value: bytes) -> str:
    """A caller-supplied value for a refusal's detail: bounded, non-ASCII escaped."""
    text = value[:_QUOTED].decode("ascii", "backslashreplace")
    return repr(text + ("..." if len(value) > _QUOTED else ""))
