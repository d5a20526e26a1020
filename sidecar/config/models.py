"""Configuration: pydantic models mirroring the YAML (frozen, unknown keys refused).

Each key's meaning is its ``Field(description=...)``, written once: the generated reference
(:mod:`sidecar.config.reference`) and the JSON Schema (``sidecar schema``) read it there. Each
model validates its own keys; cross-field validators raise all their problems at once, one
``"sub.key: message"`` line each, which :mod:`sidecar.config.load` turns into dotted keys. The
``identity`` section is one model per kind (:mod:`sidecar.config.identity`). Reading the file and
the environment is :mod:`sidecar.config.load`'s job.

Secrets are :class:`pydantic.SecretStr` (they print as ``**********``) or ``<key>_file`` paths,
one or the other (:class:`sidecar.config.sections.Section`); the models give them as
:class:`sidecar.secrets.SecretSource` values whose files are read at each use, so a rotated
Kubernetes Secret is picked up at the next login.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from yarl import URL

from sidecar.config.callers import CallerHeader, host_entry, origin_entry
from sidecar.config.headers import Headers, header_placeholder_problems
from sidecar.config.identity import DemoSection, Identity
from sidecar.config.sections import TLS, Section
from sidecar.secrets import SecretSource


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Address(Section):
    """A listening address: loopback only unless ``allow_non_loopback`` says otherwise."""

    host: str = Field(
        "127.0.0.1", description="the address to listen on; loopback unless allow_non_loopback"
    )
    port: int = Field(8080, ge=0, le=65535, description="the port (0 picks a free one)")
    allow_non_loopback: bool = Field(
        False,
        description="allow a host that is not loopback: anything that can reach it gets what the "
        "port serves (the admin POSTs stay loopback-only)",
    )

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

    drain_timeout: float = Field(
        10.0, ge=0, description="seconds in-flight requests get to finish after SIGTERM"
    )
    head_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds to send a whole request head, from its first byte (or from "
        "connecting, for a connection's first request; slowloris); then 408 and close",
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        description="longest silence while a request body arrives (also after 100 Continue); "
        "then 408 and close",
    )
    idle_timeout: float = Field(
        75.0, gt=0, description="seconds an idle keep-alive connection stays open"
    )
    # null: derived from the descriptor limit (sidecar.http.server.default_max_connections)
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

    port: int = Field(
        8081, ge=0, le=65535, description="port of the admin endpoints (0 picks a free one)"
    )


class Timeout(Section):
    """Seconds allowed for the upstream leg."""

    connect: float = Field(5.0, gt=0, description="seconds to connect to the upstream")
    total: float = Field(
        30.0,
        gt=0,
        description="seconds to the response head once the request was sent whole; also the "
        "longest silence while a body moves, either way",
    )


class Upstream(Section):
    """The one origin that receives the token."""

    url: str | None = Field(
        None,
        description="the one origin that gets the token (a path prefix allowed); the incoming "
        "path and query are appended (required unless demo.enabled)",
    )
    timeout: Timeout = Field(Timeout(), description="seconds allowed for the upstream leg")
    tls: TLS = Field(TLS(), description="TLS toward the upstream")
    send_cookies: bool = Field(
        False, description="send the session's cookies matching the upstream URL (RFC 6265)"
    )
    capture_cookies: bool = Field(
        False,
        description="the upstream's Set-Cookie answers update the session's cookie jar (RFC 6265; "
        "needs send_cookies), for APIs that rotate session cookies on ordinary calls",
    )
    replay_body_limit: int = Field(
        65536,
        ge=0,
        description="request bodies up to this many bytes are buffered so that a request answered "
        "401 can be replayed after a reactive refresh; larger bodies stream, never replayed",
    )
    pool_size: int = Field(100, ge=1, description="keep-alive connections kept to the upstream")
    max_request_body: int | None = Field(
        None,
        ge=0,
        description="request bodies over this many bytes get 413 (null: no limit, uploads of any "
        "size stream through)",
    )
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


class Retry(Section):
    """Exponential backoff with full jitter, in seconds."""

    initial: float = Field(1.0, gt=0, description="first backoff ceiling in seconds")
    max: float = Field(60.0, gt=0, description="largest backoff in seconds")


class Refresh(Section):
    """When to refresh: ``max(lead_time, lead_fraction * lifetime)`` before expiry, with jitter."""

    lead_time: float = Field(300.0, ge=0, description="refresh this many seconds before expiry ...")
    lead_fraction: float = Field(
        0.2,
        ge=0,
        le=0.9,
        description="... or this fraction of the lifetime, whichever is larger",
    )
    jitter: float = Field(
        0.1, ge=0, le=1, description="refresh earlier by up to this fraction of the lead, at random"
    )
    retry: Retry = Field(
        Retry(), description="backoff after a failed refresh (exponential, full jitter)"
    )
    reactive_min_interval: float = Field(
        5.0,
        ge=0,
        description="an upstream 401 triggers a refresh at most once per this many seconds (an "
        "upstream refusing every token cannot turn each request into a token call)",
    )
    expiry_margin: float = Field(
        2.0,
        ge=0,
        description="a token is not sent in its last this-many seconds (at most a tenth of its "
        "lifetime), so it cannot expire on its way or on a clock slightly ahead",
    )


REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://")
REDIS_SCHEME_RULE = "must start with redis://, rediss://, unix:// or redis+sentinel://"


class Sink(Section):
    """A file holding the current access token, for clients that cannot use the proxy."""

    path: Path = Field(description="the token file (written atomically: temp file + rename)")
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


class Session(Section):
    """Where the session is kept between restarts."""

    section_key: ClassVar[str] = "session"
    secret_keys: ClassVar[tuple[str, ...]] = ("redis_url",)

    store: Literal["memory", "file", "redis"] = Field("file", description="memory, file or redis")
    path: Path = Field(
        Path(".sidecar/session.json"),
        description="file store: the session file (mode 0600, in a directory of sidecar's own)",
    )
    redis_url: str | None = Field(
        None,
        description="redis store: redis://[:password@]host:port/db, rediss:// (TLS), "
        "unix:///path, or redis+sentinel://host:26379[,host:port]/service/db",
    )
    redis_url_file: Path | None = Field(
        None,
        description="redis store: a file holding the URL instead (with its password, from a "
        "mounted Secret), read for every new connection",
    )
    encryption_key_file: Path | None = Field(
        None,
        description="a file holding 32 random bytes, base64 (openssl rand -base64 32): "
        "AES-256-GCM at rest",
    )
    previous_encryption_key_files: list[Path] = Field(
        default_factory=list,
        description="keys a stored session may still be sealed with (a rotation): read, never "
        "written",
    )
    lock_lease: float = Field(
        15.0,
        gt=0,
        description="redis: seconds one replica may hold the renewal lock (a replica dying "
        "mid-refresh delays the others by at most this long)",
    )
    poll_interval: float = Field(
        1.0, gt=0, description="redis: seconds between checks when notifications are missed"
    )
    logout_on_shutdown: bool = Field(
        False, description="log out (revoke) on a clean shutdown; not with store redis"
    )
    token_sink: Sink | None = Field(
        None,
        description="{path, mode}: write the current access token to a file at every new token "
        "(removed at logout)",
    )
    logout_timeout: float = Field(
        5.0,
        gt=0,
        le=60,
        description="seconds a logout may spend revoking before the session is cleared anyway",
    )

    def problems(self) -> list[str]:
        """The redis URL and the key files each need their companion keys."""
        problems = super().problems()
        if self.previous_encryption_key_files and self.encryption_key_file is None:
            problems.append(
                "previous_encryption_key_files: needs encryption_key_file (the key to write with)"
            )
        if self.store == "redis":
            if self.secret("redis_url") is None:
                problems.append("redis_url: required for store redis (or redis_url_file)")
            elif self.redis_url and not self.redis_url.startswith(REDIS_SCHEMES):
                problems.append(f"redis_url: {REDIS_SCHEME_RULE}")
        # a shared session is every replica's: one pod stopping (a rolling deploy) would log
        # them all out
        if self.logout_on_shutdown and self.store == "redis":
            problems.append(
                "logout_on_shutdown: cannot be true with session.store: redis (the session is "
                "shared: one replica stopping would log every replica out); POST /session/logout "
                "on any replica ends it for all"
            )
        return problems

    def redis_source(self) -> SecretSource:
        """Where the redis URL comes from (``redis_url`` or ``redis_url_file``, read at use)."""
        source = self.secret("redis_url")
        if source is None:
            raise ValueError("no redis URL is configured")
        return source

    def redis_address(self) -> str:
        """The redis URL: ``redis_url``, or what ``redis_url_file`` holds (read now)."""
        return self.redis_source().read()


class Log(Section):
    """Logging: JSON lines on stderr."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug, info, warning or error"
    )
    access_log: bool = Field(True, description="one line per proxied request")
    format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="json (one object per line), text (human-readable), or auto: text when "
        "stderr is a terminal, else json",
    )


