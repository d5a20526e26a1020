"""The data path as the build leaves it: compiled with mypyc unless the sources are asked for.

``make`` builds sidecar in place with the modules of ``sidecar/compiled.py`` compiled;
``SIDECAR_PURE_PYTHON=1`` runs their sources instead (``make test`` runs the data-path suites a
second time that way).
"""

from __future__ import annotations

import importlib
import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from sidecar.compiled import MODULES, PURE_PYTHON, installed, wanted_pure
from tests.helpers import python_output

ROOT = Path(__file__).resolve().parent.parent


def _files(pure: bool) -> list[str]:
    """The files a fresh process imports the compiled modules from, and its ``--version``."""
    env = {k: v for k, v in os.environ.items() if k != PURE_PYTHON}
    if pure:
        env[PURE_PYTHON] = "1"
    script = (
        "import importlib, sys\n"
        "from sidecar.cli import main\n"
        f"for name in {MODULES!r}:\n"
        "    print(importlib.import_module(name).__file__)\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    return python_output(script, env).splitlines()


def test_a_build_made_without_asking_for_the_sources_is_compiled() -> None:
    """``make`` compiles the data path: a checkout whose build did not is noticed here rather
    than measured (or shipped) a third slower. Tests of a pure build say so with
    SIDECAR_PURE_PYTHON=1."""
    assert installed() or wanted_pure(), (
        f"sidecar was built without compiling its data path: build it again (make venv), or run "
        f"the tests with {PURE_PYTHON}=1"
    )


def test_the_compiled_modules_are_imported_unless_the_sources_are_asked_for() -> None:
    """Without SIDECAR_PURE_PYTHON every listed module comes from its extension module, and
    ``--version`` says the data path is compiled; with it, every one comes from its source (none
    is mixed), and ``--version`` says so."""
    if installed():
        *compiled, version = _files(pure=False)
        assert all(f.endswith(tuple(EXTENSION_SUFFIXES)) for f in compiled), compiled
        assert version.endswith("(data path compiled with mypyc)")
    *sources, version = _files(pure=True)
    assert [Path(f).relative_to(ROOT).as_posix() for f in sources] == [
        name.replace(".", "/") + ".py" for name in MODULES
    ]
    expected = f"({PURE_PYTHON}=1)" if installed() else "(not compiled)"
    assert version.endswith(f"(data path pure Python {expected})")


def test_every_compiled_module_in_the_package_is_one_the_build_lists() -> None:
    """An extension module left behind by an older list would shadow its source unseen."""
    found = set()
    for path in (ROOT / "sidecar").rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        # EXTENSION_SUFFIXES lists the longest first (".cpython-311-...so", ".abi3.so", ".so")
        suffix = next((s for s in EXTENSION_SUFFIXES if rel.endswith(s)), None)
        if suffix is not None:
            found.add(rel[: -len(suffix)].replace("/", "."))
    assert found - {"sidecar.data_path__mypyc"} <= set(MODULES)


def test_no_compiled_class_inherits_from_a_python_class() -> None:
    """mypyc 2.4 gets weak references to instances of a compiled class with a Python base wrong
    (the garbage collector crashed on a compiled ``threading.Thread`` and on a compiled
    ``Exception`` subclass). So classes in the compiled modules have only compiled bases, and
    exceptions raised there are defined in ``sidecar/errors.py``."""
    offenders = []
    for name in MODULES:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if not isinstance(value, type) or value.__module__ != name:
                continue
            if getattr(value, "_is_protocol", False):
                continue  # a typing.Protocol: a type for the checker, never instantiated
            for base in value.__mro__[1:]:
                if base is not object and base.__module__ not in MODULES:
                    offenders.append(
                        f"{name}.{value.__name__} <- {base.__module__}.{base.__name__}"
                    )
    assert offenders == []


def test_the_protocols_have_every_method_the_loops_call() -> None:
    """Without asyncio.Protocol as a base nothing supplies a default: a method the loop or its TLS
    layer calls and the class lacks fails there (a missing ``eof_received`` made every upstream
    close an error report and a forced close)."""
    from sidecar.http.client_conn import UpstreamConnection
    from sidecar.http.connection import FrontProtocol

    called = (
        "connection_made",
        "data_received",
        "eof_received",
        "connection_lost",
        "pause_writing",
        "resume_writing",
    )
    for cls in (FrontProtocol, UpstreamConnection):
        assert [m for m in called if not callable(getattr(cls, m, None))] == [], cls.__name__
