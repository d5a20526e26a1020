"""Loading the configuration: YAML file and environment in, a validated Config out.

:func:`load_config` reads a YAML file (or the embedded demo), fills ``${VAR}`` from the environment,
applies ``SIDECAR_<SECTION>_<KEY>`` overrides and validates against
:class:`sidecar.config.models.Config`. Every problem is reported at once, each naming its dotted
key and the file, as a
:class:`~sidecar.errors.ConfigError` (exit code 2). :func:`redacted` shows a loaded configuration
with its secrets masked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from sidecar.config.callers import read_caller_secret
from sidecar.config.identity import KINDS, kinds_with
from sidecar.config.json_login import JsonLoginSection
from sidecar.config.models import Config
from sidecar.config.oauth2 import OAuth2Section
from sidecar.errors import ConfigError

ENV_PREFIX = "SIDECAR_"
ENV_CONFIG = "SIDECAR_CONFIG"
DEMO_SOURCE = "<embedded demo>"


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, env: Mapping[str, str], path: str, unset: dict[str, str]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of the tree; the keys whose
    variables are not set go into ``unset`` (key: problem)."""
    if isinstance(node, dict):
        return {
            k: _interpolate(v, env, f"{path}.{k}" if path else str(k), unset)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_interpolate(v, env, f"{path}[{i}]", unset) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        unset.setdefault(path, f"{path}: environment variable {name} is not set")
        return ""

    return _VAR.sub(substitute, node)


def submodels(annotation: Any) -> list[type[BaseModel]]:
    """The section models of a field annotated ``Section``, ``Section | None``, or a union of
    sections (``identity``: one per kind); empty for a value that is not a section."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = get_origin(annotation)
    if origin is Annotated:
        return submodels(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return [model for arg in get_args(annotation) for model in submodels(arg)]
    return []


def yaml_fields(models: Iterable[type[BaseModel]]) -> dict[str, FieldInfo]:
    """``{key as written in YAML: field}`` of a section (of any of its kinds: the first that has
    the key gives the field). The key differs from the field's name where it has an alias."""
    found: dict[str, FieldInfo] = {}
    for model in models:
        for name, field in model.model_fields.items():
            found.setdefault(field.alias or name, field)
    return found


def _resolve_env_key(models: list[type[BaseModel]], parts: list[str]) -> list[str] | None:
    """Map ``["upstream", "timeout", "total"]``-like parts onto nested YAML keys, or None."""
    keys = yaml_fields(models)
    for cut in range(len(parts), 0, -1):
        name = "_".join(parts[:cut])
        if name not in keys:
            continue
        rest = parts[cut:]
        sections = submodels(keys[name].annotation)
        if sections:
            if not rest:
                return None
            tail = _resolve_env_key(sections, rest)
            if tail is not None:
                return [name, *tail]
        elif not rest:
            return [name]
    return None


#: variables Kubernetes injects for Services whose names start with "sidecar"
_SERVICE_LINK = re.compile(r"_SERVICE_HOST$|_SERVICE_PORT(_[A-Z0-9_]+)?$|_PORT_\d+_(TCP|UDP|SCTP)")


def _apply_env_overrides(
    data: dict[str, Any], env: Mapping[str, str], problems: list[str]
) -> dict[str, str]:
    """Apply ``SIDECAR_<SECTION>_<KEY>=value``; returns ``{dotted key: variable}``.

    Variables whose first word is not a config section are ignored: Kubernetes injects
    ``SIDECAR_SERVICE_HOST`` and friends for a Service named ``sidecar``. Within a known section an
    unknown key is an error, as in the file.
    """
    applied: dict[str, str] = {}
    for var, raw in sorted(env.items()):
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG or _SERVICE_LINK.search(var):
            continue
        if raw.startswith(("tcp://", "udp://", "sctp://")):
            continue  # a service link: SIDECAR_ADMIN_PORT for a Service named "sidecar-admin"
        parts = var[len(ENV_PREFIX) :].lower().split("_")
        if parts[0] not in Config.model_fields:
            continue
        keys = _resolve_env_key([Config], parts)
        if keys is None:
            problems.append(f"{var}: no such configuration key")
            continue
        value: Any = raw
        if raw.startswith(("{", "[")):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                problems.append(f"{var}: not valid YAML/JSON")
                continue
        elif raw.lower() in ("null", "~", ""):
            value = None
        target = data
        for key in keys[:-1]:
            child = target.get(key)
            if not isinstance(child, dict):
                child = {}
                target[key] = child
            target = child
        target[keys[-1]] = value
        applied[".".join(keys)] = var
    return applied


def _format_validation_error(exc: ValidationError) -> list[str]:
    """One line per problem, each starting with its dotted key.

    Cross-field validators name their keys as ``"sub.key: message"``, one per line; those are
    split and appended to the location so every line names the exact key.
    """
    lines = []
    for err in exc.errors():
        loc, kind = _without_kind(err["loc"])
        # list items as key[0], as ${VAR} problems and file checks name them
        base = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc]
        if err["type"] == "extra_forbidden":
            lines.append(f"{_dotted(base)}: {_unknown(loc, kind)}")
            continue
        for part in err["msg"].removeprefix("Value error, ").split("\n"):
            sub, sep, message = part.partition(": ")
            if sep and re.fullmatch(r"[a-z_]+(\.[A-Za-z0-9_-]+)*", sub):
                key = _dotted([*base, sub]) if base else sub
            else:
                key, message = _dotted(base) or "(top level)", part
            lines.append(f"{key}: {message}")
    return lines


