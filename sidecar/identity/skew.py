"""The offset between the identity provider's clock and ours, and how it corrects token expiries.

A token's ``exp`` (or a vendor's ``expires_at``) is a moment on the provider's clock. When the
provider's clock is 120 s ahead of ours, a 30 s token read naively looks valid for 150 s, and the
upstream (on the provider's time) refuses it for the last 120 of them. So the offset is measured at
every answer from the provider's ``Date`` header (RFC 9110 section 6.6.1, whole seconds: the
moment of the answer lies between our send and our receipt) and subtracted from absolute expiries.
A relative ``expires_in`` needs no offset: it is counted from when the request was sent, which is
never later than when the provider issued the token.

Without a ``Date`` header the token's ``iat`` stands in, trusted only to move an expiry earlier:
some providers backdate ``iat`` (Entra ID by five minutes), which would otherwise push it later.
Offsets within :data:`sidecar.tokens.SKEW_RESOLUTION` are the measurement's own noise and are not
applied (:func:`sidecar.tokens.expiry_offset`).
"""

from __future__ import annotations

import email.utils
import logging
from collections.abc import Callable

log = logging.getLogger("sidecar.identity")

#: a difference larger than this is logged (once, until it falls back under it)
LOG_ABOVE = 5.0


def date_offset(date: str | None, sent_at: float, received_at: float) -> float | None:
    """Provider minus local, from one answer's ``Date`` header: the provider stamped it (rounded
    down to the second) somewhere between ``sent_at`` and ``received_at`` (our clock)."""
    if date is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None  # an HTTP-date is always GMT; a zoneless one is malformed
    return when.timestamp() + 0.5 - (sent_at + received_at) / 2


class ClockSkew:
    """The latest measured offset (provider minus local); ``report`` is told each new value."""

    def __init__(self, report: Callable[[float], None] | None = None) -> None:
        #: None until an answer with a Date header arrived
        self.seconds: float | None = None
        self.report = report
        self._logged = False

    def observe(self, date: str | None, sent_at: float, received_at: float) -> None:
        """Take one answer's ``Date`` header into account."""
        offset = date_offset(date, sent_at, received_at)
        if offset is None:
            return
        self.seconds = offset
        if self.report is not None:
            self.report(offset)
        large = abs(offset) > LOG_ABOVE
        if large and not self._logged:
            log.warning(
                "identity.clock_skew",
                extra={
                    "seconds": round(offset, 1),
                    "meaning": "provider minus local; token expiries are corrected by it",
                },
            )
        self._logged = large
