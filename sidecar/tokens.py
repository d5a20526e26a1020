"""The values every role shares: the :class:`Token` and the parsing of RFC 6749 token responses,
the :class:`SessionRecord` a store keeps, and the :class:`Credentials` snapshot requests use.

A :class:`Token` never shows its secrets: ``repr`` and ``str`` print a fingerprint only, so a token
that slips into a log line or an exception message leaks nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.cookies import Cookie
from sidecar.errors import IdentityUnavailable, StoreUnreadable
from sidecar.field_values import checked, header_value_problem

#: tokens without ``expires_in`` and without a JWT ``exp`` are assumed to live this long (seconds);
#: short on purpose, so an unknown lifetime errs toward refreshing too often rather than too late
DEFAULT_LIFETIME = 300.0
#: seconds of clock difference that whole-second Date headers cannot tell from none
SKEW_RESOLUTION = 2.0
#: what a session field's name looks like (``identity.response.fields`` allows no other)
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
#: an ``expires_in`` beyond this (seconds) is taken for a provider bug, not a real lifetime
MAX_LIFETIME = 366 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Token:
    """One access token (and its refresh token, when issued), with wall-clock issue and expiry.

    A json_login provider also returns the session ``fields`` named in its config (tenant id,
    customer id: not secrets, but kept out of ``repr`` anyway) and the ``cookies`` its answers set.
    """

    access_token: str = field(repr=False)
    expires_at: float
    obtained_at: float
    token_type: str = "Bearer"  # noqa: S105 - a token type name, not a secret
    refresh_token: str | None = field(default=None, repr=False)
    scope: str | None = None
    fields: Mapping[str, str] = field(default_factory=dict, repr=False, hash=False)
    cookies: tuple[Cookie, ...] = field(default=(), repr=False)

    @property
    def lifetime(self) -> float:
        """Seconds between issue and expiry."""
        return max(0.0, self.expires_at - self.obtained_at)

    @property
    def fingerprint(self) -> str:
        """A short, non-reversible id for logs: the first 8 hex digits of SHA-256 of the token."""
        return hashlib.sha256(self.access_token.encode()).hexdigest()[:8]

    def is_valid(self, now: float) -> bool:
        """True while the token has not expired."""
        return now < self.expires_at

    def renewable_at(self, now: float) -> bool:
        """True when a session can go on from this token at ``now`` without a new login: with
        its refresh token, or, until it expires, by a re-issue with the credentials."""
        return self.refresh_token is not None or self.is_valid(now)

    def __repr__(self) -> str:
        return (
            f"Token(fingerprint={self.fingerprint}, expires_at={self.expires_at:.0f}, "
            f"refreshable={self.refresh_token is not None})"
        )

    __str__ = __repr__

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the session store (contains the secrets: stores only)."""
        out: dict[str, Any] = {
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "token_type": self.token_type,
            "expires_at": self.expires_at,
            "obtained_at": self.obtained_at,
            "scope": self.scope,
        }
        # added keys are written only when used: older records and older readers stay compatible
        if self.fields:
            out["fields"] = dict(self.fields)
        if self.cookies:
            out["cookies"] = [c.to_dict() for c in self.cookies]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Token:
        """The inverse of :meth:`to_dict`; raises ValueError/KeyError/TypeError on bad data.

        Every value that can reach a header passes :func:`sidecar.field_values.checked` (a store
        is a path into the request head like the identity provider's answer): the access token
        is a Bearer token, the refresh token, the fields and the cookies are field values, the
        token type is Bearer. The messages name the field, never its value."""
        access = checked(data["access_token"], "access_token", bearer=True)
        refresh = data.get("refresh_token")
        if refresh is not None:
            refresh = checked(refresh, "refresh_token")
        token_type = data.get("token_type") or "Bearer"
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise ValueError("token_type is not Bearer")
        fields = data.get("fields") or {}
        if not isinstance(fields, dict):
            raise ValueError("fields must be an object")
        if not all(isinstance(k, str) and _FIELD_NAME.fullmatch(k) for k in fields):
            raise ValueError("fields: a name is not a lower-case identifier")
        return cls(
            access_token=access,
            refresh_token=refresh,
            token_type="Bearer",  # noqa: S106 - a token type name, not a secret
            expires_at=float(data["expires_at"]),
            obtained_at=float(data["obtained_at"]),
            scope=data.get("scope"),
            fields={k: checked(v, f"fields.{k}") for k, v in fields.items()},
            cookies=tuple(Cookie.from_dict(c) for c in data.get("cookies") or ()),
        )


