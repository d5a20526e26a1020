"""The configuration reference, generated from the config model so that it cannot drift.

``python -m sidecar.config.reference > docs/config-reference.md`` writes it; a test checks that the
committed file equals what this module generates.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sidecar.config.load import submodel
from sidecar.config.models import Config

HEADER = """# Configuration reference

Generated from `sidecar/config/models.py` by `python -m sidecar.config.reference`; do not edit by
hand. Every key may be set in the YAML file, or overridden by `SIDECAR_<SECTION>_<KEY>`
(for example `SIDECAR_UPSTREAM_TIMEOUT_TOTAL=10`). Secrets print as `**********`.

| key | type | default | meaning |
|---|---|---|---|
"""


def _type_name(field: FieldInfo) -> str:
    text = str(field.annotation).replace("typing.", "").replace("pathlib.", "")
    text = text.replace("pydantic.types.", "").replace("<class '", "").replace("'>", "")
    return text.replace("Literal", "one of ").replace("|", "or")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if field.is_required():
        return "(required)"
    if value is None:
        return "null"
    return json.dumps(value if not hasattr(value, "__fspath__") else str(value))


def _rows(model: type[BaseModel], prefix: str, docs: dict[str, str]) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        section = submodel(field.annotation)
        if section is not None:
            optional = "" if section is field.annotation else " (optional)"
            rows.append(f"| `{key}` | section{optional} | | {_first_line(section.__doc__)} |")
            rows.extend(_rows(section, key + ".", docs))
            continue
        meaning = field.description or docs.get(key, "")
        rows.append(f"| `{key}` | {_type_name(field)} | `{_default(field)}` | {meaning} |")
    return rows


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text else ""


MEANINGS = {
    "listen.host": "address of the proxy; loopback unless allow_non_loopback",
    "listen.port": "port of the proxy (0 picks a free one)",
    "listen.allow_non_loopback": "allow a non-loopback host (anyone reaching it gets signed calls)",
    "listen.drain_timeout": "seconds in-flight requests get to finish after SIGTERM",
    "admin.host": "address of /metrics, /healthz, /readyz, /session",
    "admin.port": "port of the admin endpoints",
    "admin.allow_non_loopback": "allow a non-loopback admin host (POSTs stay loopback-only)",
    "upstream.url": "the one origin that gets the token; incoming path and query are appended",
    "upstream.timeout.connect": "seconds to connect to the upstream",
    "upstream.timeout.total": "seconds to the response head; then the longest silence mid-body",
    "upstream.tls.verify": "verify the upstream's certificate",
    "upstream.tls.ca_file": "CA bundle for the upstream (re-read when it changes)",
    "upstream.tls.cert_file": "client certificate for mTLS (re-read when it changes)",
    "upstream.tls.key_file": "client key for mTLS (re-read when it changes)",
    "upstream.tls.min_version": "lowest TLS version accepted",
    "upstream.send_cookies": "send the session's cookies matching the upstream URL (RFC 6265)",
    "upstream.replay_body_limit": "bodies up to this many bytes are buffered for a 401 replay",
    "upstream.pool_size": "idle keep-alive connections kept to the upstream",
    "upstream.max_request_body": "request bodies over this many bytes get 413 (null: no limit)",
    "identity.kind": "oauth2, json_login (vendor JSON session APIs), or demo",
    "identity.issuer": "OIDC issuer: endpoints from <issuer>/.well-known/openid-configuration",
    "identity.token_url": "the OAuth2 token endpoint (optional with issuer)",
    "identity.backup_token_urls": "tried in order when the token endpoint is down, slow or 5xx",
    "identity.grant": "client_credentials, password, jwt_bearer (RFC 7523) or token_exchange",
    "identity.client_id": "the client's id",
    "identity.client_secret": "the client's secret (or client_secret_file)",
    "identity.client_secret_file": "file holding the secret, re-read at every login",
    "identity.client_auth": (
        "client_secret_basic, client_secret_post, private_key_jwt, client_assertion_file or none"
    ),
    "identity.private_key_file": "PEM private key (RSA, EC, Ed25519), re-read at every login",
    "identity.key_id": "kid header of the signed assertions",
    "identity.signing_alg": "JWS algorithm of the assertions (default: from the key type)",
    "identity.username": "password grant: the user",
    "identity.password": "password grant: the password (or password_file)",
    "identity.password_file": "file holding the password, re-read at every login",
    "identity.assertion_file": "jwt_bearer: file holding the assertion, re-read at every login",
    "identity.subject_token_file": "token_exchange: the subject token file, re-read at every login",
    "identity.subject_token_type": "token_exchange: RFC 8693 type of the subject token",
    "identity.actor_token_file": "token_exchange: the actor token's file (optional)",
    "identity.actor_token_type": "token_exchange: RFC 8693 type of the actor token",
    "identity.requested_token_type": "token_exchange: RFC 8693 type asked for (optional)",
    "identity.scope": "scope requested",
    "identity.audience": "audience parameter",
    "identity.resource": "resource parameter (RFC 8707)",
    "identity.revocation_url": "RFC 7009 endpoint used by logout (default: from discovery)",
    "identity.introspection_url": "RFC 7662: validates opaque tokens (default: from discovery)",
    "identity.jwks_url": "JWKS for validate (default: from discovery; json_login: required)",
    "identity.timeout": "seconds per call to the identity provider",
    "identity.tls.verify": "verify the identity provider's certificate",
    "identity.tls.ca_file": "CA bundle for the identity provider (re-read when it changes)",
    "identity.tls.cert_file": "client certificate for mTLS to the provider (re-read on change)",
    "identity.tls.key_file": "client key for mTLS toward the provider (re-read when it changes)",
    "identity.tls.min_version": "lowest TLS version accepted from the identity provider",
    "identity.credentials": "json_login: {name: value} or {name_file: path}, as credentials.name",
    "identity.login.url": "json_login: the login endpoint",
    "identity.login.method": "HTTP method of the call",
    "identity.login.headers": "request headers; values may use {{ credentials.* }}",
    "identity.login.json": "the JSON body; string values may use {{ credentials.* }}",
    "identity.login.backup_urls": "tried in order when the one before fails (unreachable, 5xx)",
    "identity.refresh.url": "json_login: refresh endpoint (no refresh section: renew by a login)",
    "identity.refresh.method": "HTTP method of the call",
    "identity.refresh.headers": "request headers; may use {{ credentials.* }} and {{ session.* }}",
    "identity.refresh.json": "the JSON body; may use {{ credentials.* }} and {{ session.* }}",
    "identity.refresh.backup_urls": "tried in order when the one before fails (unreachable, 5xx)",
    "identity.refresh.rejected_status": "statuses meaning 'refresh token rejected': log in again",
    "identity.logout.url": "json_login: the logout endpoint (POST /session/logout, shutdown)",
    "identity.logout.method": "HTTP method of the call",
    "identity.logout.headers": "request headers; may use {{ credentials.* }} and {{ session.* }}",
    "identity.logout.json": "the JSON body (null: none)",
    "identity.logout.backup_urls": "tried in order when the one before fails (unreachable, 5xx)",
    "identity.response.access_token": "dotted path of the access token in the answer",
    "identity.response.refresh_token": "dotted path of the refresh token (rotated when present)",
    "identity.response.expires_in": "dotted path of the lifetime in seconds",
    "identity.response.expires_at": "dotted path of the expiry in epoch seconds",
    "identity.response.fields": "{name: path}: session fields, as {{ session.name }}",
    "identity.validate.enabled": "verify each new JWT access token before use (any kind)",
    "identity.validate.issuer": "expected iss (default: identity.issuer; json_login: required)",
    "identity.validate.audience": "expected aud (default: identity.audience; json_login: required)",
    "identity.validate.algorithms": "accepted JWS algorithms (asymmetric only)",
    "identity.validate.leeway": "seconds of clock skew allowed on exp and nbf",
    "identity.validate.jwks_min_refetch_interval": "unknown kid: JWKS re-fetched once per this",
    "refresh.lead_time": "refresh this many seconds before expiry ...",
    "refresh.lead_fraction": "... or this fraction of the lifetime, whichever is larger",
    "refresh.jitter": "refresh earlier by up to this fraction of the lead, at random",
    "refresh.retry.initial": "first backoff ceiling in seconds (full jitter)",
    "refresh.retry.max": "largest backoff in seconds",
    "refresh.reactive_min_interval": "seconds between refreshes caused by upstream 401s",
    "refresh.expiry_margin": "stop sending a token this long before expiry (max 10 % of its life)",
    "headers.tenant_id": "X-Tenant-ID value, may use {{ session.<field> }} (null: not sent)",
    "headers.activity_id": "X-Activity-ID: auto (one uuid4 per session), a value, or null",
    "headers.correlation_id": "X-Correlation-ID: propagate, generate, a value, or null",
    "headers.request_id": "X-Request-ID: generate (uuid4 per request), propagate, or null",
    "headers.traceparent": "W3C traceparent: propagate (if valid), generate, or null",
    "headers.session_id": "X-Session-ID: auto (one uuid4 per session), a value, or null",
    "headers.static": "extra headers sent with every request",
    "session.store": "memory, file or redis",
    "session.path": "file store: the session file (mode 0600)",
    "session.redis_url": "redis store: redis://, rediss://, unix:// or redis+sentinel://",
    "session.redis_url_file": "redis store: a file holding the URL (with its password) instead",
    "session.encryption_key_file": "32 random bytes, base64: AES-256-GCM at rest",
    "session.previous_encryption_key_files": "older keys, read only (a key rotation)",
    "session.lock_lease": "redis: seconds one replica may hold the renewal lock",
    "session.poll_interval": "redis: seconds between checks when notifications are missed",
    "session.logout_on_shutdown": "log out (revoke) on a clean shutdown; not with store redis",
    "session.logout_timeout": "seconds revocation may take at logout (cleared anyway)",
    "log.level": "debug, info, warning or error",
    "log.access_log": "one JSON line per proxied request",
    "demo.enabled": "run the embedded identity provider (and echo upstream without url)",
    "demo.token_lifetime": "seconds the demo tokens live",
    "demo.echo_port": "port of the demo echo upstream (0 picks a free one)",
}


def generate() -> str:
    """The whole reference as Markdown."""
    return HEADER + "\n".join(_rows(Config, "", MEANINGS)) + "\n"


if __name__ == "__main__":
    sys.stdout.write(generate())
