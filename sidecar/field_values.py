"""What may go into a header sidecar writes: one check, called on every path a value enters by.

sidecar writes values it did not make into request heads: the access token, the session's fields
(``{{ session.* }}`` header templates), the session's cookies, configured header values. Each comes
in by one of three paths, and each path calls :func:`header_value_problem` before the value is kept:

* the identity provider's answer (:func:`sidecar.tokens.parse_token_response` for oauth2 and the
  demo, :func:`sidecar.identity.json_mapping.parse_session` for json_login, and
  :func:`sidecar.cookies.parse_set_cookie` for its cookies);
* the session store (:meth:`sidecar.tokens.Token.from_dict` and
  :meth:`sidecar.cookies.Cookie.from_dict`, the one reader of the file and Redis stores, of the
  shared-session watcher's peer records and of a worker's copy of the credentials): a record that
  fails is unreadable, never installed;
* the configuration (``headers.*`` values, json_login call headers), checked when it is loaded.

The rendered result of a header template is checked once more (:mod:`sidecar.proxy.header_values`).
Refusals name what is wrong, never the value: it may be a secret, and it may be an attack.
"""

from __future__ import annotations

import re

# RFC 9110 5.5: a field value is visible characters, spaces and tabs. obs-text (bytes 0x80-0xFF)
# is left out on purpose: the proxy writes heads as Latin-1 and receivers disagree about it.
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
# RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

FIELD_VALUE_RULE = "only visible ASCII, spaces and tabs may go into a header (RFC 9110 5.5)"
BEARER_RULE = (
    "a Bearer token is letters, digits and - . _ ~ + / with = padding at the end (RFC 6750 2.1)"
)


def header_value_problem(value: object, *, bearer: bool = False) -> str | None:
    """None when ``value`` may go into a header sidecar writes; else what is wrong with it, in
    words that never quote it. ``bearer``: the value follows ``Bearer`` in Authorization, and must
    be an RFC 6750 b64token."""
    if not isinstance(value, str):
        return "is not text"
    if bearer:
        if _B64TOKEN.fullmatch(value):
            return None
        rule = BEARER_RULE
    elif _FIELD_VALUE.fullmatch(value) is None:
        rule = FIELD_VALUE_RULE
    else:
        return None
    if "\r" in value or "\n" in value:
        return f"holds a line break, not allowed in a header: {rule}"
    return f"holds a character not allowed in a header: {rule}"


def checked(value: object, what: str, *, bearer: bool = False) -> str:
    """``value`` when :func:`header_value_problem` finds nothing wrong; else ValueError naming
    ``what`` (never the value)."""
    problem = header_value_problem(value, bearer=bearer)
    if problem is not None or not isinstance(value, str):
        raise ValueError(f"{what} {problem or 'is not text'}")
    return value
