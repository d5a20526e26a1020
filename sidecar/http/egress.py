"""Leaving through a forward proxy: ``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY``, read once at
start as every other HTTP client in the user's cluster reads them.

Both legs honour them: the identity calls (aiohttp is given the proxy per request) and the
upstream pool, which opens each connection as a ``CONNECT`` tunnel through the proxy and then
speaks TLS (or plain HTTP) inside it, so the proxy sees the upstream's host and port and nothing
else of an HTTPS exchange. A plain-HTTP upstream is tunnelled the same way rather than sent to the
proxy in absolute form: one code path, and the token is never written into a request line the
proxy would log.

Rules, as curl and Go's ``httpproxy`` apply them: the lower-case variable wins over the
upper-case one; ``NO_PROXY`` is a comma-separated list of host names, domain suffixes (``.corp``
or ``corp``), addresses, networks (``10.0.0.0/8``) and ``*`` (everything), each optionally with
``:port``. Only ``http://``
proxies are supported; ``user:password@`` in the proxy URL is sent as ``Proxy-Authorization:
Basic`` and never logged.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from yarl import URL

from sidecar.errors import ConfigError, UpstreamUnavailable

#: the proxy's answer to CONNECT must fit in this many bytes
MAX_CONNECT_ANSWER = 8192


@dataclass(frozen=True)
class ForwardProxy:
    """One forward proxy: where it listens and the credentials it wants (if any)."""

    host: str
    port: int
    #: the ``Proxy-Authorization`` value, or empty
    authorization: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        """The proxy's URL without credentials (what aiohttp connects to, and what is logged)."""
        return str(URL.build(scheme="http", host=self.host, port=self.port))

    def connect_request(self, host: str, port: int) -> bytes:
        """The CONNECT request head for ``host:port`` (RFC 9110 9.3.6)."""
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        auth = f"Proxy-Authorization: {self.authorization}\r\n" if self.authorization else ""
        return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n".encode("idna")

    async def open_tunnel(self, host: str, port: int) -> socket.socket:
        """A connected socket through which bytes reach ``host:port``.

        Raises :class:`UpstreamUnavailable` when the proxy cannot be reached or refuses; the
        caller bounds the time (the upstream's connect timeout covers the whole tunnel).
        """
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise UpstreamUnavailable(f"egress proxy {self.url} not found: {exc}") from exc
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, self.connect_request(host, port))
            answer = await _read_answer(loop, sock)
        except OSError as exc:
            sock.close()
            raise UpstreamUnavailable(
                f"egress proxy {self.url} failed: {exc.strerror or type(exc).__name__}"
            ) from exc
        except BaseException:
            sock.close()
            raise
        status_line = answer.split(b"\r\n", 1)[0]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].startswith(b"2"):
            sock.close()
            shown = status_line[:100].decode("latin-1", "replace")
            raise UpstreamUnavailable(
                f"egress proxy {self.url} refused the tunnel to {host}:{port}: {shown!r}"
            )
        return sock


async def _read_answer(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The proxy's answer head, read byte-exact up to its blank line (the tunnel's first bytes
    after it belong to the upstream, so nothing past it may be consumed)."""
    data = b""
    while not data.endswith(b"\r\n\r\n"):
        if len(data) >= MAX_CONNECT_ANSWER:
            raise ConnectionError("answer to CONNECT too long")
        byte = await loop.sock_recv(sock, 1)
        if not byte:
            raise ConnectionResetError("proxy closed the connection")
        data += byte
    return data


class Egress:
    """The proxy settings of the environment: which forward proxy (if any) a URL goes through."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._proxies: dict[str, ForwardProxy] = {}
        for scheme in ("https", "http"):
            name, value = _variable(environ, f"{scheme}_proxy")
            if value:
                self._proxies[scheme] = _parse(name, value)
        self._no_proxy = _no_proxy_entries(_variable(environ, "no_proxy")[1])

    def __bool__(self) -> bool:
        return bool(self._proxies)

    def proxy_for(self, url: str | URL) -> ForwardProxy | None:
        """The forward proxy for ``url``, or None to connect directly."""
        target = URL(url) if isinstance(url, str) else url
        proxy = self._proxies.get(target.scheme or "")
        if proxy is None or self._bypassed(target):
            return None
        return proxy

    def _bypassed(self, url: URL) -> bool:
        host = (url.raw_host or "").lower().rstrip(".")
        return any(_matches(entry, host, url.port) for entry in self._no_proxy)


def _no_proxy_entries(value: str) -> tuple[str, ...]:
    return tuple(e.strip().lower() for e in value.split(",") if e.strip())


def _matches(entry: str, host: str, port: int | None) -> bool:
    """One NO_PROXY entry against a host: ``*``; a name or a domain suffix (``corp``, ``.corp``);
    an address or a network (``10.0.0.0/8``, ``::1``); each optionally with ``:port``."""
    if entry == "*":
        return True
    name, _, wanted = entry.rpartition(":") if _has_port(entry) else (entry, "", "")
    if wanted and str(port) != wanted:
        return False
    name = name.strip("[]").rstrip(".")
    try:
        network = ipaddress.ip_network(name, strict=False)
    except ValueError:
        suffix = name.lstrip(".")
        return host == suffix or host.endswith("." + suffix)
    try:
        return ipaddress.ip_address(host.strip("[]")) in network
    except ValueError:
        return False


def _has_port(entry: str) -> bool:
    """``host:port`` or ``[v6]:port``, but not a bare IPv6 address."""
    if entry.startswith("["):
        return "]:" in entry
    return entry.count(":") == 1


def _variable(environ: Mapping[str, str], lower: str) -> tuple[str, str]:
    """The variable's name and value, the lower-case spelling first (as curl reads them)."""
    for name in (lower, lower.upper()):
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return lower.upper(), ""


def _parse(name: str, value: str) -> ForwardProxy:
    """A proxy URL from the environment; ``host:port`` alone means ``http://host:port``."""
    url = URL(value if "://" in value else f"http://{value}")
    if url.scheme != "http" or not url.raw_host:
        raise ConfigError(
            f"{name}: only http:// forward proxies are supported (got scheme {url.scheme!r})"
        )
    authorization = ""
    if url.user is not None:
        pair = f"{url.user}:{url.password or ''}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    return ForwardProxy(url.raw_host, url.port or 80, authorization)
