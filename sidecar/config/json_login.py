"""Configuration of ``identity.kind: json_login``: vendor JSON session APIs (the FinHub seed).

:class:`JsonLoginSection` is ``identity`` of that kind, with its ``login``, ``refresh``,
``logout`` and ``response`` sub-sections; :func:`json_login_problems` checks it and returns one
``"dotted.key: message"`` line per problem (the loader prefixes ``identity.``).

Placeholders (see :mod:`sidecar.templates`) allowed in each call:

* ``login``: ``{{ credentials.<name> }}`` (there is no session yet);
* ``refresh`` and ``logout``: the same, plus ``{{ session.access_token }}``,
  ``{{ session.refresh_token }}`` and ``{{ session.<field> }}`` for each ``response.fields`` name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from yarl import URL

from sidecar.config.sections import KIND, TokenChecks, Validate
from sidecar.field_values import checked
from sidecar.secrets import SecretSource, both_given
from sidecar.templates import compile_text, names_by_key, unknown

_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: session values every json_login session has, besides the configured fields
SESSION_TOKENS = ("access_token", "refresh_token")
#: answers to a refresh call that mean "this refresh token is dead: log in again"
DEFAULT_REJECTED_STATUS = (400, 401, 403)


class _Section(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", serialize_by_alias=True, validate_by_name=False
    )


def _http_url(value: str) -> str:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    return value


class JsonCall(_Section):
    """One identity call: a JSON request to ``url`` (backup URLs tried in order on failure)."""

    url: str = Field(description="the endpoint of the call")
    method: Literal["POST", "PUT", "PATCH", "GET", "DELETE"] = Field(
        "POST", description="HTTP method of the call"
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="request headers; values may use placeholders (login: {{ credentials.* }}; "
        "refresh, logout: also {{ session.* }}). X-Request-ID (uuid4) is always added",
    )
    body: Any = Field(
        None,
        alias="json",
        description="the JSON body template; string values may use the placeholders headers may "
        "(null: no body)",
    )
    backup_urls: list[str] = Field(
        default_factory=list,
        description="tried in order when the one before is unreachable, times out or answers 5xx",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("backup_urls")
    @classmethod
    def _backups(cls, value: list[str]) -> list[str]:
        return [_http_url(v) for v in value]

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid header name")
            checked(text, f"the value of {name!r}")
        return value

    @property
    def urls(self) -> tuple[str, ...]:
        """The primary URL, then the backups."""
        return (self.url, *self.backup_urls)

    def placeholders(self) -> dict[str, frozenset[str]]:
        """Placeholder names per dotted sub-key (``headers.X``, ``json.a.b``); raises ValueError
        for a malformed placeholder."""
        found = {}
        for name, value in self.headers.items():
            try:
                found[f"headers.{name}"] = compile_text(value).names
            except ValueError as exc:
                raise ValueError(f"headers.{name}: {exc}") from None
        found.update(names_by_key(self.body, "json"))
        return found


class JsonRefreshCall(JsonCall):
    """The refresh call: as any call, plus which answers mean the refresh token was rejected."""

    rejected_status: list[int] = Field(
        default_factory=lambda: list(DEFAULT_REJECTED_STATUS),
        description="statuses of a refresh answer meaning 'refresh token rejected': log in again "
        "(as for OAuth2 invalid_grant); other 4xx are retried with backoff",
    )

    @field_validator("rejected_status")
    @classmethod
    def _client_errors(cls, value: list[int]) -> list[int]:
        if any(not 400 <= s < 500 or s in (408, 429) for s in value):
            raise ValueError("only 4xx statuses other than 408 and 429 can mean 'rejected'")
        return value


class JsonResponse(_Section):
    """Where the login/refresh answer keeps things, as dotted paths into its JSON."""

    access_token: str = Field(
        "access_token",
        description="dotted path of the access token in the answer",
    )
    refresh_token: str | None = Field(
        "refresh_token",
        description="dotted path of the refresh token; a new one replaces the old (rotation), "
        "an answer without one keeps the old",
    )
    expires_in: str | None = Field(
        None,
        description="dotted path of the lifetime in seconds (or expires_at; with neither, the "
        "JWT's exp)",
    )
    expires_at: str | None = Field(
        None, description="dotted path of the expiry in epoch seconds (or expires_in)"
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="{name: path}: extra session fields, usable as {{ session.<name> }} in calls "
        "and headers",
    )

    @field_validator("fields")
    @classmethod
    def _field_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _NAME.fullmatch(name):
                raise ValueError(f"{name!r}: field names are lower-case identifiers")
            if name in SESSION_TOKENS:
                raise ValueError(f"{name!r} is reserved for the token itself")
        return value


class JsonLoginSection(TokenChecks):
    """``identity`` of kind json_login: credentials and the JSON calls that use them."""

    kind: Literal["json_login"] = Field("json_login", description=KIND)
    credentials: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="{name: value} or {name_file: path} (re-read at every login), used as "
        "{{ credentials.name }}",
    )
    login: JsonCall | None = Field(None, description="the login call (required)")
    refresh: JsonRefreshCall | None = Field(
        None, description="the refresh call (without one, a session is renewed by a login)"
    )
    logout: JsonCall | None = Field(
        None, description="the logout call (POST /session/logout, logout_on_shutdown)"
    )
    response: JsonResponse = Field(
        JsonResponse(), description="where the login and refresh answers keep things"
    )

    def problems(self) -> list[str]:
        """The calls, credentials and answer paths (:func:`json_login_problems`) and what
        ``validate`` needs under this kind."""
        calls = {"login": self.login, "refresh": self.refresh, "logout": self.logout}
        return [
            *super().problems(),
            *json_login_problems(self.credentials, calls, self.response),
            *json_login_validate_problems(self.validate_token, self.jwks_url),
        ]

    def credential_sources(self) -> dict[str, SecretSource]:
        """``{name: where its value comes from}`` for every credential."""
        sources = {}
        for key, value in self.credentials.items():
            name = key.removesuffix("_file")
            where = f"identity.credentials.{name}"
            if key.endswith("_file"):
                sources[name] = SecretSource(where, file=Path(value.get_secret_value()))
            else:
                sources.setdefault(name, SecretSource(where, value=value.get_secret_value()))
        return sources


def credential_names(credentials: Mapping[str, SecretStr]) -> list[str]:
    """The credential names, with ``<name>_file`` entries under ``<name>``."""
    return sorted({k.removesuffix("_file") for k in credentials})


def session_names(response: JsonResponse) -> list[str]:
    """Every ``session.*`` name a json_login session has."""
    return [f"session.{n}" for n in (*SESSION_TOKENS, *response.fields)]


def json_login_problems(
    credentials: Mapping[str, SecretStr],
    calls: Mapping[str, JsonCall | None],
    response: JsonResponse,
) -> list[str]:
    """Every problem of a json_login identity section, one ``key: message`` line each."""
    problems = []
    for key in credentials:
        name = key.removesuffix("_file")
        if not _NAME.fullmatch(name):
            problems.append(f"credentials.{key}: names are lower-case identifiers")
        elif key.endswith("_file") and name in credentials:
            problems.append(both_given(f"credentials.{name}"))
    if calls.get("login") is None:
        problems.append("login: required for kind json_login")
    if response.expires_in is not None and response.expires_at is not None:
        problems.append("response.expires_in: give expires_in or expires_at, not both")
    creds = [f"credentials.{n}" for n in credential_names(credentials)]
    for call_name, call in calls.items():
        if call is None:
            continue
        allowed = creds if call_name == "login" else [*creds, *session_names(response)]
        problems.extend(_placeholder_problems(call_name, call, allowed))
    return problems


def json_login_validate_problems(validate: Validate, jwks_url: str | None) -> list[str]:
    """``validate`` under json_login: the keys its checks need (there is no discovery, so no
    issuer to take the JWKS, ``iss`` and ``aud`` from)."""
    if not validate.enabled:
        return []
    problems = []
    if not jwks_url:
        problems.append("jwks_url: required when validate is enabled (kind json_login)")
    if not validate.issuer:
        problems.append("validate.issuer: required when validate is enabled (kind json_login)")
    if not validate.audience:
        problems.append("validate.audience: required when validate is enabled (kind json_login)")
    return problems


def _placeholder_problems(call_name: str, call: JsonCall, allowed: Iterable[str]) -> list[str]:
    try:
        found = call.placeholders()
    except ValueError as exc:
        return [f"{call_name}.{exc}"]
    problems = []
    for where, names in found.items():
        for name in unknown(names, allowed):
            problems.append(
                f"{call_name}.{where}: unknown placeholder {{{{ {name} }}}} "
                f"(known here: {', '.join(sorted(allowed)) or 'none'})"
            )
    return problems
