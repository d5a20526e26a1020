"""The ``headers`` section: the headers added to each forwarded request, and the checks of the
values that may carry ``{{ session.* }}`` placeholders (run when the configuration is validated
and reused by the compiled header rules)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from sidecar.config.json_login import JsonLoginSection, session_names
from sidecar.config.sections import Section
from sidecar.field_values import checked
from sidecar.templates import compile_text, unknown

if TYPE_CHECKING:
    from sidecar.config.identity import Identity


class Headers(Section):
    """Headers added to each forwarded request. ``null`` switches a header off."""

    tenant_id: str | None = Field(
        None, description="X-Tenant-ID value, may use {{ session.<field> }} (null: not sent)"
    )
    activity_id: str | None = Field(
        "auto", description="X-Activity-ID: auto (one uuid4 per session), a value, or null"
    )
    correlation_id: str | None = Field(
        "propagate", description="X-Correlation-ID: propagate, generate, a value, or null"
    )
    request_id: Literal["generate", "propagate"] | None = Field(
        "generate", description="X-Request-ID: generate (uuid4 per request), propagate, or null"
    )
    traceparent: Literal["generate", "propagate"] | None = Field(
        "propagate", description="W3C traceparent: propagate (if valid), generate, or null"
    )
    session_id: str | None = Field(
        "auto", description="X-Session-ID: auto (one uuid4 per session), a value, or null"
    )
    static: dict[str, str] = Field(
        default_factory=dict, description="extra headers sent with every request"
    )

    @field_validator("static")
    @classmethod
    def _safe_static(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = {"host", "authorization", "content-length", "transfer-encoding", "connection"}
        for name, header_value in value.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in reserved:
                raise ValueError(f"{name!r} is managed by the sidecar and cannot be set here")
            checked(header_value, f"the value of {name!r}")
        return value

    @field_validator("tenant_id", "activity_id", "correlation_id", "session_id")
    @classmethod
    def _safe_value(cls, value: str | None) -> str | None:
        return None if value is None else checked(value, "the value")


def header_templates(headers: Headers) -> dict[str, str]:
    """The header values that may hold ``{{ session.* }}`` placeholders, by dotted key."""
    fixed = {
        "tenant_id": headers.tenant_id,
        "activity_id": headers.activity_id,
        "correlation_id": headers.correlation_id,
        "session_id": headers.session_id,
    }
    out = {f"headers.{k}": v for k, v in fixed.items() if v is not None}
    out.update({f"headers.static.{k}": v for k, v in headers.static.items()})
    return out


def header_placeholder_problems(headers: Headers, identity: Identity) -> list[str]:
    """Header values may use ``{{ session.<field> }}`` and ``{{ session.access_token }}``; never a
    credential or the refresh token, which stay between the sidecar and the identity provider."""
    allowed = ["session.access_token"]
    if isinstance(identity, JsonLoginSection):
        allowed += [n for n in session_names(identity.response) if n != "session.refresh_token"]
    problems = []
    for key, value in header_templates(headers).items():
        try:
            names = compile_text(value).names
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
            continue
        for name in unknown(names, allowed):
            problems.append(
                f"{key}: unknown placeholder {{{{ {name} }}}} (known here: {', '.join(allowed)})"
            )
    return problems
