"""Whose session it is: the principal a stored or shared session belongs to, as an opaque id.

A stored (file) or shared (Redis) session is reused only by a sidecar that would log in as the
same principal at the same provider. Every non-secret value that names the principal (the
provider's endpoint, client id, grant, username, customer id, scope, audience, resource, the
subject of a token-exchange subject token or of a jwt-bearer assertion) goes into the id;
secrets (passwords, client secrets, keys) stay out, so a rotated secret keeps the session.

The id is a keyed hash (HMAC-SHA256), never the values: it names the Redis keys
(``sidecar:<id>:...``), is written in the session record and is the encryption context of a
sealed record, and none of those may show a username or a customer id. The key is a fixed
domain-separation key, not the session encryption key: a key rotation (a new
``session.encryption_key_file`` by SIGHUP, replicas rotated one by one) must keep every replica
on the same session, which an id that changed with the key would split.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.errors import ConfigError
from sidecar.tokens import jwt_claims

if TYPE_CHECKING:
    from sidecar.config.json_login import JsonLoginSection
    from sidecar.config.oauth2 import OAuth2Section

#: the HMAC key: separates this use of the hash from any other (see the module docstring for
#: why it is not the session encryption key)
_KEY = b"sidecar/session-principal/v1"
#: hex digits kept (128 bits): unique per principal, short enough for a Redis key
_LENGTH = 32
#: json_login credential names with one of these words (split on "_") are secrets: their values
#: rotate without changing whose session it is, unless the name ends in a word of
#: :data:`NAMING_WORDS` (``key_id`` names a key, it is not one). Every other credential names the
#: principal (username, customer_id, account, email, tenant): unknown names count as naming it,
#: the safe side (a wrong guess costs one login, never another principal's session)
SECRET_WORDS = frozenset(
    {"password", "passwd", "pass", "pwd", "secret", "key", "apikey", "token", "pin", "passphrase",
     "otp", "totp", "credential", "credentials"}
)  # fmt: skip
NAMING_WORDS = frozenset({"id", "name", "user", "username", "email", "account", "login"})


def principal_id(kind: str, values: Mapping[str, object]) -> str:
    """The opaque id of ``values`` (everything that names the principal at its provider)."""
    message = json.dumps({"kind": kind, **values}, sort_keys=True, separators=(",", ":"))
    return hmac.new(_KEY, message.encode(), hashlib.sha256).hexdigest()[:_LENGTH]


def is_secret_name(name: str) -> bool:
    """True for a json_login credential name that holds a secret (see :data:`SECRET_WORDS`)."""
    words = [word for word in re.split(r"_+", name.lower()) if word]
    if not words or words[-1] in NAMING_WORDS:
        return False
    return any(word in SECRET_WORDS for word in words)


def file_text(path: Path | None) -> str:
    """A principal value kept in a file, as it is now (read when the identity is built: at start
    and at each reload). An unreadable file counts as empty: the login that needs it fails and
    says why."""
    if path is None:
        return ""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def jwt_subject(path: Path | None) -> str:
    """The ``sub`` claim of the JWT in ``path`` (a token-exchange subject token, a jwt-bearer
    assertion); empty when there is none. Read unverified: it only tells sessions apart."""
    claims = jwt_claims(file_text(path))
    sub = claims.get("sub") if claims is not None else None
    return sub if isinstance(sub, str) else ""


def oauth2_principal(config: OAuth2Section) -> str:
    """The principal id of an oauth2 identity: the provider and every value naming the client
    or user (the subject token's or assertion's ``sub`` as the files hold them now), no secret."""
    grant = config.grant
    return principal_id(
        "oauth2",
        {
            "provider": config.token_url or config.issuer or "",
            "client_id": config.client_id or "",
            "grant": grant,
            "username": config.username or "",
            "scope": config.scope or "",
            "audience": config.audience or "",
            "resource": config.resource or "",
            "subject": jwt_subject(config.subject_token_file) if grant == "token_exchange" else "",
            "assertion": jwt_subject(config.assertion_file) if grant == "jwt_bearer" else "",
        },
    )


def json_login_principal(config: JsonLoginSection) -> str:
    """The principal id of a json_login identity: the login call as configured (its URL, and
    the headers and body templates, where a tenant may be written out) and the value of every
    credential that is not a secret (:func:`is_secret_name`), from a file as it holds it now."""
    if config.login is None:  # the config validator requires it for this kind
        raise ConfigError("identity.login: required with kind json_login")
    named = {}
    for name, source in config.credential_sources().items():
        if is_secret_name(name):
            continue
        named[name] = file_text(source.file) if source.file is not None else source.read()
    login = config.login
    return principal_id(
        "json_login",
        {
            "provider": login.url,
            "call": {"method": login.method, "headers": login.headers, "json": login.body},
            "credentials": named,
        },
    )
