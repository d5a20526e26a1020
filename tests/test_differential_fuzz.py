"""Differential fuzzing of the data path: generated callers talk to a real sidecar, which talks to
a raw upstream that records every byte; h11, a parser independent of sidecar's llhttp, reads both
sides and the invariants of issue 14 ("one request in, one request out, and the token never
leaves its pin") are checked on what it reads.

Each example is a :class:`~tests.fakes.http_sequences.Sequence` (pipelined requests with bodies,
chunking, trailers, upgrades and broken framing, cut at random byte boundaries, maybe followed by
a half-close), then one normal request on a new connection. Every example gets a fresh
:class:`~tests.fakes.raw_upstream.RawUpstream` and a fresh upstream pool, so nothing one example
did to a connection leaks into the next.

Budget: ``FUZZ_EXAMPLES`` per test (default below, for ``make test``); ``make fuzz`` raises it.
``CI=true`` makes the examples derandomized (the same ones every run). ``FUZZ_ONLY`` and
``FUZZ_WITHOUT`` narrow the generated features (see :mod:`tests.fakes.http_sequences`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings

from sidecar.app import Sidecar
from tests.conftest import MakeSidecar
from tests.fakes.http_sequences import (
    ALL,
    WELL_FORMED,
    Fate,
    Sent,
    Sequence,
    head,
    selected,
    sequences,
)
from tests.fakes.idp import FakeIdP
from tests.fakes.raw_caller import CallerResult, converse, read_answers
from tests.fakes.raw_upstream import (
    ANSWER_HEADER,
    RawConnection,
    RawUpstream,
    UpstreamRequest,
    read_back,
)
from tests.helpers import eventually

#: examples per test in ``make test`` (each takes some tens of milliseconds)
DEFAULT_EXAMPLES = 50
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
#: shrinking a failure to a minimal reproducer can take minutes: only on a longer run
SHRINK = "FUZZ_EXAMPLES" in os.environ
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("CI") == "true",
    database=None,
    phases=[p for p in Phase if SHRINK or p not in (Phase.shrink, Phase.explain)],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

#: the path prefix of the upstream URL sidecar is configured with
PREFIX = "/up"
#: the request sent on a new connection after each example: sidecar must still serve
AFTER = Sent(
    "after",
    head(b"GET /after HTTP/1.1", [(b"Host", b"localhost"), (b"Connection", b"close")]),
    Fate.FORWARD,
    "GET",
    "/after",
    closes=True,
)
#: the header lines sidecar's framing uses; any spelling of these names is a look-alike
FRAMING = frozenset({"content-length", "transfer-encoding"})

#: examples run per test in this process (printed at the end by ``make fuzz``)
RUNS: dict[str, int] = {}


class Target:
    """The sidecar under test and the identity provider that issues its tokens."""

    def __init__(self, sidecar: Sidecar, idp: FakeIdP) -> None:
        self.sidecar = sidecar
        self.idp = idp

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"Target(sidecar on port {self.sidecar.proxy_port})"


@dataclass
class Plan:
    """How the caller's requests mapped onto the upstream's (see :func:`check_forwarded`)."""

    forwarded: list[tuple[Sent, UpstreamRequest]]
    #: the first request not forwarded (refused, or left unread after a close), if any
    stopped_at: Sent | None


class Example:
    """One example's evidence, for the invariants and for failure messages."""

    def __init__(
        self,
        sequence: Sequence,
        upstream: list[RawConnection],
        caller: CallerResult,
        after: CallerResult,
        tokens: list[str],
        upstream_host: str,
    ) -> None:
        self.sequence = sequence
        self.caller = caller
        self.after = after
        self.tokens = tokens
        self.upstream_host = upstream_host
        self.connections = [read_back(r) for r in upstream]
        complete = [r for c in self.connections for r in c.requests]
        self.requests = sorted(complete, key=lambda r: r.number)
        #: the heads upstream, including that of a truncated request
        self.heads = complete + [c.truncated for c in self.connections if c.truncated]

    def failure(self, what: str) -> AssertionError:
        """``what`` went wrong, with the example's bytes on both sides (raised by each check
        itself, so hypothesis tells one invariant's failures from another's)."""
        upstream = "\n".join(
            f"  connection {c.record.number} (ended: {c.record.ended}): {bytes(c.record.data)!r}"
            for c in self.connections
        )
        return AssertionError(
            f"{what}\n"
            f"caller sent:\n{self.sequence.describe()}\n"
            f"upstream received:\n{upstream or '  nothing'}\n"
            f"caller received (ended: {self.caller.ended}): {self.caller.received!r}\n"
            f"the request after it received: {self.after.received!r}"
        )


