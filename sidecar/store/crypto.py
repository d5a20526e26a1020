"""Encryption at rest for stored sessions: AES-256-GCM with a key read from a file.

The key file holds 32 random bytes, base64-encoded (``openssl rand -base64 32``). A sealed record
is a small JSON envelope; the session id and key name are bound in as associated data, so a
record cannot be moved between identities unnoticed. Records are always sealed with the current
key; during a key rotation the previous keys still open what they sealed.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.errors import ConfigError, StoreUnreadable

ENVELOPE = "sidecar-aes256gcm-v1"


class Sealer:
    """Encrypts and decrypts session payloads with one AES-256-GCM key."""

    def __init__(self, key: bytes, context: str, previous: Sequence[bytes] = ()) -> None:
        for candidate in (key, *previous):
            if len(candidate) != 32:
                raise ConfigError("session.encryption_key_file: a key must be 32 bytes (base64)")
        self._aead = AESGCM(key)
        self._previous = [AESGCM(old) for old in previous]
        self._context = context.encode()
        self._keys = (key, *previous)

    @property
    def keys(self) -> tuple[bytes, ...]:
        """The key it seals with, then the ones it also opens with (never logged or shown)."""
        return self._keys

    @classmethod
    def from_file(cls, path: Path, context: str, previous: Sequence[Path] = ()) -> Sealer:
        """Read base64 key files (the current one and any previous ones); errors name the key
        and the file."""
        old = [
            _read_key(f"session.previous_encryption_key_files[{n}]", p)
            for n, p in enumerate(previous)
        ]
        return cls(_read_key("session.encryption_key_file", path), context, old)

    def seal(self, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        data = self._aead.encrypt(nonce, plaintext, self._context)
        envelope = {
            "format": ENVELOPE,
            "nonce": base64.b64encode(nonce).decode(),
            "data": base64.b64encode(data).decode(),
        }
        return json.dumps(envelope).encode()

    def open(self, sealed: bytes) -> bytes:
        """Decrypt; a wrong key, tampering or a plaintext record is a StoreUnreadable saying
        which."""
        return self.unseal(sealed)[0]

    def unseal(self, sealed: bytes) -> tuple[bytes, bool]:
        """Decrypt, as :meth:`open`; the flag says a previous key opened it (seal it again)."""
        try:
            envelope = json.loads(sealed)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreUnreadable("stored session is not an encrypted envelope (corrupt)") from exc
        if not isinstance(envelope, dict) or envelope.get("format") != ENVELOPE:
            raise StoreUnreadable(
                "stored session is not encrypted, but session.encryption_key_file is set; "
                "refusing to use it"
            )
        try:
            nonce = base64.b64decode(envelope["nonce"])
            data = base64.b64decode(envelope["data"])
        except (KeyError, TypeError, binascii.Error, ValueError) as exc:
            raise StoreUnreadable("encrypted session envelope is malformed") from exc
        for n, aead in enumerate([self._aead, *self._previous]):
            try:
                plaintext = aead.decrypt(nonce, data, self._context)
            except InvalidTag:
                continue
            except ValueError as exc:  # e.g. a nonce of the wrong length
                raise StoreUnreadable("encrypted session envelope is malformed") from exc
            return plaintext, n > 0
        tried = "the encryption key" + (" and the previous ones" if self._previous else "")
        raise StoreUnreadable(
            f"cannot decrypt the stored session with {tried}: wrong encryption key, or the data "
            "was altered"
        )


def _read_key(name: str, path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc}") from exc
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(
            f"{name}: {path} is not base64 (make one with `openssl rand -base64 32`)"
        ) from exc
