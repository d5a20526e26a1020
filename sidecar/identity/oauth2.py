"""OAuth2 token endpoint client for one client identity.

Grants: ``client_credentials`` and ``password`` (RFC 6749), ``jwt_bearer`` (RFC 7523 section 2.1)
and ``token_exchange`` (RFC 8693), plus ``refresh_token`` for refreshes. Client authentication:
``client_secret_basic`` / ``client_secret_post`` (RFC 6749 section 2.3.1), ``private_key_jwt``
(RFC 7523 section 2.2, OIDC Core section 9), ``client_assertion_file`` (a workload identity JWT
read from a file, RFC 7521 section 4.2) or ``none``; a refused secret or key is retried with the
previous ones of a rotation (:meth:`OAuth2Identity._authenticated`). Revocation: RFC 7009.
Endpoints come from the configuration or OIDC discovery (:mod:`sidecar.identity.discovery`);
every new access token is validated before use when ``identity.validate.enabled``
(:mod:`sidecar.identity.validation`).

Every credential file (secret, password, private key, assertion, subject and actor tokens) is
re-read at each use, so rotation (a Kubernetes Secret, a kubelet-rotated projected token) needs no
restart. PyJWT and cryptography are imported only when a private key or validation is configured.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sidecar.clock import Clock
from sidecar.config.oauth2 import OAuth2Section
from sidecar.errors import ConfigError, IdentityError, IdentityUnavailable, OAuthError
from sidecar.identity.discovery import EndpointResolver
from sidecar.identity.http import CallSpans, IdentityHTTP, IdentityResponse
from sidecar.identity.principal import oauth2_principal
from sidecar.secrets import SecretSource
from sidecar.tls import RECHECK_EVERY
from sidecar.tokens import Token, parse_token_response

if TYPE_CHECKING:
    from sidecar.identity.validation import TokenValidator
    from sidecar.metrics import Metrics

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


#: form fields that carry a credential (RFC 6749 4.3 and 6, RFC 7523, RFC 8693, RFC 7009/7662)
_CREDENTIAL_FIELDS = (
    "password",
    "assertion",
    "refresh_token",
    "subject_token",
    "actor_token",
    "token",
)


class OAuth2Identity:
    """Talks to one OAuth2 authorization server for one client."""

    def __init__(
        self,
        config: OAuth2Section,
        clock: Clock,
        *,
        metrics: Metrics | None = None,
        spans: CallSpans | None = None,
        tls_recheck_every: float = RECHECK_EVERY,
    ) -> None:
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._http = IdentityHTTP.for_identity(
            config, clock, metrics=metrics, spans=spans, tls_recheck_every=tls_recheck_every
        )
        #: every credential value read or sent, scrubbed from the provider's error text
        self._secrets = self._http.secrets
        self._endpoints = EndpointResolver(config, self._http)
        self._validator: TokenValidator | None = None
        self.fingerprint = oauth2_principal(config)

    async def aclose(self) -> None:
        await self._http.aclose()

    # ----------------------------------------------------------------- the provider protocol

    async def login(self) -> Token:
        """A new token with the configured grant (credential files re-read now)."""
        cfg = self._config
        form = {"grant_type": GRANT_TYPES[cfg.grant]}
        if cfg.grant == "password":
            form["username"] = cfg.username or ""
            form["password"] = await _secret(cfg.secret("password"), "identity.password")
        elif cfg.grant == "jwt_bearer":
            form["assertion"] = await self._grant_assertion()
        elif cfg.grant == "token_exchange":
            await self._token_exchange(form)
        self._add_scope(form, audience=True)
        return await self._token_request(form, previous_refresh_token=None)

    async def refresh(self, token: Token) -> Token:
        """RFC 6749 section 6; scope and resource (RFC 8707 section 2.2) are sent again."""
        if token.refresh_token is None:  # the session refreshes only a token that has one
            raise ValueError("a refresh needs a token with a refresh_token")
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
        url = endpoints.revocation

        async def send(signed: dict[str, str], headers: dict[str, str]) -> IdentityResponse:
            return await self._http.request(
                "POST", url, form=signed, headers=headers, expect_json=False, endpoint="revocation"
            )

        failure: IdentityError | None = None
        pairs = [("refresh_token", token.refresh_token), ("access_token", token.access_token)]
        for hint, value in pairs:
            if value is None:
                continue
            form = {"token": value, "token_type_hint": hint}
            try:
                await self._authenticated(form, send)
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
        urls = [endpoints.token, *self._config.backup_token_urls]

        async def send(signed: dict[str, str], headers: dict[str, str]) -> IdentityResponse:
            return await self._http.request(
                "POST", urls, form=signed, headers=headers, endpoint="token"
            )

        answer = await self._authenticated(form, send)
        token = parse_token_response(
            answer.json,
            answer.sent_at,
            previous_refresh_token=previous_refresh_token,
            skew=self._http.skew.seconds,
        )
        if self._config.validate_token.enabled:
            await self._validate(token)
        return token

    async def _validate(self, token: Token) -> None:
        from sidecar.identity.validation import TokenValidator, vet

        if self._validator is None:
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

                async def send(signed: dict[str, str], headers: dict[str, str]) -> IdentityResponse:
                    return await self._http.request(
                        "POST", endpoint, form=signed, headers=headers, endpoint="introspection"
                    )

                answer = await self._authenticated(form, send)
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
        await vet(self._validator, token, self._metrics)

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
        if cfg.subject_token_file is None:  # the config validator requires it for this grant
            raise ConfigError("identity.subject_token_file: required with grant token_exchange")
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

    async def _authenticated(
        self,
        form: dict[str, str],
        send: Callable[[dict[str, str], dict[str, str]], Awaitable[IdentityResponse]],
    ) -> IdentityResponse:
        """``send`` the form with client authentication: the current secret or key first (at
        every call); when the provider refuses it (:func:`_client_refused`), each previous one in
        order, so that a rotation may reach the Secret before or after the provider."""
        signed = dict(form)
        headers = await self._client_auth(signed)
        try:
            return await send(signed, headers)
        except IdentityError as exc:
            previous = self._previous_credentials()
            if not previous or not _client_refused(exc):
                raise
            refused = exc
        for index, (key, path) in enumerate(previous):
            signed = dict(form)
            try:
                headers = await self._client_auth(signed, previous=path, key=key)
                answer = await send(signed, headers)
            except IdentityError as exc:
                if exc.reason == "credential_file":
                    log.warning("identity.previous_secret_unreadable", extra={"error": str(exc)})
                    continue
                if _client_refused(exc):
                    continue
                raise
            # the index and key name only: the value never reaches a log line
            log.warning("identity.previous_secret_used", extra={"index": index, "key": key})
            if self._metrics is not None:
                self._metrics.previous_secret_used(index)
            return answer
        raise refused

    def _previous_credentials(self) -> list[tuple[str, Path]]:
        """The previous secrets or keys of the configured client_auth, as (key name, file)."""
        cfg = self._config
        if cfg.client_auth == "private_key_jwt":
            name, files = "identity.previous_private_key_files", cfg.previous_private_key_files
        elif cfg.client_auth in ("client_secret_basic", "client_secret_post"):
            name, files = "identity.previous_client_secret_files", cfg.previous_client_secret_files
        else:
            return []
        return [(f"{name}[{n}]", path) for n, path in enumerate(files)]

    async def _client_auth(
        self, form: dict[str, str], *, previous: Path | None = None, key: str = ""
    ) -> dict[str, str]:
        """Add client authentication to ``form``; returns extra request headers. ``previous``
        (named ``key``) replaces the current secret or private key file. Called last, on a
        complete form: every credential it and the form carry is noted for scrubbing."""
        for name in _CREDENTIAL_FIELDS:
            self._secrets.note(name, form.get(name))
        cfg = self._config
        client_id = cfg.client_id or ""
        if cfg.client_auth == "none":
            form["client_id"] = client_id  # RFC 6749 section 2.3: a public client names itself
            return {}
        if cfg.client_auth in ("private_key_jwt", "client_assertion_file"):
            form["client_id"] = client_id
            form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
            if cfg.client_auth == "client_assertion_file":
                # a workload identity token (RFC 7521 4.2), issued to us: sent as it is
                path = cfg.client_assertion_file
                if path is None:  # the config validator requires it for this client_auth
                    raise ConfigError("identity.client_assertion_file: required")
                form["client_assertion"] = await _file("identity.client_assertion_file", path)
            else:
                form["client_assertion"] = await self._signed_assertion(previous, key)
            self._secrets.note("client_assertion", form["client_assertion"])
            return {}
        if previous is not None:
            secret = await _file(key, previous)
        else:
            secret = await _secret(cfg.secret("client_secret"), "identity.client_secret")
        self._secrets.note("client_secret", secret)
        if cfg.client_auth == "client_secret_post":
            form["client_id"] = client_id
            form["client_secret"] = secret
            return {}
        # RFC 6749 2.3.1: both parts are form-urlencoded before the Basic encoding
        pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
        basic = base64.b64encode(pair.encode()).decode()
        self._secrets.note("basic", basic)
        return {"Authorization": "Basic " + basic}

    async def _signed_assertion(self, previous: Path | None = None, name: str = "") -> str:
        """A fresh JWT, iss = sub = client_id, aud = the (primary) token endpoint (OIDC Core 9);
        the key file (``previous``, named ``name``, when given) is re-read every time, so a
        rotated key is used at the next call."""
        from sidecar.identity.assertions import load_signing_key, sign_assertion

        cfg = self._config
        path = previous or cfg.private_key_file
        name = name if previous is not None else "identity.private_key_file"
        if path is None:  # the config validator requires it for private_key_jwt
            raise ConfigError(f"{name}: required with client_auth private_key_jwt")
        pem = await _file(name, path)
        self._secrets.note("private_key", pem)
        try:
            key, alg = load_signing_key(pem.encode(), cfg.signing_alg)
        except ValueError as exc:
            raise IdentityUnavailable(f"{name}: {exc}", reason="credential_file") from None
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


def _client_refused(exc: IdentityError) -> bool:
    """The provider refused our client authentication: RFC 6749 5.2 ``invalid_client``, or a
    401 (which some providers send bare, without a JSON error)."""
    if isinstance(exc, OAuthError):
        return exc.error == "invalid_client" or exc.status == 401
    return exc.reason == "http_401"


async def _secret(source: SecretSource | None, key: str) -> str:
    """The secret's current value (a file is read now); ``key`` names it when it is missing."""
    if source is None:
        raise ConfigError(f"{key}: a required secret is not configured")
    if source.file is not None:
        return await _file(source.where, source.file)
    # the same thread hop as a file read, so a login's timing does not depend on where the
    # secret lives
    return await asyncio.to_thread(source.read)


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
