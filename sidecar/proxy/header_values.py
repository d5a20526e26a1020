"""Header parts that come from the session: ``{{ session.* }}`` values and the session's cookies.

Both are worked out once per credentials snapshot (a new token, fields or cookie jar is a new
:class:`~sidecar.session.manager.Credentials` object), never per request: the per-request work is
one identity comparison, plus a path-match over the few cookies kept for the upstream's host.

* :class:`SessionValues` renders the header templates (``tenant_id: "{{ session.tenant_id }}"``)
  with ``session.access_token`` and the session's fields. A value that cannot be rendered (a field
  the session lacks) or cannot go into a header (:func:`~sidecar.field_values.checked`) leaves
  that header out, logged once per snapshot as ``headers.value_unavailable`` (the key is named,
  the value never).
* :class:`CookieCapture` takes the upstream's ``Set-Cookie`` answers into the session's jar for
  ``upstream.capture_cookies: true`` (the session makes a new snapshot when the jar changes).
* :class:`SessionCookies` builds the ``Cookie`` header for ``upstream.send_cookies: true``: the
  session's cookies that match the upstream URL (RFC 6265 5.4), merged with the caller's own
  ``Cookie`` header (the session's cookie wins on a name clash; see
  :func:`~sidecar.cookies.merge_cookie_headers`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from yarl import URL

from sidecar.clock import Clock
from sidecar.cookies import Cookie, cookie_header, for_origin, merge_cookie_headers
from sidecar.field_values import checked
from sidecar.templates import MissingValue, Text, compile_text

if TYPE_CHECKING:
    from sidecar.tokens import Credentials

log = logging.getLogger("sidecar.proxy")


def templated(values: Mapping[str, str]) -> dict[str, Text]:
    """The entries of ``values`` (key → header value) that hold placeholders, compiled."""
    compiled = {key: compile_text(value) for key, value in values.items()}
    return {key: text for key, text in compiled.items() if not text.is_constant}


class SessionValues:
    """Header values rendered from the session, once per credentials snapshot."""

    __slots__ = ("_for", "_templates", "_values")

    def __init__(self, templates: Mapping[str, Text]) -> None:
        self._templates = dict(templates)
        self._for: Credentials | None = None
        self._values: dict[str, str | None] = {}

    def has(self, key: str) -> bool:
        """True when the header value at ``key`` holds placeholders."""
        return key in self._templates

    def get(self, key: str, creds: Credentials) -> str | None:
        """The rendered value of ``key`` for ``creds`` (None: leave the header out)."""
        if creds is not self._for:
            self._render(creds)
        return self._values[key]

    def _render(self, creds: Credentials) -> None:
        token = creds.token
        values = {"session": {**token.fields, "access_token": token.access_token}}
        rendered: dict[str, str | None] = {}
        for key, text in self._templates.items():
            try:
                value = checked(text.render(values), key)
            except (MissingValue, ValueError) as exc:
                log.warning(
                    "headers.value_unavailable",
                    extra={"key": key, "why": type(exc).__name__, "session_id": creds.session_id},
                )
                rendered[key] = None
            else:
                rendered[key] = value
        self._values = rendered
        self._for = creds


class SessionCookies:
    """The ``Cookie`` header toward the upstream, from the session's cookie jar.

    Per snapshot the jar is cut down to the cookies for the upstream's scheme and host; the
    header for each request path is then remembered (up to :data:`PATH_CACHE` paths) until the
    first of those cookies expires, so a steady stream of requests costs a dict lookup.
    """

    __slots__ = ("_by_path", "_clock", "_for", "_host", "_kept", "_scheme", "_until")

    def __init__(self, upstream_url: str, clock: Clock) -> None:
        url = URL(upstream_url)
        self._scheme = url.scheme
        self._host = (url.host or "").lower()
        self._clock = clock
        self._for: Credentials | None = None
        self._kept: tuple[Cookie, ...] = ()
        self._by_path: dict[str, str | None] = {}
        self._until = 0.0

    def header(self, caller: str | None, creds: Credentials, path: str) -> str | None:
        """The merged Cookie header for a request to ``path`` (None: send none)."""
        now = self._clock.time()
        if creds is not self._for or now >= self._until:
            self._select(creds, now)
        if not self._kept:
            return caller
        ours = self._by_path.get(path, _UNSET)
        if ours is _UNSET:
            ours = cookie_header(self._kept, self._scheme, self._host, path, now)
            if len(self._by_path) >= PATH_CACHE:
                self._by_path.clear()
            self._by_path[path] = ours
        return merge_cookie_headers(caller, ours)

    def _select(self, creds: Credentials, now: float) -> None:
        self._kept = tuple(
            c
            for c in creds.token.cookies
            if for_origin(c, self._scheme, self._host) and not c.expired(now)
        )
        expiries = [c.expires_at for c in self._kept if c.expires_at is not None]
        self._until = min(expiries, default=math.inf)
        self._by_path = {}
        self._for = creds


#: request paths whose Cookie header is remembered per snapshot
PATH_CACHE = 256
_UNSET: Any = object()


class CookieCapture:
    """``upstream.capture_cookies``: hands each upstream answer's ``Set-Cookie`` values, with the
    upstream's host and the request's path (RFC 6265 5.3 needs both), to ``keep`` (the session's
    ``capture_cookies``). An answer without one costs a scan of its header names."""

    __slots__ = ("_host", "_keep")

    def __init__(self, upstream_url: str, keep: Callable[[Sequence[str], str, str], None]) -> None:
        self._host = (URL(upstream_url).host or "").lower()
        self._keep = keep

    def __call__(self, headers: Sequence[tuple[bytes, bytes]], target: str) -> None:
        """One answer's raw ``headers`` to a request for ``target`` (path and query)."""
        found = [v.decode("latin-1") for n, v in headers if n.lower() == b"set-cookie"]
        if found:
            self._keep(found, self._host, target.split("?", 1)[0])
