"""``identity.kind: json_login``: vendor JSON session APIs (login, refresh, logout).

Each call is rendered from its compiled templates at call time: ``{{ credentials.* }}`` (secret
files re-read at every call), ``{{ session.access_token }}``, ``{{ session.refresh_token }}`` and
``{{ session.<field> }}``. Bodies are rendered on parsed data, then serialised, so a value cannot
change the JSON structure. Every call carries a fresh ``X-Request-ID`` (uuid4); refresh and logout
also carry the session's cookies that match their URL (RFC 6265, as a browser would).

Answers (see :mod:`sidecar.identity.json_mapping`): the access token, the refresh token (rotated:
the newest replaces the old), the expiry, the session fields and the ``Set-Cookie`` headers.
A refresh answered with a status in ``refresh.rejected_status`` raises
``OAuthError("invalid_grant")``: the session manager then logs in again with the credentials.
Without a ``refresh`` call, a refresh is a new login whose answer replaces the session's tokens,
fields and cookies.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from yarl import URL

from sidecar.clock import Clock
from sidecar.config.json_login import JsonCall, JsonLoginSection, JsonRefreshCall, JsonResponse
from sidecar.cookies import Cookie, cookie_header, store_cookies
from sidecar.errors import ConfigError, IdentityUnavailable, OAuthError
from sidecar.field_values import header_value_problem
from sidecar.identity.http import CallSpans, IdentityHTTP, IdentityResponse
from sidecar.identity.json_mapping import parse_session
from sidecar.identity.principal import json_login_principal
from sidecar.identity.provider_text import SecretValues
from sidecar.secrets import SecretSource
from sidecar.templates import MissingValue, Text, Tree, compile_text, compile_tree
from sidecar.tls import RECHECK_EVERY
from sidecar.tokens import Token

if TYPE_CHECKING:
    from sidecar.identity.validation import TokenValidator
    from sidecar.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One call's templates, compiled once."""

    name: str
    config: JsonCall
    headers: tuple[tuple[str, Text], ...]
    body: Tree

    @classmethod
    def of(cls, name: str, call: JsonCall) -> _Compiled:
        headers = tuple((k, compile_text(v)) for k, v in call.headers.items())
        return cls(name, call, headers, compile_tree(call.body))


