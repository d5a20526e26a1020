"""Loading the configuration: YAML file and environment in, a validated Config out.

:func:`load_config` reads a YAML file (or the embedded demo), fills ``${VAR}`` from the environment,
applies ``SIDECAR_<SECTION>_<KEY>`` overrides and validates against
:class:`sidecar.config.models.Config`. Every problem is reported at once, each naming its dotted
key and the file, as a
:class:`~sidecar.errors.ConfigError` (exit code 2). :func:`redacted` shows a loaded configuration
with its secrets masked; :func:`read_secret` reads a secret's current value when it is needed.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from sidecar.config.callers import read_caller_secret
from sidecar.config.json_login import credential_files
from sidecar.config.models import REDIS_SCHEME_RULE, REDIS_SCHEMES, Config, Session
from sidecar.config.oauth2 import check_private_key
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


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field annotated ``Section`` or ``Section | None``, else None."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def yaml_keys(model: type[BaseModel]) -> dict[str, str]:
    """``{key as written in YAML: field name}`` (they differ where a field has an alias)."""
    return {field.alias or name: name for name, field in model.model_fields.items()}


def _resolve_env_key(model: type[BaseModel], parts: list[str]) -> list[str] | None:
    """Map ``["upstream", "timeout", "total"]``-like parts onto nested YAML keys, or None."""
    keys = yaml_keys(model)
    for cut in range(len(parts), 0, -1):
        name = "_".join(parts[:cut])
        if name not in keys:
            continue
        rest = parts[cut:]
        section = submodel(model.model_fields[keys[name]].annotation)
        if section is not None:
            if not rest:
                return None
            tail = _resolve_env_key(section, rest)
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
        keys = _resolve_env_key(Config, parts)
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
        # list items as key[0], as ${VAR} problems and file checks name them
        base = [f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]]
        if err["type"] == "extra_forbidden":
            lines.append(f"{_dotted(base)}: unknown key{_did_you_mean(err['loc'])}")
            continue
        for part in err["msg"].removeprefix("Value error, ").split("\n"):
            sub, sep, message = part.partition(": ")
            if sep and re.fullmatch(r"[a-z_]+(\.[A-Za-z0-9_-]+)*", sub):
                key = _dotted([*base, sub]) if base else sub
            else:
                key, message = _dotted(base) or "(top level)", part
            lines.append(f"{key}: {message}")
    return lines


def _did_you_mean(loc: tuple[int | str, ...]) -> str:
    """`` (did you mean ...?)`` naming the closest key its section has, or nothing."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # a list item: its model is the list's
        field = yaml_keys(model).get(part) if model is not None else None
        if field is None or model is None:
            return ""  # below a mapping of free names (headers, credentials): no key list
        model = submodel(model.model_fields[field].annotation)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(yaml_keys(model)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _dotted(parts: list[str]) -> str:
    return ".".join(parts).replace(".[", "[")


def _check_files(config: Config) -> list[str]:
    """Secret and certificate files must exist and be readable at load time; the session
    directory, when it exists, must be sidecar's alone."""
    problems = []
    candidates: dict[str, Path | None] = {
        "identity.client_secret_file": config.identity.client_secret_file,
        "identity.password_file": config.identity.password_file,
        "identity.private_key_file": config.identity.private_key_file,
        "identity.assertion_file": config.identity.assertion_file,
        "identity.subject_token_file": config.identity.subject_token_file,
        "identity.actor_token_file": config.identity.actor_token_file,
        "identity.client_assertion_file": config.identity.client_assertion_file,
        "upstream.tls.ca_file": config.upstream.tls.ca_file,
        "upstream.tls.cert_file": config.upstream.tls.cert_file,
        "upstream.tls.key_file": config.upstream.tls.key_file,
        "identity.tls.ca_file": config.identity.tls.ca_file,
        "identity.tls.cert_file": config.identity.tls.cert_file,
        "identity.tls.key_file": config.identity.tls.key_file,
        "session.encryption_key_file": config.session.encryption_key_file,
        "session.redis_url_file": config.session.redis_url_file,
    }
    for name, file in credential_files(config.identity.credentials).items():
        candidates[f"identity.credentials.{name}_file"] = file
    for n, file in enumerate(config.session.previous_encryption_key_files):
        candidates[f"session.previous_encryption_key_files[{n}]"] = file
    for n, file in enumerate(config.identity.previous_client_secret_files):
        candidates[f"identity.previous_client_secret_files[{n}]"] = file
    for n, file in enumerate(config.identity.previous_private_key_files):
        candidates[f"identity.previous_private_key_files[{n}]"] = file
    for key, path in candidates.items():
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            problems.append(f"{key}: cannot read {path}: {exc.strerror}")
            candidates[key] = None
    key_file = candidates["identity.private_key_file"]
    if key_file is not None:
        problems.extend(check_private_key(key_file, config.identity.signing_alg))
    for n in range(len(config.identity.previous_private_key_files)):
        key = f"identity.previous_private_key_files[{n}]"
        previous = candidates[key]
        if previous is not None:
            problems.extend(check_private_key(previous, config.identity.signing_alg, key=key))
    sink = config.session.token_sink
    if sink is not None and not sink.path.parent.is_dir():
        problems.append(f"session.token_sink.path: the directory {sink.path.parent} does not exist")
    if config.session.store == "redis":
        problems.extend(_redis_url_problems(config.session, candidates["session.redis_url_file"]))
    if config.listen.require_header is not None:
        try:
            read_caller_secret(config.listen.require_header.value_file)
        except ConfigError as exc:
            problems.append(str(exc))
    if config.session.store == "file":
        from sidecar.store.file import directory_problem

        problem = directory_problem(config.session.path.parent)
        if problem is not None:
            problems.append(f"session.path: {problem}")
    return problems


def _redis_url_problems(session: Session, readable_file: Path | None) -> list[str]:
    """The redis URL, inline or in its file, must be one the store can use. The problems never
    quote it: it may carry a password."""
    from sidecar.store.redis import url_problem  # the redis client library, only when needed

    if session.redis_url:
        key, where, url = "session.redis_url", "", session.redis_url
    elif readable_file is not None:
        key, where = "session.redis_url_file", f"the URL in {readable_file} "
        try:
            url = session.redis_address()
        except OSError as exc:
            return [f"{key}: cannot read {readable_file}: {exc.strerror}"]
        except UnicodeDecodeError:
            return [f"{key}: {readable_file} is not UTF-8 text"]
        if not url.startswith(REDIS_SCHEMES):
            return [f"{key}: {where}{REDIS_SCHEME_RULE}"]
    else:
        return []  # unreadable: already reported
    problem = url_problem(url)
    return [f"{key}: {where}{'is ' if where else ''}{problem}"] if problem else []


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load, interpolate, override and validate. Raises ConfigError listing every problem."""
    env = os.environ if env is None else env
    if path is None and env.get(ENV_CONFIG):
        path = env[ENV_CONFIG]
    if path is None:
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
        problems.extend(_attributed(_check_files(config), unset, overridden))
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
    for call in ("login", "refresh", "logout"):
        if data["identity"][call] is not None:
            _mask_secret_headers(data["identity"][call]["headers"])
    # credential values stay masked; the paths of <name>_file credentials are shown
    for name, file in credential_files(config.identity.credentials).items():
        data["identity"]["credentials"][f"{name}_file"] = str(file)
    return data


def _mask_secret_headers(headers: dict[str, str]) -> None:
    for name in headers:
        if _SECRET_HEADER.search(name):
            headers[name] = "**********"


def read_secret(value: SecretStr | None, file: Path | None) -> str:
    """The secret's current value: from the file when one is configured (re-read every call)."""
    if file is not None:
        return file.read_text(encoding="utf-8").strip()
    if value is not None:
        return value.get_secret_value()
    raise ConfigError("a required secret is not configured")
