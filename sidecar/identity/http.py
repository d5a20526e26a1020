"""The one HTTP client toward the identity provider, shared by every identity kind.

:class:`IdentityHTTP` owns one ``aiohttp.ClientSession`` built from ``identity.tls`` and
``identity.timeout``, and is the single boundary where aiohttp errors become the sidecar's own
(:mod:`sidecar.errors`). Its contract:

* :meth:`IdentityHTTP.request` tries ``urls`` in order. It moves on to the next URL only when the
  current one is unreachable, resets, fails TLS, times out or answers 5xx: the provider did not
  answer. A 4xx is an answer (``invalid_client`` from a backup would be the same), so it is final.
  After a backup answered, the URL that answered is tried first on later calls with the same list.
* A 2xx answer is returned as an :class:`IdentityResponse`. A 400/401/403 carrying an RFC 6749
  section 5.2 ``error`` raises :class:`~sidecar.errors.OAuthError`; every other failure raises
  :class:`~sidecar.errors.IdentityUnavailable` with a low-cardinality ``reason``: ``timeout``,
  ``unreachable``, ``tls``, ``connection``, ``http_<status>`` (with ``retry_after``) or
  ``malformed_response`` (larger than :data:`MAX_RESPONSE_BYTES`, or not JSON when JSON was
  expected).
* With ``client_errors=True`` (vendor JSON APIs, whose 4xx bodies follow no standard) a 4xx other
  than 408/429 is returned as an :class:`IdentityResponse` too, for the caller to interpret.
* Every answer's ``Date`` header updates :attr:`IdentityHTTP.skew` (:mod:`sidecar.identity.skew`),
  and each :class:`IdentityResponse` says when its request was sent.
* An OAuth2 error's ``error`` and ``error_description`` are scrubbed of the credential values
  noted in :attr:`IdentityHTTP.secrets` and bounded (:mod:`sidecar.identity.provider_text`).
* Every attempt carries a fresh uuid4 ``X-Request-ID``; redirects are not followed; no cookie jar
  is kept (``Set-Cookie`` headers are handed back raw, for the caller to keep with the session).
* Every attempt is timed into ``sidecar_identity_request_duration_seconds{endpoint,outcome}`` (when
  given the metrics): ``endpoint`` is the caller's name for the call (``token``, ``login``, ...),
  ``outcome`` one of :data:`OUTCOMES`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json as jsonlib
import logging
import os
import ssl
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from multidict import CIMultiDictProxy

from sidecar.clock import Clock
from sidecar.config.sections import TLS, IdentityBase
from sidecar.errors import IdentityUnavailable, OAuthError
from sidecar.http.egress import Egress
from sidecar.identity.provider_text import SecretValues
from sidecar.identity.skew import ClockSkew
from sidecar.tls import RECHECK_EVERY, TLSFiles

if TYPE_CHECKING:
    from sidecar.metrics import Metrics

log = logging.getLogger(__name__)


class CallSpans(Protocol):
    """Where a span per identity call goes (``tracing.otlp_endpoint``): the proxy's span
    exporter, named here by what identity needs of it so that identity does not name the proxy."""

    def identity_call(self, endpoint: str, outcome: str, seconds: float) -> None:
        """Record one call to the identity provider: its endpoint, outcome and duration."""


#: an answer larger than this is refused rather than read into memory
MAX_RESPONSE_BYTES = 1 << 20

#: the ``outcome`` label of an identity call: answered (``success``, ``rejected``: a 4xx), or why
#: not (``server_error`` is any 5xx)
OUTCOMES = (
    "success",
    "rejected",
    "server_error",
    "timeout",
    "unreachable",
    "tls",
    "connection",
    "malformed_response",
)


@dataclass(frozen=True, slots=True)
class IdentityResponse:
    """One 2xx answer from the identity provider (or a 4xx, when asked for with
    ``client_errors``)."""

    status: int
    headers: CIMultiDictProxy[str]
    #: the decoded JSON body, or None when the body is empty or not JSON
    json: Any
    #: the raw ``Set-Cookie`` header values, in the order received
    set_cookies: tuple[str, ...]
    #: the URL that answered (a backup, when the primary failed)
    url: str
    #: when the request was sent (our clock): a token's ``expires_in`` counts from here
    sent_at: float = 0.0

    def __repr__(self) -> str:
        # the body holds tokens: never shown
        return f"IdentityResponse(status={self.status}, url={self.url!r})"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 section 10.2.3).

    Both forms are understood: delta-seconds, and an HTTP-date (taken relative to ``now``, Unix
    seconds). Anything else, or a negative delay, gives None.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None  # RFC 9110 5.6.7: an HTTP-date is always GMT; a zoneless one is malformed
        seconds = when.timestamp() - now
        return max(0.0, seconds)
    return seconds if seconds >= 0 else None


class IdentityHTTP:
    """The identity provider's HTTP client: TLS, timeouts, backups and error translation."""

    def __init__(
        self,
        clock: Clock,
        *,
        timeout: float,
        tls: TLS | None = None,
        egress: Egress | None = None,
        secrets: SecretValues | None = None,
        metrics: Metrics | None = None,
        spans: CallSpans | None = None,
        tls_recheck_every: float = RECHECK_EVERY,
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._spans = spans
        #: HTTPS_PROXY / HTTP_PROXY / NO_PROXY, the process environment's unless given
        self._egress = egress if egress is not None else Egress(os.environ)
        #: the credential values the provider's error text is scrubbed of
        self.secrets = secrets or SecretValues()
        self._timeout = timeout
        #: the identity.tls files, looked at again for a rotation before a call when due
        self._tls = TLSFiles(tls or TLS(), clock, tls_recheck_every)
        self._http: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = None
        #: sessions replaced after a certificate rotation, closed once their requests are done
        self._retired: set[asyncio.Task[None]] = set()
        #: for each list of URLs, the one that answered last (tried first next time)
        self._preferred: dict[tuple[str, ...], str] = {}
        #: the provider's clock minus ours, from the Date header of every answer
        self.skew = ClockSkew()

    @classmethod
    def for_identity(
        cls,
        config: IdentityBase,
        clock: Clock,
        *,
        metrics: Metrics | None = None,
        spans: CallSpans | None = None,
        tls_recheck_every: float = RECHECK_EVERY,
    ) -> IdentityHTTP:
        """The client an identity kind talks through: ``identity.timeout`` and ``identity.tls``
        (its files looked at every ``tls_recheck_every`` seconds), its own :attr:`secrets` to
        note credentials in, and the provider's clock skew reported into
        ``sidecar_identity_clock_skew_seconds`` when given the metrics."""
        http = cls(
            clock,
            timeout=config.timeout,
            tls=config.tls,
            metrics=metrics,
            spans=spans,
            tls_recheck_every=tls_recheck_every,
        )
        if metrics is not None:
            http.skew.report = metrics.clock_skew_seen
        return http

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        for task in list(self._retired):
            task.cancel()  # its finally closes the retired session
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _retire(self, old: aiohttp.ClientSession) -> None:
        async def close_later() -> None:
            try:
                await self._clock.sleep(self._timeout)  # what a request in flight may still take
            finally:
                await old.close()

        task = asyncio.get_running_loop().create_task(close_later())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _session(self) -> aiohttp.ClientSession:
        if (
            self._http is not None
            and self._ssl is not None
            and self._tls.due()
            and await self._tls.changed()
        ):
            log.info("identity.tls_files_changed", extra={"action": "new connections"})
            self._retire(self._http)
            self._http = None
            self._ssl = None
        if self._http is None or self._http.closed:
            if self._ssl is None:
                try:
                    # at its defaults, the process's one context (tls.system_context): no
                    # second copy of the CA bundle, whether the provider is on http or https
                    self._ssl = await self._tls.context()
                except (OSError, ssl.SSLError) as exc:
                    raise IdentityUnavailable(
                        f"identity.tls: cannot build the TLS context: {exc}", reason="tls"
                    ) from exc
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._http

    def _via(self, url: str) -> dict[str, Any]:
        """aiohttp's proxy arguments for ``url``: none when it is reached directly."""
        proxy = self._egress.proxy_for(url)
        if proxy is None:
            return {}
        headers = {"Proxy-Authorization": proxy.authorization} if proxy.authorization else None
        return {"proxy": proxy.url, "proxy_headers": headers}

    def _ordered(self, urls: Sequence[str]) -> list[str]:
        preferred = self._preferred.get(tuple(urls))
        if preferred is None or preferred == urls[0]:
            return list(urls)
        return [preferred, *(u for u in urls if u != preferred)]

    async def request(
        self,
        method: str,
        urls: str | Sequence[str],
        *,
        form: Mapping[str, str] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        expect_json: bool = True,
        client_errors: bool = False,
        endpoint: str = "other",
    ) -> IdentityResponse:
        """Send one request, to the first of ``urls`` that answers; see the module docstring.

        ``form`` is sent as ``application/x-www-form-urlencoded``, ``json`` as JSON (give one at
        most). With ``expect_json`` a 2xx whose body is not JSON is a ``malformed_response``.
        ``endpoint`` names the call in the duration histogram.
        """
        candidates = [urls] if isinstance(urls, str) else list(urls)
        if not candidates:
            raise ValueError("no URL to call")
        ordered = self._ordered(candidates)
        last: IdentityUnavailable | None = None
        for index, url in enumerate(ordered):
            try:
                response = await self._measured(
                    endpoint, method, url, form, json, headers, expect_json, client_errors
                )
            except IdentityUnavailable as exc:
                if not _worth_another_url(exc):
                    raise
                last = exc
                if index + 1 < len(ordered):
                    log.warning(
                        "identity.endpoint_failed",
                        extra={"url": url, "reason": exc.reason, "next_url": ordered[index + 1]},
                    )
                continue
            if len(candidates) > 1 and self._preferred.get(tuple(candidates), candidates[0]) != url:
                log.warning(
                    "identity.endpoint_switched", extra={"url": url, "configured": candidates[0]}
                )
                self._preferred[tuple(candidates)] = url
            return response
        if last is None:  # not reached: each URL answered, raised, or left its failure here
            raise ValueError("no URL to call")
        raise last

    async def _measured(self, endpoint: str, *attempt: Any) -> IdentityResponse:
        """:meth:`_attempt`, timed by endpoint and outcome (a cancelled call is not counted),
        and a span when spans are exported."""
        metrics, spans = self._metrics, self._spans
        if metrics is None and spans is None:
            return await self._attempt(*attempt)
        started = self._clock.monotonic()
        outcome: str | None = None
        try:
            response = await self._attempt(*attempt)
            outcome = "success" if response.status < 300 else "rejected"
            return response
        except OAuthError:
            outcome = "rejected"
            raise
        except IdentityUnavailable as exc:
            outcome = _outcome(exc.reason)
            raise
        finally:
            if outcome is not None:
                seconds = self._clock.monotonic() - started
                if metrics is not None:
                    metrics.identity_called(endpoint, outcome, seconds)
                if spans is not None:
                    spans.identity_call(endpoint, outcome, seconds)

    async def _attempt(
        self,
        method: str,
        url: str,
        form: Mapping[str, str] | None,
        json: Any,
        headers: Mapping[str, str] | None,
        expect_json: bool,
        client_errors: bool = False,
    ) -> IdentityResponse:
        """One call to one URL: every aiohttp error is translated here, and only here."""
        # the caller's headers first; X-Request-ID is always a fresh uuid4 (DESIGN: every
        # identity call carries one)
        sent = {"Accept": "application/json", **(headers or {}), "X-Request-ID": str(uuid.uuid4())}
        client = await self._session()
        sent_at = self._clock.time()
        try:
            async with client.request(
                method,
                url,
                data=dict(form) if form is not None else None,
                json=json,
                headers=sent,
                allow_redirects=False,
                **self._via(url),
            ) as resp:
                raw = await _read_capped(resp)
                status = resp.status
                resp_headers = resp.headers
        except TimeoutError as exc:
            raise IdentityUnavailable("identity provider timed out", reason="timeout") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise IdentityUnavailable(
                f"identity provider's TLS certificate was not accepted: {exc.certificate_error}",
                reason="tls",
            ) from exc
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            cause = exc.os_error if isinstance(exc, aiohttp.ClientSSLError) else exc
            detail = getattr(cause, "reason", None) or type(cause).__name__
            raise IdentityUnavailable(
                f"TLS with the identity provider failed: {detail}", reason="tls"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise IdentityUnavailable(
                "identity provider unreachable: "
                f"{exc.os_error.strerror or type(exc.os_error).__name__}",
                reason="unreachable",
            ) from exc
        except aiohttp.ClientError as exc:
            why = f"identity provider connection failed: {type(exc).__name__}"
            if (
                isinstance(exc, aiohttp.ServerDisconnectedError)
                and url.startswith("https:")
                and self._tls.tls.cert_file is None
            ):
                # how a TLS 1.3 server refuses a missing client certificate: after the handshake
                why += " (over TLS: does the provider require identity.tls.cert_file?)"
            raise IdentityUnavailable(why, reason="connection") from exc
        self.skew.observe(resp_headers.get("Date"), sent_at, self._clock.time())
        decoded = _decode_json(raw)
        answered = client_errors and 400 <= status < 500 and status not in (408, 429)
        if answered or 200 <= status < 300:
            if expect_json and decoded is None and not answered:
                kind = "an HTML page" if _looks_like_html(raw, resp_headers) else "a body"
                raise IdentityUnavailable(
                    f"identity provider answered {status} with {kind} that is not JSON",
                    reason="malformed_response",
                )
            return IdentityResponse(
                status=status,
                headers=resp_headers,
                json=decoded,
                set_cookies=tuple(resp_headers.getall("Set-Cookie", ())),
                url=url,
                sent_at=sent_at,
            )
        if (
            status in (400, 401, 403)
            and isinstance(decoded, dict)
            and isinstance(decoded.get("error"), str)
        ):
            # the provider's words reach callers and logs: scrubbed and bounded first
            description = decoded.get("error_description")
            raise OAuthError(
                self.secrets.provider_text(decoded["error"], limit=64),
                self.secrets.provider_text(description) if isinstance(description, str) else None,
                status=status,
            )
        page = " (an HTML error page)" if _looks_like_html(raw, resp_headers) else ""
        raise IdentityUnavailable(
            f"identity provider answered HTTP {status}{page}",
            reason=f"http_{status}",
            retry_after=parse_retry_after(resp_headers.get("Retry-After"), self._clock.time()),
        )


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body; IdentityUnavailable as soon as it is known to exceed the cap."""
    too_large = IdentityUnavailable(
        f"identity provider answer is larger than {MAX_RESPONSE_BYTES} bytes",
        reason="malformed_response",
    )
    if (resp.content_length or 0) > MAX_RESPONSE_BYTES:
        raise too_large  # refused on the header alone, the body is never read
    body = bytearray()
    while chunk := await resp.content.read(MAX_RESPONSE_BYTES + 1 - len(body)):
        body += chunk
        if len(body) > MAX_RESPONSE_BYTES:
            raise too_large
    return bytes(body)


def _outcome(reason: str) -> str:
    """The outcome label for a failed attempt: a 5xx is ``server_error``, any other status the
    provider answered with (a 404, 408 or 429) ``rejected``, else the transport's reason."""
    if reason.startswith("http_5"):
        return "server_error"
    return "rejected" if reason.startswith("http_") else reason


def _worth_another_url(exc: IdentityUnavailable) -> bool:
    """The provider did not answer (down, unreachable, slow, 5xx): a backup may."""
    if exc.reason in ("timeout", "unreachable", "tls", "connection"):
        return True
    return exc.reason.startswith("http_5")


def _decode_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return jsonlib.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _looks_like_html(raw: bytes, headers: Mapping[str, str]) -> bool:
    if "html" in headers.get("Content-Type", "").lower():
        return True
    return raw.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))