# -- the invariants, one function each


def check_forwarded(ex: Example) -> Plan:
    """The upstream's requests are exactly the well-formed requests the caller sent, in order:
    same count, method, target (under sidecar's path prefix) and body. A request that must be
    refused, and everything after it, never reaches the upstream; nothing is forwarded after a
    request that closes the connection; after an Upgrade that was not switched (and after a
    half-close) sidecar may stop reading, but whatever it forwards must still be the caller's.
    A request only counts as reaching the upstream when its whole message arrived."""
    requests = [r for r in ex.requests if r.target != PREFIX + AFTER.target]
    forwarded: list[tuple[Sent, UpstreamRequest]] = []
    may_stop = ex.sequence.half_close
    stopped_at: Sent | None = None
    position = 0
    for index, sent in enumerate(ex.sequence.requests):
        got = requests[position] if position < len(requests) else None
        if got is None:
            if sent.fate is Fate.FORWARD and not may_stop:
                raise ex.failure(f"request [{index}] must reach the upstream and never did")
            stopped_at = sent
            break
        if sent.fate is Fate.REFUSE:
            raise ex.failure(
                f"request [{index}] must be refused, yet the upstream got {got.describe()} "
                "from it or after it"
            )
        expected = (sent.method, PREFIX + sent.target, sent.body)
        if (got.method, got.target, got.body) != expected:
            raise ex.failure(
                f"request [{index}] reached the upstream as {got.describe()} with body "
                f"{got.body!r}; expected {expected!r}"
            )
        forwarded.append((sent, got))
        position += 1
        if sent.closes:
            break
        may_stop = may_stop or sent.may_close_after
    extra = requests[position:]
    if extra:
        raise ex.failure(
            "the upstream got requests the caller never sent as such: "
            + "; ".join(f"{r.describe()} body {r.body!r}" for r in extra)
        )
    return Plan(forwarded, stopped_at)


def check_no_stray_bytes(ex: Example) -> None:
    """No caller bytes reach the upstream outside a request head or body sidecar built: every
    upstream connection's bytes read as whole requests, except one request cut short at the end
    when sidecar aborted the connection (a body it had to refuse half-way)."""
    for conn in ex.connections:
        number = conn.record.number
        if conn.stray or conn.error:
            raise ex.failure(
                f"upstream connection {number} got bytes that are no request sidecar built "
                f"(h11: {conn.error or 'not a request head'}): {conn.stray!r}"
            )
        if conn.truncated is not None and not conn.record.ended:
            raise ex.failure(
                f"upstream connection {number} holds an unfinished request "
                f"{conn.truncated.describe()} and is still open: the next request would be "
                "read as its body"
            )


