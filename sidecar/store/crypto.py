"""Encryption at rest for stored sessions: AES-256-GCM with a key read from a file.

The key file holds 32 random bytes, base64-encoded (``openssl rand -base64 32``). A sealed record
is a small JSON envelope; the session id and key name are bound in as associated data, so a
record cannot be moved between identities unnoticed.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.errors import ConfigError, StoreError

ENVELOPE = "sidecar-aes256gcm-v1"


class Sealer:
    """Encrypts and decrypts session payloads with one AES-256-GCM key."""

    def __init__(self, key: bytes, context: str) -> None:
        if len(key) != 32:
            raise ConfigError("session.encryption_key_file: the key must be 32 bytes (base64)")
        self._aead = AESGCM(key)
        self._context = context.encode()

    @classmethod
    def from_file(cls, path: Path, context: str) -> Sealer:
        """Read a base64 key file; errors name the key and the file."""
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"session.encryption_key_file: cannot read {path}: {exc}") from exc
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(
                f"session.encryption_key_file: {path} is not base64 (make one with "
                "`openssl rand -base64 32`)"
            ) from exc
        return cls(key, context)

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
        """Decrypt; a wrong key, tampering or a plaintext record is a StoreError saying which."""
        try:
            envelope = json.loads(sealed)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError("stored session is not an encrypted envelope (corrupt)") from exc
        if not isinstance(envelope, dict) or envelope.get("format") != ENVELOPE:
            raise StoreError(
                "stored session is not encrypted, but session.encryption_key_file is set; "
                "refusing to use it"
            )
        try:
            nonce = base64.b64decode(envelope["nonce"])
            data = base64.b64decode(envelope["data"])
            return self._aead.decrypt(nonce, data, self._context)
        except InvalidTag as exc:
            raise StoreError(
                "cannot decrypt the stored session: wrong encryption key, or the data was altered"
            ) from exc
        except (KeyError, TypeError, binascii.Error, ValueError) as exc:
            raise StoreError("encrypted session envelope is malformed") from exc
