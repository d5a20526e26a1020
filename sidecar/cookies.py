"""Cookies kept with the session (the axiomtrade seed's cookie sessions), per RFC 6265.

A jar is an immutable tuple of :class:`Cookie`; :func:`store_cookies` returns a new jar with the
``Set-Cookie`` headers of one answer applied (section 5.3: replacement of the same name, domain and
path keeps the old creation order; an expired cookie deletes its namesake, e.g. ``Max-Age=0``).
Expiry comes from ``Max-Age`` (preferred) or ``Expires``, measured against the ``now`` the caller
reads from the injected clock. :func:`cookie_header` builds the ``Cookie`` header for one request
URL (section 5.4: domain-match, path-match, Secure only over https, not expired; longer paths
first). Deliberately not implemented: the public suffix list (a Domain attribute without a dot is
refused unless it is the host itself) and the SameSite/HttpOnly rules, which concern browsers.

Cookie values are secrets: :class:`Cookie` does not show its value in ``repr``.
"""

from __future__ import annotations

import calendar
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sidecar.field_values import header_value_problem

#: bounds on what an identity provider can make us keep (RFC 6265 6.1 minimums are 4096/50)
MAX_COOKIE_BYTES = 4096
MAX_COOKIES = 50

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True, slots=True)
class Cookie:
    """One stored cookie (RFC 6265 5.3). ``expires_at`` None: lives as long as the session."""

    name: str
    value: str = field(repr=False)
    domain: str
    path: str
    host_only: bool = True
    secure: bool = False
    expires_at: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def key(self) -> tuple[str, str, str]:
        return (self.name, self.domain, self.path)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the session store (holds the value: stores only)."""
        return {
            "name": self.name,
            "value": self.value,
            "domain": self.domain,
            "path": self.path,
            "host_only": self.host_only,
            "secure": self.secure,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cookie:
        """The inverse of :meth:`to_dict`; raises KeyError/TypeError/ValueError on bad data,
        and on a name or value that :func:`cookie_problem` refuses (never quoting the value)."""
        expires = data.get("expires_at")
        name, value = data["name"], data["value"]
        problem = cookie_problem(name, value)
        if problem is not None:
            raise ValueError(f"cookies: {problem}")
        return cls(
            name=name,
            value=value,
            domain=str(data["domain"]),
            path=str(data["path"]),
            host_only=bool(data.get("host_only", True)),
            secure=bool(data.get("secure", False)),
            expires_at=None if expires is None else float(expires),
        )


def cookie_problem(name: object, value: object) -> str | None:
    """What keeps a cookie out of a ``Cookie`` header, or None: the name is an RFC 6265 token,
    the value a header field value (:func:`~sidecar.field_values.header_value_problem`) without
    ``;`` or a tab. Called for each cookie an identity answer sets and each one a store holds."""
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        return "a cookie name is not a token"
    problem = header_value_problem(value)
    if problem is not None:
        return f"the value of cookie {name} {problem}"
    if ";" in str(value) or "\t" in str(value):
        return f"the value of cookie {name} holds a semicolon or a tab"
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def domain_match(host: str, domain: str) -> bool:
    """RFC 6265 5.1.3: identical, or ``host`` ends with ``.domain`` and is not an IP address."""
    return host == domain or (host.endswith("." + domain) and not _is_ip(host))


def path_match(request_path: str, cookie_path: str) -> bool:
    """RFC 6265 5.1.4."""
    if request_path == cookie_path:
        return True
    if not request_path.startswith(cookie_path):
        return False
    return cookie_path.endswith("/") or request_path[len(cookie_path)] == "/"


def default_path(request_path: str) -> str:
    """RFC 6265 5.1.4: the directory of the request path."""
    if not request_path.startswith("/") or request_path.count("/") == 1:
        return "/"
    return request_path[: request_path.rindex("/")]


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DELIMITERS = re.compile(r"[\x09\x20-\x2f\x3b-\x40\x5b-\x60\x7b-\x7e]+")


def parse_cookie_date(text: str) -> float | None:
    """RFC 6265 5.1.1: the lenient cookie-date algorithm; epoch seconds or None."""
    clock: tuple[int, int, int] | None = None
    day = month = year = None
    for token in _DELIMITERS.split(text):
        if not token:
            continue
        hms = re.match(r"(\d{1,2}):(\d{1,2}):(\d{1,2})(?:\D|$)", token)
        if clock is None and hms:
            clock = (int(hms[1]), int(hms[2]), int(hms[3]))
        elif day is None and re.match(r"\d{1,2}(?:\D|$)", token):
            day = int(re.match(r"\d+", token)[0])  # type: ignore[index]
        elif month is None and token[:3].lower() in _MONTHS:
            month = _MONTHS.index(token[:3].lower()) + 1
        elif year is None and re.match(r"\d{2,4}(?:\D|$)", token):
            year = int(re.match(r"\d+", token)[0])  # type: ignore[index]
    if clock is None or day is None or month is None or year is None:
        return None
    if 70 <= year <= 99:
        year += 1900
    elif 0 <= year <= 69:
        year += 2000
    hour, minute, second = clock
    if not (1 <= day <= 31 and year >= 1601 and hour <= 23 and minute <= 59 and second <= 59):
        return None
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))


def parse_set_cookie(header: str, host: str, request_path: str, now: float) -> Cookie | None:
    """One ``Set-Cookie`` header received from ``host`` for ``request_path`` (RFC 6265 5.2/5.3),
    or None when it must be ignored. An already expired result means "delete"."""
    if len(header) > MAX_COOKIE_BYTES:
        return None
    pair, *attributes = header.split(";")
    name, sep, value = pair.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or cookie_problem(name, value) is not None:
        return None
    host = host.lower()
    domain = ""
    path: str | None = None
    secure = False
    max_age: float | None = None
    expires: float | None = None
    for attribute in attributes:
        key, _, arg = attribute.partition("=")
        key, arg = key.strip().lower(), arg.strip()
        if key == "max-age" and re.fullmatch(r"-?\d+", arg):
            delta = int(arg)
            max_age = now + delta if delta > 0 else -1.0  # 0 or less: the earliest time
        elif key == "expires":
            expires = parse_cookie_date(arg)
        elif key == "domain" and arg:
            domain = arg.lstrip(".").lower()
        elif key == "path":
            path = arg if arg.startswith("/") else None
        elif key == "secure":
            secure = True
    if domain:
        if not domain_match(host, domain) or ("." not in domain and domain != host):
            return None  # a cookie for a domain this host does not belong to (RFC 6265 5.3.6)
        host_only = False
    else:
        host_only, domain = True, host
    return Cookie(
        name=name,
        value=value,
        domain=domain,
        path=path or default_path(request_path),
        host_only=host_only,
        secure=secure,
        expires_at=max_age if max_age is not None else expires,
    )


def store_cookies(
    jar: tuple[Cookie, ...], set_cookies: Iterable[str], host: str, request_path: str, now: float
) -> tuple[Cookie, ...]:
    """The jar after one answer's ``Set-Cookie`` headers, without expired cookies."""
    cookies = {c.key(): c for c in jar}
    for header in set_cookies:
        cookie = parse_set_cookie(header, host, request_path, now)
        if cookie is None:
            continue
        if cookie.expired(now):
            cookies.pop(cookie.key(), None)
        else:
            cookies[cookie.key()] = cookie  # an existing key keeps its place (creation order)
    kept = [c for c in cookies.values() if not c.expired(now)]
    return tuple(kept[-MAX_COOKIES:])


