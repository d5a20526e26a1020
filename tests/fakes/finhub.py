"""A FinHub-shaped API (shared/seeds/finhub-production-sessions.txt): JSON login, refresh with
rotation, logout, and a resource that insists on the six production headers.

* ``POST /api/v2.1/auth/login`` ``{username, password, customerId, customerSecret}`` answers the
  seed's session object: ``expires_in``, ``token_type``, ``scope``, ``customerId``, ``tenantId``,
  ``userSessionToken`` (an HS256 JWT) and ``refreshToken``.
* ``POST /api/v2.1/auth/token/refresh`` ``{refreshToken, customerId, customerSecret}``: each refresh
  token works once (rotation); a used or unknown one gets 401.
* ``POST /api/v2.1/auth/logout`` with ``Authorization: Bearer <userSessionToken>`` ends it.
* ``/api/v2.1/<anything else>``: 200 with an echo of what it saw, or 400/401 when one of
  Authorization, X-Activity-ID, X-Tenant-ID, X-Request-ID (uuid4, never reused), X-Session-ID and
  X-Correlation-ID is missing, the tenant is wrong or the token is not a live one.

The seed shows no error body; errors here use ``{"status", "code", "message"}`` (our choice).
Every call is recorded (path, headers, JSON body) for on-the-wire checks.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from sidecar.clock import Clock, SystemClock

SIGNING_KEY = "finhub-fake-signing-key-not-a-secret-of-anyone"
PREFIX = "/api/v2.1"
SIX_HEADERS = (
    "Authorization",
    "X-Activity-ID",
    "X-Tenant-ID",
    "X-Request-ID",
    "X-Session-ID",
    "X-Correlation-ID",
)


@dataclass
class Call:
    """One request the fake received."""

    path: str
    headers: dict[str, str]
    json: Any


@dataclass
class FinHub:
    """Knobs: lifetime, credentials, tenant, cookies to set, scripted failures."""

    clock: Clock = field(default_factory=SystemClock)
    lifetime: float = 1800.0
    tenant_id: str = "1234567"
    customer_id: str = "12345678-abcd-1234-efgh-1234567890ab"
    customer_secret: str = "customer-secret-0123456789"
    username: str = "svc-finhub"
    password: str = "finhub-password-9876543210"
    #: more users of the same customer: {username: password}, each logged in as itself
    other_users: dict[str, str] = field(default_factory=dict)
    #: session tokens are ES256 JWTs signed with this key (published at /jwks as "finhub-1",
    #: with iss and aud claims) instead of HS256 ones
    signing_key: ec.EllipticCurvePrivateKey | None = None
    issuer: str = "https://api.finhub.cloud"
    audience: str = "finhub-api"
    #: merged into every session token's claims (to issue a wrong aud, iss, exp, …)
    claim_overrides: dict[str, Any] = field(default_factory=dict)
    #: Set-Cookie headers sent with every login and refresh answer
    set_cookies: list[str] = field(default_factory=list)
    #: answer every auth call this way while set: "503", "hang", "reset"
    down: str | None = None
    #: login answers 401 with an error body that repeats the submitted credentials
    echo_credentials: bool = False
    #: modes consumed one per auth call (same values as ``down``)
    failures: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    issued: dict[str, float] = field(default_factory=dict)
    refresh_tokens: set[str] = field(default_factory=set)
    #: whose session each refresh token continues (the token's ``sub``)
    refresh_subjects: dict[str, str] = field(default_factory=dict)
    used_refresh_tokens: list[str] = field(default_factory=list)
    logged_out: set[str] = field(default_factory=set)
    request_ids: set[str] = field(default_factory=set)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    served: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(f"{PREFIX}/auth/login", self._login)
        app.router.add_post(f"{PREFIX}/auth/token/refresh", self._refresh)
        app.router.add_post(f"{PREFIX}/auth/logout", self._logout)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_route("*", PREFIX + "/{tail:.*}", self._resource)
        return app

    def auth_calls(self, what: str) -> list[Call]:
        return [c for c in self.calls if c.path == f"{PREFIX}/auth/{what}"]

    @staticmethod
    def subject(authorization: str) -> str:
        """Whose session an ``Authorization: Bearer`` header carries (the token's ``sub``)."""
        token = authorization.removeprefix("Bearer ")
        claims = jwt.decode(token, options={"verify_signature": False})
        return str(claims["sub"])

    def is_live(self, token: str) -> bool:
        expires = self.issued.get(token)
        return expires is not None and token not in self.logged_out and self.clock.time() < expires

    # ----------------------------------------------------------------- auth endpoints

    async def _record(
        self, request: web.Request, *, needs_body: bool = True
    ) -> tuple[Any, web.StreamResponse | None]:
        try:
            body = await request.json()
        except ValueError:
            body = None
        self.calls.append(Call(request.path, dict(request.headers), body))
        mode = self.down or (self.failures.pop(0) if self.failures else None)
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return body, web.Response()
        if mode is not None:
            return body, _error(int(mode), "UNAVAILABLE", "scripted failure")
        problem = self._auth_headers_problem(request)
        if problem is not None:
            return body, problem
        if needs_body and not isinstance(body, dict):
            return body, _error(400, "BAD_REQUEST", "the body must be a JSON object")
        return body, None

    def _auth_headers_problem(self, request: web.Request) -> web.Response | None:
        if request.headers.get("X-Tenant-ID") != self.tenant_id:
            return _error(400, "INVALID_TENANT", "X-Tenant-ID is missing or wrong")
        if not _fresh_uuid4(request.headers.get("X-Request-ID"), self.request_ids):
            return _error(400, "INVALID_REQUEST_ID", "X-Request-ID must be a new uuid4")
        return None

    def _customer_ok(self, body: dict[str, Any]) -> bool:
        return body.get("customerId") == self.customer_id and secrets.compare_digest(
            str(body.get("customerSecret", "")), self.customer_secret
        )

    async def _login(self, request: web.Request) -> web.StreamResponse:
        body, refusal = await self._record(request)
        if refusal is not None:
            return refusal
        if self.echo_credentials:
            echoed = f"refused {body!r}"
            return web.json_response(
                {"status": 401, "code": echoed, "message": echoed, "error": echoed}, status=401
            )
        users = {self.username: self.password, **self.other_users}
        username = body.get("username")
        password = users.get(username) if isinstance(username, str) else None
        if (
            not self._customer_ok(body)
            or password is None
            or not secrets.compare_digest(str(body.get("password", "")), password)
        ):
            return _error(401, "INVALID_CREDENTIALS", "username or password is wrong")
        return self._session_answer(str(username))

    async def _refresh(self, request: web.Request) -> web.StreamResponse:
        body, refusal = await self._record(request)
        if refusal is not None:
            return refusal
        presented = body.get("refreshToken")
        if not self._customer_ok(body):
            return _error(401, "INVALID_CLIENT", "customer credentials are wrong")
        if presented not in self.refresh_tokens:
            return _error(401, "INVALID_REFRESH_TOKEN", "refresh token unknown or already used")
        self.refresh_tokens.discard(presented)  # rotation: each refresh token works once
        self.used_refresh_tokens.append(presented)
        return self._session_answer(self.refresh_subjects.get(presented, self.username))

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        _body, refusal = await self._record(request, needs_body=False)
        if refusal is not None:
            return refusal
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        if not auth.startswith("Bearer ") or not self.is_live(token):
            return _error(401, "INVALID_SESSION", "no live session for this token")
        self.logged_out.add(token)
        return web.json_response({"status": "logged_out"})

    def _session_answer(self, username: str) -> web.Response:
        now = self.clock.time()
        token = self._sign(
            {"sub": username, "exp": now + self.lifetime, "iat": now, "jti": uuid.uuid4().hex}
        )
        self.issued[token] = now + self.lifetime
        refresh = "rt-" + secrets.token_urlsafe(24)
        self.refresh_tokens.add(refresh)
        self.refresh_subjects[refresh] = username
        response = web.json_response(
            {
                "expires_in": self.lifetime,
                "token_type": "Bearer",
                "scope": "01f0418c-36da-17a0-830a-aca6bf25e007",
                "customerId": self.customer_id,
                "tenantId": self.tenant_id,
                "userSessionToken": token,
                "refreshToken": refresh,
            }
        )
        for cookie in self.set_cookies:
            response.headers.add("Set-Cookie", cookie)
        return response

    def _sign(self, claims: dict[str, Any]) -> str:
        if self.signing_key is None:
            return jwt.encode({**claims, **self.claim_overrides}, SIGNING_KEY, algorithm="HS256")
        claims = {**claims, "iss": self.issuer, "aud": self.audience, **self.claim_overrides}
        return jwt.encode(claims, self.signing_key, algorithm="ES256", headers={"kid": "finhub-1"})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.calls.append(Call(request.path, dict(request.headers), None))
        if self.signing_key is None:
            return web.json_response({"keys": []})
        public = json.loads(ECAlgorithm.to_jwk(self.signing_key.public_key()))
        public.update(kid="finhub-1", use="sig", alg="ES256")
        return web.json_response({"keys": [public]})

    # ----------------------------------------------------------------- the resource

    async def _resource(self, request: web.Request) -> web.StreamResponse:
        headers = request.headers
        self.calls.append(Call(request.path, dict(headers), None))
        missing = [name for name in SIX_HEADERS if not headers.get(name)]
        if missing:
            return self._reject(400, "MISSING_HEADER", f"required headers missing: {missing}")
        if headers["X-Tenant-ID"] != self.tenant_id:
            return self._reject(403, "INVALID_TENANT", "X-Tenant-ID does not match the session")
        if not _fresh_uuid4(headers["X-Request-ID"], self.request_ids):
            return self._reject(400, "INVALID_REQUEST_ID", "X-Request-ID must be a new uuid4")
        auth = headers["Authorization"]
        if not auth.startswith("Bearer ") or not self.is_live(auth[7:]):
            return self._reject(401, "INVALID_SESSION", "the session token is not valid")
        self.served += 1
        return web.json_response(
            {"path": request.path_qs, "cookie": headers.get("Cookie"), "tenant": self.tenant_id}
        )

    def _reject(self, status: int, code: str, message: str) -> web.Response:
        self.rejected.append((status, code))
        return _error(status, code, message)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"status": status, "code": code, "message": message}, status=status)


def _fresh_uuid4(value: str | None, seen: set[str]) -> bool:
    """True for a uuid4 never presented before (it is then remembered)."""
    if value is None or value in seen:
        return False
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return False
    if parsed.version != 4 or str(parsed) != value.lower():
        return False
    seen.add(value)
    return True