def jwt_expiry(access_token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (only to schedule a refresh).

    Decoded by hand (base64url JSON, RFC 7519 section 3) so that the proxy process need not load
    a JWT library and its cryptography backend just to read one number.
    """
    return jwt_time(access_token, "exp")


def jwt_time(access_token: str, claim: str) -> float | None:
    """A NumericDate claim (``exp``, ``iat``) of a JWT, unverified; None when absent."""
    claims = jwt_claims(access_token)
    value = claims.get(claim) if claims is not None else None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT, read without verifying it; None when ``token`` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def expiry_offset(skew: float | None, iat: float | None, sent_at: float) -> float:
    """Seconds to subtract from an absolute expiry (provider's clock) to get ours: the measured
    ``skew`` (provider minus local; None: not measured), else how far the token's ``iat`` lies
    ahead of our send time (a backdated ``iat``, as Entra ID's, must not push an expiry later);
    0 within :data:`SKEW_RESOLUTION`."""
    if skew is None:
        skew = max(0.0, iat - sent_at) if iat is not None else 0.0
    return skew if abs(skew) >= SKEW_RESOLUTION else 0.0


def _malformed(problem: str) -> IdentityUnavailable:
    return IdentityUnavailable(f"malformed token response: {problem}", reason="malformed_response")


def _positive_number(value: Any, name: str) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError  # JSON true is not a number of seconds
        number = float(value)
    except (TypeError, ValueError):
        raise _malformed(f"{name} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise _malformed(f"{name} must be a positive number")
    return number


def token_expiry(
    access: str,
    now: float,
    *,
    expires_in: Any = None,
    expires_at: Any = None,
    skew: float | None = None,
) -> float:
    """When a token asked for at ``now`` (the moment the request was sent) expires, on our clock:
    from ``expires_in`` (seconds from ``now``), else ``expires_at`` (epoch seconds), else the
    JWT's ``exp``, else :data:`DEFAULT_LIFETIME` from now. Absolute expiries are on the
    provider's clock: corrected by ``skew`` (provider minus local; None when not measured, then
    by the JWT's ``iat``, see :func:`expiry_offset`).
    Raises IdentityUnavailable (malformed_response) for a bad number or a token already expired."""
    if expires_in is not None:
        expiry = now + _positive_number(expires_in, "expires_in")
    elif expires_at is not None:
        offset = expiry_offset(skew, jwt_time(access, "iat"), now)
        expiry = _positive_number(expires_at, "expires_at") - offset
    else:
        exp = jwt_expiry(access)
        offset = expiry_offset(skew, jwt_time(access, "iat"), now)
        expiry = exp - offset if exp is not None else now + DEFAULT_LIFETIME
    if expiry <= now:
        raise _malformed("the token is already expired")
    if expiry - now > MAX_LIFETIME:
        raise _malformed(f"the lifetime of {expiry - now:.0f} s is absurd (more than a year)")
    return expiry


def parse_token_response(
    body: Any, now: float, *, previous_refresh_token: str | None = None, skew: float | None = None
) -> Token:
    """Build a Token from a decoded RFC 6749 section 5.1 response.

    Expiry comes from ``expires_in``, else from the JWT's ``exp`` (corrected by ``skew``), else
    :data:`DEFAULT_LIFETIME`; ``now`` is when the request was sent.
    When a refresh answer carries no new refresh token, the previous one stays in use (RFC 6749
    section 6); a new one always replaces it (rotation).
    """
    if not isinstance(body, dict):
        raise _malformed("not a JSON object")
    access = body.get("access_token")
    if not isinstance(access, str) or not access.strip():
        raise _malformed("access_token is missing or not a string")
    problem = header_value_problem(access, bearer=True)
    if problem is not None:
        raise _malformed(f"access_token {problem}")
    token_type = body.get("token_type", "Bearer")
    if not isinstance(token_type, str):
        raise _malformed("token_type is not a string")
    if token_type.lower() != "bearer":
        raise _malformed(f"token_type {token_type!r} is not supported (only Bearer)")
    refresh = body.get("refresh_token", previous_refresh_token)
    if refresh is not None and not isinstance(refresh, str):
        raise _malformed("refresh_token is not a string")
    if refresh and (problem := header_value_problem(refresh)) is not None:
        raise _malformed(f"refresh_token {problem}")  # RFC 6749 A.17: VSCHAR only
    expires_at = token_expiry(access, now, expires_in=body.get("expires_in"), skew=skew)
    scope = body.get("scope")
    return Token(
        access_token=access,
        refresh_token=refresh or None,
        token_type="Bearer",  # noqa: S106 - a token type name, not a secret
        expires_at=expires_at,
        obtained_at=now,
        scope=scope if isinstance(scope, str) else None,
    )


#: the record format this build writes; a record with a newer version is refused, not misread
RECORD_VERSION = 1


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One identity's session: the token and the metadata the seeds ask us to keep."""

    identity: str
    session_id: str
    activity_id: str
    token: Token
    created_at: float
    last_refreshed_at: float | None = None
    last_api_call_at: float | None = None
    refresh_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def newer_than(self, other: SessionRecord | None) -> bool:
        """True when this record's token was obtained after ``other``'s (any record beats none):
        of two copies of a session, the newer one wins."""
        return other is None or self.token.obtained_at > other.token.obtained_at

    def unusable_because(self, identity: str, now: float) -> str | None:
        """Why this (stored or shared) record cannot be the session of ``identity`` (its
        fingerprint) at ``now``; None when it can. The one judgment, for a record restored at
        start and one a peer wrote alike."""
        if self.identity != identity:
            return "stored session belongs to another identity"
        if not self.token.renewable_at(now):
            return "stored token expired and cannot be refreshed"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "identity": self.identity,
            "session_id": self.session_id,
            "activity_id": self.activity_id,
            "token": self.token.to_dict(),
            "created_at": self.created_at,
            "last_refreshed_at": self.last_refreshed_at,
            "last_api_call_at": self.last_api_call_at,
            "refresh_count": self.refresh_count,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any) -> SessionRecord:
        """Parse stored data; raises StoreUnreadable naming what is wrong."""
        if not isinstance(data, dict):
            raise StoreUnreadable("session record is not a JSON object")
        version = data.get("version")
        if not isinstance(version, int):
            raise StoreUnreadable("session record has no version")
        if version > RECORD_VERSION:
            raise StoreUnreadable(
                f"session record version {version} is newer than this sidecar understands "
                f"({RECORD_VERSION}); refusing to misread it"
            )
        try:
            return cls(
                identity=str(data["identity"]),
                session_id=str(data["session_id"]),
                activity_id=str(data["activity_id"]),
                token=Token.from_dict(data["token"]),
                created_at=float(data["created_at"]),
                last_refreshed_at=_opt_float(data.get("last_refreshed_at")),
                last_api_call_at=_opt_float(data.get("last_api_call_at")),
                refresh_count=int(data.get("refresh_count", 0)),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreUnreadable(
                f"session record is malformed: {type(exc).__name__}: {exc}"
            ) from exc


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the proxy needs for one request, precomputed once per token: the session's snapshot,
    replaced whole, never mutated."""

    token: Token
    authorization: str
    session_id: str
    activity_id: str
    #: when requests stop using it: the token's expiry less the expiry margin
    expires_at: float

    @classmethod
    def of(cls, record: SessionRecord, margin: float) -> Credentials:
        """The snapshot of ``record``, usable until its token's expiry less ``margin`` seconds."""
        token = record.token
        return cls(
            token=token,
            authorization=f"Bearer {token.access_token}",
            session_id=record.session_id,
            activity_id=record.activity_id,
            expires_at=token.expires_at - margin,
        )

    def usable_at(self, now: float) -> bool:
        """True while requests may use the token at ``now`` (the wall clock): before its expiry
        less ``refresh.expiry_margin``. The one judgment of a token wherever it is made (the
        proxy, the session, a worker), so none of them forwards a token in its last seconds."""
        return now < self.expires_at

    def __repr__(self) -> str:
        return f"Credentials(session_id={self.session_id}, token={self.token!r})"