def check_heads_are_sidecars(ex: Example) -> None:
    """Every request head upstream is one sidecar wrote: one Host (the upstream's), a target
    under the prefix, sidecar's own X-Tenant-ID; no framing look-alike (``Content_Length``) next
    to sidecar's framing, and no caller trailer turned into a header field."""
    trailers = {(n.lower(), v) for s in ex.sequence.requests for n, v in s.trailers}
    for req in ex.heads:
        where = req.describe()
        if req.header("host") != [ex.upstream_host.encode()]:
            raise ex.failure(f"upstream head {where} has Host {req.header('host')!r}")
        if not req.target.startswith(PREFIX + "/"):
            raise ex.failure(f"upstream head {where} is not under the prefix {PREFIX}")
        if req.header("x-tenant-id") != [b"1234567"]:
            raise ex.failure(
                f"upstream head {where} lacks sidecar's X-Tenant-ID: not a head it built"
            )
        for name, value in req.headers:
            lname = name.decode("latin-1").lower()
            if lname.replace("_", "-") in FRAMING and lname not in FRAMING:
                raise ex.failure(f"upstream head {where} carries the framing look-alike {name!r}")
            if (lname, value.decode("latin-1")) in trailers:
                raise ex.failure(
                    f"upstream head {where} carries the caller's trailer {name!r} as a header"
                )


def check_authorization(ex: Example) -> None:
    """``Authorization`` appears only in heads sidecar wrote, exactly once per head, with the
    session's token: the caller's own Authorization never reaches the upstream, and the token
    never lands in a body or anywhere else upstream."""
    valid = [f"Bearer {t}".encode() for t in ex.tokens]
    for req in ex.heads:
        values = req.header("authorization")
        if len(values) != 1 or values[0] not in valid:
            raise ex.failure(f"upstream head {req.describe()} has Authorization {values!r}")
    for conn in ex.connections:
        data = bytes(conn.record.data)
        heads = len(conn.requests) + (conn.truncated is not None)
        seen = sum(data.count(t) for t in valid)
        if seen != heads:
            raise ex.failure(
                f"the token appears {seen} times on upstream connection {conn.record.number}, "
                f"which carries {heads} heads sidecar wrote"
            )
        for sent in ex.sequence.requests:
            if sent.caller_auth is not None and sent.caller_auth in data:
                raise ex.failure(
                    f"the caller's own Authorization {sent.caller_auth!r} reached the upstream"
                )


def check_answers(ex: Example, plan: Plan) -> None:
    """Every request sidecar forwarded gets exactly one answer, in order: the upstream's answer
    to that very request. A request sidecar did not forward gets at most one error answer of
    sidecar's own, after which the connection closes; no bytes follow the last answer. After a
    half-close, answers may stop early, but those that come are still the right ones."""
    half_close = ex.sequence.half_close
    methods = [sent.method for sent, _ in plan.forwarded]
    methods.append(plan.stopped_at.method if plan.stopped_at is not None else "GET")
    answers, after, broken = read_answers(ex.caller, methods)
    for index, (sent, got) in enumerate(plan.forwarded):
        if index >= len(answers):
            if half_close:
                break
            raise ex.failure(
                f"{sent.kind} request to {sent.target} reached the upstream but got no answer"
            )
        answer = answers[index]
        number = answer.headers.get(ANSWER_HEADER.lower())
        if answer.status != 200 or number != str(got.number):
            raise ex.failure(
                f"answer {index} should be the upstream's answer to {got.describe()}, and is "
                f"{answer.status} for upstream request {number}: {answer.body!r}"
            )
    extra = answers[len(plan.forwarded) :]
    if extra:
        error = extra[0]
        if plan.stopped_at is None:
            raise ex.failure(
                f"an answer came after the last request's: {error.status} {error.body!r}"
            )
        if error.status < 400 or error.headers.get("x-sidecar-error") != "1":
            raise ex.failure(
                f"the request sidecar did not forward got {error.status} {error.body!r}"
            )
    if broken and not half_close:
        raise ex.failure("an answer broke off before its end")
    if after and not (half_close and broken):
        raise ex.failure(f"bytes followed the last answer (a second answer?): {after!r}")
    if not ex.caller.ended:
        raise ex.failure("sidecar left the connection open after the last answer")


