"""The embedded demo: an identity provider and an echo upstream, served inside the sidecar process.

The identity provider issues ES256-signed JWTs with the client_credentials grant (and publishes its
JWKS); the echo upstream verifies the token it receives and answers with the method, path, query and
headers it saw, so ``curl localhost:8080/echo/anything`` shows exactly what sidecar injected.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.clock import Clock

DEMO_CLIENT_ID = "demo-service"
DEMO_AUDIENCE = "demo-api"


@dataclass
class DemoIdentityProvider:
    """A tiny OAuth2 token endpoint for the demo; the secret is random per process."""

    clock: Clock
    lifetime: float
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    issuer: str = "http://demo-idp.sidecar.local"
    tokens_issued: int = 0

    def __post_init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.kid = uuid.uuid4().hex[:8]

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth2/token", self._token)
        app.router.add_get("/.well-known/jwks.json", self._jwks)
        return app

    def _authenticated(self, request: web.Request, form: Any) -> bool:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        return client_id == DEMO_CLIENT_ID and secrets.compare_digest(secret, self.client_secret)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if not self._authenticated(request, form):
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        now = self.clock.time()
        claims = {
            "iss": self.issuer,
            "sub": DEMO_CLIENT_ID,
            "aud": DEMO_AUDIENCE,
            "iat": int(now),
            "exp": int(now + self.lifetime),
            "jti": uuid.uuid4().hex,
            "scope": "demo.read demo.write",
        }
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})
        self.tokens_issued += 1
        return web.json_response(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": int(self.lifetime),
                "scope": claims["scope"],
            },
            headers={"Cache-Control": "no-store"},
        )

    async def _jwks(self, _request: web.Request) -> web.Response:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.public_key))
        jwk.update(kid=self.kid, use="sig", alg="ES256")
        return web.json_response({"keys": [jwk]})

    def verify(self, token: str) -> dict[str, Any]:
        """Verify a token this provider issued (signature, audience, issuer, expiry)."""
        claims: dict[str, Any] = jwt.decode(
            token,
            self.public_key,
            algorithms=["ES256"],
            audience=DEMO_AUDIENCE,
            issuer=self.issuer,
            options={"verify_exp": False},
        )
        if claims["exp"] <= self.clock.time():
            raise jwt.ExpiredSignatureError("token expired")
        return claims


def echo_app(idp: DemoIdentityProvider) -> web.Application:
    """An upstream that answers with what it received; the token is verified, never echoed."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        auth = request.headers.get("Authorization", "")
        token_info: dict[str, Any] = {"present": auth.startswith("Bearer ")}
        if token_info["present"]:
            try:
                claims = idp.verify(auth[7:])
                token_info.update(
                    valid=True,
                    sub=claims["sub"],
                    expires_in=round(claims["exp"] - idp.clock.time()),
                )
                headers["Authorization"] = "Bearer <verified token, not shown>"
            except jwt.PyJWTError as exc:
                token_info.update(valid=False, error=str(exc))
        status = 200 if token_info.get("valid") else 401
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": headers,
                "body_bytes": len(body),
                "token": token_info,
            },
            status=status,
            dumps=lambda obj: json.dumps(obj, indent=2) + "\n",
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app
