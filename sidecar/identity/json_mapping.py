"""Reading a vendor's JSON login/refresh answer into a :class:`~sidecar.tokens.Token`.

``identity.response`` names, as dotted paths (``data.session.token``; a numeric segment indexes a
list), where the answer keeps the access token, the refresh token, the lifetime (``expires_in``
seconds, or ``expires_at`` epoch seconds, else the JWT's ``exp``) and the extra session fields.

Contract of :func:`parse_session`:

* a login answer must hold the access token and every configured field; a refresh answer must hold
  the access token, and fields it lacks keep their previous values;
* the newest refresh token always replaces the old one; an answer without one keeps the old one;
* every failure is :class:`~sidecar.errors.IdentityUnavailable` with a ``reason`` for the metrics
  label (``missing_access_token``, ``missing_field``, ``malformed_response``), and a message that
  names the configured key and path, never a value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sidecar.config.json_login import JsonResponse
from sidecar.cookies import Cookie
from sidecar.errors import IdentityUnavailable
from sidecar.field_values import header_value_problem
from sidecar.tokens import Token, token_expiry

_MISSING = object()


def lookup(body: Any, path: str) -> Any:
    """The value at dotted ``path`` in ``body``, or a sentinel when any step is missing."""
    node = body
    for step in path.split("."):
        if isinstance(node, Mapping) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            return _MISSING
    return node


def _fail(message: str, reason: str) -> IdentityUnavailable:
    return IdentityUnavailable(f"identity answer unusable: {message}", reason=reason)


def _text(value: Any) -> str | None:
    """A scalar as text (numbers as JSON writes them), or None for null/objects/lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return str(value)
    if isinstance(value, str):
        return value
    return None


def parse_session(
    body: Any,
    response: JsonResponse,
    now: float,
    *,
    previous: Token | None,
    cookies: tuple[Cookie, ...],
    call: str,
    skew: float | None = None,
) -> Token:
    """Build the session's new Token from a decoded answer (``call`` is "login" or "refresh"),
    asked for at ``now``; ``skew`` (provider minus local) corrects an absolute expiry."""
    if not isinstance(body, Mapping):
        raise _fail(f"the {call} answer is not a JSON object", "malformed_response")
    access = lookup(body, response.access_token)
    if access is _MISSING or access is None:
        raise _fail(
            f"response.access_token: no value at {response.access_token!r} in the {call} answer",
            "missing_access_token",
        )
    problem = header_value_problem(access, bearer=True)
    if problem is not None:
        raise _fail(
            f"response.access_token: the value at {response.access_token!r} {problem}",
            "malformed_response",
        )
    refresh = previous.refresh_token if previous is not None else None
    if response.refresh_token is not None:
        found = lookup(body, response.refresh_token)
        if isinstance(found, str) and found:
            # a refresh call may send it in a header ({{ session.refresh_token }})
            if (problem := header_value_problem(found)) is not None:
                raise _fail(
                    f"response.refresh_token: the value at {response.refresh_token!r} {problem}",
                    "malformed_response",
                )
            refresh = found  # rotation: the newest always replaces the old
        elif found is not _MISSING and found is not None:
            raise _fail(
                f"response.refresh_token: the value at {response.refresh_token!r} is not a string",
                "malformed_response",
            )
    fields = dict(previous.fields) if previous is not None else {}
    for name, path in response.fields.items():
        value = _text(lookup(body, path))
        if value is None:
            if previous is None:
                raise _fail(
                    f"response.fields.{name}: no value at {path!r} in the {call} answer",
                    "missing_field",
                )
            continue
        if (problem := header_value_problem(value)) is not None:
            raise _fail(f"response.fields.{name}: the value {problem}", "malformed_response")
        fields[name] = value
    expires_at = token_expiry(
        access,
        now,
        expires_in=_number_at(body, response.expires_in),
        expires_at=_number_at(body, response.expires_at),
        skew=skew,
    )
    return Token(
        access_token=access,
        refresh_token=refresh,
        expires_at=expires_at,
        obtained_at=now,
        fields=fields,
        cookies=cookies,
    )


def _number_at(body: Any, path: str | None) -> Any:
    """The value at ``path`` when configured and present (absent: the next source decides)."""
    if path is None:
        return None
    value = lookup(body, path)
    return None if value is _MISSING else value
