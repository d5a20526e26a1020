"""Validation of newly obtained access tokens before use (``identity.validate``).

The Transmit seed's rule: a token is used only after its signature (against the provider's JWKS,
RFC 7517), ``iss``, ``aud``, ``exp`` and ``nbf`` (RFC 7519 section 4.1) are checked. The ``alg`` of
the token must be on the configured allow-list, which only holds asymmetric algorithms: ``none``
and HS* can never pass (RFC 8725 section 3.1). Times are read from the injected Clock, not by PyJWT.

Keys are cached for an hour; a token signed with an unknown ``kid`` re-fetches the JWKS once, at
most once per ``jwks_min_refetch_interval`` (a provider rotating keys is followed, a flood of forged
kids is not).
An opaque token (not a JWT) is asked about at the introspection endpoint instead (RFC 7662).

Imported only when validation is enabled: it loads PyJWT and cryptography.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt

from sidecar.clock import Clock
from sidecar.config.sections import Validate
from sidecar.errors import IdentityUnavailable, InvalidToken
from sidecar.identity.http import IdentityHTTP

if TYPE_CHECKING:
    from sidecar.metrics import Metrics
    from sidecar.tokens import Token

log = logging.getLogger(__name__)

#: seconds the JWKS is cached before it is fetched again (keys removed by the provider stop
#: verifying within this time)
JWKS_MAX_AGE = 3600.0

#: PyJWT's errors, most specific first, and the reason label each becomes
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.InvalidSignatureError, "invalid_token_signature"),
    (jwt.InvalidAudienceError, "invalid_token_audience"),
    (jwt.InvalidIssuerError, "invalid_token_issuer"),
    (jwt.MissingRequiredClaimError, "invalid_token_claims"),
    (jwt.InvalidAlgorithmError, "invalid_token_algorithm"),
    (jwt.DecodeError, "invalid_token_malformed"),
)


class TokenValidator:
    """Checks access tokens against one issuer, one audience and the issuer's JWKS."""

    def __init__(
        self,
        rules: Validate,
        http: IdentityHTTP,
        clock: Clock,
        *,
        issuer: str,
        audience: str,
        jwks_url: Callable[[], Awaitable[str | None]],
        introspect: Callable[[str], Awaitable[dict[str, Any] | None]] | None = None,
    ) -> None:
        self._rules = rules
        self._http = http
        self._clock = clock
        self._issuer = issuer
        self._audience = audience
        self._jwks_url = jwks_url
        #: RFC 7662 introspection of a token that is not a JWT; gives None without an endpoint
        self._introspect = introspect
        self._keys: list[_Key] | None = None
        #: when the keys were last fetched (their age), and when a fetch was last tried (the
        #: rate limit of re-fetches for unknown kids)
        self._fetched_at = -math.inf
        self._tried_at = -math.inf

    async def check(self, access_token: str) -> None:
        """Return when ``access_token`` passes every check; else raise InvalidToken.

        A token that is not a JWT (an opaque token) is checked by introspection (RFC 7662) when
        the provider has an introspection endpoint: it must be ``active``, and ``iss``, ``aud``,
        ``exp`` and ``nbf`` are checked where the answer carries them.

        Raises IdentityUnavailable when the JWKS or the introspection endpoint cannot be reached
        (retried like any outage).
        """
        try:
            header = jwt.get_unverified_header(access_token)
        except jwt.PyJWTError:
            await self._check_opaque(access_token)
            return
        alg = header.get("alg")
        if alg not in self._rules.algorithms:
            raise _invalid(
                f"alg {str(alg)[:20]!r} is not in validate.algorithms", "invalid_token_algorithm"
            )
        kid = header.get("kid")
        candidates = await self._candidates(kid, alg)
        if not candidates:
            raise _invalid(f"no key in the JWKS matches kid {str(kid)[:64]!r}", "invalid_token_key")
        claims = self._verify(access_token, alg, candidates)
        self._check_times(claims)

    async def _check_opaque(self, access_token: str) -> None:
        claims = await self._introspect(access_token) if self._introspect else None
        if claims is None:
            raise _invalid("not a JWT, and no introspection endpoint", "invalid_token_malformed")
        # RFC 7662 2.2: "active" is the one required member; anything but true means unusable
        if claims.get("active") is not True:
            raise _invalid("introspection says the token is not active", "invalid_token_inactive")
        if "iss" in claims and claims["iss"] != self._issuer:
            raise _invalid("introspection names another issuer", "invalid_token_issuer")
        if "aud" in claims:
            audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
            if self._audience not in audiences:
                raise _invalid("introspection names another audience", "invalid_token_audience")
        self._check_times(claims, require_exp=False)

    async def _candidates(self, kid: Any, alg: str) -> list[_Key]:
        keys = await self._load(force=False)
        found = _matching(keys, kid, alg)
        if not found and kid is not None:
            now = self._clock.monotonic()
            if now - self._tried_at >= self._rules.jwks_min_refetch_interval:
                log.info("identity.jwks_refetch", extra={"kid": str(kid)[:64]})
                found = _matching(await self._load(force=True), kid, alg)
        return found

    def _verify(self, token: str, alg: str, keys: list[_Key]) -> dict[str, Any]:
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key.jwk.key,
                    algorithms=[alg],
                    audience=self._audience,
                    issuer=self._issuer,
                    # exp/nbf/iat are checked below with the injected clock
                    options={
                        "require": ["exp", "iss", "aud"],
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                    },
                )
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                continue  # another key with the same kid (or none) may still verify it
            except jwt.PyJWTError as exc:
                raise _invalid(str(exc), _reason(exc)) from None
            return claims
        raise _invalid("signature does not verify", "invalid_token_signature")

    def _check_times(self, claims: dict[str, Any], *, require_exp: bool = True) -> None:
        """exp (required in a JWT, optional in an introspection answer) and nbf, with leeway."""
        now = self._clock.time()
        leeway = self._rules.leeway
        exp, nbf = claims.get("exp"), claims.get("nbf")
        for name, value in (("exp", exp), ("nbf", nbf)):
            if value is None and (name == "nbf" or not require_exp):
                continue
            if not _is_number(value):
                raise _invalid(f"{name} is not a number", "invalid_token_claims")
        if isinstance(exp, int | float) and now >= exp + leeway:
            raise _invalid("the token has expired", "invalid_token_expired")
        if isinstance(nbf, int | float) and now + leeway < nbf:
            raise _invalid("the token is not valid yet (nbf)", "invalid_token_not_yet_valid")

    async def _load(self, *, force: bool) -> list[_Key]:
        """The JWKS's keys: cached, fetched again when forced or older than JWKS_MAX_AGE. A
        refresh of a stale cache that fails keeps the cached keys (the provider's keys rarely
        change, and an outage of its JWKS endpoint should not stop every login)."""
        if self._keys is not None and not force:
            if self._clock.monotonic() - self._fetched_at < JWKS_MAX_AGE:
                return self._keys
            try:
                return await self._fetch()
            except IdentityUnavailable as exc:
                log.warning("identity.jwks_stale", extra={"error": str(exc), "reason": exc.reason})
                return self._keys
        return await self._fetch()

    async def _fetch(self) -> list[_Key]:
        url = await self._jwks_url()
        if url is None:
            raise IdentityUnavailable(
                "no JWKS endpoint: set identity.jwks_url or an issuer whose discovery names one",
                reason="jwks_invalid",
            )
        self._tried_at = self._clock.monotonic()
        answer = await self._http.request("GET", url, endpoint="jwks")
        keys = _parse_jwks(answer.json)
        if not keys:
            raise IdentityUnavailable(
                f"the JWKS at {url} holds no usable signing key", reason="jwks_invalid"
            )
        self._keys = keys
        self._fetched_at = self._tried_at
        return keys


