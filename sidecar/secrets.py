"""Where a secret comes from: a value given inline, or a file read again at every use.

A configuration names a secret twice over: ``client_secret`` (the value, or ``${VAR}`` from the
environment, filled in when the file is loaded) or ``client_secret_file`` (a path, usually a
mounted Kubernetes Secret). :class:`SecretSource` is that choice as one value. :meth:`read` reads
the file at each call, so a rotated Secret is picked up at the next use without a restart; the
value itself never reaches a ``repr`` or a log line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: how every masked secret prints
MASK = "**********"


@dataclass(frozen=True, repr=False)
class SecretSource:
    """One secret: ``value`` inline, or the content of ``file``. ``key`` is the dotted
    configuration key of the inline form (``identity.client_secret``); the file form is named
    ``<key>_file``."""

    key: str
    value: str | None = None
    file: Path | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.file is None):
            raise ValueError(f"{self.key}: a secret comes from a value or a file, exactly one")

    @property
    def where(self) -> str:
        """The key the secret was given under: ``<key>_file`` for a file, else ``<key>``."""
        return f"{self.key}_file" if self.file is not None else self.key

    def read(self) -> str:
        """The secret's current value: the file's content (read now, surrounding whitespace
        removed), or the inline value. Raises OSError or UnicodeDecodeError for a file that
        cannot be read as UTF-8 text."""
        if self.file is not None:
            return self.file.read_text(encoding="utf-8").strip()
        return self.value or ""  # never None: __post_init__ requires a value without a file

    def __repr__(self) -> str:
        shown = str(self.file) if self.file is not None else MASK
        return f"SecretSource({self.where}={shown})"


def both_given(key: str) -> str:
    """The problem line of a secret given both inline and as a file, naming the inline key
    (``key`` is the key without the section, as models report it)."""
    name = key.rpartition(".")[2]
    return f"{key}: give {name} or {name}_file, not both"
