"""Configuration loading: interpolation, secret files, environment overrides, validation that
reports every problem with its dotted key and the file, redaction, and ``sidecar check-config``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from sidecar.checks import checked_config
from sidecar.cli import main
from sidecar.config.json_login import JsonLoginSection
from sidecar.config.load import DEMO_SOURCE, load_config, redacted
from sidecar.config.models import Config
from sidecar.errors import ConfigError
from tests.helpers import oauth2_section

SECRET = "s3cret-client-value-4242"
#: the "every interface" address the loopback rule exists to refuse
ANY_HOST = "0.0.0.0"  # noqa: S104 - the address under test, nothing binds it


def oauth2_config(**sections: Any) -> dict[str, Any]:
    """A minimal valid oauth2 configuration, with ``sections`` merged in one level deep."""
    data: dict[str, Any] = {
        "upstream": {"url": "https://api.example.com"},
        "identity": {
            "kind": "oauth2",
            "token_url": "https://idp.example.com/oauth2/token",
            "client_id": "my-service",
            "client_secret": SECRET,
        },
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "sidecar.yaml") -> Path:
    """Write ``data`` (YAML text, or a mapping to dump) to a file and return its path."""
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def problems(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    """The problem lines of a ConfigError message (without the ``  - `` bullets)."""
    return [
        line.removeprefix("  - ") for line in str(exc.value).splitlines() if line.startswith("  - ")
    ]


# ----------------------------------------------------------------- ${VAR} interpolation


def test_interpolation_fills_variables_and_defaults(tmp_path: Path) -> None:
    """``${VAR}`` takes the variable's value and ``${VAR:-default}`` the default when unset, inside
    longer strings too; a set variable wins over its default."""
    path = write(
        tmp_path,
        oauth2_config(
            upstream={"url": "https://${API_HOST}/v${API_VERSION:-2}"},
            identity={"client_id": "${CLIENT_ID:-fallback-id}", "scope": "${SCOPE:-read}"},
        ),
    )
    config = load_config(path, env={"API_HOST": "api.example.org", "SCOPE": "read write"})
    assert config.upstream.url == "https://api.example.org/v2"
    assert oauth2_section(config).client_id == "fallback-id"
    assert oauth2_section(config).scope == "read write"


def test_interpolation_of_secret_keeps_it_secret(tmp_path: Path) -> None:
    """A secret taken from the environment is usable by the sidecar but prints masked."""
    path = write(tmp_path, oauth2_config(identity={"client_secret": "${MY_SECRET}"}))
    config = load_config(path, env={"MY_SECRET": "from-the-env-777"})
    source = config.identity.secret("client_secret")
    assert source is not None
    assert source.read() == "from-the-env-777"
    assert "from-the-env-777" not in repr(config)
    assert "from-the-env-777" not in repr(source)
    assert "from-the-env-777" not in str(redacted(config))


def test_missing_variable_is_an_error_naming_key_and_file(tmp_path: Path) -> None:
    """An unset ``${VAR}`` without a default is an error that names the dotted key, the variable
    and the file; it is not silently replaced by an empty string."""
    path = write(tmp_path, oauth2_config(identity={"client_secret": "${NOT_SET_ANYWHERE}"}))
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    assert str(path) in str(exc.value)
    assert any(
        p.startswith("identity.client_secret:") and "NOT_SET_ANYWHERE" in p for p in problems(exc)
    ), str(exc.value)


def test_empty_default_is_allowed(tmp_path: Path) -> None:
    """``${VAR:-}`` is an explicit empty default, not a missing variable."""
    path = write(tmp_path, oauth2_config(headers={"static": {"X-Extra": "a${SUFFIX:-}b"}}))
    config = load_config(path, env={})
    assert config.headers.static == {"X-Extra": "ab"}


# ----------------------------------------------------------------- *_file secrets


def test_secret_file_is_read_and_re_read(tmp_path: Path) -> None:
    """``client_secret_file`` is accepted instead of ``client_secret``; its content (stripped) is
    the secret, re-read on every use so a rotated Kubernetes Secret is picked up; the source
    names the key it was given under."""
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("first-secret\n")
    data = oauth2_config()
    del data["identity"]["client_secret"]
    data["identity"]["client_secret_file"] = str(secret_file)
    config = load_config(write(tmp_path, data), env={})
    source = config.identity.secret("client_secret")
    assert source is not None
    assert source.where == "identity.client_secret_file"
    assert source.read() == "first-secret"
    secret_file.write_text("rotated-secret\n")
    assert source.read() == "rotated-secret"


def test_missing_secret_file_is_an_error_naming_the_key(tmp_path: Path) -> None:
    """A ``client_secret_file`` that does not exist fails at load time, naming
    ``identity.client_secret_file`` and the missing path, not at the first login."""
    missing = tmp_path / "nope" / "client-secret"
    data = oauth2_config()
    del data["identity"]["client_secret"]
    data["identity"]["client_secret_file"] = str(missing)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    lines = problems(exc)
    assert len(lines) == 1, lines
    assert lines[0].startswith("identity.client_secret_file:")
    assert str(missing) in lines[0]
    assert str(path) in str(exc.value)


def test_secret_and_secret_file_together_is_an_error(tmp_path: Path) -> None:
    """Giving both ``client_secret`` and ``client_secret_file`` is ambiguous and refused."""
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("x")
    path = write(tmp_path, oauth2_config(identity={"client_secret_file": str(secret_file)}))
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    assert "identity.client_secret: give client_secret or client_secret_file, not both" in (
        problems(exc)
    ), str(exc.value)


# ----------------------------------------------------------------- SIDECAR_<SECTION>_<KEY>


def test_env_overrides_single_and_nested_keys(tmp_path: Path) -> None:
    """``SIDECAR_<SECTION>_<KEY>`` overrides one key, including nested ones
    (``SIDECAR_UPSTREAM_TIMEOUT_TOTAL``) and keys with underscores in their names; values are
    converted to the key's type and the rest of the section is kept."""
    path = write(
        tmp_path,
        oauth2_config(listen={"port": 9000}, upstream={"timeout": {"connect": 3, "total": 30}}),
    )
    config = load_config(
        path,
        env={
            "SIDECAR_LISTEN_PORT": "9100",
            "SIDECAR_UPSTREAM_TIMEOUT_TOTAL": "7.5",
            "SIDECAR_IDENTITY_CLIENT_ID": "other-service",
            "SIDECAR_REFRESH_RETRY_MAX": "12",
            "SIDECAR_LISTEN_ALLOW_NON_LOOPBACK": "true",
            "SIDECAR_LISTEN_HOST": ANY_HOST,
        },
    )
    assert config.listen.port == 9100
    assert config.listen.host == ANY_HOST
    assert config.listen.allow_non_loopback is True
    assert config.upstream.timeout.total == 7.5
    assert config.upstream.timeout.connect == 3  # the sibling key is untouched
    assert oauth2_section(config).client_id == "other-service"
    assert oauth2_section(config).token_url == "https://idp.example.com/oauth2/token"
    assert config.refresh.retry.max == 12