class Tracing(Section):
    """W3C trace context for the requests sidecar forwards."""

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


class Demo(Section):
    """The embedded demo: an identity provider and an echo upstream inside the process."""

    enabled: bool = Field(
        False,
        description="run the embedded identity provider (and an echo upstream without "
        "upstream.url)",
    )
    token_lifetime: float = Field(120.0, gt=0, description="seconds the demo tokens live")
    echo_port: int = Field(
        0, ge=0, le=65535, description="port of the demo echo upstream (0 picks a free one)"
    )


class Config(Section):
    """The whole configuration."""

    listen: Listen = Field(Listen(), description="where the proxy listens")
    admin: Admin = Field(Admin(), description="where the admin endpoints listen")
    upstream: Upstream = Field(Upstream(), description="the one origin that receives the token")
    identity: Identity = Field(
        DemoSection(), description="how the session is obtained; the keys depend on kind"
    )
    refresh: Refresh = Field(Refresh(), description="when and how the token is refreshed")
    headers: Headers = Field(Headers(), description="headers added to each forwarded request")
    session: Session = Field(Session(), description="where the session is kept")
    log: Log = Field(Log(), description="logging, on stderr")
    tracing: Tracing = Field(Tracing(), description="W3C trace context and span export")
    demo: Demo = Field(Demo(), description="the embedded demo")

    def problems(self) -> list[str]:
        """What the sections say about each other, one ``"dotted.key: message"`` line each."""
        problems = header_placeholder_problems(self.headers, self.identity)
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
        return problems
