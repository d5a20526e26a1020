"""Every metric named in DESIGN.md, owned by one object with its own registry.

An object, not module globals, so that each test (and each sidecar in one process) starts from zero.
The per-request metrics are plain numbers (:class:`RequestMetrics`), turned into samples only when
scraped: every proxied request updates them, and prometheus_client's locked values cost more than
the rest of the bookkeeping.
"""

from __future__ import annotations

import math
import platform
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from sidecar import __version__

#: methods kept as label values; anything else is counted as OTHER (bounded cardinality)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})

REQUESTS_HELP = (
    "Requests answered to callers, by method, status code and who made the status: the upstream, "
    "or sidecar (its own errors and refusals; 499: the caller left before any answer)"
)

DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


DURATION_HELP = "Time from receiving a request to the end of its response"
IN_FLIGHT_HELP = "Requests being proxied right now"

#: the duration buckets' upper bounds, +Inf last (a bisection finds a duration's bucket)
_BOUNDS = (*DURATION_BUCKETS, math.inf)
#: their ``le`` labels, as prometheus_client writes them ("0.0005", "1.0", "+Inf")
_LE = tuple(floatToGoString(b) for b in _BOUNDS)  # type: ignore[no-untyped-call]


#: the help text of sidecar_refused_requests_total (a worker's and the supervisor's alike)
REFUSED_HELP = "Requests the proxy refused, by reason (the error code of the refusal)"