def test_env_override_creates_a_section_absent_from_the_file(tmp_path: Path) -> None:
    """An override may set a key whose section the file does not mention at all."""
    path = write(tmp_path, oauth2_config())
    config = load_config(path, env={"SIDECAR_ADMIN_PORT": "9181", "SIDECAR_LOG_LEVEL": "debug"})
    assert config.admin.port == 9181
    assert config.log.level == "debug"


def test_env_override_accepts_yaml_mappings(tmp_path: Path) -> None:
    """A value starting with ``{`` is parsed as YAML/JSON, so a mapping can be given at once."""
    path = write(tmp_path, oauth2_config())
    config = load_config(path, env={"SIDECAR_HEADERS_STATIC": '{"X-Team": "payments"}'})
    assert config.headers.static == {"X-Team": "payments"}


def test_env_override_unknown_key_in_known_section_is_an_error(tmp_path: Path) -> None:
    """A misspelt key inside a known section is an error naming the variable, as in the file."""
    path = write(tmp_path, oauth2_config())
    with pytest.raises(ConfigError) as exc:
        load_config(
            path,
            env={"SIDECAR_UPSTREAM_TIMEOUT_TOTL": "5", "SIDECAR_UPSTREAM_TIMEOUT": "5"},
        )
    lines = problems(exc)
    assert any(p.startswith("SIDECAR_UPSTREAM_TIMEOUT_TOTL:") for p in lines), lines
    # a whole sub-section cannot be set from a scalar: that is not a key either
    assert any(p.startswith("SIDECAR_UPSTREAM_TIMEOUT:") for p in lines), lines


