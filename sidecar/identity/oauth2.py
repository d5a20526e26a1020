"""OAuth2 token endpoint client (RFC 6749): client_credentials, password and refresh_token grants,
client_secret_basic / client_secret_post client authentication, RFC 7009 revocation.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from urllib.parse import quote

from sidecar.clock import Clock
from sidecar.config import Identity, read_secret
from sidecar.identity.http import IdentityHTTP
from sidecar.tokens import Token, parse_token_response

log = logging.getLogger(__name__)


class OAuth2Identity:
    """Talks to one OAuth2 token endpoint for one client."""

    def __init__(self, config: Identity, clock: Clock, *, token_url: str | None = None) -> None:
        self._config = config
        self._clock = clock
        self._token_url = token_url or config.token_url or ""
        self._http = IdentityHTTP(clock, timeout=config.timeout, tls=config.tls)
        ident = "|".join(
            [
                self._token_url,
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

    async def _client_auth(self, form: dict[str, str]) -> dict[str, str]:
        """Add client authentication (RFC 6749 2.3.1) and return extra request headers."""
        cfg = self._config
        secret = await asyncio.to_thread(read_secret, cfg.client_secret, cfg.client_secret_file)
        client_id = cfg.client_id or ""
        if cfg.client_auth == "client_secret_post":
            form["client_id"] = client_id
            form["client_secret"] = secret
            return {}
        # RFC 6749 2.3.1: both parts are form-urlencoded before the Basic encoding
        pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}

    def _add_scope(self, form: dict[str, str]) -> None:
        cfg = self._config
        if cfg.scope:
            form["scope"] = cfg.scope
        if cfg.audience:
            form["audience"] = cfg.audience
        if cfg.resource:
            form["resource"] = cfg.resource

    async def login(self) -> Token:
        cfg = self._config
        form: dict[str, str] = {"grant_type": cfg.grant}
        if cfg.grant == "password":
            form["username"] = cfg.username or ""
            form["password"] = await asyncio.to_thread(read_secret, cfg.password, cfg.password_file)
        self._add_scope(form)
        return await self._token_request(form, previous_refresh_token=None)

    async def refresh(self, token: Token) -> Token:
        assert token.refresh_token is not None
        form = {"grant_type": "refresh_token", "refresh_token": token.refresh_token}
        if self._config.scope:
            form["scope"] = self._config.scope
        return await self._token_request(form, previous_refresh_token=token.refresh_token)

    async def _token_request(
        self, form: dict[str, str], previous_refresh_token: str | None
    ) -> Token:
        headers = await self._client_auth(form)
        answer = await self._http.request("POST", self._token_url, form=form, headers=headers)
        return parse_token_response(
            answer.json, self._clock.time(), previous_refresh_token=previous_refresh_token
        )

    async def logout(self, token: Token) -> None:
        """RFC 7009: revoke the refresh token (which ends the grant), then the access token."""
        url = self._config.revocation_url
        if not url:
            return
        pairs = [("refresh_token", token.refresh_token), ("access_token", token.access_token)]
        for hint, value in pairs:
            if value is None:
                continue
            form = {"token": value, "token_type_hint": hint}
            headers = await self._client_auth(form)
            await self._http.request("POST", url, form=form, headers=headers, expect_json=False)
