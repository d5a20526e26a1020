"""Configuration of ``identity.kind: oauth2``: a standards OAuth2/OIDC identity.

:class:`OAuth2Section` holds the keys of that kind. Its checks (:func:`oauth2_problems`) return
one ``"key: message"`` line per problem (the loader prefixes ``identity.``), so every missing key
is named: ``subject_token_file: required for grant token_exchange``. Whether a private key signs
is the identity role's check (:func:`sidecar.identity.assertions.check_private_key`), run by the
composition root.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr, field_validator

from sidecar.config.sections import KIND, JWSAlgorithm, TokenChecks, identity_url

#: RFC 8693 section 3: the token type of a JWT such as a Kubernetes service-account token
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 - a URN, not a secret

#: the client authentications that send a client secret
SECRET_AUTH = ("client_secret_basic", "client_secret_post")


class OAuth2Section(TokenChecks):
    """``identity`` of kind oauth2: the token endpoint, the client and the grant."""

    secret_keys: ClassVar[tuple[str, ...]] = ("client_secret", "password")

    kind: Literal["oauth2"] = Field("oauth2", description=KIND)
    issuer: str | None = Field(
        None, description="OIDC issuer: endpoints from <issuer>/.well-known/openid-configuration"
    )
    token_url: str | None = Field(
        None, description="the OAuth2 token endpoint (optional with issuer)"
    )
    backup_token_urls: tuple[str, ...] = Field(
        (), description="tried in order when the token endpoint is unreachable, times out or 5xx"
    )
    grant: Literal["client_credentials", "password", "jwt_bearer", "token_exchange"] = Field(
        "client_credentials",
        description="client_credentials, password, jwt_bearer (RFC 7523) or token_exchange "
        "(RFC 8693)",
    )
    client_id: str | None = Field(None, description="the client's id (required)")
    client_secret: SecretStr | None = Field(
        None, description="the client's secret (or client_secret_file)"
    )
    client_secret_file: Path | None = Field(
        None, description="a file holding the client's secret, re-read at every login"
    )
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
    ] = Field(
        "client_secret_basic",
        description="client_secret_basic, client_secret_post, private_key_jwt, "
        "client_assertion_file or none",
    )
    private_key_file: Path | None = Field(
        None, description="PEM private key (RSA, EC or Ed25519), re-read at every login"
    )
    previous_private_key_files: list[Path] = Field(
        default_factory=list,
        description="private_key_jwt: older keys, tried in order when the current one is refused",
    )
    client_assertion_file: Path | None = Field(
        None,
        description="client_auth client_assertion_file: a workload JWT (projected "
        "service-account token) sent as client_assertion, re-read at every call",
    )
    key_id: str | None = Field(None, description="kid header of the signed assertions")
    signing_alg: JWSAlgorithm | None = Field(
        None, description="JWS algorithm of the assertions (default: from the key type)"
    )
    username: str | None = Field(None, description="password grant: the user")
    password: SecretStr | None = Field(
        None, description="password grant: the password (or password_file)"
    )
    password_file: Path | None = Field(
        None, description="password grant: a file holding the password, re-read at every login"
    )
    assertion_file: Path | None = Field(
        None, description="jwt_bearer: a file holding the assertion (JWT), re-read at every login"
    )
    subject_token_file: Path | None = Field(
        None,
        description="token_exchange: the subject token's file (e.g. a projected service-account "
        "token), re-read at every login",
    )
    subject_token_type: str = Field(
        TOKEN_TYPE_JWT, description="token_exchange: RFC 8693 type of the subject token"
    )
    actor_token_file: Path | None = Field(
        None, description="token_exchange: the actor token's file (optional)"
    )
    actor_token_type: str | None = Field(
        None, description="token_exchange: RFC 8693 type of the actor token"
    )
    requested_token_type: str | None = Field(
        None, description="token_exchange: RFC 8693 type asked for (optional)"
    )
    scope: str | None = Field(None, description="scope requested")
    audience: str | None = Field(None, description="audience parameter")
    resource: str | None = Field(None, description="resource parameter (RFC 8707)")
    revocation_url: str | None = Field(
        None, description="RFC 7009 endpoint used by logout (default: from discovery)"
    )
    introspection_url: str | None = Field(
        None, description="RFC 7662: validates opaque tokens (default: from discovery)"
    )

    @field_validator("issuer", "token_url", "revocation_url", "introspection_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else identity_url(value)

    @field_validator("backup_token_urls")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(identity_url(url) for url in value)

    def problems(self) -> list[str]:
        """Secrets given twice, and :func:`oauth2_problems`."""
        return [*super().problems(), *oauth2_problems(self)]


def oauth2_problems(identity: OAuth2Section) -> list[str]:
    """Every problem of an oauth2 identity section: endpoints, client authentication, grant."""
    return [
        *_endpoint_problems(identity),
        *_client_problems(identity),
        *_grant_problems(identity),
    ]


def _endpoint_problems(identity: OAuth2Section) -> list[str]:
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


def _client_problems(identity: OAuth2Section) -> list[str]:
    problems = []
    if not identity.client_id:
        problems.append("client_id: required for kind oauth2")
    has_secret = identity.secret("client_secret") is not None
    if identity.client_auth in SECRET_AUTH and not has_secret:
        problems.append(
            "client_secret: client_secret or client_secret_file is required "
            f"for client_auth {identity.client_auth}"
        )
    elif identity.client_auth not in SECRET_AUTH and has_secret:
        problems.append(f"client_secret: not used with client_auth {identity.client_auth}")
    if identity.client_auth == "private_key_jwt" and identity.private_key_file is None:
        problems.append("private_key_file: required for client_auth private_key_jwt")
    problems.extend(_rotation_problems(identity))
    return problems


def _rotation_problems(identity: OAuth2Section) -> list[str]:
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
    by_secret = identity.client_auth in SECRET_AUTH
    if identity.previous_client_secret_files and not by_secret:
        problems.append(
            f"previous_client_secret_files: not used with client_auth {identity.client_auth}"
        )
    if identity.previous_private_key_files and identity.client_auth != "private_key_jwt":
        problems.append(
            f"previous_private_key_files: not used with client_auth {identity.client_auth}"
        )
    return problems


def _grant_problems(identity: OAuth2Section) -> list[str]:
    problems = []
    if identity.grant == "password":
        if not identity.username:
            problems.append("username: required for grant password")
        if identity.secret("password") is None:
            problems.append("password: password or password_file is required for grant password")
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
