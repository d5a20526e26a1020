"""A standards OAuth2/OIDC provider for tests: FakeIdP plus discovery, JWKS, asymmetric access
tokens, private_key_jwt client authentication, the jwt_bearer and token_exchange grants, and bad
answers on demand. Like FakeIdP it records every call, so tests check what went over the wire.

It verifies what a real provider would, with the client's PUBLIC key only: an assertion's
signature, ``iss``/``sub``/``aud``, ``exp`` (on the shared fake clock) and that no ``jti`` is ever
presented twice.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm

from tests.fakes.idp import SIGNING_KEY, Call, FakeIdP

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"

#: identity settings for a client that has no secret (and a provider without revocation)
NO_SECRET: dict[str, Any] = {"client_secret": None, "revocation_url": None}


def write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> Path:
    """Write ``key`` to ``path`` as an unencrypted PKCS#8 PEM (a client's private_key_file)."""
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


#: bad token-endpoint answers, by mode name: (status, content type, body)
BAD_ANSWERS: dict[str, tuple[int, str, str]] = {
    "html_200": (200, "text/html", "<!DOCTYPE html><html><body>Sign in</body></html>"),
    "html_502": (502, "text/html", "<html><body>Bad Gateway</body></html>"),
    "not_json": (200, "application/json", "access_token=abc&expires_in=60"),
    "404": (404, "application/json", '{"detail": "no such tenant"}'),
    "no_token": (200, "application/json", '{"token_type": "Bearer", "expires_in": 60}'),
    "expires_negative": (200, "", '{"access_token": "a.b.c", "expires_in": -5}'),
    "expires_zero": (200, "", '{"access_token": "a.b.c", "expires_in": 0}'),
    "expires_absurd": (200, "", '{"access_token": "a.b.c", "expires_in": 99999999999}'),
    "expires_text": (200, "", '{"access_token": "a.b.c", "expires_in": "soon"}'),
    "token_type_mac": (200, "", '{"access_token": "a.b.c", "token_type": "MAC"}'),
    "json_array": (200, "application/json", "[1, 2, 3]"),
}


