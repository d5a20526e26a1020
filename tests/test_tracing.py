"""W3C trace context: every access line names the trace of its request, a traceparent that
sidecar starts keeps the caller's sampling decision, else follows ``tracing.sample``, and with
``tracing.otlp_endpoint`` spans reach an OTLP/HTTP receiver."""

from __future__ import annotations

import io
import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from sidecar.session.manager import State
from tests.conftest import MakeSidecar, Serve, admin_url, proxy_url
from tests.fakes.upstream import FakeUpstream
from tests.helpers import events, eventually, sample

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SAMPLED = f"00-{TRACE}-00f067aa0ba902b7-01"
NOT_SAMPLED = f"00-{TRACE}-00f067aa0ba902b7-00"


def access_lines(log_output: io.StringIO) -> list[dict[str, object]]:
    logging.getLogger("sidecar.test").info("test.flush")  # writes the pending access lines
    return [e for e in events(log_output) if e["event"] == "http.access"]


async def test_every_access_line_carries_the_trace_id(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    upstream: FakeUpstream,
    log_output: io.StringIO,
) -> None:
    """The access line of a forwarded request has the trace id of the traceparent sent upstream
    (the caller's, or the one sidecar started); a request sidecar refused has the caller's trace
    id, or null when the caller sent no trace context."""
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.state() is State.VALID, what="first login")
    async with http.get(proxy_url(sidecar, "/a"), headers={"traceparent": SAMPLED}) as resp:
        assert resp.status == 200
    async with http.get(proxy_url(sidecar, "/b")) as resp:
        assert resp.status == 200
    started = upstream.seen[-1].headers["traceparent"].split("-")[1]
    refused = URL(proxy_url(sidecar, "/c/%2e%2e/d"), encoded=True)
    async with http.get(refused, headers={"traceparent": NOT_SAMPLED}) as resp:
        assert resp.status == 400
    async with http.get(URL(proxy_url(sidecar, "/e/%2e%2e/f"), encoded=True)) as resp:
        assert resp.status == 400
    lines = access_lines(log_output)
    assert [(line["path"], line["trace_id"]) for line in lines] == [
        ("/a", TRACE),
        ("/b", started),
        ("/c/../d", TRACE),
        ("/e/../f", None),
    ]
    assert started != TRACE


@pytest.mark.parametrize(
    ("mode", "sample", "caller", "flags"),
    [
        ("propagate", True, None, "01"),
        ("propagate", False, None, "00"),
        ("propagate", False, "00-zz-broken", "00"),
        ("generate", True, None, "01"),
        ("generate", False, None, "00"),
        ("generate", True, NOT_SAMPLED, "00"),
        ("generate", False, SAMPLED, "01"),
    ],
)
async def test_a_traceparent_sidecar_starts_keeps_the_callers_sampling_decision(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    upstream: FakeUpstream,
    mode: str,
    sample: bool,
    caller: str | None,
    flags: str,
) -> None:
    """When sidecar starts a trace (``headers.traceparent: generate``, or ``propagate`` without
    a valid traceparent from the caller), its sampled flag is the caller's when the caller sent
    a valid traceparent, else ``tracing.sample``; the trace itself is new."""
    sidecar = await make_sidecar(headers={"traceparent": mode}, tracing={"sample": sample})
    headers = {"traceparent": caller} if caller is not None else {}
    async with http.get(proxy_url(sidecar, "/x"), headers=headers) as resp:
        assert resp.status == 200
    sent = upstream.seen[-1].headers["traceparent"]
    version, trace, _span, sent_flags = sent.split("-")
    assert (version, sent_flags) == ("00", flags), sent
    assert trace != TRACE


