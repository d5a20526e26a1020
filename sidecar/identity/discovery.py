"""Where the identity provider's endpoints are: explicit configuration, else OIDC discovery.

With ``identity.issuer`` set, ``<issuer>/.well-known/openid-configuration`` (OpenID Connect
Discovery 1.0 section 4) is fetched once, when first needed, and kept for the life of the process.
A failed fetch raises like any identity call, so it is retried by the session's backoff as part of
the login: the process starts and stays up while the provider is down. Explicit keys
(``token_url``, ``revocation_url``, ``introspection_url``, ``jwks_url``) win over the document.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from yarl import URL

from sidecar.config.oauth2 import OAuth2Section
from sidecar.errors import IdentityUnavailable
from sidecar.identity.http import IdentityHTTP

log = logging.getLogger(__name__)

WELL_KNOWN = "/.well-known/openid-configuration"


@dataclass(frozen=True, slots=True)
class Endpoints:
    """The provider's endpoints; None where neither the config nor the document names one."""

    token: str
    revocation: str | None = None
    introspection: str | None = None
    jwks: str | None = None
    issuer: str | None = None


class EndpointResolver:
    """Gives the endpoints, discovering them once when ``identity.issuer`` is set."""

    def __init__(self, config: OAuth2Section, http: IdentityHTTP) -> None:
        self._config = config
        self._http = http
        self._endpoints: Endpoints | None = None
        if config.issuer is None:
            self._endpoints = Endpoints(
                token=config.token_url or "",
                revocation=config.revocation_url,
                introspection=config.introspection_url,
                jwks=config.jwks_url,
            )

    @property
    def known(self) -> Endpoints | None:
        """The endpoints when already resolved (no network)."""
        return self._endpoints

    async def get(self) -> Endpoints:
        """The endpoints; the first call with an issuer fetches the discovery document.

        Raises IdentityUnavailable (``reason`` ``discovery_invalid`` or
        ``discovery_issuer_mismatch`` for a document that cannot be used, else the transport's).
        """
        if self._endpoints is None:
            self._endpoints = await self._discover()
        return self._endpoints

    async def _discover(self) -> Endpoints:
        cfg = self._config
        issuer = cfg.issuer or ""
        url = issuer.rstrip("/") + WELL_KNOWN
        answer = await self._http.request("GET", url, endpoint="discovery")
        doc = answer.json
        if not isinstance(doc, dict):
            raise _invalid(url, "not a JSON object")
        # OIDC Discovery 4.3: the issuer in the document MUST be identical to the one we asked;
        # otherwise another provider's keys and endpoints could be substituted
        if doc.get("issuer") != issuer:
            raise IdentityUnavailable(
                f"discovery document at {url} names issuer "
                f"{self._http.secrets.provider_text(repr(doc.get('issuer')))}, "
                f"not the configured {issuer!r}",
                reason="discovery_issuer_mismatch",
            )
        secure = URL(issuer).scheme == "https"

        def endpoint(name: str) -> str | None:
            value = doc.get(name)
            if value is None:
                return None
            target = URL(value) if isinstance(value, str) else None
            if target is None or target.scheme not in ("http", "https") or not target.host:
                raise _invalid(url, f"{name} is not an http(s) URL")
            if secure and target.scheme != "https":
                raise _invalid(url, f"{name} is not https although the issuer is")
            return str(value)

        token = cfg.token_url or endpoint("token_endpoint")
        if token is None:
            raise _invalid(url, "token_endpoint is missing")
        found = Endpoints(
            token=token,
            revocation=cfg.revocation_url or endpoint("revocation_endpoint"),
            introspection=cfg.introspection_url or endpoint("introspection_endpoint"),
            jwks=cfg.jwks_url or endpoint("jwks_uri"),
            issuer=issuer,
        )
        log.info(
            "identity.discovered",
            extra={
                "issuer": issuer,
                "token_endpoint": found.token,
                "revocation_endpoint": found.revocation,
                "jwks_uri": found.jwks,
            },
        )
        return found


def _invalid(url: str, problem: str) -> IdentityUnavailable:
    return IdentityUnavailable(
        f"discovery document at {url} is unusable: {problem}", reason="discovery_invalid"
    )
