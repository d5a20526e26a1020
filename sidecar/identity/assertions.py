"""Signed JWT assertions (RFC 7523): ``private_key_jwt`` client authentication (section 2.2,
OIDC Core section 9) and self-signed ``jwt_bearer`` grants (section 2.1).

Imported only when a private key is configured: it loads PyJWT and cryptography, which the
proxy otherwise does without (idle memory).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

if TYPE_CHECKING:
    from sidecar.config.oauth2 import OAuth2Section

#: seconds an assertion is valid: long enough for one request, short enough to be useless later
ASSERTION_LIFETIME = 60

SigningKey: TypeAlias = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def load_signing_key(pem: bytes, signing_alg: str | None) -> tuple[SigningKey, str]:
    """Parse an unencrypted PEM private key and pick its JWS algorithm.

    The algorithm follows the key (RSA: RS256, EC P-256/384/521: ES256/384/512, Ed25519/Ed448:
    EdDSA) unless ``signing_alg`` names another one the key can make. Raises ValueError saying
    what is wrong, never showing key material.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not an unencrypted PEM private key (RSA, EC or Ed25519)") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ValueError(f"an RSA key of {key.key_size} bits is too short (2048 at least)")
        kind, default, allowed = "RSA", "RS256", _RSA_ALGORITHMS
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        curve_alg = _EC_ALGORITHMS.get(key.curve.name)
        if curve_alg is None:
            raise ValueError(f"the EC curve {key.curve.name} has no JWS algorithm")
        kind, default, allowed = f"EC {key.curve.name}", curve_alg, frozenset({curve_alg})
    elif isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        kind, default, allowed = "EdDSA", "EdDSA", frozenset({"EdDSA"})
    else:
        raise ValueError(f"a {type(key).__name__} cannot sign JWTs")
    chosen = signing_alg or default
    if chosen not in allowed:
        raise ValueError(f"signing_alg {chosen} cannot be made with an {kind} key")
    return key, chosen


def check_private_key(
    path: Path, signing_alg: str | None, *, key: str = "identity.private_key_file"
) -> list[str]:
    """The key in ``path`` must be usable for signing, with ``signing_alg`` when set: one
    ``"dotted.key: message"`` line when it is not, naming ``identity.signing_alg`` when the
    algorithm is what does not fit. A file that cannot be read gives nothing here: the
    configuration's own file check names it."""
    try:
        pem = path.read_bytes()
    except OSError:
        return []
    try:
        load_signing_key(pem, signing_alg)
    except ValueError as exc:
        named = "identity.signing_alg" if "signing_alg" in str(exc) else key
        return [f"{named}: {exc}"]
    return []


def signing_key_problems(identity: OAuth2Section) -> list[str]:
    """Every configured private key (``private_key_file``, ``previous_private_key_files``) must
    sign, so a wrong key is caught by ``check-config`` and at start, not at the first login (the
    files are read again at every login, so a rotated key is used)."""
    problems = []
    if identity.private_key_file is not None:
        problems += check_private_key(identity.private_key_file, identity.signing_alg)
    for n, previous in enumerate(identity.previous_private_key_files):
        key = f"identity.previous_private_key_files[{n}]"
        problems += check_private_key(previous, identity.signing_alg, key=key)
    return problems


def sign_assertion(
    key: SigningKey,
    algorithm: str,
    *,
    issuer: str,
    subject: str,
    audience: str,
    now: float,
    key_id: str | None = None,
) -> str:
    """A JWT for RFC 7523 section 3: iss, sub, aud, a fresh uuid4 ``jti``, ``iat`` and a short
    ``exp`` (:data:`ASSERTION_LIFETIME`), all from ``now`` (the injected clock)."""
    issued = int(now)
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "jti": str(uuid.uuid4()),
        "iat": issued,
        "exp": issued + ASSERTION_LIFETIME,
    }
    headers = {"kid": key_id} if key_id else None
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)
