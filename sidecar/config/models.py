"""Configuration: pydantic models mirroring the YAML (frozen, unknown keys refused).

Each model validates its own keys. Cross-field validators raise all their problems at once, one
``"sub.key: message"`` line each, which :mod:`sidecar.config.load` turns into dotted keys. Reading
the file, the environment and the secret files is that module's job.

Secrets are :class:`pydantic.SecretStr` (they print as ``**********``) or ``<key>_file`` paths whose
content is read when needed (:func:`sidecar.config.load.read_secret`), so a rotated Kubernetes
Secret is picked up at the next login.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from yarl import URL

from sidecar.config.callers import CallerHeader, host_entry, origin_entry
from sidecar.config.headers import header_placeholder_problems
from sidecar.config.json_login import (
    JsonCall,
    JsonRefreshCall,
    JsonResponse,
    json_login_problems,
    json_login_validate_problems,
)
from sidecar.config.oauth2 import (
    TOKEN_TYPE_JWT,
    JWSAlgorithm,
    Validate,
    identity_url,
    oauth2_problems,
)
from sidecar.field_values import checked


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Address(_Model):
    """A listening address: loopback only unless ``allow_non_loopback`` says otherwise."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    allow_non_loopback: bool = False

    @model_validator(mode="after")
    def _loopback_only(self) -> _Address:
        if not self.allow_non_loopback and not is_loopback(self.host):
            raise ValueError(
                f"host: {self.host!r} is not a loopback address; anything that can reach it gets "
                "requests signed with the session's token. Set allow_non_loopback: true to mean it"
            )
        return self