def test_env_variables_of_unknown_sections_are_ignored(tmp_path: Path) -> None:
    """Variables whose first word is not a section are not ours: Kubernetes injects
    ``SIDECAR_SERVICE_HOST``, ``SIDECAR_PORT`` and friends for a Service named ``sidecar``."""
    path = write(tmp_path, oauth2_config())
    config = load_config(
        path,
        env={
            "SIDECAR_SERVICE_HOST": "10.0.0.12",
            "SIDECAR_SERVICE_PORT": "8080",
            "SIDECAR_PORT": "tcp://10.0.0.12:8080",
            "SIDECAR_PORT_8080_TCP_ADDR": "10.0.0.12",
            "SIDECAR_CONFIG": "/ignored/because/a/path/was/given.yaml",
            "OTHER_LISTEN_PORT": "1",
        },
    )
    assert config.listen.port == 8080
    assert config.listen.host == "127.0.0.1"


def test_sidecar_config_variable_selects_the_file(tmp_path: Path) -> None:
    """Without a path, ``$SIDECAR_CONFIG`` names the file; without either, the embedded demo."""
    path = write(tmp_path, oauth2_config(identity={"client_id": "from-env-file"}))
    assert oauth2_section(load_config(None, env={"SIDECAR_CONFIG": str(path)})).client_id == (
        "from-env-file"
    )
    demo = load_config(None, env={})
    assert demo.demo.enabled
    assert demo.identity.kind == "demo"
    with pytest.raises(ConfigError) as exc:
        load_config(None, env={"SIDECAR_LISTEN_PORTT": "1"})
    assert DEMO_SOURCE in str(exc.value)


# ----------------------------------------------------------------- validation


def test_unknown_yaml_keys_are_rejected_by_dotted_name(tmp_path: Path) -> None:
    """Misspelt keys are errors naming the full dotted key, at any depth, not silently ignored."""
    data = oauth2_config(session={"stor": "file"}, upstream={"timeout": {"totl": 3}})
    data["listn"] = {"port": 1}
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    lines = problems(exc)
    assert "session.stor: unknown key (did you mean store?)" in lines
    assert "upstream.timeout.totl: unknown key (did you mean total?)" in lines
    assert "listn: unknown key (did you mean listen?)" in lines


@pytest.mark.parametrize("section", ["listen", "admin"])
@pytest.mark.parametrize("host", [ANY_HOST, "10.1.2.3", "::", "example.com"])
def test_non_loopback_host_is_refused_unless_allowed(
    tmp_path: Path, section: str, host: str
) -> None:
    """Anything that can reach the proxy gets requests signed with the token: a non-loopback
    listen (or admin) host is refused, naming ``<section>.host``, unless ``allow_non_loopback``."""
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, oauth2_config(**{section: {"host": host}})), env={})
    lines = problems(exc)
    assert len(lines) == 1, lines  # one problem, one line
    assert lines[0].startswith(f"{section}.host:")
    assert "allow_non_loopback" in lines[0]
    allowed = load_config(
        write(tmp_path, oauth2_config(**{section: {"host": host, "allow_non_loopback": True}})),
        env={},
    )
    assert getattr(allowed, section).host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "localhost", "::1"])
def test_loopback_hosts_are_accepted(tmp_path: Path, host: str) -> None:
    """Every loopback spelling is accepted without ``allow_non_loopback``."""
    config = load_config(
        write(tmp_path, oauth2_config(listen={"host": host}, admin={"host": host})), env={}
    )
    assert config.listen.host == host
    assert config.admin.host == host


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://user:pw@api.example.com", "credentials"),
        ("https://token@api.example.com", "credentials"),
        ("https://api.example.com/v1?key=abc", "query"),
        ("https://api.example.com/v1#frag", "fragment"),
        ("ftp://api.example.com", "http"),
        ("api.example.com", "http"),
    ],
)
def test_bad_upstream_urls_are_refused(tmp_path: Path, url: str, words: str) -> None:
    """The upstream URL is one http(s) origin with an optional path prefix: credentials, a query or
    a fragment in it, or another scheme, are refused naming ``upstream.url``."""
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, oauth2_config(upstream={"url": url})), env={})
    lines = problems(exc)
    assert len(lines) == 1, lines
    assert lines[0].startswith("upstream.url:")
    assert words in lines[0]


