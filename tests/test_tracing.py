"""W3C trace context: every access line names the trace of its request, and a traceparent that
sidecar starts keeps the caller's sampling decision, else follows ``tracing.sample``."""

from __future__ import annotations

import io
import logging

import aiohttp
import pytest
from yarl import URL

from sidecar.session import State
from tests.conftest import MakeSidecar, proxy_url
from tests.fakes.upstream import FakeUpstream
from tests.helpers import events, eventually

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
