"""Configuration of who may call the proxy (``listen.allowed_hosts``, ``allowed_origins``,
``require_header``): the entries' checks and their normal forms, and the caller secret's file.

The fields live on :class:`sidecar.config.models.Listen`; :mod:`sidecar.proxy.callers` compiles
them into the per-request check. Entries are kept in the form the check compares with: lower case,
a host without its trailing dot, an origin without a default port.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sidecar.errors import ConfigError

#: a header name (RFC 9110 5.1: a token)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: a DNS name or IPv4 address as a Host carries it (letters, digits, dots, hyphens, underscores)
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
#: what a caller secret may hold: visible ASCII (a header value that needs no quoting)
_VISIBLE = re.compile(r"[\x21-\x7e]+")
#: the key named in every problem with the caller secret's file
VALUE_FILE_KEY = "listen.require_header.value_file"
#: default ports, left out of an origin as browsers leave them out of ``Origin``
_DEFAULT_PORTS = {"http": "80", "https": "443"}
#: headers a caller may not be asked to send: sidecar or HTTP itself gives them their meaning
_RESERVED = frozenset(
    {"host", "authorization", "content-length", "transfer-encoding", "connection", "origin"}
)


def host_entry(entry: str) -> str:
    """An ``allowed_hosts`` entry in normal form: a host name, IPv4 address or bracketed IPv6
    address without port (any port matches), lower case, no trailing dot; or ``*`` (any Host)."""
    text = entry.strip().lower()
    if text == "*":
        return text
    if text.startswith("["):
        try:
            ipaddress.IPv6Address(text.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise ValueError(f"{entry!r} is not a bracketed IPv6 address") from None
        if not text.endswith("]"):
            raise ValueError(f"{entry!r}: give the host without a port (any port matches)")
        return text
    if ":" in text:
        raise ValueError(
            f"{entry!r}: give the host without a port (any port matches); IPv6 in brackets"
        )
    text = text.removesuffix(".")
    if not _NAME.fullmatch(text):
        raise ValueError(f"{entry!r} is not a host name or address")
    return text


def origin_entry(entry: str) -> str:
    """An ``allowed_origins`` entry in normal form: ``scheme://host[:port]`` in lower case,
    without a default port (as browsers send ``Origin``), or ``null``."""
    text = entry.strip().lower()
    if text == "null":
        return text
    if not text.isascii() or any(c.isspace() or c in "/?#" for c in text.partition("://")[2]):
        raise ValueError(
            f"{entry!r} is not an origin: scheme://host[:port] without a path, the host in "
            "ASCII (punycode), as the browser sends it in the Origin header"
        )
    scheme, sep, authority = text.partition("://")
    if not sep or scheme not in ("http", "https") or not authority:
        raise ValueError(
            f"{entry!r} is not an origin: scheme://host[:port] (http or https, no path), as the "
            "browser sends it in the Origin header"
        )
    host, colon, port = authority.rpartition(":")
    if colon and (host.endswith("]") or ":" not in host) and port == _DEFAULT_PORTS[scheme]:
        authority = host
    return f"{scheme}://{authority}"


class CallerHeader(BaseModel):
    """A header every caller must send with a shared secret value (403 without it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        "X-Sidecar-Caller", description="the header's name; it is removed before forwarding"
    )
    value_file: Path = Field(
        description="file holding the expected value, read at start and at every SIGHUP"
    )

    @field_validator("name")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _TOKEN.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid header name")
        if value.lower() in _RESERVED:
            raise ValueError(f"{value!r} already has a meaning in HTTP or to sidecar")
        return value


def read_caller_secret(path: Path) -> bytes:
    """The caller secret held by ``path`` (surrounding whitespace removed); a ConfigError naming
    ``listen.require_header.value_file`` when it cannot be read or could not be sent as a header
    value. The message never quotes the file's content."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise ConfigError(f"{VALUE_FILE_KEY}: cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{VALUE_FILE_KEY}: {path} is not ASCII text") from None
    if not text:
        raise ConfigError(f"{VALUE_FILE_KEY}: {path} is empty")
    if not _VISIBLE.fullmatch(text):
        raise ConfigError(
            f"{VALUE_FILE_KEY}: {path} holds spaces or control characters; a header value "
            "without them is needed"
        )
    return text.encode("ascii")