class Collector:
    """An in-process OTLP/HTTP receiver: what was posted to /v1/traces, as JSON."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200

    def app(self) -> web.Application:
        async def traces(request: web.Request) -> web.Response:
            assert request.content_type == "application/json"
            self.requests.append(await request.json())
            return web.json_response({}, status=self.status)

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        return app

    def spans(self) -> list[dict[str, Any]]:
        return [
            span
            for body in self.requests
            for resource in body["resourceSpans"]
            for scope in resource["scopeSpans"]
            for span in scope["spans"]
        ]


def attributes(span: dict[str, Any]) -> dict[str, Any]:
    return {a["key"]: next(iter(a["value"].values())) for a in span["attributes"]}


async def test_spans_are_exported_and_sidecar_sits_between_caller_and_upstream(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, upstream: FakeUpstream, serve: Serve
) -> None:
    """With ``tracing.otlp_endpoint``, a sampled request gives one server span in the caller's
    trace whose parent is the caller's span and which is itself the parent named in the
    traceparent the upstream received; each identity call gives a client span; both reach an
    OTLP/HTTP receiver as JSON with the service name. A request the caller did not sample is
    forwarded unsampled and not exported."""
    collector = Collector()
    endpoint = await serve(collector.app())
    sidecar = await make_sidecar(tracing={"otlp_endpoint": endpoint, "service_name": "orders"})
    await eventually(lambda: sidecar.session.state() is State.VALID, what="first login")
    async with http.get(proxy_url(sidecar, "/a?q=1"), headers={"traceparent": SAMPLED}) as resp:
        assert resp.status == 200
    sent = upstream.seen[-1].headers["traceparent"]
    async with http.get(proxy_url(sidecar, "/b"), headers={"traceparent": NOT_SAMPLED}) as resp:
        assert resp.status == 200
    unsampled = upstream.seen[-1].headers["traceparent"]
    assert sidecar.spans is not None
    await sidecar.spans.flush()

    _, trace, parent, flags = sent.split("-")
    assert (trace, flags) == (TRACE, "01")
    assert parent != "00f067aa0ba902b7"  # sidecar's own span, not the caller's
    assert unsampled.endswith("-00")
    body = collector.requests[0]
    resource = body["resourceSpans"][0]["resource"]
    assert attributes(resource) == {"service.name": "orders"}
    spans = collector.spans()
    (proxied,) = [s for s in spans if s["kind"] == 2]
    assert proxied["traceId"] == TRACE
    assert proxied["spanId"] == parent
    assert proxied["parentSpanId"] == "00f067aa0ba902b7"
    assert proxied["name"] == "GET"
    assert attributes(proxied) == {
        "http.request.method": "GET",
        "url.path": "/a",
        "http.response.status_code": "200",
        "sidecar.response.source": "upstream",
    }
    assert int(proxied["startTimeUnixNano"]) <= int(proxied["endTimeUnixNano"])
    (login,) = [s for s in spans if s["kind"] == 3]
    assert login["name"] == "identity token"
    assert attributes(login)["sidecar.identity.outcome"] == "success"
    assert login["traceId"] != TRACE


async def test_a_failing_collector_costs_no_request(
    make_sidecar: MakeSidecar,
    http: aiohttp.ClientSession,
    serve: Serve,
    log_output: io.StringIO,
) -> None:
    """A collector that answers 503 loses its batch, counted in sidecar_spans_dropped_total and
    logged once; requests are answered as usual."""
    collector = Collector()
    collector.status = 503
    endpoint = await serve(collector.app())
    sidecar = await make_sidecar(tracing={"otlp_endpoint": endpoint})
    await eventually(lambda: sidecar.session.state() is State.VALID, what="first login")
    assert sidecar.spans is not None
    for _ in range(2):
        async with http.get(proxy_url(sidecar, "/x"), headers={"traceparent": SAMPLED}) as resp:
            assert resp.status == 200
        await sidecar.spans.flush()
    assert len(collector.requests) == 2
    async with http.get(admin_url(sidecar, "/metrics")) as resp:
        text = await resp.text()
    assert sample(text, "sidecar_spans_dropped_total") == 3.0  # the login's span and two requests
    failures = [e for e in events(log_output) if e["event"] == "tracing.export_failed"]
    assert len(failures) == 1, failures


def test_otlp_endpoint_must_be_an_http_url() -> None:
    """``tracing.otlp_endpoint`` is refused unless it is an http(s) URL with a host."""
    from pydantic import ValidationError

    from sidecar.config.models import Tracing

    assert Tracing(otlp_endpoint="http://collector:4318").otlp_endpoint is not None
    for bad in ("collector:4318", "grpc://collector:4317", "http://"):
        with pytest.raises(ValidationError):
            Tracing(otlp_endpoint=bad)
