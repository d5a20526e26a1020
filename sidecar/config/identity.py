"""The ``identity`` section: one model per kind, told apart by ``kind``.

A key belongs to the kinds whose model has it: ``login`` under ``kind: oauth2`` is refused as an
unknown key of that kind (the loader names the kind it belongs to, :func:`kinds_with`), rather
than checked by hand. Without ``kind`` the section is the demo's, as long as it holds no key the
demo does not take.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from sidecar.config.json_login import JsonLoginSection
from sidecar.config.oauth2 import OAuth2Section
from sidecar.config.sections import KIND, IdentityBase


class DemoSection(IdentityBase):
    """``identity`` of kind demo: the embedded provider (``demo.enabled``) gives the session."""

    kind: Literal["demo"] = Field("demo", description=KIND)


#: every kind's model, in the order the reference lists them
KINDS: dict[str, type[IdentityBase]] = {
    "oauth2": OAuth2Section,
    "json_login": JsonLoginSection,
    "demo": DemoSection,
}

#: the problem of a section whose kind is missing (with keys the demo does not take) or unknown
KIND_PROBLEM = (
    "kind: missing or unknown: give oauth2 or json_login (demo, the default, needs demo.enabled: "
    "true and takes only timeout and tls)"
)


def _kind(value: Any) -> str | None:
    """The kind of a section as given (a mapping from YAML, or a model): ``kind``, else demo
    for a section without keys of another kind; None (refused) otherwise."""
    if not isinstance(value, dict):
        return getattr(value, "kind", None)
    kind = value.get("kind")
    if kind is None and set(value) <= set(DemoSection.model_fields):
        return "demo"
    return kind if kind in KINDS else None


Identity = Annotated[
    Annotated[OAuth2Section, Tag("oauth2")]
    | Annotated[JsonLoginSection, Tag("json_login")]
    | Annotated[DemoSection, Tag("demo")],
    Discriminator(_kind, custom_error_type="identity_kind", custom_error_message=KIND_PROBLEM),
]


def kinds_with(key: str) -> list[str]:
    """The kinds whose section has ``key`` (as written in YAML)."""
    return [
        kind
        for kind, model in KINDS.items()
        if any((field.alias or name) == key for name, field in model.model_fields.items())
    ]