def test_upstream_url_trailing_slash_is_dropped(tmp_path: Path) -> None:
    """A path prefix keeps its path but loses a trailing slash (paths are appended to it)."""
    config = load_config(
        write(tmp_path, oauth2_config(upstream={"url": "https://api.example.com/base/"})), env={}
    )
    assert config.upstream.url == "https://api.example.com/base"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """One load reports every problem (file, environment and cross-field), each on its own line
    starting with its dotted key, under a header naming the file."""
    path = write(
        tmp_path,
        {
            "listen": {"host": ANY_HOST},
            "admin": {"port": 70000},
            "upstream": {"url": "https://u:p@api.example.com"},
            "identity": {"kind": "oauth2", "client_secret": "${UNSET_VAR}"},
            "refresh": {"jitter": 2},
            "session": {"store": "redis"},
            "log": {"levl": "debug"},
        },
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={"SIDECAR_ADMIN_PROT": "1"})
    message = str(exc.value)
    assert message.splitlines()[0] == f"{path}: invalid configuration:"
    keys = {line.split(":", 1)[0] for line in problems(exc)}
    assert keys >= {
        "identity.client_secret",  # the unset variable
        "SIDECAR_ADMIN_PROT",
        "admin.port",
        "listen.host",
        "upstream.url",
        "identity.token_url",
        "identity.client_id",
        "refresh.jitter",
        "session.redis_url",
        "log.levl",
    }, message


def test_unreadable_and_malformed_files_name_the_file(tmp_path: Path) -> None:
    """A missing file, YAML that does not parse, and a top level that is not a mapping are each
    a ConfigError naming the file."""
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="cannot read config file") as exc:
        load_config(missing, env={})
    assert str(missing) in str(exc.value)
    broken = write(tmp_path, "listen: {port: 8080\n", "broken.yaml")
    with pytest.raises(ConfigError, match="not valid YAML") as exc:
        load_config(broken, env={})
    assert str(broken) in str(exc.value)
    listing = write(tmp_path, "- listen\n- admin\n", "list.yaml")
    with pytest.raises(ConfigError, match="mapping") as exc:
        load_config(listing, env={})
    assert str(listing) in str(exc.value)


def test_config_is_frozen(tmp_path: Path) -> None:
    """The loaded configuration cannot be changed by accident after validation."""
    config = load_config(write(tmp_path, oauth2_config()), env={})
    with pytest.raises(ValueError, match="frozen"):
        config.listen.port = 1  # type: ignore[misc]


# ----------------------------------------------------------------- redaction


def test_redacted_masks_every_secret() -> None:
    """``redacted`` masks client_secret, password, a Redis URL's password and static headers whose
    names look secret, and keeps everything else readable."""
    config = Config.model_validate(
        oauth2_config(
            identity={
                "grant": "password",
                "username": "svc-user",
                "password": "pw-value-31337",
            },
            headers={
                "static": {
                    "X-Api-Key": "key-value-1",
                    "X-Auth-Token": "token-value-2",
                    "Cookie": "cookie-value-3",
                    "X-Session-Hint": "session-value-4",
                    "X-Team": "payments",
                }
            },
            session={"store": "redis", "redis_url": "redis://:redis-pw-5@127.0.0.1:6379/0"},
        )
    )
    data = redacted(config)
    text = yaml.safe_dump(data)
    for secret in (
        SECRET,
        "pw-value-31337",
        "key-value-1",
        "token-value-2",
        "cookie-value-3",
        "session-value-4",
        "redis-pw-5",
    ):
        assert secret not in text
    assert data["identity"]["client_secret"] == "**********"
    assert data["identity"]["password"] == "**********"
    assert data["identity"]["username"] == "svc-user"
    assert data["headers"]["static"]["X-Team"] == "payments"
    assert data["headers"]["static"]["X-Api-Key"] == "**********"
    assert "127.0.0.1:6379" in data["session"]["redis_url"]


# ----------------------------------------------------------------- sidecar check-config