@dataclass
class OIDCProvider(FakeIdP):
    """Knobs beyond FakeIdP's: the issuer (set from the served URL), the client's public key,
    trusted assertion keys, accepted subject tokens, claim overrides for issued tokens."""

    issuer: str = ""
    audience: str = "api://orders"
    #: the issuer the discovery document claims (None: the real one)
    discovery_issuer: str | None = None
    #: access tokens are ES256 JWTs signed with this key, published in the JWKS as "idp-1"
    signing_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    key_id: str = "idp-1"
    #: merged into every issued access token's claims (to issue a wrong aud, iss, exp, …)
    claim_overrides: dict[str, Any] = field(default_factory=dict)
    #: sign issued tokens with this key instead (one the JWKS does not publish)
    rogue_key: ec.EllipticCurvePrivateKey | None = None
    #: "ES256" (signed with signing_key), or "HS256" / "none" to issue forbidden kinds of token
    token_alg: str = "ES256"
    #: the key the JWS header names (None: ``key_id``)
    header_kid: str | None = None
    #: private_key_jwt: the client's public key (None: client secrets are checked instead)
    client_public_key: Any = None
    #: jwt_bearer: public keys whose assertions are trusted (besides the client's own)
    assertion_keys: list[Any] = field(default_factory=list)
    #: token_exchange: subject tokens accepted
    subject_tokens: set[str] = field(default_factory=set)
    #: token_exchange: the actor token accepted, if one is expected
    actor_token: str | None = None
    #: issue opaque access tokens (not JWTs), whose claims only /introspect tells
    opaque_tokens: bool = False
    opaque_claims: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the JWKS endpoint answers 503 while set
    jwks_down: bool = False
    #: the revocation endpoint never answers while set
    revocation_hangs: bool = False
    #: client_assertion_file: a federated workload identity (as Entra ID's federated credential):
    #: assertions signed by this key with this issuer, subject and audience authenticate the client
    workload_key: Any = None
    workload_issuer: str = "https://kubernetes.default.svc.cluster.local"
    workload_subject: str = "system:serviceaccount:orders:orders-api"
    workload_audience: str = "api://AzureADTokenExchange"
    seen_jti: set[str] = field(default_factory=set)
    assertion_failures: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_post("/introspect", self._introspect)
        return app

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    def paths(self) -> list[str]:
        return [c.path for c in self.calls]

    # ----------------------------------------------------------------- metadata

    async def _discovery(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(Call(request.path, {}, dict(request.headers)))
        mode = self.down or (self.failures.pop(0) if self.failures else None)
        if mode is not None:
            return await self._fail(mode, request)
        return web.json_response(
            {
                "issuer": self.discovery_issuer or self.issuer,
                "token_endpoint": self.token_endpoint,
                "revocation_endpoint": f"{self.issuer}/revoke",
                "jwks_uri": f"{self.issuer}/jwks",
                "introspection_endpoint": f"{self.issuer}/introspect",
                "grant_types_supported": ["client_credentials", JWT_BEARER, TOKEN_EXCHANGE],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self.calls.append(Call(request.path, {}, dict(request.headers)))
        if self.jwks_down:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        public = json.loads(ECAlgorithm.to_jwk(self.signing_key.public_key()))
        public.update(kid=self.key_id, use="sig", alg="ES256")
        return web.json_response({"keys": [public]})

    def _access_token(self, claims: dict[str, Any]) -> str:
        claims = {**claims, "iss": self.issuer, "aud": self.audience, **self.claim_overrides}
        claims = {k: v for k, v in claims.items() if v is not None}
        if self.opaque_tokens:
            token = "opaque-" + secrets.token_urlsafe(24)
            self.opaque_claims[token] = claims
            return token
        if self.token_alg == "HS256":
            return jwt.encode(claims, SIGNING_KEY, algorithm="HS256")
        if self.token_alg == "none":
            return jwt.encode(claims, "", algorithm="none")
        return jwt.encode(
            claims,
            self.rogue_key or self.signing_key,
            algorithm="ES256",
            headers={"kid": self.header_kid or self.key_id},
        )

    # ----------------------------------------------------------------- client and grants

    def _client_ok(self, request: web.Request, form: dict[str, str]) -> bool:
        if form.get("client_assertion_type") == ASSERTION_TYPE:
            if self.workload_key is not None:
                return self._workload_ok(form.get("client_assertion", ""))
            if self.client_public_key is None:
                return False
            return self._assertion_ok(
                form.get("client_assertion", ""), [self.client_public_key], client=True
            )
        public = "Authorization" not in request.headers and "client_secret" not in form
        if form.get("grant_type") in (JWT_BEARER, TOKEN_EXCHANGE) and public:
            # a public client (client_auth none): the grant's own token authenticates it
            return form.get("client_id") == self.client_id
        return super()._client_ok(request, form)

    def _workload_ok(self, assertion: str) -> bool:
        """A workload's token (e.g. a projected service-account token): signature, iss, sub and
        aud of the federated credential, exp on the fake clock. Reused while valid, as such
        tokens are (no jti check)."""
        try:
            claims = jwt.decode(
                assertion,
                self.workload_key,
                algorithms=["RS256", "ES256"],
                audience=self.workload_audience,
                issuer=self.workload_issuer,
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.PyJWTError as exc:
            self.assertion_failures.append(type(exc).__name__)
            return False
        if claims.get("sub") != self.workload_subject:
            self.assertion_failures.append("wrong_subject")
            return False
        if claims.get("exp", 0) <= self.clock.time():
            self.assertion_failures.append("expired")
            return False
        return True

    def _assertion_ok(self, assertion: str, keys: list[Any], *, client: bool) -> bool:
        """RFC 7523 section 3: signature, iss/sub, aud = our token endpoint, exp, unused jti."""
        for key in keys:
            try:
                claims = jwt.decode(
                    assertion,
                    key,
                    algorithms=["RS256", "ES256", "PS256", "EdDSA"],
                    audience=self.token_endpoint,
                    # times are checked below on the fake clock, not by PyJWT
                    options={
                        "verify_exp": False,
                        "verify_iat": False,
                        "verify_nbf": False,
                        "require": ["exp", "jti", "iss", "sub"],
                    },
                )
            except jwt.PyJWTError as exc:
                self.assertion_failures.append(type(exc).__name__)
                continue
            if claims["exp"] <= self.clock.time():
                self.assertion_failures.append("expired")
                return False
            if claims["jti"] in self.seen_jti:
                self.assertion_failures.append("jti_reused")
                return False
            if client and not claims["iss"] == claims["sub"] == self.client_id:
                self.assertion_failures.append("wrong_issuer")
                return False
            self.seen_jti.add(claims["jti"])
            return True
        return False

    def _grant_error(self, form: dict[str, str]) -> str | None:
        grant = form.get("grant_type")
        if grant == JWT_BEARER:
            keys = [*self.assertion_keys]
            if self.client_public_key is not None:
                keys.append(self.client_public_key)
            ok = self._assertion_ok(form.get("assertion", ""), keys, client=False)
            return None if ok else "invalid_grant"
        if grant == TOKEN_EXCHANGE:
            if form.get("subject_token_type") != JWT_TYPE:
                return "invalid_request"
            if form.get("subject_token") not in self.subject_tokens:
                return "invalid_grant"
            if self.actor_token is not None and form.get("actor_token") != self.actor_token:
                return "invalid_grant"
            return None
        return super()._grant_error(form)

    def _issue(self, form: dict[str, str]) -> dict[str, Any]:
        body = super()._issue(form)
        if form.get("grant_type") == TOKEN_EXCHANGE:
            body["issued_token_type"] = "urn:ietf:params:oauth:token-type:access_token"
            body.pop("refresh_token", None)  # RFC 8693 2.2.1: usually none for an exchange
        return body

    async def _introspect(self, request: web.Request) -> web.Response:
        """RFC 7662: active while issued, unrevoked and unexpired, with the token's claims."""
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.calls.append(Call(request.path, form, dict(request.headers)))
        if not self._client_ok(request, form):
            return web.json_response({"error": "invalid_client"}, status=401)
        token = form.get("token", "")
        if not self.is_valid(token):
            return web.json_response({"active": False})
        return web.json_response({"active": True, **self.opaque_claims.get(token, {})})

    async def _revoke(self, request: web.Request) -> web.Response:
        if self.revocation_hangs:
            self.calls.append(Call(request.path, {}, dict(request.headers)))
            await asyncio.sleep(3600)
        return await super()._revoke(request)

    async def _fail(self, mode: str, request: web.Request) -> web.StreamResponse:
        if mode in BAD_ANSWERS:
            status, content_type, body = BAD_ANSWERS[mode]
            return web.Response(
                status=status, text=body, content_type=content_type or "application/json"
            )
        return await super()._fail(mode, request)
