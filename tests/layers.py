"""The package's floor plan as data: which layer each module belongs to, and its imports.

Layers, top to bottom (a module may import from its own layer or any layer below):

4. the face and composition root: cli, app, checks, lifecycle, workers, demo, ``__main__``
3. policy: ``proxy/``, ``session/``, admin
2. roles that talk to the outside: ``identity/``, ``store/``, ``http/``
1. the configuration as data (``config/``) and what reads it alone (tls)
0. base values: errors, clock, logs, metrics, cookies, templates, tokens, field_values, secrets

``python -m tests.layers`` prints the graph's upward imports and cycles.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sidecar"

FACE = {"cli", "app", "checks", "lifecycle", "workers", "demo", "__main__"}
POLICY_PACKAGES = {"proxy", "session"}
OUTSIDE_PACKAGES = {"identity", "store", "http"}
CONFIG_LAYER = {"config", "tls"}


def layer(module: str) -> int:
    """The layer of a module named relative to the package (``session.manager``)."""
    head = module.split(".")[0]
    if head in FACE:
        return 4
    if head in POLICY_PACKAGES or head == "admin":
        return 3
    if head in OUTSIDE_PACKAGES:
        return 2
    if head in CONFIG_LAYER:
        return 1
    return 0


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    #: under ``if TYPE_CHECKING:`` (no import at run time)
    typing_only: bool


def modules() -> dict[str, Path]:
    """Every module of the package, by its name relative to the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts) or "__init__"] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The package module ``sidecar.<name>`` stands for (a package means its ``__init__``)."""
    if name == "sidecar":
        return "__init__"
    if not name.startswith("sidecar."):
        return None
    relative = name.removeprefix("sidecar.")
    while relative and relative not in known:
        relative = relative.rpartition(".")[0]
    return relative or None


def imports() -> list[Import]:
    """Every import of one package module by another, with its line."""
    known = modules()
    found: list[Import] = []
    for source, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        typing_lines = _typing_only_lines(tree)
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            targets = {_resolve(name, known) for name in names}
            for target in sorted(t for t in targets if t is not None and t != source):
                if target == "__init__" and source != "__init__":
                    continue  # the version string, importable from anywhere
                found.append(Import(source, target, node.lineno, node.lineno in typing_lines))
    return found


def _typing_only_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                for inner in ast.walk(child):
                    if hasattr(inner, "lineno"):
                        lines.add(inner.lineno)
    return lines


def upward(found: list[Import]) -> list[Import]:
    """The imports that point to a higher layer than their module's."""
    return [i for i in found if layer(i.target) > layer(i.source)]


def cycles(found: list[Import], typing_too: bool = False) -> list[list[str]]:
    """The import cycles, one per strongly connected group of modules: at run time, or with
    ``typing_too`` counting the imports only the type checker follows."""
    graph: dict[str, set[str]] = {}
    for i in found:
        if typing_too or not i.typing_only:
            graph.setdefault(i.source, set()).add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def main() -> int:
    found = imports()
    up = upward(found)
    loops = cycles(found)
    typed_loops = cycles(found, typing_too=True)
    print(f"{len(modules())} modules, {len(found)} imports between them")
    print(f"{len(up)} upward imports")
    for i in up:
        kind = " (typing only)" if i.typing_only else ""
        print(f"  {i.source}:{i.line} -> {i.target}{kind}")
    print(f"{len(loops)} import cycles")
    for group in loops:
        print("  " + " <-> ".join(group))
    print(f"{len(typed_loops)} import cycles counting typing-only imports")
    for group in typed_loops:
        print("  " + " <-> ".join(group))
    return 0


if __name__ == "__main__":
    sys.exit(main())
