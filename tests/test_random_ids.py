"""The request ids and trace ids sidecar makes: well formed, never repeated, and a random source
that fails once fails one id only (ids are made in batches of 64)."""

from __future__ import annotations

import os
import re
import uuid

import pytest

from sidecar.proxy.headers import _RandomPool, new_id, new_traceparent, valid_traceparent

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_ids_are_version_4_uuids_and_never_repeat_across_batches() -> None:
    ids = [new_id() for _ in range(1000)]  # more than 15 batches
    assert all(UUID4.fullmatch(i) for i in ids), [i for i in ids if not UUID4.fullmatch(i)]
    assert all(uuid.UUID(i).version == 4 for i in ids)
    assert len(set(ids)) == len(ids)


def test_ids_are_the_random_bytes_with_only_the_version_and_variant_bits_set() -> None:
    """Each id is 16 bytes of the source in order, as uuid.UUID(bytes=..., version=4) renders
    them: the batch is made without losing or reusing a random bit."""
    raw = os.urandom(16 * 64)
    pool = _RandomPool(lambda n: raw[:n])
    made = [pool.new_id() for _ in range(64)][::-1]  # handed out from the end of the batch
    expected = [str(uuid.UUID(bytes=raw[at : at + 16], version=4)) for at in range(0, 1024, 16)]
    assert made == expected


def test_traceparents_are_valid_and_never_repeat() -> None:
    made = [new_traceparent() for _ in range(1000)]
    assert all(valid_traceparent(t) for t in made)
    assert len({t[3:35] for t in made}) == len(made)  # trace ids
    assert len({t[36:52] for t in made}) == len(made)  # span ids
    assert new_traceparent(sampled=False).endswith("-00")


def test_a_random_source_that_fails_once_fails_that_one_call_only() -> None:
    """getrandom refused once (a seccomp filter, the /dev/urandom fallback out of descriptors):
    that request's id fails, the next ones are made again; the pool is never left broken."""
    failures = [OSError(11, "Resource temporarily unavailable")]

    def flaky(n: int) -> bytes:
        if failures:
            raise failures.pop()
        return os.urandom(n)

    pool = _RandomPool(flaky)
    with pytest.raises(OSError, match="temporarily unavailable"):
        pool.new_id()
    assert UUID4.fullmatch(pool.new_id())
    failures.append(OSError(11, "Resource temporarily unavailable"))
    with pytest.raises(OSError, match="temporarily unavailable"):
        pool.new_traceparent()
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", pool.new_traceparent())
    assert pool.new_traceparent(sampled=False).endswith("-00")


def test_a_forked_pool_forgets_the_ids_made_ahead() -> None:
    pool = _RandomPool()
    first = pool.new_id()
    pool.reset()  # what os.register_at_fork runs in the child
    assert pool.new_id() != first
    assert not any(pool.new_id() == first for _ in range(200))