def test_check_config_prints_effective_config_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``check-config -c FILE`` exits 0 and prints the effective config (overrides applied) as
    YAML with the secret value absent."""
    path = write(tmp_path, oauth2_config(listen={"port": 9000}))
    monkeypatch.setenv("SIDECAR_LISTEN_PORT", "9300")
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    printed = yaml.safe_load(out)
    assert printed["listen"]["port"] == 9300
    assert printed["identity"]["client_id"] == "my-service"
    assert printed["identity"]["client_secret"] == "**********"
    # what check-config prints is itself a valid configuration (secrets aside)
    assert set(printed) == set(Config.model_fields)


def test_check_config_bad_file_exits_2_naming_key_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad config makes ``check-config`` exit 2 with a message on stderr naming the key and the
    file, and nothing on stdout; the secret is not echoed in the error either."""
    path = write(tmp_path, oauth2_config(upstream={"timeout": {"totl": 3}}))
    assert main(["check-config", "-c", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(path) in captured.err
    assert "upstream.timeout.totl" in captured.err
    assert SECRET not in captured.err


def test_check_config_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config file that does not exist is a config error (exit 2), naming the file."""
    path = tmp_path / "absent.yaml"
    assert main(["check-config", "-c", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_kubernetes_service_links_for_sidecar_named_services_are_ignored(tmp_path: Path) -> None:
    """A Service named `sidecar-admin` injects SIDECAR_ADMIN_PORT=tcp://...; that and the other
    service-link variables must not be read as overrides of admin.port."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "upstream: {url: 'https://api.example.com'}\nidentity: {kind: demo}\n"
        "demo: {enabled: true}\n"
    )
    env = {
        "SIDECAR_ADMIN_PORT": "tcp://10.0.0.7:8081",
        "SIDECAR_ADMIN_PORT_8081_TCP": "tcp://10.0.0.7:8081",
        "SIDECAR_ADMIN_PORT_8081_TCP_PORT": "8081",
        "SIDECAR_ADMIN_SERVICE_HOST": "10.0.0.7",
        "SIDECAR_ADMIN_SERVICE_PORT": "8081",
        "SIDECAR_LISTEN_PORT": "9000",
    }
    config = load_config(path, env=env)
    assert config.admin.port == 8081
    assert config.listen.port == 9000


def test_previous_encryption_keys_need_a_current_key_and_readable_files(tmp_path: Path) -> None:
    """session.previous_encryption_key_files only makes sense beside encryption_key_file (the key
    that writes), and each listed file must be readable: the problem names its position."""
    key = tmp_path / "new.key"
    key.write_text("bm90LWEtcmVhbC1rZXktYnV0LWJhc2U2NC1lbmNvZGVkLWE=")
    alone = write(tmp_path, oauth2_config(session={"previous_encryption_key_files": [str(key)]}))
    with pytest.raises(ConfigError) as exc:
        load_config(alone, env={})
    assert any(p.startswith("session.previous_encryption_key_files") for p in problems(exc))
    assert "needs encryption_key_file" in str(exc.value)
    missing = tmp_path / "gone.key"
    listed = write(
        tmp_path,
        oauth2_config(
            session={
                "encryption_key_file": str(key),
                "previous_encryption_key_files": [str(missing)],
            }
        ),
    )
    with pytest.raises(ConfigError) as exc:
        load_config(listed, env={})
    assert f"session.previous_encryption_key_files[0]: cannot read {missing}" in str(exc.value)


def test_redis_url_file_errors_name_the_key_and_never_show_the_url(tmp_path: Path) -> None:
    """redis_url or redis_url_file, not both and not neither; the file must be readable and hold
    a redis URL, and a wrong one is reported without its content (it may carry a password)."""
    base = {"upstream": {"url": "https://api.example.com"}, "demo": {"enabled": True}}

    def load_problems(session: dict[str, Any]) -> list[str]:
        with pytest.raises(ConfigError) as exc:
            checked_config(
                write(tmp_path, {**base, "session": {"store": "redis", **session}}), env={}
            )
        return problems(exc)

    url_file = tmp_path / "redis-url"
    url_file.write_text("redis://:pw-in-file@127.0.0.1:6379/0\n")
    assert load_problems({}) == ["session.redis_url: required for store redis (or redis_url_file)"]
    both = load_problems({"redis_url": "redis://127.0.0.1:6379/0", "redis_url_file": str(url_file)})
    assert both == ["session.redis_url: give redis_url or redis_url_file, not both"]
    missing = load_problems({"redis_url_file": str(tmp_path / "nope")})
    assert len(missing) == 1
    assert missing[0].startswith("session.redis_url_file: cannot read ")
    url_file.write_text("http://:pw-in-file@127.0.0.1:6379/0\n")
    wrong = load_problems({"redis_url_file": str(url_file)})
    assert len(wrong) == 1
    assert wrong[0].startswith("session.redis_url_file: the URL in ")
    assert "must start with redis://" in wrong[0]
    assert "pw-in-file" not in wrong[0]
    url_file.write_text("redis://:pw-in-file@127.0.0.1:6379/0\n")
    config = load_config(
        write(tmp_path, {**base, "session": {"store": "redis", "redis_url_file": str(url_file)}}),
        env={},
    )
    assert config.session.redis_address() == "redis://:pw-in-file@127.0.0.1:6379/0"


def test_an_unset_variable_is_one_problem_and_a_bad_override_names_its_variable(
    tmp_path: Path,
) -> None:
    """``${API_URL}`` unset is reported once (not again as an invalid empty URL); a bad value
    from SIDECAR_LISTEN_PORT names the variable, since the file has no listen.port."""
    path = write(tmp_path, {"upstream": {"url": "${API_URL}"}, "demo": {"enabled": True}})
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={"SIDECAR_LISTEN_PORT": "abc"})
    lines = problems(exc)
    assert lines[0] == "upstream.url: environment variable API_URL is not set"
    assert len(lines) == 2, lines
    assert lines[1].startswith("listen.port: ")
    assert lines[1].endswith("(set by SIDECAR_LISTEN_PORT)")


