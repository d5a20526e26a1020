"""Optional span export (``tracing.otlp_endpoint``): one span per proxied request and one per
identity-provider call, sent as OTLP/HTTP JSON to ``<endpoint>/v1/traces``.

No OpenTelemetry library is needed: the OTLP JSON encoding is a stable part of the protocol
(OTLP 1.0) and an OpenTelemetry Collector's ``otlp`` receiver takes it on its HTTP port (4318).
Spans are kept in a bounded queue and sent in batches every :data:`EXPORT_EVERY` seconds from a
background task; a full queue drops spans (``sidecar_spans_dropped_total``) rather than grow, and a
collector that fails loses its batch (logged once per failing streak), never a request.

A proxied request's span sits between the caller's span and the upstream's: when export is on,
the traceparent sent upstream names sidecar's span as the parent (same trace id, the caller's
sampled flag), so sidecar's own time shows in the caller's trace. Only sampled spans are sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import aiohttp

from sidecar import __version__
from sidecar.clock import Clock
from sidecar.proxy.headers import new_traceparent, valid_traceparent

if TYPE_CHECKING:
    from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.proxy")

#: seconds between two exports
EXPORT_EVERY = 2.0
#: spans waiting for the next export at most; more are dropped (and counted)
MAX_QUEUED = 4096
#: OTLP span kinds and status codes (opentelemetry-proto trace/v1/trace.proto)
SERVER, CLIENT = 2, 3
STATUS_OK, STATUS_ERROR = 1, 2


class SpanExporter:
    """Collects finished spans and sends them to an OTLP/HTTP endpoint in batches."""

    def __init__(
        self,
        endpoint: str,
        clock: Clock,
        *,
        service_name: str = "sidecar",
        sample: bool = True,
        metrics: Metrics | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.url = endpoint.rstrip("/") + "/v1/traces"
        self._clock = clock
        self._sample = sample
        self._metrics = metrics
        self._timeout = timeout
        self._resource = {"attributes": [_attribute("service.name", service_name)]}
        self._spans: list[dict[str, Any]] = []
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    # ----------------------------------------------------------------- recording

    def proxied(
        self,
        method: str,
        path: str,
        status: int,
        source: str,
        sent: str | None,
        caller: str | None,
        seconds: float,
    ) -> None:
        """The span of one proxied request, ``seconds`` long and ending now. ``sent`` is the
        traceparent sent upstream (sidecar's span is its parent id), ``caller`` the caller's."""
        caller = caller if caller is not None and valid_traceparent(caller) else None
        if sent is None:  # not forwarded: a span of its own in the caller's trace, or a new one
            sampled = _sampled(caller) if caller is not None else self._sample
            sent = new_traceparent(sampled)
            if caller is not None:
                sent = f"00-{caller[3:35]}-{sent[36:52]}-{caller[53:55]}"
        if not _sampled(sent):
            return
        parent = caller[36:52] if caller is not None and caller[3:35] == sent[3:35] else None
        self._add(
            method,  # OpenTelemetry's HTTP span name without a route: the method alone
            SERVER,
            sent[3:35],
            sent[36:52],
            parent,
            seconds,
            [
                _attribute("http.request.method", method),
                _attribute("url.path", path.split("?", 1)[0]),
                _attribute("http.response.status_code", status),
                _attribute("sidecar.response.source", source),
            ],
            error=status >= 500 and source == "sidecar",
        )

    def identity_call(self, endpoint: str, outcome: str, seconds: float) -> None:
        """The span of one call to the identity provider (a trace of its own)."""
        if not self._sample:
            return
        ids = new_traceparent()
        self._add(
            f"identity {endpoint}",
            CLIENT,
            ids[3:35],
            ids[36:52],
            None,
            seconds,
            [
                _attribute("sidecar.identity.endpoint", endpoint),
                _attribute("sidecar.identity.outcome", outcome),
            ],
            error=outcome != "success",
        )

    def _add(
        self,
        name: str,
        kind: int,
        trace_id: str,
        span_id: str,
        parent: str | None,
        seconds: float,
        attributes: list[dict[str, Any]],
        *,
        error: bool,
    ) -> None:
        if len(self._spans) >= MAX_QUEUED:
            if self._metrics is not None:
                self._metrics.spans_dropped()
            return
        end = self._clock.time()
        span: dict[str, Any] = {
            "traceId": trace_id,
            "spanId": span_id,
            "name": name,
            "kind": kind,
            "startTimeUnixNano": str(int((end - seconds) * 1e9)),
            "endTimeUnixNano": str(int(end * 1e9)),
            "attributes": attributes,
            "status": {"code": STATUS_ERROR if error else STATUS_OK},
        }
        if parent is not None:
            span["parentSpanId"] = parent
        self._spans.append(span)

    # ----------------------------------------------------------------- sending

    def start(self) -> None:
        """Export every :data:`EXPORT_EVERY` seconds from now on."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await self._clock.sleep(EXPORT_EVERY)
            await self.flush()

    async def flush(self) -> None:
        """Send the spans collected so far (one request); a failure is logged, not raised."""
        if not self._spans:
            return
        batch, self._spans = self._spans, []
        body = {
            "resourceSpans": [
                {
                    "resource": self._resource,
                    "scopeSpans": [
                        {"scope": {"name": "sidecar", "version": __version__}, "spans": batch}
                    ],
                }
            ]
        }
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        try:
            async with self._http.post(self.url, json=body) as resp:
                await resp.read()
                if resp.status >= 300:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message=resp.reason or ""
                    )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if self._metrics is not None:
                self._metrics.spans_dropped(len(batch))
            if not self._failing:
                log.warning(
                    "tracing.export_failed",
                    extra={"url": self.url, "spans": len(batch), "error": str(exc) or repr(exc)},
                )
            self._failing = True
            return
        if self._failing:
            log.info("tracing.export_recovered", extra={"url": self.url})
        self._failing = False

    async def aclose(self) -> None:
        """Stop exporting after one last flush (bounded by the timeout)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
        if self._http is not None:
            await self._http.close()
            self._http = None


def _sampled(traceparent: str) -> bool:
    return int(traceparent[53:55], 16) & 1 == 1


def _attribute(key: str, value: str | int) -> dict[str, Any]:
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": value}}