def for_origin(cookie: Cookie, scheme: str, host: str) -> bool:
    """RFC 6265 5.4 steps 1.1 and 1.3: the cookie may go to ``scheme://host`` (``host`` in lower
    case): host-only ones to the identical host, others by domain-match; Secure ones over https."""
    if cookie.secure and scheme != "https":
        return False
    return host == cookie.domain if cookie.host_only else domain_match(host, cookie.domain)


def cookie_header(
    jar: tuple[Cookie, ...], scheme: str, host: str, path: str, now: float
) -> str | None:
    """The ``Cookie`` header value for a request to ``scheme://host/path``, or None."""
    host = host.lower()
    chosen = [
        c
        for c in jar
        if for_origin(c, scheme, host) and path_match(path or "/", c.path) and not c.expired(now)
    ]
    if not chosen:
        return None
    chosen.sort(key=lambda c: -len(c.path))  # stable: equal paths keep creation order
    return "; ".join(f"{c.name}={c.value}" for c in chosen)


def merge_cookie_headers(caller: str | None, session: str | None) -> str | None:
    """The caller's ``Cookie`` header merged with the session's: on a name clash the session's
    cookie wins (as the session's Authorization replaces the caller's); the caller's other cookies
    come first, in their order."""
    if not caller:
        return session
    if not session:
        return caller
    ours = {pair.split("=", 1)[0].strip() for pair in session.split(";")}
    theirs = [
        pair.strip()
        for pair in caller.split(";")
        if pair.strip() and pair.split("=", 1)[0].strip() not in ours
    ]
    return "; ".join([*theirs, session])
