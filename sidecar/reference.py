"""The configuration reference, generated from the config model so that it cannot drift.

``python -m sidecar.reference > docs/config-reference.md`` writes it; a test checks that the
committed file equals what this module generates.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sidecar.config import Config

HEADER = """# Configuration reference

Generated from `sidecar/config.py` by `python -m sidecar.reference`; do not edit by hand.
Every key may be set in the YAML file, or overridden by `SIDECAR_<SECTION>_<KEY>`
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
    if value is None:
        return "null"
    return json.dumps(value if not hasattr(value, "__fspath__") else str(value))


def _rows(model: type[BaseModel], prefix: str, docs: dict[str, str]) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.append(f"| `{key}` | section | | {_first_line(annotation.__doc__)} |")
            rows.extend(_rows(annotation, key + ".", docs))
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
    "admin.host": "address of /metrics, /healthz, /readyz, /session",
    "admin.port": "port of the admin endpoints",
    "admin.allow_non_loopback": "allow a non-loopback admin host (POSTs stay loopback-only)",
    "upstream.url": "the one origin that gets the token; incoming path and query are appended",
    "upstream.timeout.connect": "seconds to connect to the upstream",
    "upstream.timeout.total": "seconds to the response head; then the longest silence mid-body",
    "upstream.tls.verify": "verify the upstream's certificate",
    "upstream.tls.ca_file": "CA bundle for the upstream",
    "upstream.tls.cert_file": "client certificate for mTLS",
    "upstream.tls.key_file": "client key for mTLS",
    "upstream.tls.min_version": "lowest TLS version accepted",
    "upstream.send_cookies": "send cookies kept with the session to the upstream",
    "upstream.replay_body_limit": "bodies up to this many bytes are buffered for a 401 replay",
    "upstream.pool_size": "idle keep-alive connections kept to the upstream",
    "upstream.max_request_body": "request bodies over this many bytes get 413 (null: no limit)",
    "identity.kind": "oauth2, or demo (the embedded demo provider)",
    "identity.token_url": "the OAuth2 token endpoint",
    "identity.grant": "client_credentials or password",
    "identity.client_id": "the client's id",
    "identity.client_secret": "the client's secret (or client_secret_file)",
    "identity.client_secret_file": "file holding the secret, re-read at every login",
    "identity.client_auth": "client_secret_basic or client_secret_post",
    "identity.username": "password grant: the user",
    "identity.password": "password grant: the password (or password_file)",
    "identity.password_file": "file holding the password, re-read at every login",
    "identity.scope": "scope requested",
    "identity.audience": "audience parameter",
    "identity.resource": "resource parameter (RFC 8707)",
    "identity.revocation_url": "RFC 7009 endpoint used by logout",
    "identity.timeout": "seconds per call to the identity provider",
    "identity.tls.verify": "verify the identity provider's certificate",
    "identity.tls.ca_file": "CA bundle for the identity provider",
    "identity.tls.cert_file": "client certificate for mTLS toward the identity provider",
    "identity.tls.key_file": "client key for mTLS toward the identity provider",
    "identity.tls.min_version": "lowest TLS version accepted from the identity provider",
    "refresh.lead_time": "refresh this many seconds before expiry ...",
    "refresh.lead_fraction": "... or this fraction of the lifetime, whichever is larger",
    "refresh.jitter": "refresh earlier by up to this fraction of the lead, at random",
    "refresh.retry.initial": "first backoff ceiling in seconds (full jitter)",
    "refresh.retry.max": "largest backoff in seconds",
    "refresh.reactive_min_interval": "seconds between refreshes caused by upstream 401s",
    "headers.tenant_id": "X-Tenant-ID value (null: not sent)",
    "headers.activity_id": "X-Activity-ID: auto (one uuid4 per session), a value, or null",
    "headers.correlation_id": "X-Correlation-ID: propagate, generate, a value, or null",
    "headers.request_id": "X-Request-ID: generate (uuid4 per request), propagate, or null",
    "headers.traceparent": "W3C traceparent: propagate (if valid), generate, or null",
    "headers.session_id": "X-Session-ID: auto (one uuid4 per session), a value, or null",
    "headers.static": "extra headers sent with every request",
    "session.store": "memory, file or redis",
    "session.path": "file store: the session file (mode 0600)",
    "session.redis_url": "redis store: redis://, rediss://, unix:// or redis+sentinel://",
    "session.encryption_key_file": "32 random bytes, base64: AES-256-GCM at rest",
    "session.lock_lease": "redis: seconds one replica may hold the renewal lock",
    "session.poll_interval": "redis: seconds between checks when notifications are missed",
    "session.logout_on_shutdown": "log out (revoke) on a clean shutdown",
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