class Metrics:
    """The sidecar's Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # *_created series double the exposition without telling an operator anything
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.session_valid = Gauge(
            "sidecar_session_valid", "1 while a valid (unexpired) token is held, else 0", registry=r
        )
        self.token_expiry = Gauge(
            "sidecar_token_expiry_timestamp_seconds",
            "Unix time at which the current token expires (0 without a token)",
            registry=r,
        )
        self.session_started = Gauge(
            "sidecar_session_started_timestamp_seconds",
            "Unix time at which the current session was created by a login",
            registry=r,
        )
        self.last_refresh_success = Gauge(
            "sidecar_last_refresh_success_timestamp_seconds",
            "Unix time of the last successful token refresh or login",
            registry=r,
        )
        self.refreshes = Counter(
            "sidecar_token_refreshes_total",
            "Token refreshes by result; reason is the trigger on success, the error on failure",
            ["result", "reason"],
            registry=r,
        )
        self.logins = Counter(
            "sidecar_logins_total", "Logins with the configured credentials", ["result"], registry=r
        )
        self.login_failures = Counter(
            "sidecar_login_failures_total",
            "Failed logins by reason (the error code, e.g. missing_access_token, http_503)",
            ["reason"],
            registry=r,
        )
        #: sidecar_upstream_requests_total, sidecar_upstream_request_duration_seconds and
        #: sidecar_requests_in_flight, in this place in the exposition
        self.requests = RequestMetrics()
        r.register(self.requests)
        self.reactive_refreshes = Counter(
            "sidecar_reactive_refreshes_total",
            "Refreshes caused by an upstream 401 on a token believed valid",
            registry=r,
        )
        self.token_validation_failures = Counter(
            "sidecar_token_validation_failures_total",
            "New access tokens refused by identity.validate, by the check that failed",
            ["reason"],
            registry=r,
        )
        self.refused_requests = Counter(
            "sidecar_refused_requests_total",
            REFUSED_HELP,
            ["reason"],
            registry=r,
        )
        self._refusal_children: dict[str, Counter] = {}
        self._previous_secret_used = Counter(
            "sidecar_identity_previous_secret_used_total",
            "Identity calls accepted only with a previous client secret or key (a rotation in "
            "progress), by its index in the previous_* list",
            ["index"],
            registry=r,
        )
        self.identity_clock_skew = Gauge(
            "sidecar_identity_clock_skew_seconds",
            "The identity provider's clock minus ours, from its Date header (absolute token "
            "expiries are corrected by it)",
            registry=r,
        )
        self.build_info = Gauge(
            "sidecar_build_info",
            "Always 1; the labels name the running sidecar's version and Python",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(version=__version__, python=platform.python_version()).set(1)
        self._standard_collectors(r)
        self.identity_duration = Histogram(
            "sidecar_identity_request_duration_seconds",
            "Calls to the identity provider (each URL tried counts), by endpoint and outcome",
            ["endpoint", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.consecutive_failures = Gauge(
            "sidecar_consecutive_refresh_failures",
            "Failed logins or refreshes in a row since the last success (0 while renewals work)",
            registry=r,
        )
        self._spans_dropped = Counter(
            "sidecar_spans_dropped_total",
            "Spans not exported (tracing.otlp_endpoint): the queue was full or the export failed",
            registry=r,
        )
        #: a request began: counted in flight until :meth:`request_finished`
        self.request_started = self.requests.started
        #: a request :meth:`request_started` counted is over (see
        #: :meth:`RequestMetrics.finished`)
        self.request_finished = self.requests.finished
        for result in ("success", "failure"):
            self.logins.labels(result=result)

    @staticmethod
    def _standard_collectors(registry: CollectorRegistry) -> None:
        """process_* (CPU, memory, file descriptors of this process) and python_* (the
        interpreter, garbage collection), as every Python exporter has them."""
        prometheus_client.ProcessCollector(registry=registry)
        prometheus_client.PlatformCollector(registry=registry)
        prometheus_client.GCCollector(registry=registry)

    def request_refused(self, reason: str) -> None:
        """Count one request refused by the proxy (``reason``: the refusal's error code)."""
        child = self._refusal_children.get(reason)
        if child is None:
            child = self._refusal_children[reason] = self.refused_requests.labels(reason=reason)
        child.inc()

    # ------------------------------------------------------------- the identity provider's calls

    def identity_called(self, endpoint: str, outcome: str, seconds: float) -> None:
        """One call to the identity provider ended (``outcome``: ok, or what went wrong)."""
        self.identity_duration.labels(endpoint=endpoint, outcome=outcome).observe(seconds)

    def clock_skew_seen(self, seconds: float) -> None:
        """The identity provider's clock was found ``seconds`` ahead of ours (negative: behind)."""
        self.identity_clock_skew.set(seconds)

    def token_refused(self, reason: str) -> None:
        """A token the identity provider issued failed validation (``reason``: the check)."""
        self.token_validation_failures.labels(reason=reason).inc()

    def previous_secret_used(self, index: int) -> None:
        """A login succeeded only with the ``index``-th previous client secret or key."""
        self._previous_secret_used.labels(index=str(index)).inc()

    def spans_dropped(self, count: int = 1) -> None:
        """``count`` spans were not exported (a full queue, or a failed export)."""
        self._spans_dropped.inc(count)

    # ------------------------------------------------------------- the session's events

    def logged_in(self) -> None:
        """A login with the configured credentials succeeded."""
        self.logins.labels(result="success").inc()

    def login_failed(self, reason: str) -> None:
        """A login failed (``reason``: the error's code)."""
        self.logins.labels(result="failure").inc()
        self.login_failures.labels(reason=reason).inc()

    def session_refreshed(self, trigger: str) -> None:
        """A refresh (or re-issue) succeeded; ``trigger`` says who asked for it."""
        self.refreshes.labels(result="success", reason=trigger).inc()

    def refresh_failed(self, reason: str) -> None:
        """A refresh (or re-issue) failed (``reason``: the error's code)."""
        self.refreshes.labels(result="failure", reason=reason).inc()

    def token_rejected(self) -> None:
        """An upstream's 401 to a token believed valid started a reactive refresh."""
        self.reactive_refreshes.inc()

    def session_installed(self, started_at: float, renewed_at: float) -> None:
        """A session's token became the current one: its session was created at ``started_at``
        (a login) and its token obtained at ``renewed_at``. The one writer of both gauges."""
        self.session_started.set(started_at)
        self.last_refresh_success.set(renewed_at)

    def session_status(self, valid: bool, expires_at: float, failures: int) -> None:
        """The session's state now: a usable token or not, its expiry (0 without one), failed
        renewals in a row."""
        self.session_valid.set(1 if valid else 0)
        self.token_expiry.set(expires_at)
        self.consecutive_failures.set(failures)

    def in_flight_now(self) -> float:
        """Requests being proxied right now (the gauge's value)."""
        return float(self.requests.in_flight)

    def snapshot(self) -> dict[str, Any]:
        """The per-request metrics as plain data, for a worker to report to its supervisor."""
        requests = self.requests
        refused = [
            [s.labels["reason"], s.value]
            for s in next(iter(self.refused_requests.collect())).samples
            if s.name.endswith("_total")
        ]
        return {
            "requests": [
                [method, code, source, float(value)]
                for (method, code, source), value in requests.counted().items()
            ],
            "refused": refused,
            "buckets": [[le, float(value)] for le, value in requests.cumulative()],
            "sum": requests.seconds,
            "in_flight": self.in_flight_now(),
        }

    def take_requests_from_workers(self) -> WorkerTotals:
        """Supervisor mode: the per-request metrics become the sum of the workers' reports."""
        self.registry.unregister(self.requests)
        self.registry.unregister(self.refused_requests)
        totals = WorkerTotals()
        self.registry.register(totals)
        return totals

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return bytes(generate_latest(self.registry))


class RequestMetrics:
    """The metrics every proxied request updates, as plain numbers: a collector that turns them
    into prometheus_client's samples when scraped, named, labelled and ordered as a Counter, a
    Histogram and a Gauge would have been.

    No lock: they are updated only from the event loop's thread (one per process; workers are
    processes), and a scrape reads them from that same thread.
    """

    __slots__ = ("buckets", "counts", "in_flight", "seconds")

    def __init__(self) -> None:
        self.in_flight = 0
        #: requests by (method as received, status, source), in the order first seen
        self.counts: dict[tuple[str, int, str], int] = {}
        #: requests by duration bucket (not cumulative), +Inf last
        self.buckets = [0] * len(_BOUNDS)
        #: the durations' sum
        self.seconds = 0.0

    def started(self) -> None:
        """A request began: in flight until :meth:`finished`."""
        self.in_flight += 1

    def finished(self, method: str, status: int, source: str, seconds: float) -> None:
        """A request :meth:`started` is over: no longer in flight, counted by method, status
        and ``source`` (who made the status: ``upstream``, passed on, or ``sidecar``: its own
        answer, or 499, the caller left before any answer), and its duration observed."""
        self.in_flight -= 1
        key = (method, status, source)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        # the first bucket whose bound is >= seconds (a Histogram's "le")
        self.buckets[bisect_left(_BOUNDS, seconds)] += 1
        self.seconds += seconds

    def counted(self) -> dict[tuple[str, str, str], int]:
        """Requests by (method, code, source) labels: methods outside :data:`KNOWN_METHODS`
        count as OTHER (bounded cardinality), in the order first seen."""
        out: dict[tuple[str, str, str], int] = {}
        for (method, status, source), value in self.counts.items():
            key = (method if method in KNOWN_METHODS else "OTHER", str(status), source)
            out[key] = out.get(key, 0) + value
        return out

    def cumulative(self) -> list[tuple[str, int]]:
        """The histogram's buckets as exposed: (le, requests at most that long)."""
        out = []
        total = 0
        for le, value in zip(_LE, self.buckets, strict=True):
            total += value
            out.append((le, total))
        return out

    def describe(self) -> Iterator[Metric]:
        """The families collected, without their samples (for the registry's name checks)."""
        yield CounterMetricFamily(
            "sidecar_upstream_requests", REQUESTS_HELP, labels=["method", "code", "source"]
        )
        yield HistogramMetricFamily("sidecar_upstream_request_duration_seconds", DURATION_HELP)
        yield GaugeMetricFamily("sidecar_requests_in_flight", IN_FLIGHT_HELP)

    def collect(self) -> Iterator[Metric]:
        """The three metrics' samples now."""
        family = CounterMetricFamily(
            "sidecar_upstream_requests", REQUESTS_HELP, labels=["method", "code", "source"]
        )
        for labels, value in self.counted().items():
            family.add_metric(list(labels), float(value))
        yield family
        yield HistogramMetricFamily(
            "sidecar_upstream_request_duration_seconds",
            DURATION_HELP,
            buckets=[(le, float(value)) for le, value in self.cumulative()],
            sum_value=self.seconds,
        )
        yield GaugeMetricFamily(
            "sidecar_requests_in_flight", IN_FLIGHT_HELP, value=float(self.in_flight)
        )


class WorkerTotals:
    """A collector summing the per-request metrics that workers report (``Metrics.snapshot``).

    A worker's last report is kept after it exits, so counters never go backwards when a worker
    is replaced; the in-flight gauge counts live workers only.
    """

    def __init__(self) -> None:
        self.reports: dict[int, dict[str, Any]] = {}
        self.live: set[int] = set()

    def update(self, worker: int, report: dict[str, Any]) -> None:
        self.reports[worker] = report
        self.live.add(worker)

    def gone(self, worker: int) -> None:
        self.live.discard(worker)

    def collect(self) -> Iterator[Metric]:
        requests: dict[tuple[str, str, str], float] = {}
        buckets: dict[str, float] = {}
        total = 0.0
        in_flight = 0.0
        for worker, report in self.reports.items():
            for method, code, source, value in report["requests"]:
                key = (method, code, source)
                requests[key] = requests.get(key, 0.0) + value
            for le, value in report["buckets"]:
                buckets[le] = buckets.get(le, 0.0) + value
            total += report["sum"]
            if worker in self.live:
                in_flight += report["in_flight"]
        family = CounterMetricFamily(
            "sidecar_upstream_requests", REQUESTS_HELP, labels=["method", "code", "source"]
        )
        for labels, value in sorted(requests.items()):
            family.add_metric(list(labels), value)
        yield family
        ordered = [f"{b:g}" for b in DURATION_BUCKETS] + ["+Inf"]
        yield HistogramMetricFamily(
            "sidecar_upstream_request_duration_seconds",
            DURATION_HELP,
            buckets=[(le, buckets.get(_le_key(le), 0.0)) for le in ordered],
            sum_value=total,
        )
        yield GaugeMetricFamily("sidecar_requests_in_flight", IN_FLIGHT_HELP, value=in_flight)
        yield self._refused()

    def _refused(self) -> Metric:
        """``sidecar_refused_requests_total`` summed over the workers' reports."""
        refused: dict[str, float] = {}
        for report in self.reports.values():
            for reason, value in report.get("refused", ()):
                refused[reason] = refused.get(reason, 0.0) + value
        family = CounterMetricFamily("sidecar_refused_requests", REFUSED_HELP, labels=["reason"])
        for reason, value in sorted(refused.items()):
            family.add_metric([reason], value)
        return family


def _le_key(le: str) -> str:
    """prometheus_client renders bucket bounds as floats ("0.005", "1.0", "+Inf")."""
    return le if le == "+Inf" else str(float(le))
