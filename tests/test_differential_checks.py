"""The differential fuzz suite's invariants, checked against hand-made evidence: each one passes a
faithful exchange and catches the breach it exists for (a smuggled request, stray bytes, a
poisoned connection, the token in a body, two answers to one request, a request eaten by a
poisoned pool). A harness that cannot fail proves nothing; these show that it can.
"""

from __future__ import annotations

import pytest

from tests.fakes.http_sequences import Fate, Sent, Sequence, head
from tests.fakes.raw_caller import CallerResult
from tests.fakes.raw_upstream import RawConnection
from tests.test_differential_fuzz import (
    AFTER,
    PREFIX,
    Example,
    check_all,
    check_answers,
    check_authorization,
    check_forwarded,
    check_heads_are_sidecars,
    check_no_stray_bytes,
    check_still_serves,
)

TOKEN = "token-0123"
HOST = "127.0.0.1:9"


def built(method: str, target: str, framing: bytes = b"", *extra: tuple[bytes, bytes]) -> bytes:
    """A request head as sidecar writes it (``framing``: its Content-Length line, or none)."""
    headers = [
        (b"Host", HOST.encode()),
        *extra,
        (b"Authorization", b"Bearer " + TOKEN.encode()),
        (b"X-Tenant-ID", b"1234567"),
    ]
    return head(f"{method} {PREFIX}{target} HTTP/1.1".encode(), headers)[:-2] + framing + b"\r\n"


def answer(number: int, close: bool = False) -> bytes:
    """The upstream's answer to request ``number`` as sidecar relays it."""
    extra = b"Connection: close\r\n" if close else b""
    return b"HTTP/1.1 200 OK\r\nX-Upstream-Request: %d\r\n%bContent-Length: 0\r\n\r\n" % (
        number,
        extra,
    )


GET = Sent(
    "plain", head(b"GET /f/0 HTTP/1.1", [(b"Host", b"localhost")]), Fate.FORWARD, "GET", "/f/0"
)
POST = Sent(
    "plain",
    head(b"POST /f/1 HTTP/1.1", [(b"Host", b"localhost"), (b"Content-Length", b"3")]) + b"abc",
    Fate.FORWARD,
    "POST",
    "/f/1",
    b"abc",
    closes=True,
    caller_auth=b"Bearer caller-credential-1",
)
AFTER_BYTES = built("GET", AFTER.target)


def evidence(
    upstream: list[bytes],
    caller: bytes,
    *,
    requests: tuple[Sent, ...] = (GET, POST),
    ended: tuple[bool, ...] = (),
    caller_ended: bool = True,
    after: bytes | None = None,
) -> Example:
    """An example's evidence from the bytes each side saw. Each upstream connection's complete
    requests are numbered in order across connections; the request after the example goes on a
    connection of its own and is answered last."""
    connections = []
    number = 0
    for index, data in enumerate(upstream):
        record = RawConnection(index + 1, bytearray(data), ended=ended[index] if ended else True)
        count = data.count(b" HTTP/1.1\r\n")
        record.answered = list(range(number + 1, number + count + 1))
        number += count
        connections.append(record)
    last = RawConnection(len(upstream) + 1, bytearray(AFTER_BYTES), [number + 1])
    sequence = Sequence(requests, tuple((s.wire, None) for s in requests))
    after_answer = answer(number + 1, close=True) if after is None else after
    return Example(
        sequence,
        [*connections, last],
        CallerResult(caller, caller_ended),
        CallerResult(after_answer, True),
        [TOKEN],
        HOST,
    )


def faithful() -> Example:
    return evidence(
        [built("GET", "/f/0") + built("POST", "/f/1", b"Content-Length: 3\r\n") + b"abc"],
        answer(1) + answer(2, close=True),
    )


def test_a_faithful_exchange_passes_every_check() -> None:
    """Two requests forwarded as sent, each answered once, the connection closed: no check
    objects."""
    check_all(faithful())


def test_a_smuggled_request_is_caught() -> None:
    """A request the caller's bytes made upstream on their own (after an Upgrade, say) is not
    the caller's, is no head sidecar wrote, and carries no token of sidecar's."""
    ex = evidence(
        [built("GET", "/f/0") + b"GET /steal HTTP/1.1\r\nHost: x\r\n\r\n"],
        answer(1) + answer(2, close=True),
        requests=(GET,),
    )
    for check in (check_forwarded, check_heads_are_sidecars, check_authorization):
        with pytest.raises(AssertionError):
            check(ex)


def test_a_changed_body_and_a_missing_request_are_caught() -> None:
    """A body that arrives changed, or a well-formed request that never arrives, is caught."""
    changed = evidence(
        [built("GET", "/f/0") + built("POST", "/f/1", b"Content-Length: 2\r\n") + b"ab"],
        answer(1) + answer(2, close=True),
    )
    with pytest.raises(AssertionError, match="reached the upstream as"):
        check_forwarded(changed)
    missing = evidence([built("GET", "/f/0")], answer(1, close=True))
    with pytest.raises(AssertionError, match="must reach the upstream and never did"):
        check_forwarded(missing)