async def vet(validator: TokenValidator, token: Token, metrics: Metrics | None) -> None:
    """Check ``token`` before it is used, for any kind of identity: a refusal is counted by
    reason, logged (``identity.token_invalid``, with the token's fingerprint only) and raised."""
    try:
        await validator.check(token.access_token)
    except InvalidToken as exc:
        if metrics is not None:
            metrics.token_refused(exc.reason)
        log.warning(
            "identity.token_invalid",
            extra={"reason": exc.reason, "error": str(exc), "token": token.fingerprint},
        )
        raise


@dataclass(frozen=True, slots=True)
class _Key:
    jwk: jwt.PyJWK
    kid: str | None
    #: the key's own ``alg`` (RFC 7517 section 4.4), when it pins one
    alg: str | None


def _parse_jwks(doc: Any) -> list[_Key]:
    """The usable signing keys of a JWK Set (RFC 7517 section 5); others are skipped."""
    entries = doc.get("keys") if isinstance(doc, dict) else None
    keys = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            log.info("identity.jwks_key_skipped", extra={"kid": str(entry.get("kid"))[:64]})
            continue
        alg, kid = entry.get("alg"), entry.get("kid")
        keys.append(
            _Key(jwk, kid if isinstance(kid, str) else None, alg if isinstance(alg, str) else None)
        )
    return keys


def _matching(keys: list[_Key], kid: Any, alg: str) -> list[_Key]:
    """Keys with this kid (any key when the token names none) whose own ``alg``, if set, agrees."""
    return [k for k in keys if (kid is None or k.kid == kid) and k.alg in (None, alg)]


def _reason(exc: Exception) -> str:
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "invalid_token"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _invalid(problem: str, reason: str) -> InvalidToken:
    # the problem text comes from PyJWT or from us: it names a claim or a check, never the token
    return InvalidToken(f"the access token failed validation: {problem}", reason=reason)