def _without_kind(loc: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], str | None]:
    """The location without the identity kind pydantic puts after ``identity`` (the YAML has
    no such level), and that kind."""
    if len(loc) > 1 and loc[0] == "identity" and loc[1] in KINDS:
        return (loc[0], *loc[2:]), str(loc[1])
    return loc, None


def _unknown(loc: tuple[int | str, ...], kind: str | None) -> str:
    """The problem of a key its section does not have: the kinds it belongs to, for a key of
    another identity kind; else the closest key the section has, if any is close."""
    key = str(loc[-1])
    if kind is not None and len(loc) == 2:
        others = [k for k in kinds_with(key) if k != kind]
        if others:
            return f"only used by kind {' or '.join(others)}"
    models: list[type[BaseModel]] = [KINDS[kind]] if kind is not None else [Config]
    for n, part in enumerate(loc[:-1]):
        if isinstance(part, int) or (kind is not None and n == 0):
            continue  # a list item: its model is the list's; identity: its kind's model
        field = yaml_fields(models).get(part)
        if field is None:
            return "unknown key"  # below a mapping of free names (headers, credentials)
        models = submodels(field.annotation)
    import difflib  # only for a config with an unknown key: a running sidecar never needs it

    close = difflib.get_close_matches(key, list(yaml_fields(models)), n=1, cutoff=0.6)
    return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def _dotted(parts: list[str]) -> str:
    return ".".join(parts).replace(".[", "[")


#: the files an oauth2 identity may name, checked readable at load
_OAUTH2_FILES = (
    "client_secret_file",
    "password_file",
    "private_key_file",
    "assertion_file",
    "subject_token_file",
    "actor_token_file",
    "client_assertion_file",
)


def _check_files(config: Config) -> list[str]:
    """Secret and certificate files must exist and be readable at load time (what they hold is
    the roles' check), the token sink's directory must exist, the caller secret must be one."""
    problems = []
    identity = config.identity
    candidates: dict[str, Path | None] = {}
    if isinstance(identity, OAuth2Section):
        for name in _OAUTH2_FILES:
            candidates[f"identity.{name}"] = getattr(identity, name)
    candidates |= {
        "upstream.tls.ca_file": config.upstream.tls.ca_file,
        "upstream.tls.cert_file": config.upstream.tls.cert_file,
        "upstream.tls.key_file": config.upstream.tls.key_file,
        "identity.tls.ca_file": config.identity.tls.ca_file,
        "identity.tls.cert_file": config.identity.tls.cert_file,
        "identity.tls.key_file": config.identity.tls.key_file,
        "session.encryption_key_file": config.session.encryption_key_file,
        "session.redis_url_file": config.session.redis_url_file,
    }
    if isinstance(identity, JsonLoginSection):
        for source in identity.credential_sources().values():
            candidates[source.where] = source.file
    for n, file in enumerate(config.session.previous_encryption_key_files):
        candidates[f"session.previous_encryption_key_files[{n}]"] = file
    if isinstance(identity, OAuth2Section):
        for n, file in enumerate(identity.previous_client_secret_files):
            candidates[f"identity.previous_client_secret_files[{n}]"] = file
        for n, file in enumerate(identity.previous_private_key_files):
            candidates[f"identity.previous_private_key_files[{n}]"] = file
    for key, path in candidates.items():
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            problems.append(f"{key}: cannot read {path}: {exc.strerror}")
    sink = config.session.token_sink
    if sink is not None and not sink.path.parent.is_dir():
        problems.append(f"session.token_sink.path: the directory {sink.path.parent} does not exist")
    if config.listen.require_header is not None:
        try:
            read_caller_secret(config.listen.require_header.value_file)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


