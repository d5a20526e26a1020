"""Checks of the header values that may carry ``{{ session.* }}`` placeholders (the ``headers``
section), run when the configuration is validated and reused by the compiled header rules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sidecar.config.json_login import JsonLoginSection, session_names
from sidecar.templates import compile_text, unknown

if TYPE_CHECKING:
    from sidecar.config.identity import Identity
    from sidecar.config.models import Headers


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