class Listen(_Address):
    """Where the proxy listens. Loopback only unless ``allow_non_loopback`` says otherwise."""

    #: seconds in-flight requests get to finish after SIGTERM before they are cut
    drain_timeout: float = Field(10.0, ge=0)
    #: seconds a caller gets to send a whole request head, from its first byte (or from
    #: connecting, for a connection's first request); then 408 and close
    head_timeout: float = Field(
        10.0, gt=0, description="seconds to send a whole request head (slowloris); then 408"
    )
    #: seconds of silence allowed while a request body is expected (also after 100 Continue)
    body_timeout: float = Field(
        30.0, gt=0, description="longest silence while a request body arrives; then 408 and close"
    )
    #: seconds an idle keep-alive connection stays open between requests
    idle_timeout: float = Field(
        75.0, gt=0, description="seconds an idle keep-alive connection stays open"
    )
    #: caller connections served at once; more get 503 and are closed. null: derived from the
    #: descriptor limit (see sidecar.http.server.default_max_connections)
    max_connections: int | None = Field(
        None,
        ge=1,
        description="caller connections at once (beyond: 503 and close); null: from the fd limit",
    )

    # -- who may call (sidecar/proxy/callers.py; docs/security.md, "Security model")
    # null, unlike the admin port: the proxy may listen on its Unix socket only
    port: int | None = Field(  # type: ignore[assignment]
        8080,
        ge=0,
        le=65535,
        description="port of the proxy (0 picks a free one; null: none, "
        "the proxy is only on unix_socket)",
    )
    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="Host names accepted besides localhost, 127.x.x.x and [::1] (any port); "
        "any other Host is 421. '*' accepts every Host",
    )
    allowed_origins: tuple[str, ...] = Field(
        (),
        description="origins (scheme://host[:port]) whose browser requests are accepted; a "
        "request with another Origin, or with Sec-Fetch-Site other than none, is 403",
    )
    require_header: CallerHeader | None = Field(
        None, description="a header every caller must send with a secret value (403 without it)"
    )
    unix_socket: Path | None = Field(
        None,
        description="also listen on this Unix socket (mode 0660); a stale socket file is replaced",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(host_entry(entry) for entry in value)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(origin_entry(entry) for entry in value)

    @model_validator(mode="after")
    def _somewhere(self) -> Listen:
        if self.port is None and self.unix_socket is None:
            raise ValueError("port: null needs unix_socket (the proxy must listen somewhere)")
        return self


class Admin(_Address):
    """Where the admin endpoints listen (/metrics, /healthz, /readyz, /session)."""

    port: int = Field(8081, ge=0, le=65535)


class Timeout(_Model):
    """Seconds allowed for the upstream leg."""

    connect: float = Field(5.0, gt=0)
    total: float = Field(
        30.0,
        gt=0,
        description="seconds to the response head once the request was sent whole; also the "
        "longest silence while a body moves, either way",
    )


class TLS(_Model):
    """Client TLS (upstream or identity provider): verification is on unless switched off."""

    verify: bool = True
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _key_with_cert(self) -> TLS:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set but cert_file is not")
        return self


class Upstream(_Model):
    """The one origin that receives the token."""

    url: str | None = None
    timeout: Timeout = Timeout()
    tls: TLS = TLS()
    send_cookies: bool = False
    capture_cookies: bool = Field(
        False,
        description="the upstream's Set-Cookie answers update the session's cookie jar (RFC 6265; "
        "needs send_cookies), for APIs that rotate session cookies on ordinary calls",
    )
    #: request bodies up to this many bytes are buffered so that a request answered 401 can be
    #: replayed after a reactive refresh; larger bodies stream and are never replayed
    replay_body_limit: int = Field(65536, ge=0)
    #: keep-alive connections kept open toward the upstream
    pool_size: int = Field(100, ge=1)
    #: request bodies larger than this many bytes are refused with 413 (null: no limit, so
    #: uploads of any size stream through)
    max_request_body: int | None = Field(None, ge=0)
    rewrite_location: bool = Field(
        True,
        description="an absolute Location or Content-Location naming the upstream (origin and "
        "path prefix) is pointed back at the caller's Host, as nginx's proxy_redirect default",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        if url.user or url.password:
            raise ValueError(
                "credentials in the URL are not allowed; the identity section holds them"
            )
        if url.query_string or url.fragment:
            raise ValueError("the URL may carry a path prefix but no query or fragment")
        return str(url.with_path(url.path.rstrip("/")))


class Identity(_Model):
    """How the session is obtained from the identity provider."""

    # "validate" would shadow BaseModel.validate: the field is validate_token, named validate in
    # the YAML and in every dump (check-config, the config handed to workers)
    model_config = ConfigDict(frozen=True, extra="forbid", serialize_by_alias=True)

    kind: Literal["oauth2", "json_login", "demo"] = "demo"
    #: OIDC discovery: endpoints come from <issuer>/.well-known/openid-configuration
    issuer: str | None = None
    token_url: str | None = None
    #: tried in order when the token endpoint is unreachable, times out or answers 5xx
    backup_token_urls: tuple[str, ...] = ()
    grant: Literal["client_credentials", "password", "jwt_bearer", "token_exchange"] = (
        "client_credentials"
    )
    client_id: str | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    previous_client_secret_files: list[Path] = Field(
        default_factory=list,
        description="secret files the provider may still expect (a rotation): tried in order "
        "when it refuses the current one (invalid_client, 401)",
    )
    client_auth: Literal[
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
        "client_assertion_file",
        "none",
    ] = "client_secret_basic"
    #: PEM private key (RSA, EC or Ed25519), re-read at every login
    private_key_file: Path | None = None
    previous_private_key_files: list[Path] = Field(
        default_factory=list,
        description="private_key_jwt: older keys, tried in order when the current one is refused",
    )
    client_assertion_file: Path | None = Field(
        None,
        description="client_auth client_assertion_file: a workload JWT (projected "
        "service-account token) sent as client_assertion, re-read at every call",
    )
    key_id: str | None = None
    signing_alg: JWSAlgorithm | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    #: jwt_bearer: a file holding the assertion (JWT), re-read at every login
    assertion_file: Path | None = None
    #: token_exchange: the subject token (e.g. a projected service-account token), re-read
    subject_token_file: Path | None = None
    subject_token_type: str = TOKEN_TYPE_JWT
    actor_token_file: Path | None = None
    actor_token_type: str | None = None
    requested_token_type: str | None = None
    scope: str | None = None
    audience: str | None = None
    resource: str | None = None
    revocation_url: str | None = None
    introspection_url: str | None = None
    jwks_url: str | None = None
    #: seconds allowed for one call to the identity provider
    timeout: float = Field(10.0, gt=0)
    #: TLS toward the identity provider, the same model as upstream.tls
    tls: TLS = TLS()
    # kind json_login (sidecar/config/json_login.py): each credential may be <name>_file instead
    credentials: dict[str, SecretStr] = Field(default_factory=dict)
    login: JsonCall | None = None
    refresh: JsonRefreshCall | None = None
    logout: JsonCall | None = None
    response: JsonResponse = JsonResponse()
    validate_token: Validate = Field(Validate(), alias="validate")

    @field_validator("issuer", "token_url", "revocation_url", "introspection_url", "jwks_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else identity_url(value)

    @field_validator("backup_token_urls")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(identity_url(url) for url in value)

    @model_validator(mode="after")
    def _complete(self) -> Identity:
        if self.kind == "demo":
            return self
        if self.kind == "json_login":
            calls = {"login": self.login, "refresh": self.refresh, "logout": self.logout}
            problems = json_login_problems(self.credentials, calls, self.response)
            problems += json_login_validate_problems(self.validate_token, self.jwks_url)
            if problems:
                raise ValueError("\n".join(problems))
            return self
        problems = oauth2_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


class Retry(_Model):
    """Exponential backoff with full jitter, in seconds."""

    initial: float = Field(1.0, gt=0)
    max: float = Field(60.0, gt=0)


class Refresh(_Model):
    """When to refresh: ``max(lead_time, lead_fraction * lifetime)`` before expiry, with jitter."""

    lead_time: float = Field(300.0, ge=0)
    lead_fraction: float = Field(0.2, ge=0, le=0.9)
    jitter: float = Field(0.1, ge=0, le=1)
    retry: Retry = Retry()
    #: an upstream 401 triggers a reactive refresh at most once per this many seconds, so an
    #: upstream that rejects every token cannot turn each request into a token call
    reactive_min_interval: float = Field(5.0, ge=0)
    #: a token is not forwarded in its last this-many seconds (at most a tenth of its lifetime),
    #: so that it cannot expire on its way to the upstream or on a clock slightly ahead
    expiry_margin: float = Field(2.0, ge=0)


class Headers(_Model):
    """Headers added to each forwarded request. ``null`` switches a header off."""

    tenant_id: str | None = None
    activity_id: str | None = "auto"
    correlation_id: str | None = "propagate"
    request_id: Literal["generate", "propagate"] | None = "generate"
    traceparent: Literal["generate", "propagate"] | None = "propagate"
    session_id: str | None = "auto"
    static: dict[str, str] = Field(default_factory=dict)

    @field_validator("static")
    @classmethod
    def _safe_static(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = {"host", "authorization", "content-length", "transfer-encoding", "connection"}
        for name, header_value in value.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in reserved:
                raise ValueError(f"{name!r} is managed by the sidecar and cannot be set here")
            checked(header_value, f"the value of {name!r}")
        return value

    @field_validator("tenant_id", "activity_id", "correlation_id", "session_id")
    @classmethod
    def _safe_value(cls, value: str | None) -> str | None:
        return None if value is None else checked(value, "the value")


REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://")
REDIS_SCHEME_RULE = "must start with redis://, rediss://, unix:// or redis+sentinel://"


class Sink(_Model):
    """A file holding the current access token, for clients that cannot use the proxy."""

    path: Path = Field(description="the file (written atomically: temp file + rename)")
    mode: str = Field("0600", description="octal permissions of the file")

    @field_validator("mode")
    @classmethod
    def _octal(cls, value: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", value):
            raise ValueError(f'{value!r} is not an octal file mode such as "0600"')
        if int(value, 8) & 0o022:
            raise ValueError(f"{value!r} lets group or others replace the token")
        return value

    def file_mode(self) -> int:
        """The mode as a number."""
        return int(self.mode, 8)


class Session(_Model):
    """Where the session is kept between restarts."""

    store: Literal["memory", "file", "redis"] = "file"
    path: Path = Path(".sidecar/session.json")
    #: redis://[:password@]host:port/db, rediss:// for TLS, or unix:///path/to/socket
    redis_url: str | None = None
    #: a file holding the redis URL instead (a URL with a password, from a mounted Secret)
    redis_url_file: Path | None = None
    #: a file holding 32 random bytes, base64 (``openssl rand -base64 32``): AES-256-GCM at rest
    encryption_key_file: Path | None = None
    #: keys a stored session may still be sealed with (a rotation): read, never written
    previous_encryption_key_files: list[Path] = Field(default_factory=list)
    #: seconds a replica may hold the shared renewal lock; a replica that dies mid-refresh delays
    #: the others by at most this long
    lock_lease: float = Field(15.0, gt=0)
    #: seconds between checks of the shared record when change notifications are missed
    poll_interval: float = Field(1.0, gt=0)
    logout_on_shutdown: bool = False
    token_sink: Sink | None = Field(
        None,
        description="{path, mode}: write the current access token to a file at every new token "
        "(removed at logout)",
    )
    #: seconds a logout may spend revoking before the session is cleared anyway
    logout_timeout: float = Field(5.0, gt=0, le=60)

    @model_validator(mode="after")
    def _previous_keys(self) -> Session:
        if self.previous_encryption_key_files and self.encryption_key_file is None:
            raise ValueError(
                "previous_encryption_key_files: needs encryption_key_file (the key to write with)"
            )
        return self

    @model_validator(mode="after")
    def _redis_url(self) -> Session:
        if self.redis_url and self.redis_url_file is not None:
            raise ValueError("redis_url_file: set redis_url or redis_url_file, not both")
        if self.store == "redis":
            if not self.redis_url and self.redis_url_file is None:
                raise ValueError("redis_url: required for store redis (or redis_url_file)")
            if self.redis_url and not self.redis_url.startswith(REDIS_SCHEMES):
                raise ValueError(f"redis_url: {REDIS_SCHEME_RULE}")
        return self

    @model_validator(mode="after")
    def _shared_logout(self) -> Session:
        # a shared session is every replica's: one pod stopping (a rolling deploy) would log
        # them all out
        if self.logout_on_shutdown and self.store == "redis":
            raise ValueError(
                "logout_on_shutdown: cannot be true with session.store: redis (the session is "
                "shared: one replica stopping would log every replica out); POST /session/logout "
                "on any replica ends it for all"
            )
        return self

    def redis_address(self) -> str:
        """The redis URL: ``redis_url``, or what ``redis_url_file`` holds (read now)."""
        if self.redis_url:
            return self.redis_url
        if self.redis_url_file is None:
            raise ValueError("no redis URL is configured")
        return self.redis_url_file.read_text(encoding="utf-8").strip()


class Log(_Model):
    """Logging: JSON lines on stderr."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    #: json: one JSON object per line; text: one human-readable line (time, level, event, fields)
    format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="json (one object per line), text (human-readable), or auto: text when "
        "stderr is a terminal, else json",
    )


class Tracing(_Model):
    """W3C trace context for the requests sidecar forwards."""

    #: the sampled flag of a traceparent sidecar starts; a caller's own decision is kept
    sample: bool = Field(
        True,
        description="sampled flag of a traceparent sidecar starts when the caller sent none "
        "(a caller's own flag is kept)",
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP endpoint (e.g. http://otel-collector:4318) that receives a span "
        "per proxied request and per identity call, as JSON; null: no export",
    )
    service_name: str = Field("sidecar", description="service.name of the exported spans")

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and (
            URL(value).scheme not in ("http", "https") or not URL(value).host
        ):
            raise ValueError("must be an http:// or https:// URL")
        return value


class Demo(_Model):
    """The embedded demo: an identity provider and an echo upstream inside the process."""

    enabled: bool = False
    token_lifetime: float = Field(120.0, gt=0)
    #: the echo upstream's port (0 picks a free one)
    echo_port: int = Field(0, ge=0, le=65535)


class Config(_Model):
    """The whole configuration."""

    listen: Listen = Listen()
    admin: Admin = Admin()
    upstream: Upstream = Upstream()
    identity: Identity = Identity()
    refresh: Refresh = Refresh()
    headers: Headers = Headers()
    session: Session = Session()
    log: Log = Log()
    tracing: Tracing = Tracing()
    demo: Demo = Demo()

    @model_validator(mode="after")
    def _coherent(self) -> Config:
        problems = header_placeholder_problems(self.headers, self.identity)
        if self.identity.kind != "json_login":
            for key in ("credentials", "login", "refresh", "logout"):
                if getattr(self.identity, key):
                    problems.append(f"identity.{key}: only used by kind json_login")
        if self.identity.kind == "demo" and not self.demo.enabled:
            problems.append(
                "identity.kind: required (oauth2 or json_login); the default, demo, needs "
                "demo.enabled: true"
            )
        if self.upstream.capture_cookies and not self.upstream.send_cookies:
            problems.append(
                "upstream.capture_cookies: needs upstream.send_cookies: true (the captured "
                "cookies are sent back with it)"
            )
        if self.upstream.url is None and not self.demo.enabled:
            problems.append("upstream.url: required")
        if problems:
            raise ValueError("\n".join(problems))
        return self
