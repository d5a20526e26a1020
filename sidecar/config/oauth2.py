"""Configuration of ``identity.kind: oauth2``: the checks of a standards OAuth2/OIDC identity.

:func:`oauth2_problems` checks a whole identity section of that kind and returns one
``"key: message"`` line per problem (the loader prefixes ``identity.``), so every missing key is
named: ``subject_token_file: required for grant token_exchange``. Whether a private key signs is
the identity role's check (:func:`sidecar.identity.assertions.check_private_key`), run by the
composition root. The fields themselves live on :class:`sidecar.config.models.Identity`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from yarl import URL

if TYPE_CHECKING:
    from sidecar.config.models import Identity

#: asymmetric JWS algorithms (RFC 7518, RFC 8037) sidecar signs or accepts; never ``none`` or HS*
JWSAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]


def identity_url(value: str) -> str:
    """``value`` when it is an http(s) URL with a host and no credentials; else ValueError."""
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    if url.user or url.password:
        raise ValueError("credentials in the URL are not allowed; the identity section holds them")
    return value


class Validate(BaseModel):
    """Verify each new JWT access token before use: signature (JWKS), iss, aud, exp, nbf."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = False
    #: the expected ``iss``; default identity.issuer
    issuer: str | None = None
    #: the expected ``aud`` (one of the token's audiences); default identity.audience
    audience: str | None = None
    algorithms: tuple[JWSAlgorithm, ...] = ("RS256", "ES256", "PS256", "EdDSA")
    #: seconds of clock skew allowed on exp and nbf
    leeway: float = Field(30.0, ge=0, le=300)
    #: a token signed with an unknown ``kid`` re-fetches the JWKS at most once per this many seconds
    jwks_min_refetch_interval: float = Field(60.0, ge=0)

    @field_validator("algorithms")
    @classmethod
    def _some(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one algorithm is required")
        return value


#: RFC 8693 section 3: the token type of a JWT such as a Kubernetes service-account token
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 - a URN, not a secret


def oauth2_problems(identity: Identity) -> list[str]:
    """Every problem of an oauth2 identity section: endpoints, client authentication, grant."""
    return [
        *_endpoint_problems(identity),
        *_client_problems(identity),
        *_grant_problems(identity),
    ]


def _endpoint_problems(identity: Identity) -> list[str]:
    problems = []
    if not identity.token_url and not identity.issuer:
        problems.append("token_url: required for kind oauth2 (or issuer, for discovery)")
    check = identity.validate_token
    if check.enabled:
        if not (check.issuer or identity.issuer):
            problems.append("validate.issuer: required when validate is enabled (or issuer)")
        if not (check.audience or identity.audience):
            problems.append("validate.audience: required when validate is enabled (or audience)")
        if not (identity.jwks_url or identity.issuer):
            problems.append("jwks_url: required when validate is enabled (or issuer)")
    return problems


def _client_problems(identity: Identity) -> list[str]:
    problems = []
    if not identity.client_id:
        problems.append("client_id: required for kind oauth2")
    has_secret = identity.client_secret is not None or identity.client_secret_file is not None
    if identity.client_secret is not None and identity.client_secret_file is not None:
        problems.append("client_secret: give client_secret or client_secret_file, not both")
    if identity.client_auth in ("client_secret_basic", "client_secret_post") and not has_secret:
        problems.append(
            "client_secret: client_secret or client_secret_file is required "
            f"for client_auth {identity.client_auth}"
        )
    elif identity.client_auth not in ("client_secret_basic", "client_secret_post") and has_secret:
        problems.append(f"client_secret: not used with client_auth {identity.client_auth}")
    if identity.client_auth == "private_key_jwt" and identity.private_key_file is None:
        problems.append("private_key_file: required for client_auth private_key_jwt")
    problems.extend(_rotation_problems(identity))
    return problems


def _rotation_problems(identity: Identity) -> list[str]:
    """The workload assertion file and the previous secrets/keys go with one client_auth each."""
    problems = []
    by_assertion = identity.client_auth == "client_assertion_file"
    if by_assertion and identity.client_assertion_file is None:
        problems.append("client_assertion_file: required for client_auth client_assertion_file")
    elif not by_assertion and identity.client_assertion_file is not None:
        problems.append(
            f"client_assertion_file: not used with client_auth {identity.client_auth} "
            "(set client_auth: client_assertion_file)"
        )
    by_secret = identity.client_auth in ("client_secret_basic", "client_secret_post")
    if identity.previous_client_secret_files and not by_secret:
        problems.append(
            f"previous_client_secret_files: not used with client_auth {identity.client_auth}"
        )
    if identity.previous_private_key_files and identity.client_auth != "private_key_jwt":
        problems.append(
            f"previous_private_key_files: not used with client_auth {identity.client_auth}"
        )
    return problems


def _grant_problems(identity: Identity) -> list[str]:
    problems = []
    if identity.grant == "password":
        if not identity.username:
            problems.append("username: required for grant password")
        if (identity.password is None) == (identity.password_file is None):
            problems.append(
                "password: exactly one of password or password_file is required for grant password"
            )
    if (
        identity.grant == "jwt_bearer"
        and identity.assertion_file is None
        and identity.private_key_file is None
    ):
        problems.append(
            "assertion_file: required for grant jwt_bearer (or private_key_file to sign one)"
        )
    if identity.grant == "token_exchange" and identity.subject_token_file is None:
        problems.append("subject_token_file: required for grant token_exchange")
    # RFC 8693 section 2.1: actor_token_type is required with, and only with, actor_token
    if identity.actor_token_file is not None and not identity.actor_token_type:
        problems.append("actor_token_type: required with actor_token_file")
    if identity.actor_token_type and identity.actor_token_file is None:
        problems.append("actor_token_file: required with actor_token_type")
    return problems
