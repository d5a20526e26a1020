"""What the session reports about itself at GET /session: state, expiry, ages, counts, last error.

Redacted by construction: a token appears only as its fingerprint, session fields and cookies
only as names and counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.session.manager import SessionManager
    from sidecar.session.schedule import RefreshSchedule


def summarize(manager: SessionManager, schedule: RefreshSchedule, renewing: bool) -> dict[str, Any]:
    """The /session summary of ``manager``, whose refresh schedule is ``schedule``; ``renewing``
    says whether a login or refresh is in flight. Never a token."""
    now = manager.clock.time()
    record = manager.record
    out: dict[str, Any] = {
        "state": manager.state().value,
        "store": manager.store.kind,
        "refresh_in_progress": renewing,
        "logins": manager.login_count,
        "refresh_failures": manager.refresh_failures,
        "consecutive_failures": schedule.failures,
        "last_error": schedule.last_error,
        "next_attempt_in": round(max(0.0, schedule.next_attempt_at - now), 3)
        if schedule.failures
        else None,
        "last_api_call_at": manager.last_api_call_at,
        "last_api_call_ago": _ago(now, manager.last_api_call_at),
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
            next_refresh_in=round(max(0.0, schedule.refresh_at - now), 3),
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
