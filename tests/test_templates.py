"""{{ ... }} placeholders: safe rendering into JSON values, and config errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.config.load import load_config
from sidecar.config.models import Config
from sidecar.errors import ConfigError
from sidecar.templates import MissingValue, compile_text, compile_tree
from tests.helpers import json_login_section
from tests.test_config import write


def json_login(**identity: Any) -> dict[str, Any]:
    """A minimal valid json_login config, with ``identity`` keys replaced."""
    base: dict[str, Any] = {
        "kind": "json_login",
        "credentials": {"username": "u", "password": "p"},
        "login": {
            "url": "https://idp.example.com/login",
            "json": {"user": "{{ credentials.username }}", "pw": "{{ credentials.password }}"},
        },
        "response": {"fields": {"tenant_id": "tenantId"}},
    }
    base.update(identity)
    return {"upstream": {"url": "https://api.example.com"}, "identity": base}


def test_rendered_values_cannot_change_the_json_structure() -> None:
    """A credential holding quotes, braces and a placeholder-lookalike stays one string value:
    rendering works on parsed data, so the serialised body has exactly the template's keys."""
    tree = compile_tree({"user": "{{ credentials.u }}", "n": 3, "list": ["a{{ credentials.u }}"]})
    hostile = '", "admin": true, "x": "{{ credentials.u }}'
    body = json.loads(json.dumps(tree.render({"credentials": {"u": hostile}})))
    assert body == {"user": hostile, "n": 3, "list": ["a" + hostile]}
    assert set(body) == {"user", "n", "list"}


def test_text_templates_mix_literals_and_placeholders() -> None:
    """Literal text around placeholders is kept; whitespace inside the braces is optional."""
    text = compile_text("Bearer {{session.access_token}} / {{ session.tenant_id }}")
    assert text.names == {"session.access_token", "session.tenant_id"}
    values = {"session": {"access_token": "at", "tenant_id": "7"}}
    assert text.render(values) == "Bearer at / 7"
    with pytest.raises(MissingValue) as caught:
        text.render({"session": {"access_token": "at"}})
    assert caught.value.name == "session.tenant_id"


def test_malformed_placeholders_are_refused() -> None:
    """A ``{{`` that is not ``{{ namespace.name }}`` is an error, not literal text."""
    for bad in ("{{ password }}", "{{ credentials.a.b }}", "x {{ credentials.", "{{}}"):
        with pytest.raises(ValueError, match="malformed placeholder"):
            compile_text(bad)


def test_unknown_placeholder_names_the_key() -> None:
    """A misspelt credential in the login body is a config error naming the exact key."""
    cfg = json_login(
        login={
            "url": "https://idp.example.com/login",
            "json": {"a": {"b": "{{ credentials.pasword }}"}},
        }
    )
    with pytest.raises(ValueError, match=r"login\.json\.a\.b: unknown placeholder"):
        Config.model_validate(cfg)


def test_session_placeholders_are_not_available_at_login() -> None:
    """There is no session yet when logging in: {{ session.* }} in login is an error."""
    cfg = json_login(
        login={"url": "https://idp.example.com/l", "headers": {"X-T": "{{ session.tenant_id }}"}}
    )
    with pytest.raises(ValueError, match=r"login\.headers\.X-T: unknown placeholder"):
        Config.model_validate(cfg)


def test_refresh_and_logout_may_use_session_values() -> None:
    """Refresh and logout see the tokens and every configured field."""
    cfg = json_login(
        refresh={
            "url": "https://idp.example.com/r",
            "json": {"rt": "{{ session.refresh_token }}", "t": "{{ session.tenant_id }}"},
        },
        logout={
            "url": "https://idp.example.com/o",
            "headers": {"Authorization": "Bearer {{ session.access_token }}"},
        },
    )
    assert json_login_section(Config.model_validate(cfg)).refresh is not None


def test_header_values_may_use_session_fields_but_not_secrets(tmp_path: Path) -> None:
    """headers.* may use session fields and the access token; credentials and the refresh token
    are refused (they stay with the identity provider), each naming its key, all at once."""
    cfg = json_login()
    cfg["headers"] = {
        "tenant_id": "{{ session.tenant_id }}",
        "static": {
            "X-Token": "{{ session.access_token }}",
            "X-Bad": "{{ credentials.password }}",
            "X-Worse": "{{ session.refresh_token }}",
        },
    }
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, cfg), env={})
    message = str(caught.value)
    assert "headers.static.X-Bad: unknown placeholder {{ credentials.password }}" in message
    assert "headers.static.X-Worse: unknown placeholder {{ session.refresh_token }}" in message
    assert "tenant_id" not in message.replace("session.tenant_id", "")


def test_credentials_given_twice_or_badly_named_are_errors() -> None:
    """``password`` and ``password_file`` together, or a name that cannot be a placeholder."""
    cfg = json_login(credentials={"password": "p", "password_file": "/x", "Bad-Name": "v"})
    with pytest.raises(ValueError, match="credentials") as caught:
        Config.model_validate(cfg)
    text = str(caught.value)
    assert "credentials.password: give password or password_file, not both" in text
    assert "credentials.Bad-Name: names are lower-case identifiers" in text


def test_json_login_needs_a_login_call() -> None:
    """kind json_login without identity.login is refused, naming the key."""
    cfg = json_login()
    del cfg["identity"]["login"]
    with pytest.raises(ValueError, match="login: required for kind json_login"):
        Config.model_validate(cfg)


def test_json_login_keys_with_another_kind_are_errors(tmp_path: Path) -> None:
    """identity.login (and credentials, refresh, logout) with kind oauth2 would be silently
    ignored: it is an error naming the key and the kind it belongs to instead; the loader
    reports each (the oauth2 model has no such keys)."""
    cfg = json_login(kind="oauth2", token_url="https://idp.example.com/t", client_id="c")
    cfg["identity"]["client_secret"] = "s"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, cfg), env={})
    message = str(caught.value)
    assert "identity.login: only used by kind json_login" in message
    assert "identity.credentials: only used by kind json_login" in message
    assert "identity.response: only used by kind json_login" in message
