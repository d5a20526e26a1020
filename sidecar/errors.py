"""The sidecar's exception tree. Library errors are translated into it at one boundary each.

::

    SidecarError
    ├── ConfigError                 bad configuration (exit code 2); names the key and the file
    ├── IdentityError               the identity provider did not give us a token
    │   ├── IdentityUnavailable     transient: refused, reset, timeout, 5xx, 429, malformed answer
    │   ├── OAuthError              the provider said no, with an RFC 6749 ``error`` code
    │   └── InvalidToken            the provider's token failed validation (signature, aud, exp…)
    ├── NoSessionError              no valid token can be had right now (HTTP 503)
    ├── UpstreamError               the upstream leg failed
    │   ├── UpstreamUnavailable     refused or reset (HTTP 502)
    │   ├── UpstreamTimeout         connect or total timeout (HTTP 504)
    │   └── UpstreamBroken          failed mid-body, after its head was passed on (no answer can
    │                               be made: the caller's connection is cut)
    ├── RefusedRequest              a caller's request we will not forward (HTTP 4xx)
    └── StoreError                  the session store could not be read or written
        └── StoreUnreadable         it answered, but what it holds cannot be read
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""

    http_status: int = 500
    exit_code: int = 1
    #: short machine-readable code for JSON error bodies and metric labels
    code: str = "internal_error"


class ConfigError(SidecarError):
    """The configuration is invalid. The message lists every problem, each naming its key."""

    exit_code = 2
    code = "bad_config"


class IdentityError(SidecarError):
    """The identity provider did not give us a usable token."""

    http_status = 503
    code = "identity_error"

    @property
    def reason(self) -> str:
        """A low-cardinality label for metrics (``reason`` of ``sidecar_token_refreshes_total``)."""
        return self.code


class IdentityUnavailable(IdentityError):
    """A transient failure: worth retrying with backoff.

    ``retry_after`` carries the provider's ``Retry-After`` in seconds when it sent one.
    """

    code = "identity_unavailable"

    def __init__(
        self, message: str, *, reason: str = "unavailable", retry_after: float | None = None
    ):
        super().__init__(message)
        self._reason = reason
        self.retry_after = retry_after

    @property
    def reason(self) -> str:
        return self._reason


class OAuthError(IdentityError):
    """An RFC 6749 section 5.2 error answer. Decisions are made on ``error``, never on text."""

    code = "oauth_error"

    #: errors that mean the grant itself is dead: retrying the same request cannot succeed
    FATAL_FOR_REFRESH = frozenset({"invalid_grant"})

    def __init__(self, error: str, description: str | None = None, *, status: int | None = None):
        detail = f"identity provider answered error={error!r}"
        if status is not None:
            detail += f" (HTTP {status})"
        if description:
            # the provider's text is shown, but bounded: it is not ours to trust
            detail += f": {description[:200]}"
        super().__init__(detail)
        self.error = error
        self.description = description
        self.status = status

    @property
    def reason(self) -> str:
        return self.error


class InvalidToken(IdentityError):
    """A token the provider issued failed validation; it is never used.

    ``reason`` names the check that failed (``invalid_token_signature``, ``invalid_token_audience``,
    ``invalid_token_expired``, …). Treated like a transient failure: retried with backoff.
    """

    code = "invalid_token"

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self._reason = reason

    @property
    def reason(self) -> str:
        return self._reason


class NoSessionError(SidecarError):
    """No valid token is held and none could be obtained in time."""

    http_status = 503
    code = "no_session"


class UpstreamError(SidecarError):
    """The upstream leg failed."""

    http_status = 502
    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    """The upstream refused or reset the connection."""

    http_status = 502
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the configured timeout."""

    http_status = 504
    code = "upstream_timeout"


class UpstreamBroken(UpstreamError):
    """The upstream failed after its response head was received (mid-body): the caller already
    has the head, so the proxy cuts the connection rather than answer an error."""

    code = "upstream_broken"


class RefusedRequest(SidecarError):
    """A caller's request that the sidecar refuses to forward."""

    code = "refused"

    def __init__(self, message: str, *, status: int = 400, code: str = "refused"):
        super().__init__(message)
        self.http_status = status
        self.code = code


class StoreError(SidecarError):
    """The session store could not be read or written."""

    code = "store_error"


class StoreUnreadable(StoreError):
    """The store answered, but the record it holds cannot be read: corrupt, written by a newer
    version, or sealed with a key this process does not have. Not an outage."""

    code = "store_unreadable"


# Signals raised inside llhttp's callbacks to stop parsing, defined here rather than in the http
# modules because those are compiled (sidecar/compiled.py) and a compiled class must not inherit
# from a Python one: mypyc 2.4 gets the weak references to such instances wrong, and the garbage
# collector crashes on them.


class BadUpstreamHead(UpstreamUnavailable):
    """A response head sidecar will not relay."""


class SurplusBytes(Exception):
    """Bytes follow the complete upstream answer in the same read."""


class BodyEnd(Exception):
    """The body of a request that asked for an upgrade has ended: parse no further."""
