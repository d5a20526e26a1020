"""What every configuration section shares: frozen models that refuse unknown keys, secrets given
inline or as a file (one :class:`~sidecar.secrets.SecretSource` each), and the parts more than
one section holds (``tls``, and the keys every identity kind has).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from yarl import URL

from sidecar.secrets import SecretSource, both_given

#: asymmetric JWS algorithms (RFC 7518, RFC 8037) sidecar signs or accepts; never ``none`` or HS*
JWSAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]


#: what ``identity.kind`` means, for every kind's model
KIND = (
    "oauth2 (OAuth2 / OIDC), json_login (vendor JSON session APIs), or demo (the embedded "
    "provider: needs demo.enabled); each kind takes its own keys"
)


def identity_url(value: str) -> str:
    """``value`` when it is an http(s) URL with a host and no credentials; else ValueError."""
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    if url.user or url.password:
        raise ValueError("credentials in the URL are not allowed; the identity section holds them")
    return value


class Section(BaseModel):
    """A configuration section: frozen, unknown keys refused.

    Secrets are declared by name in :attr:`secret_keys`: each is given as ``<name>`` (inline, or
    ``${VAR}``) or as ``<name>_file`` (read at every use), never both; :meth:`secret` gives the
    one configured as a :class:`~sidecar.secrets.SecretSource`. A section with checks across its
    keys extends :meth:`problems`, so that every problem is reported at once.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: the dotted key of the section, for the keys its secrets are named by
    section_key: ClassVar[str] = ""
    #: the secrets of the section, each a pair of fields ``<name>`` and ``<name>_file``
    secret_keys: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _coherent(self) -> Any:
        problems = self.problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def problems(self) -> list[str]:
        """The section's problems across keys, one ``"key: message"`` line each (the loader
        prefixes the section): here, a secret given both inline and as a file."""
        return [
            both_given(name)
            for name in self.secret_keys
            if getattr(self, name) is not None and getattr(self, f"{name}_file") is not None
        ]

    def secret(self, name: str) -> SecretSource | None:
        """Where the secret ``name`` (one of :attr:`secret_keys`) comes from; None when it is
        not configured."""
        if name not in self.secret_keys:
            raise ValueError(f"{self.section_key}.{name} is not a secret key")
        key = f"{self.section_key}.{name}"
        file: Path | None = getattr(self, f"{name}_file")
        if file is not None:
            return SecretSource(key, file=file)
        value: SecretStr | str | None = getattr(self, name)
        if value is None:
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        return SecretSource(key, value=text)


class TLS(Section):
    """Client TLS (upstream or identity provider): verification is on unless switched off."""

    verify: bool = Field(True, description="verify the server's certificate")
    ca_file: Path | None = Field(
        None, description="CA bundle the server's certificate must chain to (re-read on change)"
    )
    cert_file: Path | None = Field(
        None, description="client certificate for mutual TLS (re-read when it changes)"
    )
    key_file: Path | None = Field(
        None, description="the client certificate's key (needs cert_file; re-read on change)"
    )
    min_version: Literal["1.2", "1.3"] = Field("1.2", description="lowest TLS version accepted")

    @model_validator(mode="after")
    def _key_with_cert(self) -> TLS:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set but cert_file is not")
        return self


class Validate(Section):
    """Verify each new JWT access token before use: signature (JWKS), iss, aud, exp, nbf."""

    enabled: bool = Field(False, description="verify each new JWT access token before use")
    issuer: str | None = Field(
        None, description="expected iss (default: identity.issuer; json_login: required)"
    )
    audience: str | None = Field(
        None,
        description="expected aud, one of the token's audiences (default: identity.audience; "
        "json_login: required)",
    )
    algorithms: tuple[JWSAlgorithm, ...] = Field(
        ("RS256", "ES256", "PS256", "EdDSA"),
        description="accepted JWS algorithms (asymmetric only)",
    )
    leeway: float = Field(
        30.0, ge=0, le=300, description="seconds of clock skew allowed on exp and nbf"
    )
    jwks_min_refetch_interval: float = Field(
        60.0,
        ge=0,
        description="a token signed with an unknown kid re-fetches the JWKS at most once per "
        "this many seconds",
    )

    @field_validator("algorithms")
    @classmethod
    def _some(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one algorithm is required")
        return value


class IdentityBase(Section):
    """The keys every identity kind has."""

    # "validate" would shadow BaseModel.validate: the field is validate_token, named validate in
    # the YAML and in every dump (check-config, the config handed to workers)
    model_config = ConfigDict(frozen=True, extra="forbid", serialize_by_alias=True)
    section_key: ClassVar[str] = "identity"

    # each kind narrows ``kind`` to its own name (the Literal tells the kinds apart)
    kind: str = Field(description=KIND)
    timeout: float = Field(10.0, gt=0, description="seconds allowed for one call to the provider")
    tls: TLS = Field(TLS(), description="TLS toward the identity provider")


class TokenChecks(IdentityBase):
    """The keys of the kinds that talk to a real provider: verifying the tokens it issues."""

    jwks_url: str | None = Field(
        None, description="JWKS for validate (default: from discovery; json_login: required)"
    )
    validate_token: Validate = Field(
        Validate(), alias="validate", description="verify new JWT access tokens before use"
    )

    @field_validator("jwks_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else identity_url(value)
