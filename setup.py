"""Builds sidecar with its data path compiled by mypyc (see sidecar/compiled.py).

Everything else about the package is in pyproject.toml. ``SIDECAR_PURE_PYTHON=1`` builds it
without compiling (no C compiler or mypy needed; about a third slower per request).
"""

from __future__ import annotations

import os
import runpy
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# read without importing the package (its dependencies need not be installed to build it)
compiled = runpy.run_path(os.path.join(HERE, "sidecar", "compiled.py"))


#: the commands that build extension modules; the others (metadata, sdist) need no compiling,
#: and pip runs this file for them first
BUILDING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}


def ext_modules() -> list:  # type: ignore[type-arg]
    if compiled["wanted_pure"]() or not BUILDING & set(sys.argv[1:]):
        return []
    try:
        # mypyc type-checks what the compiled modules import, with pyproject.toml's [tool.mypy]
        # (its pydantic plugin included): the runtime packages must be importable here
        import pydantic  # noqa: F401
        from mypyc.build import mypycify
    except ImportError as exc:
        raise SystemExit(
            f"sidecar's build compiles its data path with mypyc, which type-checks it against "
            f"the packages it uses ({exc.name} is missing): build in an environment with "
            f"requirements/run.txt installed, with pip's --no-build-isolation (as make and the "
            f"image do), or set {compiled['PURE_PYTHON']}=1 to build it as pure Python"
        ) from exc
    paths = [os.path.join(*name.split(".")) + ".py" for name in compiled["MODULES"]]
    return mypycify(paths, opt_level="3", group_name=compiled["GROUP"])


setup(ext_modules=ext_modules())