def check_still_serves(ex: Example) -> None:
    """After the example, a normal request on a new connection is answered by the upstream, and
    the upstream got it as a request of its own (no poisoned pooled connection ate it)."""
    answers, _, _ = read_answers(ex.after, ["GET"])
    mine = [r for r in ex.requests if r.target == PREFIX + AFTER.target]
    if len(mine) != 1 or mine[0] is not ex.requests[-1] or mine[0].body:
        raise ex.failure(f"the request after the example reached the upstream as {mine!r}")
    if not answers or answers[0].headers.get(ANSWER_HEADER.lower()) != str(mine[0].number):
        raise ex.failure(f"the request after the example was answered {answers!r}")


def count_coverage(ex: Example, plan: Plan) -> None:
    """What the examples exercised, for ``--hypothesis-show-statistics`` (``make fuzz``)."""
    for sent in ex.sequence.requests:
        event(f"request kind: {sent.kind}")
    pieces = len(ex.sequence.pieces)
    event(f"pieces: {'1' if pieces == 1 else '2-9' if pieces < 10 else '10+'}")
    event(f"forwarded: {len(plan.forwarded)} of {len(ex.sequence.requests)}")
    if ex.sequence.half_close:
        event("half-close")
    if plan.stopped_at is not None:
        event(f"not forwarded: {plan.stopped_at.kind}")


# -- driving an example


async def settle(sidecar: Sidecar) -> None:
    """Until sidecar has no caller connection and no request in flight, and the upstream has
    read what sidecar wrote."""
    front = sidecar.front
    assert front is not None
    await eventually(
        lambda: not front.connections and front.in_flight == 0,
        what="sidecar to let go of the caller's connection and finish its requests",
    )
    await asyncio.sleep(0.02)


async def run_example(target: Target, sequence: Sequence) -> Example:
    """Play ``sequence`` through sidecar to a fresh raw upstream, then one normal request."""
    sidecar, idp = target.sidecar, target.idp
    upstream = RawUpstream()
    url = await upstream.start()
    await sidecar.reconfigure_proxy(sidecar.config, url + PREFIX)
    try:
        caller = await converse(sidecar.proxy_port, sequence)
        await settle(sidecar)
        after = await converse(sidecar.proxy_port, Sequence((AFTER,), ((AFTER.wire, None),)))
        await settle(sidecar)
    finally:
        await upstream.close()
    host = url.removeprefix("http://")
    return Example(sequence, upstream.connections, caller, after, list(idp.issued), host)


def check_all(ex: Example) -> Plan:
    """Every invariant, the most telling first."""
    plan = check_forwarded(ex)
    check_no_stray_bytes(ex)
    check_heads_are_sidecars(ex)
    check_authorization(ex)
    check_answers(ex, plan)
    check_still_serves(ex)
    return plan


@pytest.fixture
async def target(make_sidecar: MakeSidecar, upstream_url: str, idp: FakeIdP) -> Target:
    """A sidecar whose upstream each example replaces; bodies over 16 bytes with a length are
    streamed rather than buffered, so both ways of forwarding a body are exercised."""
    sidecar = await make_sidecar(
        upstream={
            "url": upstream_url + PREFIX,
            "replay_body_limit": 16,
            "timeout": {"connect": 2, "total": 2},
        }
    )
    await eventually(lambda: sidecar.session.usable() is not None)
    return Target(sidecar, idp)


@pytest.fixture(scope="module", autouse=True)
def report_runs() -> Iterator[None]:
    """``make fuzz`` shows how many examples each test ran."""
    yield
    for name, count in RUNS.items():
        print(f"\ndifferential fuzz: {name} ran {count} examples")


