"""A test identity provider: an OAuth2 token endpoint with knobs, call records and fault modes.

Tokens are HS256 JWTs (so expiry can come from ``exp`` alone). Refresh tokens rotate: each one works
once. Every call is recorded with its form and headers, so tests check what went over the wire.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
from aiohttp import web

from sidecar.clock import Clock, SystemClock

SIGNING_KEY = "test-idp-signing-key-not-a-secret-of-anyone"


@dataclass
class Call:
    """One request the token endpoint received."""

    path: str
    form: dict[str, str]
    headers: dict[str, str]
    #: when it arrived (the provider's clock)
    at: float = 0.0

    @property
    def grant_type(self) -> str:
        return self.form.get("grant_type", "")


@dataclass
class FakeIdP:
    """Knobs: lifetime, refresh tokens on/off, expires_in on/off, delay, scripted failures."""

    clock: Clock = field(default_factory=SystemClock)
    lifetime: float = 60.0
    client_id: str = "svc-client"
    client_secret: str = "client-secret-0123456789"
    username: str = "svc-user"
    password: str = "user-password-9876543210"
    issue_refresh_tokens: bool = True
    send_expires_in: bool = True
    #: put ``iat`` in issued tokens (False: ``exp`` only)
    send_iat: bool = True
    #: seconds the provider's clock runs ahead of ``clock`` (negative: behind); its tokens, its
    #: Date headers and is_valid (which the fake upstream asks) all use that clock
    clock_offset: float = 0.0
    #: seconds (real time) to wait before answering a token request
    delay: float = 0.0
    #: seconds of the fake clock a token request takes: ``clock`` (a FakeClock) is moved forward
    #: this much after the request arrives and before the token is issued
    answer_after: float = 0.0
    #: modes consumed one per token call: "500", "502", "503", "429" (with Retry-After: 2), "hang",
    #: "malformed" (truncated JSON), "not_a_token" (JSON of the wrong shape), "truncated" (the
    #: body breaks off), "reset", "invalid_grant", "invalid_client", "echo" (an invalid_client
    #: answer whose error_description, error code and headers repeat every submitted credential)
    failures: list[str] = field(default_factory=list)
    #: fail every token call with this mode while set
    down: str | None = None
    #: fail every refresh (grant refresh_token) with this mode while set; logins still work
    refresh_down: str | None = None
    calls: list[Call] = field(default_factory=list)
    issued: dict[str, float] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    refresh_tokens: set[str] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/revoke", self._revoke)
        app.on_response_prepare.append(self._date)
        return app

    def now(self) -> float:
        """The provider's own clock."""
        return self.clock.time() + self.clock_offset

    async def _date(self, request: web.Request, response: web.StreamResponse) -> None:
        """The Date header on the provider's clock (aiohttp would use the real one)."""
        response.headers["Date"] = email.utils.formatdate(self.now(), usegmt=True)

    @property
    def token_calls(self) -> list[Call]:
        return [c for c in self.calls if c.path == "/token"]

    def grants(self) -> list[str]:
        return [c.grant_type for c in self.token_calls]

    def is_valid(self, access_token: str) -> bool:
        expires = self.issued.get(access_token)
        return expires is not None and access_token not in self.revoked and self.now() < expires

    def revoke_all(self) -> None:
        """Invalidate every access token issued so far (refresh tokens stay valid)."""
        self.revoked.update(self.issued)

    def _client_ok(self, request: web.Request, form: dict[str, str]) -> bool:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        return client_id == self.client_id and secrets.compare_digest(secret, self.client_secret)

    async def _fail(self, mode: str, request: web.Request) -> web.StreamResponse:
        if mode == "echo":
            return self._echo(request)
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "malformed":
            return web.Response(text='{"access_token": "abc', content_type="application/json")
        if mode == "not_a_token":
            return web.json_response({"token": 5, "expires_in": "soon"})
        if mode == "truncated":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = 200
            await response.prepare(request)
            await response.write(b'{"access_token": "')
            assert request.transport is not None
            request.transport.abort()
            return response
        if mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if mode in ("invalid_grant", "invalid_client"):
            return web.json_response({"error": mode, "error_description": "scripted"}, status=400)
        status = int(mode)
        headers = {"Retry-After": "2"} if status == 429 else {}
        return web.json_response({"error": "server_error"}, status=status, headers=headers)

    def _echo(self, request: web.Request) -> web.Response:
        """What a careless provider does: repeat what it was sent in its error answer (the
        Basic credentials decoded, and encoded as sent)."""
        auth = request.headers.get("Authorization", "")
        basic = ""
        if auth.startswith("Basic "):
            basic = base64.b64decode(auth[6:]).decode(errors="replace")
        form = self.calls[-1].form
        echoed = f"client {basic!r} with {auth!r} sent {form!r} and {urlencode(form)}"
        return web.json_response(
            {"error": f"invalid_client {form.get('password', '')}", "error_description": echoed},
            status=401,
            headers={"X-Echo": echoed[:200].encode("ascii", "replace").decode()},
        )

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.calls.append(Call("/token", form, dict(request.headers), self.now()))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.answer_after:
            await self.clock.advance(self.answer_after)  # type: ignore[attr-defined]
        mode = self.down or (self.failures.pop(0) if self.failures else None)
        if mode is None and form.get("grant_type") == "refresh_token":
            mode = self.refresh_down
        if mode is not None:
            return await self._fail(mode, request)
        if not self._client_ok(request, form):
            return web.json_response({"error": "invalid_client"}, status=401)
        refused = self._grant_error(form)
        if refused is not None:
            return web.json_response({"error": refused}, status=400)
        return web.json_response(self._issue(form), headers={"Cache-Control": "no-store"})

    def _grant_error(self, form: dict[str, str]) -> str | None:
        """The RFC 6749 error code for a grant we refuse, or None to issue a token."""
        grant = form.get("grant_type")
        if grant == "password":
            if form.get("username") != self.username or form.get("password") != self.password:
                return "invalid_grant"
        elif grant == "refresh_token":
            presented = form.get("refresh_token", "")
            if presented not in self.refresh_tokens:
                return "invalid_grant"
            self.refresh_tokens.discard(presented)  # rotation: each refresh token works once
        elif grant != "client_credentials":
            return "unsupported_grant_type"
        return None

    def _access_token(self, claims: dict[str, Any]) -> str:
        """Sign the access token's claims (HS256 here: expiry readable without keys)."""
        return jwt.encode(claims, SIGNING_KEY, algorithm="HS256")

    def _issue(self, form: dict[str, str]) -> dict[str, Any]:
        now = self.now()
        claims: dict[str, Any] = {"sub": self.client_id, "exp": now + self.lifetime}
        if self.send_iat:
            claims["iat"] = now
        access = self._access_token({**claims, "jti": uuid.uuid4().hex})
        self.issued[access] = now + self.lifetime
        body: dict[str, Any] = {"access_token": access, "token_type": "Bearer"}
        if self.send_expires_in:
            body["expires_in"] = self.lifetime
        if self.issue_refresh_tokens:
            refresh = "rt-" + secrets.token_urlsafe(24)
            self.refresh_tokens.add(refresh)
            body["refresh_token"] = refresh
        if form.get("scope"):
            body["scope"] = form["scope"]
        return body

    async def _revoke(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.calls.append(Call("/revoke", form, dict(request.headers), self.now()))
        token = form.get("token", "")
        self.revoked.add(token)
        self.refresh_tokens.discard(token)
        return web.Response(status=200)