def test_each_identity_kind_takes_its_own_keys(tmp_path: Path) -> None:
    """identity is one model per kind: a key of another kind is refused naming the kind it
    belongs to; a section without kind but with another kind's keys asks for a kind; a typo
    in a kind's key is matched against that kind's keys; SIDECAR_IDENTITY_* reaches the keys of
    any kind."""
    base = {"upstream": {"url": "https://api.example.com"}, "demo": {"enabled": True}}

    def load_problems(identity: dict[str, Any]) -> list[str]:
        with pytest.raises(ConfigError) as exc:
            load_config(write(tmp_path, {**base, "identity": identity}), env={})
        return problems(exc)

    assert load_problems({"kind": "demo", "client_id": "c"}) == [
        "identity.client_id: only used by kind oauth2"
    ]
    assert load_problems({"kind": "demo", "jwks_url": "https://idp.example.com/jwks"}) == [
        "identity.jwks_url: only used by kind oauth2 or json_login"
    ]
    (missing,) = load_problems({"client_id": "c"})
    assert missing.startswith("identity.kind: missing or unknown: give oauth2 or json_login"), (
        missing
    )
    (unknown,) = load_problems({"kind": "oauth", "client_id": "c"})
    assert unknown == missing, unknown
    typo = {**oauth2_config()["identity"], "scoep": "read"}
    assert load_problems(typo) == ["identity.scoep: unknown key (did you mean scope?)"]
    demo = load_config(write(tmp_path, {**base, "identity": {"timeout": 3}}), env={})
    assert (demo.identity.kind, demo.identity.timeout) == ("demo", 3)
    path = write(tmp_path, {**base, "identity": {"kind": "json_login"}})
    env = {
        "SIDECAR_IDENTITY_LOGIN_URL": "https://idp.example.com/login",
        "SIDECAR_IDENTITY_CREDENTIALS": '{"user": "u"}',
    }
    config = load_config(path, env=env)
    assert isinstance(config.identity, JsonLoginSection)
    assert config.identity.login is not None
    assert config.identity.login.url == "https://idp.example.com/login"
    assert list(config.identity.credentials) == ["user"]


def test_a_missing_identity_section_asks_for_a_kind(tmp_path: Path) -> None:
    """Without an identity section (and without the demo) the one problem asks for a kind,
    rather than only saying what the default kind, demo, would need."""
    path = write(tmp_path, {"upstream": {"url": "https://api.example.com"}})
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    assert problems(exc) == [
        "identity.kind: required (oauth2 or json_login); the default, demo, needs "
        "demo.enabled: true"
    ]


