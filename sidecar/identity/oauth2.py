"""OAuth2 token endpoint client (RFC 6749): client_credentials, password and refresh_token grants,
client_secret_basic / client_secret_post client authentication, RFC 7009 revocation.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from sidecar.clock import Clock
from sidecar.config import Identity, read_secret
from sidecar.errors import IdentityUnavailable, OAuthError
from sidecar.tokens import Token, parse_token_response

log = logging.getLogger(__name__)

#: a token response larger than this is refused rather than read into memory
MAX_RESPONSE_BYTES = 1 << 20


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header in its delta-seconds form (RFC 9110 10.2.3)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class OAuth2Identity:
    """Talks to one OAuth2 token endpoint for one client."""

    def __init__(self, config: Identity, clock: Clock, *, token_url: str | None = None) -> None:
        self._config = config
        self._clock = clock
        self._token_url = token_url or config.token_url or ""
        self._http: aiohttp.ClientSession | None = None
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

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._config.timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()

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
        body = await self._post(self._token_url, form, headers)
        return parse_token_response(
            body, self._clock.time(), previous_refresh_token=previous_refresh_token
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
            await self._post(url, form, headers, expect_json=False)

    async def _post(
        self,
        url: str,
        form: Mapping[str, str],
        headers: Mapping[str, str],
        *,
        expect_json: bool = True,
    ) -> Any:
        """POST a form; translate every failure into IdentityUnavailable or OAuthError."""
        all_headers = {"Accept": "application/json", "X-Request-ID": str(uuid.uuid4()), **headers}
        try:
            async with self._session().post(
                url, data=dict(form), headers=all_headers, allow_redirects=False
            ) as resp:
                raw = await resp.content.read(MAX_RESPONSE_BYTES + 1)
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except TimeoutError as exc:
            raise IdentityUnavailable("identity provider timed out", reason="timeout") from exc
        except aiohttp.ClientConnectorError as exc:
            raise IdentityUnavailable(
                f"identity provider unreachable: {exc.os_error.strerror or exc.os_error}",
                reason="unreachable",
            ) from exc
        except aiohttp.ClientError as exc:
            raise IdentityUnavailable(
                f"identity provider connection failed: {type(exc).__name__}", reason="connection"
            ) from exc
        if len(raw) > MAX_RESPONSE_BYTES:
            raise IdentityUnavailable(
                "identity provider response too large", reason="malformed_response"
            )
        decoded = _decode_json(raw)
        if 200 <= status < 300:
            if not expect_json:
                return None
            if decoded is None:
                raise IdentityUnavailable(
                    f"identity provider answered {status} with a body that is not JSON",
                    reason="malformed_response",
                )
            return decoded
        if (
            status in (400, 401, 403)
            and isinstance(decoded, dict)
            and isinstance(decoded.get("error"), str)
        ):
            description = decoded.get("error_description")
            raise OAuthError(
                decoded["error"],
                description if isinstance(description, str) else None,
                status=status,
            )
        raise IdentityUnavailable(
            f"identity provider answered HTTP {status}",
            reason=f"http_{status}",
            retry_after=retry_after,
        )


def _decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
