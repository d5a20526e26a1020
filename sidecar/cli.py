"""Command line: ``sidecar run``, ``sidecar check-config``, ``sidecar status``, ``sidecar schema``.

Exit codes: 0 success or clean shutdown; 1 runtime failure (e.g. a port in use); 2 bad
configuration or usage. ``sidecar status`` is a probe and says what it found: 0 the session is
VALID, 1 a sidecar answered and its session is not VALID, 2 no usable answer (the admin port is
unreachable, or a bad ``--admin``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar import __version__
from sidecar.compiled import describe

if TYPE_CHECKING:
    from sidecar.config.models import Config

# Imports stay in the commands that need them: ``--version`` and ``status`` load no config
# machinery (pydantic, YAML), ``check-config`` loads no data path (the HTTP code, aiohttp), and
# ``run`` loads the identity kind and the store its config names (see sidecar.app).

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

log = logging.getLogger("sidecar.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description=__doc__.splitlines()[0])
    data_path = describe()  # how this install runs the data path (sidecar/compiled.py)
    parser.add_argument(
        "--version", action="version", version=f"sidecar {__version__} (data path {data_path})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument(
        "-c", "--config", help="YAML config file (default: $SIDECAR_CONFIG, else the demo)"
    )
    run.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="proxy processes sharing the port (SO_REUSEPORT) and one session; 'auto': one per "
        "CPU this process may use (affinity and cgroup quota) (default: 1)",
    )
    run.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop implementation: 'auto' is uvloop where it is installed, else asyncio; "
        "'uvloop' requires it (default: %(default)s)",
    )
    check = sub.add_parser(
        "check-config", help="validate a config and print it with secrets redacted"
    )
    check.add_argument(
        "-c", "--config", help="YAML config file (default: $SIDECAR_CONFIG, else the demo)"
    )
    status = sub.add_parser(
        "status", help="print a one-line summary of a running sidecar's session"
    )
    status.add_argument(
        "--admin", default="http://127.0.0.1:8081", help="admin URL (default: %(default)s)"
    )
    sub.add_parser(
        "schema",
        help="print the configuration's JSON Schema (for editors that validate YAML with it)",
    )
    return parser


def _workers(value: str) -> int:
    """``--workers``: a count, or ``auto``."""
    if value == "auto":
        return usable_cpus()
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number or 'auto'") from None


def usable_cpus(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The CPUs this process may run on (its affinity mask), capped by a cgroup v2 CPU quota
    (a Kubernetes CPU limit: ``200000 100000`` is 2 CPUs, rounded up); at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = cpus or 1
    try:
        quota, period = Path(cgroup_cpu_max).read_text().split()[:2]
    except (OSError, ValueError):
        return count  # no cgroup v2 quota file (or an unreadable one): the affinity decides
    if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
        count = min(count, max(1, -(-int(quota) // int(period))))
    return count


#: pydantic's values of PYDANTIC_DISABLE_PLUGINS that switch every plugin off
PLUGINS_OFF = ("__all__", "1", "true")


def without_pydantic_plugins(environ: Mapping[str, str] = os.environ) -> bool:
    """Load no pydantic plugin unless ``PYDANTIC_DISABLE_PLUGINS`` asks for them; call it before
    pydantic is imported. True when the plugin lookup is left out.

    sidecar uses no pydantic plugin, but pydantic looks for them at its first model, among the
    ``pydantic`` entry points of every installed distribution: that imports
    ``importlib.metadata`` (with ``zipfile`` and ``csv``), about 0.8 MB that stay resident in a
    running sidecar for nothing. Unset, the variable counts as ``__all__``: with that value, or
    ``1`` or ``true`` (pydantic's own values for "none"), pydantic's plugin loader is replaced
    by one that finds none, before pydantic imports it. Any other value (an empty one, or the
    names of plugins to leave out) keeps pydantic's loader, which then reads the variable.
    """
    name = "pydantic.plugin._loader"
    if environ.get("PYDANTIC_DISABLE_PLUGINS", "__all__") not in PLUGINS_OFF:
        return False
    if name not in sys.modules:
        loader = types.ModuleType(name, "pydantic's plugin loader, finding none (sidecar.cli)")
        vars(loader)["get_plugins"] = _no_plugins
        sys.modules[name] = loader
    return sys.modules[name].get_plugins is _no_plugins


def _no_plugins() -> Iterable[Any]:
    """What pydantic's ``get_plugins`` returns when every plugin is switched off."""
    return ()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sidecar`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_worker"] and len(argv) in (2, 3):  # internal: a child of `run --workers N`
        without_pydantic_plugins()
        from sidecar.workers import worker_entry

        return worker_entry(int(argv[1]), *argv[2:])
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)
    if args.command == "status":
        return _status(args.admin)
    without_pydantic_plugins()  # every command from here on loads pydantic
    if args.command == "schema":
        print(json.dumps(config_schema(), indent=2))
        return EXIT_OK
    from sidecar.checks import checked_config
    from sidecar.errors import ConfigError

    try:
        config = checked_config(args.config)
    except ConfigError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        import yaml

        from sidecar.config.load import redacted

        print(yaml.safe_dump(redacted(config), sort_keys=False), end="")
        return EXIT_OK
    if args.workers < 1:
        print("sidecar: --workers must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    if args.workers > 1 and config.listen.port == 0:
        print(
            "sidecar: --workers needs a fixed listen.port (0 would give each worker its own)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    return _run(config, args.workers, args.loop, load=lambda: checked_config(args.config))


def event_loop(name: str) -> str | None:
    """The loop ``--loop name`` runs on: ``uvloop`` or ``asyncio``; None when ``name`` is
    ``uvloop`` and it is not installed. ``auto`` is uvloop where it is installed (the image
    installs it: fewer instructions per request), else asyncio."""
    if name == "asyncio":
        return name
    try:
        import uvloop  # noqa: F401 - only whether it imports
    except ImportError:
        return None if name == "uvloop" else "asyncio"
    return "uvloop"


def _run(
    config: Config,
    workers: int = 1,
    loop: str = "auto",
    load: Callable[[], Config] | None = None,
) -> int:
    import asyncio

    from sidecar.errors import SidecarError
    from sidecar.lifecycle import serve
    from sidecar.logs import setup_logging

    chosen = event_loop(loop)
    if chosen is None:
        print(
            "sidecar: --loop uvloop: uvloop is not installed (pip install uvloop)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    loop = chosen
    run = asyncio.run
    if loop == "uvloop":
        import uvloop

        run = uvloop.run
    setup_logging(config.log.level, fmt=config.log.format)
    try:
        if workers > 1:
            from sidecar.workers import serve_workers

            return run(serve_workers(config, workers, load, loop))
        return run(serve(config, load=load))
    except SidecarError as exc:
        log.error("sidecar.failed", extra={"error": str(exc)})
        return exc.exit_code
    except OSError as exc:
        log.error("sidecar.failed", extra={"error": f"{exc.strerror or exc}"})
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


def _status(admin: str) -> int:
    import urllib.error
    import urllib.request

    url = admin.rstrip("/") + "/session"
    if not url.startswith(("http://", "https://")):
        print(f"sidecar: --admin must be an http(s) URL, not {admin!r}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - scheme checked above
            summary = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"sidecar: cannot read {url}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not isinstance(summary, dict):
        print(f"sidecar: {url} did not answer a session summary", file=sys.stderr)
        return EXIT_CONFIG
    print(status_line(summary))
    return EXIT_OK if summary.get("state") == "VALID" else EXIT_FAILURE


def config_schema() -> dict[str, Any]:
    """The JSON Schema of the YAML configuration (keys as written in YAML)."""
    from sidecar.config.models import Config

    schema = Config.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def human_duration(seconds: float | None) -> str:
    """``24m10s``, ``2h03m``, ``5s``; ``-`` for None."""
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    s = int(abs(seconds))
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    return f"{sign}{s // 3600}h{(s % 3600) // 60:02d}m"


def status_line(summary: dict[str, Any]) -> str:
    """The one human line of DESIGN.md, for example
    ``session: VALID | token expires in 24m10s | refreshed 5m00s ago | last call 2s ago |
    store: file``.
    """
    parts = [f"session: {summary.get('state', '?')}"]
    expires_in = summary.get("expires_in")
    if expires_in is None:
        parts.append("no token")
    elif expires_in >= 0:
        parts.append(f"token expires in {human_duration(expires_in)}")
    else:
        parts.append(f"token expired {human_duration(-expires_in)} ago")
    refreshed = summary.get("last_refreshed_ago")
    parts.append(
        "never refreshed" if refreshed is None else f"refreshed {human_duration(refreshed)} ago"
    )
    last_call = summary.get("last_api_call_ago")
    parts.append(
        "no calls yet" if last_call is None else f"last call {human_duration(last_call)} ago"
    )
    if summary.get("cookies"):
        parts.append(f"cookies: {summary['cookies']}")  # the axiomtrade seed's "Cookies: PRESENT"
    if summary.get("last_error"):
        parts.append(f"last error: {summary['last_error']}")
    parts.append(f"store: {summary.get('store', '?')}")
    return " | ".join(parts)