#: a check of a valid configuration that needs more than the configuration (a role's own
#: knowledge: does the key sign, can the client use the URL); one ``"dotted.key: message"`` each
Check = Callable[[Config], list[str]]


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    checks: Iterable[Check] = (),
) -> Config:
    """Load, interpolate, override and validate; then, on a valid configuration, run ``checks``
    (the composition root passes the roles' checks: :func:`sidecar.checks.checked_config`).
    Raises ConfigError listing every problem, each naming its key and the variable it came
    from."""
    env = os.environ if env is None else env
    if path is None and env.get(ENV_CONFIG):
        path = env[ENV_CONFIG]
    if path is None:
        from importlib import resources  # the demo's file only: not loaded by other configs

        source = DEMO_SOURCE
        text = resources.files("sidecar").joinpath("demo.yaml").read_text(encoding="utf-8")
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config file: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")

    unset: dict[str, str] = {}
    data = _interpolate(data, env, "", unset)
    problems: list[str] = []
    overridden = _apply_env_overrides(data, env, problems)
    # a SIDECAR_* value replaced whatever the file had there, unset variables included
    unset = {key: line for key, line in unset.items() if _within(key, overridden) is None}
    problems = list(unset.values()) + problems
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(_attributed(_format_validation_error(exc), unset, overridden))
    if config is not None:
        found = _check_files(config)
        for check in checks:
            found += check(config)
        problems.extend(_attributed(found, unset, overridden))
    if problems or config is None:  # no config without a problem that says why
        raise ConfigError(
            f"{source}: invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return config


def _attributed(lines: list[str], unset: dict[str, str], overridden: dict[str, str]) -> list[str]:
    """Problem lines without those an unset variable explains (the empty value it left, or the
    list or section holding it), each naming the SIDECAR_* variable its value came from."""
    out = []
    for line in lines:
        key = line.split(":", 1)[0]
        if any(_under(key, u) or _under(u, key) for u in unset):
            continue
        var = _within(key, overridden)
        out.append(f"{line} (set by {var})" if var else line)
    return out


def _within(key: str, keys: Mapping[str, str]) -> str | None:
    """The value of the entry of ``keys`` that is ``key`` or one of its parents, if any."""
    for candidate, value in keys.items():
        if _under(key, candidate):
            return value
    return None


def _under(key: str, parent: str) -> bool:
    """``key`` is ``parent``, one of its keys or one of its list items (at any depth)."""
    return key == parent or key.startswith((f"{parent}.", f"{parent}["))


_SECRET_HEADER = re.compile(r"auth|token|secret|key|cookie|password|session", re.IGNORECASE)


def redacted(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, with every secret value masked."""
    data = config.model_dump(mode="json", by_alias=True)
    redis_url = data["session"]["redis_url"]
    if redis_url and "@" in redis_url:
        scheme, _, rest = redis_url.partition("://")
        userinfo, _, hosts = rest.rpartition("@")
        user = userinfo.partition(":")[0]
        data["session"]["redis_url"] = f"{scheme}://{user}:**********@{hosts}"
    _mask_secret_headers(data["headers"]["static"])
    if isinstance(config.identity, JsonLoginSection):
        for call in ("login", "refresh", "logout"):
            if data["identity"][call] is not None:
                _mask_secret_headers(data["identity"][call]["headers"])
        # credential values stay masked; the paths of <name>_file credentials are shown
        for source in config.identity.credential_sources().values():
            if source.file is not None:
                data["identity"]["credentials"][source.where.rpartition(".")[2]] = str(source.file)
    return data


def _mask_secret_headers(headers: dict[str, str]) -> None:
    for name in headers:
        if _SECRET_HEADER.search(name):
            headers[name] = "**********"
