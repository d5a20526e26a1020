"""The modules the build compiles to C with mypyc, and whether this process runs them compiled.

The data path's modules are compiled (``setup.py``): they are plain, fully typed Python that
mypyc turns into a C extension, which runs them with about a third fewer instructions per
request. The sources stay the reference: ``SIDECAR_PURE_PYTHON=1`` builds without compiling,
and at run time makes sidecar import these modules from their sources even when compiled ones
are installed beside them (to rule the compiled build out when chasing a problem).

This module imports nothing of sidecar's: ``setup.py`` reads it, and ``sidecar --version`` asks it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec, SourceFileLoader
from types import ModuleType

#: the modules compiled: the data path, from the caller's bytes to the upstream's and back
#: (``sidecar.logs`` is left out: compiled, its writer thread crashed the garbage collector)
MODULES = (
    "sidecar.http.wire",
    "sidecar.http.connection",
    "sidecar.http.exchange",
    "sidecar.http.client_conn",
    "sidecar.http.client",
    "sidecar.proxy.headers",
    "sidecar.proxy.callers",
    "sidecar.proxy.forward",
    "sidecar.metrics",
)

#: the shared library mypyc builds for them (``mypycify(group_name=...)`` adds ``__mypyc``)
GROUP = "sidecar.data_path"

#: the variable that asks for the sources: at build time, not compiled; at run time, not loaded
PURE_PYTHON = "SIDECAR_PURE_PYTHON"

_PACKAGE = os.path.dirname(__file__)


def wanted_pure() -> bool:
    return os.environ.get(PURE_PYTHON, "") == "1"


def _find_installed() -> bool:
    lib = os.path.join(_PACKAGE, "data_path__mypyc")
    return any(os.path.exists(lib + suffix) for suffix in EXTENSION_SUFFIXES)


#: looked for once, when sidecar is imported (not later from the event loop)
_INSTALLED = _find_installed()


def installed() -> bool:
    """True when compiled modules are installed beside the sources."""
    return _INSTALLED


def describe() -> str:
    """How this process runs the data path, for ``--version`` and the start log line."""
    if not installed():
        return "pure Python (not compiled)"
    if wanted_pure():
        return f"pure Python ({PURE_PYTHON}=1)"
    return "compiled with mypyc"


def stale() -> list[str]:
    """The compiled modules older than their sources (an in-place build not redone since)."""
    found = []
    for name in MODULES:
        base = os.path.join(os.path.dirname(_PACKAGE), *name.split("."))
        for suffix in EXTENSION_SUFFIXES:
            if os.path.exists(base + suffix):
                if os.path.getmtime(base + suffix) < os.path.getmtime(base + ".py"):
                    found.append(name)
                break
    return found


class _Sources:
    """Finds the compiled modules' sources ahead of the extension modules beside them."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in MODULES:
            return None
        source = os.path.join(os.path.dirname(_PACKAGE), *fullname.split(".")) + ".py"
        spec = ModuleSpec(fullname, SourceFileLoader(fullname, source), origin=source)
        spec.has_location = True  # __file__ and the bytecode cache, as for any source module
        return spec


def prefer_sources() -> None:
    """With ``SIDECAR_PURE_PYTHON=1``: import every compiled module from its source."""
    if wanted_pure() and not any(isinstance(f, _Sources) for f in sys.meta_path):
        sys.meta_path.insert(0, _Sources())
