"""``{{ namespace.name }}`` placeholders, compiled once and filled on every call.

``${VAR}`` is the loader's business (filled once at load); this module handles the placeholders
filled at call time from ``credentials.*`` and ``session.*``. Templates are compiled from *parsed*
data (the YAML tree), never from JSON text, and every rendered value is a string placed into that
tree: a value holding quotes or braces stays one JSON string and cannot change the structure.

Contract:

* :func:`compile_text` turns one string into a :class:`Text`; :func:`compile_tree` turns a
  JSON-like tree (dicts, lists, scalars) into a :class:`Tree` whose string *values* may hold
  placeholders (mapping keys may not).
* ``names`` lists every placeholder a template uses, as ``"namespace.name"``, so the config can
  refuse unknown ones at load time, naming the key.
* ``render(values)`` looks names up in ``values[namespace][name]``; a name missing at render time
  raises :class:`MissingValue` (the caller decides what that means).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: ``{{ credentials.password }}``, ``{{session.tenant_id}}``: one dot, identifier-like names
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
#: anything that looks like an attempt at a placeholder, to refuse malformed ones
_OPENING = re.compile(r"\{\{")

Values = Mapping[str, Mapping[str, str]]


class MissingValue(LookupError):
    """A placeholder had no value at render time; ``name`` is ``"namespace.name"``."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no value for {{{{ {name} }}}}")
        self.name = name


@dataclass(frozen=True, slots=True)
class Text:
    """A compiled string: literal pieces alternating with (namespace, name) references."""

    pieces: tuple[str | tuple[str, str], ...]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f"{p[0]}.{p[1]}" for p in self.pieces if isinstance(p, tuple))

    @property
    def is_constant(self) -> bool:
        return not any(isinstance(p, tuple) for p in self.pieces)

    def render(self, values: Values) -> str:
        out = []
        for piece in self.pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            namespace, name = piece
            try:
                out.append(values[namespace][name])
            except KeyError:
                raise MissingValue(f"{namespace}.{name}") from None
        return "".join(out)


def compile_text(text: str) -> Text:
    """Compile one string; raises ValueError for a ``{{`` that is not a well-formed placeholder."""
    pieces: list[str | tuple[str, str]] = []
    pos = 0
    for match in PLACEHOLDER.finditer(text):
        _literal(text[pos : match.start()], pieces)
        pieces.append((match.group(1), match.group(2)))
        pos = match.end()
    _literal(text[pos:], pieces)
    return Text(tuple(pieces))


def _literal(chunk: str, pieces: list[str | tuple[str, str]]) -> None:
    if _OPENING.search(chunk):
        raise ValueError(
            f"malformed placeholder in {chunk!r}: write {{{{ namespace.name }}}}, "
            "e.g. {{ credentials.password }}"
        )
    if chunk:
        pieces.append(chunk)


@dataclass(frozen=True, slots=True)
class Tree:
    """A compiled JSON-like tree; strings are :class:`Text`, other scalars pass through."""

    root: Any

    @property
    def names(self) -> frozenset[str]:
        return frozenset(_names(self.root))

    def render(self, values: Values) -> Any:
        return _render(self.root, values)


def compile_tree(node: Any, where: str = "") -> Tree:
    """Compile parsed data; raises ValueError naming the dotted location of a bad string."""
    return Tree(_compile(node, where))


def _compile(node: Any, where: str) -> Any:
    if isinstance(node, str):
        try:
            return compile_text(node)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}" if where else str(exc)) from None
    if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
            if not isinstance(key, str) or _OPENING.search(key):
                raise ValueError(f"{where}: keys must be plain strings, got {key!r}")
            out[key] = _compile(value, f"{where}.{key}" if where else key)
        return out
    if isinstance(node, list | tuple):
        return [_compile(v, f"{where}[{i}]") for i, v in enumerate(node)]
    if node is None or isinstance(node, bool | int | float):
        return node
    raise ValueError(f"{where}: {type(node).__name__} is not JSON data")


def names_by_key(node: Any, where: str) -> dict[str, frozenset[str]]:
    """The placeholder names of each string leaf of ``node``, by dotted key (for messages)."""
    out: dict[str, frozenset[str]] = {}
    _collect(_compile(node, where), where, out)
    return out


def _collect(node: Any, where: str, out: dict[str, frozenset[str]]) -> None:
    if isinstance(node, Text):
        if not node.is_constant:
            out[where] = node.names
    elif isinstance(node, dict):
        for key, value in node.items():
            _collect(value, f"{where}.{key}", out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _collect(value, f"{where}[{i}]", out)


def _names(node: Any) -> Iterable[str]:
    if isinstance(node, Text):
        yield from node.names
    elif isinstance(node, dict):
        for value in node.values():
            yield from _names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _names(value)


def _render(node: Any, values: Values) -> Any:
    if isinstance(node, Text):
        return node.render(values)
    if isinstance(node, dict):
        return {k: _render(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_render(v, values) for v in node]
    return node


def unknown(names: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """The names not in ``allowed``, sorted (for config messages)."""
    allowed_set = set(allowed)
    return sorted(n for n in names if n not in allowed_set)
