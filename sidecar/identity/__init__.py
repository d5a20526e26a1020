"""Identity providers: each kind turns configuration into tokens behind one protocol.

The session manager decides *when* to call; a provider only knows *how*. Providers raise
:class:`~sidecar.errors.IdentityUnavailable` for transient failures and
:class:`~sidecar.errors.OAuthError` when the provider says no.
"""

from __future__ import annotations

from typing import Protocol

from sidecar.tokens import Token


class IdentityProvider(Protocol):
    """What the session manager needs from an identity provider."""

    #: stable text that changes when the identity changes (client, endpoint, grant): a stored
    #: session is reused only by the same identity
    fingerprint: str

    async def login(self) -> Token:
        """Obtain a new token with the configured credentials."""

    async def refresh(self, token: Token) -> Token:
        """Exchange ``token.refresh_token`` for a new token (only called when it has one)."""

    async def logout(self, token: Token) -> None:
        """End the session at the provider (revocation); a no-op where the provider has none."""

    async def aclose(self) -> None:
        """Release connections."""