def test_unset_variables_and_overrides_in_lists_file_checks_and_replaced_keys(
    tmp_path: Path,
) -> None:
    """An unset variable is one problem wherever it sits (a list item, a file key), a SIDECAR_*
    value that replaces it is judged on its own, and file checks name the variable too."""
    base: dict[str, Any] = {"upstream": {"url": "https://api.example.com"}}
    oauth = {"kind": "oauth2", "token_url": "https://idp.example.com/t", "client_id": "c"}

    def load_problems(data: dict[str, Any], env: dict[str, str]) -> list[str]:
        with pytest.raises(ConfigError) as exc:
            load_config(write(tmp_path, {**base, **data}), env=env)
        return problems(exc)

    listed = {"identity": {**oauth, "client_secret": "s", "backup_token_urls": ["${DR_URL}"]}}
    assert load_problems(listed, {}) == [
        "identity.backup_token_urls[0]: environment variable DR_URL is not set"
    ]
    keyed = {
        "identity": {**oauth, "client_secret": "s"},
        "session": {"encryption_key_file": "${KEYFILE}"},
    }
    assert load_problems(keyed, {}) == [
        "session.encryption_key_file: environment variable KEYFILE is not set"
    ]
    replaced = {"upstream": {"url": "${API_URL}"}, "demo": {"enabled": True}}
    got = load_problems(replaced, {"SIDECAR_UPSTREAM_URL": "ftp://x"})
    assert len(got) == 1, got
    assert got[0].startswith("upstream.url: ")
    assert got[0].endswith("(set by SIDECAR_UPSTREAM_URL)")
    missing = str(tmp_path / "no-such-key")
    got = load_problems(
        {"demo": {"enabled": True}}, {"SIDECAR_SESSION_ENCRYPTION_KEY_FILE": missing}
    )
    assert got == [
        f"session.encryption_key_file: cannot read {missing}: No such file or directory "
        "(set by SIDECAR_SESSION_ENCRYPTION_KEY_FILE)"
    ]


def test_a_redis_url_file_with_an_unescaped_password_is_refused_without_showing_it(
    tmp_path: Path,
) -> None:
    """redis-py would quote the password in its error; check-config reports the file instead.
    (The store's check: the config layer alone takes the URL as data.)"""
    url_file = tmp_path / "redis-url"
    url_file.write_text("redis://:p4ss/w0rd@127.0.0.1:6379/0\n")
    path = write(
        tmp_path,
        {
            "upstream": {"url": "https://api.example.com"},
            "demo": {"enabled": True},
            "session": {"store": "redis", "redis_url_file": str(url_file)},
        },
    )
    assert load_config(path, env={}).session.redis_url_file == url_file
    with pytest.raises(ConfigError) as exc:
        checked_config(path, env={})
    (line,) = problems(exc)
    assert line.startswith(
        f"session.redis_url_file: the URL in {url_file} is not a valid redis URL"
    )
    assert "p4ss" not in str(exc.value)
    assert "w0rd" not in str(exc.value)


def test_logout_on_shutdown_with_a_shared_redis_store_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """session.logout_on_shutdown with session.store: redis would log every replica out when one
    of them stops (a rolling deploy logs everyone out): check-config exits 2 naming both keys.
    Each alone stays valid."""
    shared = {"store": "redis", "redis_url": "redis://127.0.0.1:6379/0"}
    path = write(tmp_path, oauth2_config(session={**shared, "logout_on_shutdown": True}))
    assert main(["check-config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "session.logout_on_shutdown" in err
    assert "session.store" in err
    assert "POST /session/logout" in err
    load_config(write(tmp_path, oauth2_config(session=shared)), env={})
    load_config(write(tmp_path, oauth2_config(session={"logout_on_shutdown": True})), env={})


def test_every_key_has_its_meaning_written_on_its_field() -> None:
    """Each key's meaning is its field's description (the reference and the JSON Schema read it
    there): no field of any section, of any identity kind, is without one."""
    from sidecar.config.load import submodels

    seen: set[type[BaseModel]] = set()
    missing = []
    pending: list[type[BaseModel]] = [Config]
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            pending.extend(submodels(field.annotation))
    assert len(seen) > 20
    assert missing == []
