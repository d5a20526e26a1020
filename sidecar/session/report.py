"""What the session reports about itself at GET /session: state, expiry, ages, counts, last error.

:func:`summarize` takes a :class:`Snapshot`, a plain value the manager takes of itself. Redacted by
construction: a token appears only as its fingerprint, session fields and cookies only as names
and counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.tokens import SessionRecord


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The session at ``now``, as /session shows it."""

    now: float
    state: str
    store: str
    #: a login or refresh is in flight
    renewing: bool
    logins: int
    refresh_failures: int
    consecutive_failures: int
    last_error: str | None
    next_attempt_at: float
    refresh_at: float
    last_api_call_at: float | None
    #: the session record (holds secrets: only its fingerprint and metadata are reported)
    record: SessionRecord | None


def summarize(snapshot: Snapshot) -> dict[str, Any]:
    """The /session summary of ``snapshot``. Never a token."""
    now = snapshot.now
    record = snapshot.record
    out: dict[str, Any] = {
        "state": snapshot.state,
        "store": snapshot.store,
        "refresh_in_progress": snapshot.renewing,
        "logins": snapshot.logins,
        "refresh_failures": snapshot.refresh_failures,
        "consecutive_failures": snapshot.consecutive_failures,
        "last_error": snapshot.last_error,
        "next_attempt_in": round(max(0.0, snapshot.next_attempt_at - now), 3)
        if snapshot.consecutive_failures
        else None,
        "last_api_call_at": snapshot.last_api_call_at,
        "last_api_call_ago": _ago(now, snapshot.last_api_call_at),
    }
    if record is not None:
        token = record.token
        out.update(
            session_id=record.session_id,
            activity_id=record.activity_id,
            token_fingerprint=token.fingerprint,
            refreshable=token.refresh_token is not None,
            expires_at=token.expires_at,
            expires_in=round(token.expires_at - now, 3),
            next_refresh_in=round(max(0.0, snapshot.refresh_at - now), 3),
            created_at=record.created_at,
            age=round(now - record.created_at, 3),
            last_refreshed_at=record.last_refreshed_at,
            last_refreshed_ago=_ago(now, record.last_refreshed_at),
            refresh_count=record.refresh_count,
            # names and counts only: field values and cookies stay out of /session
            session_fields=sorted(token.fields),
            cookies=len(token.cookies),
        )
    return out


def _ago(now: float, then: float | None) -> float | None:
    return None if then is None else round(now - then, 3)