#: issue 14's first reproducer: an Upgrade the upstream answers with a plain 200, a request left
#: unfinished behind it, then a half-close; the next caller's request must not become its body
UPGRADE_SMUGGLING = Sequence(
    (
        Sent(
            "upgrade_websocket",
            head(
                b"GET /chat HTTP/1.1",
                [(b"Host", b"localhost"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
            ),
            Fate.FORWARD,
            "GET",
            "/chat",
            may_close_after=True,
        ),
        Sent(
            "truncated",
            head(b"POST /store HTTP/1.1", [(b"Host", b"localhost"), (b"Content-Length", b"250")]),
            Fate.REFUSE,
            "POST",
            "/store",
        ),
    ),
    half_close=True,
)


async def test_upgrade_smuggling_reproducer_of_issue_14(target: Target) -> None:
    """The attack of issue 14 through the same harness, every run: nothing the caller wrote
    behind the Upgrade reaches the upstream as a request, and the request after it is the
    upstream's own request, answered with its own answer."""
    wire = UPGRADE_SMUGGLING.wire
    sequence = Sequence(UPGRADE_SMUGGLING.requests, ((wire, None),), half_close=True)
    check_all(await run_example(target, sequence))


#: found by `make fuzz`: what follows an h2c Upgrade's body in the same read was parsed as a
#: request of its own, and a malformed one (CL+TE here) refused the requests queued before it
H2C_THEN_BAD_FRAMING = (
    Sent("plain", b"HEAD /f/0 HTTP/1.1\r\nHost: localhost\r\n\r\n", Fate.FORWARD, "HEAD", "/f/0"),
    Sent(
        "upgrade_other",
        b"POST /h2c/1 HTTP/1.1\r\nUpgrade: h2c\r\nHost: localhost\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
        b"Content-Length: 3\r\n\r\nl\x00x",
        Fate.FORWARD,
        "POST",
        "/h2c/1",
        body=b"l\x00x",
        may_close_after=True,
    ),
    Sent(
        "cl_te",
        b"POST /bad/2 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 9\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n1\r\nl\r\n0\r\n\r\n",
        Fate.EITHER,
        "POST",
        "/bad/2",
        body=b"l",
        closes=True,
    ),
)


@pytest.mark.parametrize("piece", [1, 7, 10_000], ids=["bytewise", "7-byte pieces", "one write"])
async def test_bytes_behind_an_h2c_body_do_not_refuse_what_came_before(
    target: Target, piece: int
) -> None:
    """A HEAD, an h2c Upgrade with a body, then bad framing in the same reads: the HEAD and the
    h2c request are both forwarded and answered; the bytes behind the h2c body are never read."""
    wire = b"".join(sent.wire for sent in H2C_THEN_BAD_FRAMING)
    pieces = tuple((wire[i : i + piece], None) for i in range(0, len(wire), piece))
    check_all(await run_example(target, Sequence(H2C_THEN_BAD_FRAMING, pieces)))


@FUZZ
@given(sequence=sequences(selected(WELL_FORMED)))
async def test_well_formed_traffic_reaches_the_upstream_exactly(
    target: Target, sequence: Sequence
) -> None:
    """Pipelined well-formed requests (bodies by length or chunked, chunk extensions, trailers,
    HEAD, the caller's own Authorization), cut anywhere, paused, half-closed: every invariant
    holds, and each request arrives upstream exactly once, as sent, with sidecar's token."""
    RUNS["well-formed"] = RUNS.get("well-formed", 0) + 1
    example = await run_example(target, sequence)
    count_coverage(example, check_all(example))


@FUZZ
@given(sequence=sequences(selected(ALL)))
async def test_hostile_traffic_is_refused_or_forwarded_exactly(
    target: Target, sequence: Sequence
) -> None:
    """Well-formed requests mixed with Upgrades followed by more bytes, non-HTTP bytes and broken
    or ambiguous framing (CL+TE, duplicate or malformed Content-Length, bad chunk sizes,
    obfuscated Transfer-Encoding, bare LF, underscore look-alikes): what must be refused never
    reaches the upstream, nothing is smuggled, the token stays in sidecar's heads, each request
    gets one answer, and sidecar still serves afterwards."""
    RUNS["hostile"] = RUNS.get("hostile", 0) + 1
    example = await run_example(target, sequence)
    count_coverage(example, check_all(example))
