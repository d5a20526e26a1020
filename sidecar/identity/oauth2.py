"""OAuth2 token endpoint client for one client identity.

Grants: ``client_credentials`` and ``password`` (RFC 6749), ``jwt_bearer`` (RFC 7523 section 2.1)
and ``token_exchange`` (RFC 8693), plus ``refresh_token`` for refreshes. Client authentication:
``client_secret_basic`` / ``client_secret_post`` (RFC 6749 section 2.3.1), ``private_key_jwt``
(RFC 7523 section 2.2, OIDC Core section 9) or ``none``. Revocation: RFC 7009. Endpoints come from
the configuration or OIDC discovery (:mod:`sidecar.identity.discovery`); every new access token is
validated before use when ``identity.validate.enabled`` (:mod:`sidecar.identity.validation`).

Every credential file (secret, password, private key, assertion, subject and actor tokens) is
re-read at each use, so rotation (a Kubernetes Secret, a kubelet-rotated projected token) needs no
restart. PyJWT and cryptography are imported only when a private key or validation is configured.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from pydantic import SecretStr

from sidecar.clock import Clock
from sidecar.config import Identity
from sidecar.config_load import read_secret
from sidecar.errors import IdentityError, IdentityUnavailable, InvalidToken
from sidecar.identity.discovery import EndpointResolver
from sidecar.identity.http import IdentityHTTP
from sidecar.tokens import Token, parse_token_response

if TYPE_CHECKING:
    from sidecar.identity.validation import TokenValidator
    from sidecar.metrics import Metrics
    from sidecar.tracing import SpanExporter

log = logging.getLogger(__name__)

#: grant_type values on the wire (RFC 7523 section 2.1, RFC 8693 section 2.1)
GRANT_TYPES = {
    "client_credentials": "client_credentials",
    "password": "password",
    "jwt_bearer": "urn:ietf:params:oauth:grant-type:jwt-bearer",
    "token_exchange": "urn:ietf:params:oauth:grant-type:token-exchange",
}
#: RFC 7523 section 2.2
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class OAuth2Identity:
    """Talks to one OAuth2 authorization server for one client."""

    def __init__(
        self,
        config: Identity,
        clock: Clock,
        *,
        metrics: Metrics | None = None,
        spans: SpanExporter | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._http = IdentityHTTP(
            clock, timeout=config.timeout, tls=config.tls, metrics=metrics, spans=spans
        )
        self._endpoints = EndpointResolver(config, self._http)
        self._validator: TokenValidator | None = None
        ident = "|".join(
            [
                config.token_url or config.issuer or "",
                config.client_id or "",
                config.grant,
                config.username or "",
                config.scope or "",
                config.audience or "",
                config.resource or "",
            ]
        )
        self.fingerprint = hashlib.sha256(ident.encode()).hexdigest()[:16]

    async def aclose(self) -> None:
        await self._http.aclose()

    # ----------------------------------------------------------------- the provider protocol

    async def login(self) -> Token:
        """A new token with the configured grant (credential files re-read now)."""
        cfg = self._config
        form = {"grant_type": GRANT_TYPES[cfg.grant]}
        if cfg.grant == "password":
            form["username"] = cfg.username or ""
            form["password"] = await _secret("identity.password", cfg.password, cfg.password_file)
        elif cfg.grant == "jwt_bearer":
            form["assertion"] = await self._grant_assertion()
        elif cfg.grant == "token_exchange":
            await self._token_exchange(form)
        self._add_scope(form, audience=True)
        return await self._token_request(form, previous_refresh_token=None)

    async def refresh(self, token: Token) -> Token:
        """RFC 6749 section 6; scope and resource (RFC 8707 section 2.2) are sent again."""
        assert token.refresh_token is not None
        form = {"grant_type": "refresh_token", "refresh_token": token.refresh_token}
        self._add_scope(form, audience=False)
        return await self._token_request(form, previous_refresh_token=token.refresh_token)

    async def logout(self, token: Token) -> None:
        """RFC 7009: revoke the refresh token (which ends the grant), then the access token.

        Both are attempted; the first failure is raised after the second attempt.
        """
        endpoints = await self._endpoints.get()
        if not endpoints.revocation:
            return
        failure: IdentityError | None = None
        pairs = [("refresh_token", token.refresh_token), ("access_token", token.access_token)]
        for hint, value in pairs:
            if value is None:
                continue
            form = {"token": value, "token_type_hint": hint}
            try:
                headers = await self._client_auth(form)
                await self._http.request(
                    "POST",
                    endpoints.revocation,
                    form=form,
                    headers=headers,
                    expect_json=False,
                    endpoint="revocation",
                )
            except IdentityError as exc:
                log.warning("identity.revocation_failed", extra={"hint": hint, "error": str(exc)})
                failure = failure or exc
        if failure is not None:
            raise failure

    # ----------------------------------------------------------------- requests

    async def _token_request(
        self, form: dict[str, str], previous_refresh_token: str | None
    ) -> Token:
        endpoints = await self._endpoints.get()
        headers = await self._client_auth(form)
        urls = [endpoints.token, *self._config.backup_token_urls]
        answer = await self._http.request(
            "POST", urls, form=form, headers=headers, endpoint="token"
        )
        token = parse_token_response(
            answer.json, self._clock.time(), previous_refresh_token=previous_refresh_token
        )
        if self._config.validate_token.enabled:
            await self._validate(token)
        return token

    async def _validate(self, token: Token) -> None:
        if self._validator is None:
            from sidecar.identity.validation import TokenValidator

            cfg = self._config
            resolver = self._endpoints

            async def jwks_url() -> str | None:
                return (await resolver.get()).jwks

            async def introspect(access_token: str) -> dict[str, Any] | None:
                endpoint = (await resolver.get()).introspection
                if not endpoint:
                    return None
                # RFC 7662 2.1: the caller authenticates like at the token endpoint
                form = {"token": access_token, "token_type_hint": "access_token"}
                headers = await self._client_auth(form)
                answer = await self._http.request(
                    "POST", endpoint, form=form, headers=headers, endpoint="introspection"
                )
                return answer.json if isinstance(answer.json, dict) else {}

            self._validator = TokenValidator(
                cfg.validate_token,
                self._http,
                self._clock,
                issuer=cfg.validate_token.issuer or cfg.issuer or "",
                audience=cfg.validate_token.audience or cfg.audience or "",
                jwks_url=jwks_url,
                introspect=introspect,
            )
        try:
            await self._validator.check(token.access_token)
        except InvalidToken as exc:
            if self._metrics is not None:
                self._metrics.token_validation_failures.labels(reason=exc.reason).inc()
            log.warning(
                "identity.token_invalid",
                extra={"reason": exc.reason, "error": str(exc), "token": token.fingerprint},
            )
            raise

    def _add_scope(self, form: dict[str, str], *, audience: bool) -> None:
        cfg = self._config
        if cfg.scope:
            form["scope"] = cfg.scope
        if cfg.audience and audience:
            form["audience"] = cfg.audience
        if cfg.resource:
            form["resource"] = cfg.resource  # RFC 8707 section 2

    async def _token_exchange(self, form: dict[str, str]) -> None:
        """RFC 8693 section 2.1: the subject token (and actor token), read from their files."""
        cfg = self._config
        assert cfg.subject_token_file is not None
        form["subject_token"] = await _file("identity.subject_token_file", cfg.subject_token_file)
        form["subject_token_type"] = cfg.subject_token_type
        if cfg.actor_token_file is not None and cfg.actor_token_type:
            form["actor_token"] = await _file("identity.actor_token_file", cfg.actor_token_file)
            form["actor_token_type"] = cfg.actor_token_type
        if cfg.requested_token_type:
            form["requested_token_type"] = cfg.requested_token_type

    async def _grant_assertion(self) -> str:
        """RFC 7523 section 2.1: the assertion file's JWT, else one signed with our key."""
        cfg = self._config
        if cfg.assertion_file is not None:
            return await _file("identity.assertion_file", cfg.assertion_file)
        return await self._signed_assertion()

    async def _client_auth(self, form: dict[str, str]) -> dict[str, str]:
        """Add client authentication to ``form``; returns extra request headers."""
        cfg = self._config
        client_id = cfg.client_id or ""
        if cfg.client_auth == "none":
            form["client_id"] = client_id  # RFC 6749 section 2.3: a public client names itself
            return {}
        if cfg.client_auth == "private_key_jwt":
            form["client_id"] = client_id
            form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
            form["client_assertion"] = await self._signed_assertion()
            return {}
        secret = await _secret("identity.client_secret", cfg.client_secret, cfg.client_secret_file)
        if cfg.client_auth == "client_secret_post":
            form["client_id"] = client_id
            form["client_secret"] = secret
            return {}
        # RFC 6749 2.3.1: both parts are form-urlencoded before the Basic encoding
        pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}

    async def _signed_assertion(self) -> str:
        """A fresh JWT, iss = sub = client_id, aud = the (primary) token endpoint (OIDC Core 9);
        the key file is re-read every time, so a rotated key is used at the next call."""
        from sidecar.identity.assertions import load_signing_key, sign_assertion

        cfg = self._config
        assert cfg.private_key_file is not None
        pem = await _file("identity.private_key_file", cfg.private_key_file)
        try:
            key, alg = load_signing_key(pem.encode(), cfg.signing_alg)
        except ValueError as exc:
            raise IdentityUnavailable(
                f"identity.private_key_file: {exc}", reason="credential_file"
            ) from None
        endpoints = await self._endpoints.get()
        return sign_assertion(
            key,
            alg,
            issuer=cfg.client_id or "",
            subject=cfg.client_id or "",
            audience=endpoints.token,
            now=self._clock.time(),
            key_id=cfg.key_id,
        )


async def _secret(key: str, value: SecretStr | None, path: Path | None) -> str:
    if path is not None:
        return await _file(key + "_file", path)
    # the same thread hop as a file read, so a login's timing does not depend on where the
    # secret lives
    return await asyncio.to_thread(read_secret, value, None)


async def _file(key: str, path: Path) -> str:
    """A credential file's current content, stripped. A missing or empty file is a transient
    failure (a rotation may be half done): retried with backoff, and the message names the key."""
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise IdentityUnavailable(
            f"{key}: cannot read {path}: {problem}", reason="credential_file"
        ) from None
    text = text.strip()
    if not text:
        raise IdentityUnavailable(f"{key}: {path} is empty", reason="credential_file")
    return text
