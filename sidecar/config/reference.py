"""The configuration reference, generated from the config models so that it cannot drift.

Each key's meaning is written once, as the ``Field(description=...)`` of its model; this module
only lays the keys out (dotted key, type, default, meaning).
``python -m sidecar.config.reference > docs/config-reference.md`` writes it; a test checks that the
committed file equals what this module generates.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sidecar.config.load import submodels, yaml_fields
from sidecar.config.models import Config

HEADER = """# Configuration reference

Generated from the descriptions of the models in `sidecar/config/` by
`python -m sidecar.config.reference`; do not edit by hand. Every key may be set in the YAML file,
or overridden by `SIDECAR_<SECTION>_<KEY>` (for example `SIDECAR_UPSTREAM_TIMEOUT_TOTAL=10`).
Secrets print as `**********`. The keys of `identity` depend on its `kind`: a key marked
"(kind oauth2)" is refused under another kind.

| key | type | default | meaning |
|---|---|---|---|
"""


def _type_name(field: FieldInfo) -> str:
    text = str(field.annotation).replace("typing.", "").replace("pathlib.", "")
    text = text.replace("pydantic.types.", "").replace("<class '", "").replace("'>", "")
    return text.replace("Literal", "one of ").replace("|", "or")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if field.is_required():
        return "(required)"
    if value is None:
        return "null"
    return json.dumps(value if not hasattr(value, "__fspath__") else str(value))


def _rows(models: list[type[BaseModel]], prefix: str) -> list[str]:
    """The rows of a section's keys; a section with several kinds (``identity``) lists every
    kind's keys, each naming the kinds it belongs to when not all have it."""
    rows = []
    for key, field in yaml_fields(models).items():
        dotted = f"{prefix}{key}"
        owners = [m for m in models if key in yaml_fields([m])]
        note = ""
        if len(owners) < len(models):
            note = f"(kind {' or '.join(_kind_of(m) for m in owners)}) "
        meaning = note + (field.description or "")
        sections = submodels(field.annotation)
        if sections:
            optional = " (optional)" if _optional(field) else ""
            rows.append(f"| `{dotted}` | section{optional} | | {meaning} |")
            rows.extend(_rows(sections, dotted + "."))
        elif key == "kind" and len(models) > 1:
            kinds = ", ".join(_kind_of(m) for m in models)
            default = json.dumps(Config.model_fields["identity"].get_default().kind)
            rows.append(f"| `{dotted}` | one of {kinds} | `{default}` | {meaning} |")
        else:
            rows.append(f"| `{dotted}` | {_type_name(field)} | `{_default(field)}` | {meaning} |")
    return rows


def _optional(field: FieldInfo) -> bool:
    """A section that may be null (``X | None``)."""
    return type(None) in getattr(field.annotation, "__args__", ())


def _kind_of(model: type[BaseModel]) -> str:
    return str(model.model_fields["kind"].default)


def generate() -> str:
    """The whole reference as Markdown."""
    return HEADER + "\n".join(_rows([Config], "")) + "\n"


if __name__ == "__main__":
    sys.stdout.write(generate())