def test_a_refused_request_that_reaches_the_upstream_is_caught() -> None:
    """A request that had to be refused (here: CL and TE together, kept alive) must not be
    answered by the upstream."""
    bad = Sent("dup_cl", b"...", Fate.REFUSE, "POST", "/bad/0")
    ex = evidence(
        [built("POST", "/bad/0", b"Content-Length: 0\r\n")],
        answer(1, close=True),
        requests=(bad,),
    )
    with pytest.raises(AssertionError, match="must be refused"):
        check_forwarded(ex)


def test_stray_bytes_and_a_poisoned_connection_are_caught() -> None:
    """Bytes that are no request upstream are caught; so is a request cut short on a
    connection that stays open (its missing body would be the next caller's request)."""
    stray = evidence([built("GET", "/f/0") + b"\x81\x85\x37\xfa\x21\x3d"], answer(1))
    with pytest.raises(AssertionError, match="no request sidecar built"):
        check_no_stray_bytes(stray)
    cut = built("POST", "/f/1", b"Content-Length: 250\r\n") + b"abc"
    poisoned = evidence([built("GET", "/f/0") + cut], answer(1), ended=(False,))
    with pytest.raises(AssertionError, match="still open"):
        check_no_stray_bytes(poisoned)
    aborted = evidence([built("GET", "/f/0") + cut], answer(1), ended=(True,))
    check_no_stray_bytes(aborted)


def test_framing_look_alikes_and_trailers_as_headers_are_caught() -> None:
    """``Content_Length`` next to sidecar's framing, and a caller's trailer field sent as a
    header, are caught."""
    lookalike = evidence(
        [built("GET", "/f/0", b"", (b"Content_Length", b"5"))],
        answer(1, close=True),
        requests=(GET,),
    )
    with pytest.raises(AssertionError, match="look-alike"):
        check_heads_are_sidecars(lookalike)
    trailer = Sent("plain", b"...", Fate.FORWARD, "GET", "/f/0", trailers=(("X-Trailer-0", "t0"),))
    merged = evidence(
        [built("GET", "/f/0", b"", (b"X-Trailer-0", b"t0"))],
        answer(1, close=True),
        requests=(trailer,),
    )
    with pytest.raises(AssertionError, match="trailer"):
        check_heads_are_sidecars(merged)


def test_the_token_outside_a_head_and_the_callers_credential_are_caught() -> None:
    """The token in a body (a victim's head eaten by a poisoned connection) and the caller's own
    Authorization reaching the upstream are caught."""
    body = b"Authorization: Bearer " + TOKEN.encode()
    in_body = evidence(
        [
            built("GET", "/f/0")
            + built("POST", "/f/1", b"Content-Length: %d\r\n" % len(body))
            + body
        ],
        answer(1) + answer(2, close=True),
        requests=(GET, Sent("plain", b"", Fate.FORWARD, "POST", "/f/1", body, closes=True)),
    )
    with pytest.raises(AssertionError, match="the token appears 3 times"):
        check_authorization(in_body)
    callers = evidence(
        [
            built("GET", "/f/0", b"", (b"X-Copy", b"Bearer caller-credential-1"))
            + built("POST", "/f/1", b"Content-Length: 3\r\n")
            + b"abc"
        ],
        answer(1) + answer(2, close=True),
    )
    with pytest.raises(AssertionError, match="caller's own Authorization"):
        check_authorization(callers)


def test_missing_extra_and_misplaced_answers_are_caught() -> None:
    """Two answers for one request, answers in the wrong order, an answer that never comes and a
    connection left open after the last answer are each caught."""
    upstream = [built("GET", "/f/0") + built("POST", "/f/1", b"Content-Length: 3\r\n") + b"abc"]
    error = (
        b"HTTP/1.1 400 Bad Request\r\nX-Sidecar-Error: 1\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}"
    )
    cases = {
        "bytes followed the last answer": answer(1) + answer(2, close=True) + error,
        "should be the upstream's answer": answer(2) + answer(1, close=True),
        "got no answer": answer(1),
    }
    for message, caller in cases.items():
        with pytest.raises(AssertionError, match=message):
            check_answers(evidence(upstream, caller), check_forwarded(evidence(upstream, caller)))
    still_open = evidence(upstream, answer(1) + answer(2), caller_ended=False)
    with pytest.raises(AssertionError, match="left the connection open"):
        check_answers(still_open, check_forwarded(still_open))


def test_a_request_after_the_example_that_a_poisoned_pool_ate_is_caught() -> None:
    """When the request after the example is answered with another request's answer, sidecar no
    longer serves correctly."""
    ex = evidence(
        [built("GET", "/f/0") + built("POST", "/f/1", b"Content-Length: 3\r\n") + b"abc"],
        answer(1) + answer(2, close=True),
        after=answer(2, close=True),
    )
    with pytest.raises(AssertionError, match="was answered"):
        check_still_serves(ex)
