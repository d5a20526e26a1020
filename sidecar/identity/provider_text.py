"""The identity provider's own words (an OAuth2 ``error_description``, a vendor's error body), made
safe to show: scrubbed of every credential value, then bounded to one short line.

A provider is not ours to trust: some repeat what they were sent in their error answers, and the
text goes on to callers' 503 bodies, ``/session``, ``sidecar status`` and the log. Each identity
provider keeps one :class:`SecretValues`, notes every credential value as it reads or sends it
(client secret, password, customer secret, private key, assertion, refresh and subject tokens,
the Authorization header it built) and passes every piece of provider text through
:meth:`SecretValues.provider_text` before it becomes part of an error.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote, quote_plus

#: provider text is cut to this many characters (after scrubbing, so no secret is cut in half)
MAX_PROVIDER_TEXT = 200
REDACTED = "[redacted]"

# anything that is not printable ASCII: line breaks, terminal escapes, other scripts
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


def _forms(value: str) -> set[str]:
    """``value`` as a provider may repeat it: raw, form-encoded, percent-encoded, JSON-escaped;
    for a multi-line value (a PEM key) each long line too."""
    forms = {value, quote_plus(value, safe=""), quote(value, safe=""), json.dumps(value)[1:-1]}
    forms.update(line.strip() for line in value.splitlines() if len(line.strip()) >= 16)
    return {f for f in forms if f}


class SecretValues:
    """The credential values one identity provider uses now, by key (a rotation replaces the
    value noted before under the same key)."""

    __slots__ = ("_pattern", "_values")

    def __init__(self) -> None:
        self._values: dict[str, str] = {}
        self._pattern: re.Pattern[str] | None = None

    def note(self, key: str, value: str | None) -> None:
        """Remember ``value`` as the current credential under ``key`` (None or empty: nothing
        changes)."""
        if value and self._values.get(key) != value:
            self._values[key] = value
            self._pattern = None

    def scrub(self, text: str) -> str:
        """``text`` with every form of every noted value replaced by ``[redacted]``."""
        if not self._values:
            return text
        if self._pattern is None:
            forms = set().union(*(_forms(v) for v in self._values.values()))
            # longest first: a value that contains another is replaced whole
            alternatives = sorted(forms, key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, alternatives)), re.IGNORECASE)
        return self._pattern.sub(REDACTED, text)

    def provider_text(self, text: object, limit: int = MAX_PROVIDER_TEXT) -> str:
        """The provider's ``text`` fit to show: scrubbed, on one printable line, at most
        ``limit`` characters."""
        clean = _UNPRINTABLE.sub(" ", self.scrub(str(text))).strip()
        if len(clean) > limit:
            clean = clean[: limit - 3].rstrip() + "..."
        return clean