class JsonLoginIdentity:
    """Talks to one vendor session API for one set of credentials."""

    def __init__(
        self,
        config: JsonLoginSection,
        clock: Clock,
        *,
        metrics: Metrics | None = None,
        spans: CallSpans | None = None,
        tls_recheck_every: float = RECHECK_EVERY,
    ) -> None:
        if config.login is None:  # the config validator requires it for this kind
            raise ConfigError("identity.login: required with kind json_login")
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._validator: TokenValidator | None = None
        self._response: JsonResponse = config.response
        self._login = _Compiled.of("login", config.login)
        self._refresh = _Compiled.of("refresh", config.refresh) if config.refresh else None
        self._logout = _Compiled.of("logout", config.logout) if config.logout else None
        sources = config.credential_sources().values()
        #: the credentials given as files, read again at every call
        self._files = [source for source in sources if source.file is not None]
        self._literal = {
            source.key.rpartition(".")[2]: source.read()
            for source in sources
            if source.file is None
        }
        self._http = IdentityHTTP.for_identity(
            config, clock, metrics=metrics, spans=spans, tls_recheck_every=tls_recheck_every
        )
        #: every credential and session token sent, scrubbed from the provider's error text
        self._secrets = self._http.secrets
        self.fingerprint = json_login_principal(config)

    async def aclose(self) -> None:
        await self._http.aclose()

    # ----------------------------------------------------------------- the protocol

    async def login(self) -> Token:
        answer = await self._call(self._login, None)
        return await self._checked(self._session_from(answer, "login", previous=None, jar=()))

    async def refresh(self, token: Token) -> Token:
        call = self._refresh
        if call is None:
            return await self.login()  # a new login replaces the session's tokens and cookies
        answer = await self._call(call, token)
        session = self._session_from(answer, "refresh", previous=token, jar=token.cookies)
        return await self._checked(session)

    async def logout(self, token: Token) -> None:
        """Call the logout endpoint when one is configured; any answer but 2xx raises."""
        if self._logout is not None:
            await self._call(self._logout, token, expect_json=False)

    async def _checked(self, token: Token) -> Token:
        """``token`` once ``identity.validate`` (when enabled) passed it: a JWT verified against
        ``identity.jwks_url`` with ``validate.issuer`` and ``validate.audience``, as under oauth2
        (the Transmit seed's rule); InvalidToken otherwise, and the token is never used."""
        rules = self._config.validate_token
        if not rules.enabled:
            return token
        from sidecar.identity.validation import TokenValidator, vet  # PyJWT only when used

        if self._validator is None:
            jwks = self._config.jwks_url

            async def jwks_url() -> str | None:
                return jwks

            self._validator = TokenValidator(
                rules,
                self._http,
                self._clock,
                issuer=rules.issuer or "",
                audience=rules.audience or "",
                jwks_url=jwks_url,
            )
        await vet(self._validator, token, self._metrics)
        return token

    # ----------------------------------------------------------------- calls

    async def _values(self, token: Token | None) -> dict[str, dict[str, str]]:
        creds = dict(self._literal)
        if self._files:
            creds.update(await asyncio.to_thread(_read_files, self._files))
        values = {"credentials": creds, "session": {}}
        for name, value in creds.items():
            self._secrets.note(f"credentials.{name}", value)
        if token is not None:
            session = dict(token.fields)
            session["access_token"] = token.access_token
            self._secrets.note("access_token", token.access_token)
            if token.refresh_token is not None:
                session["refresh_token"] = token.refresh_token
                self._secrets.note("refresh_token", token.refresh_token)
            values["session"] = session
        return values

    async def _call(
        self, call: _Compiled, token: Token | None, *, expect_json: bool = True
    ) -> IdentityResponse:
        values = await self._values(token)
        try:
            headers = {name: text.render(values) for name, text in call.headers}
            body = call.body.render(values)
        except MissingValue as exc:
            # e.g. {{ session.refresh_token }} for a session that never got one
            raise IdentityUnavailable(
                f"identity.{call.name}: {{{{ {exc.name} }}}} has no value in this session",
                reason="missing_value",
            ) from None
        for name, value in headers.items():
            problem = header_value_problem(value)
            if problem is not None:
                # a secret file with a line break in it: refused here, never sent (or logged)
                raise IdentityUnavailable(
                    f"identity.{call.name}.headers.{name}: the rendered value {problem}",
                    reason="bad_header_value",
                )
        if token is not None and token.cookies and not _has(headers, "cookie"):
            url = URL(call.config.url)
            line = cookie_header(
                token.cookies, url.scheme, url.host or "", url.path, self._clock.time()
            )
            if line:
                headers["Cookie"] = line
        answer = await self._http.request(
            call.config.method,
            call.config.urls,
            json=body,
            headers=headers,
            expect_json=expect_json,
            client_errors=True,
            endpoint=call.name,
        )
        if 200 <= answer.status < 300:
            return answer
        raise _refusal(call, answer, self._secrets)

    def _session_from(
        self,
        answer: IdentityResponse,
        call: str,
        *,
        previous: Token | None,
        jar: tuple[Cookie, ...],
    ) -> Token:
        now = self._clock.time()
        url = URL(answer.url)
        cookies = store_cookies(jar, answer.set_cookies, url.host or "", url.path, now)
        return parse_session(
            answer.json,
            self._response,
            answer.sent_at,  # expires_in counts from the request, not from the answer
            previous=previous,
            cookies=cookies,
            call=call,
            skew=self._http.skew.seconds,
        )


def _refusal(call: _Compiled, answer: IdentityResponse, secrets: SecretValues) -> Exception:
    """The error for a 4xx answer (transient failures were raised by the HTTP client).

    A refresh answered with one of ``refresh.rejected_status`` is ``invalid_grant``: the session
    manager's fallback to a full login. A refused login is ``invalid_grant`` too (what an OAuth2
    password grant answers to wrong credentials); it is retried with backoff. Anything else is
    ``invalid_request``. The vendor's own error code, when it sends one, is the description,
    scrubbed of ``secrets`` and bounded."""
    status = answer.status
    config = call.config
    rejected = isinstance(config, JsonRefreshCall) and status in config.rejected_status
    code = "invalid_grant" if rejected or call.name == "login" else "invalid_request"
    return OAuthError(code, _vendor_code(answer.json, secrets), status=status)


def _vendor_code(body: Any, secrets: SecretValues) -> str | None:
    """A short description from common vendor error shapes (``error``/``code``/``message``)."""
    if not isinstance(body, Mapping):
        return None
    for key in ("error", "code", "message", "errorCode"):
        value = body.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool):
            # scrubbed before it is cut: a cut must not leave half a secret
            return f"{key}={secrets.provider_text(json.dumps(value), limit=100)}"
    return None


def _has(headers: Mapping[str, str], name: str) -> bool:
    return any(k.lower() == name for k in headers)


def _read_files(files: Iterable[SecretSource]) -> dict[str, str]:
    return {source.key.rpartition(".")[2]: source.read() for source in files}
