"""Secret sources: a value inline or a file read again at every use, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.secrets import SecretSource


def test_a_file_source_is_read_at_every_use_and_names_its_key(tmp_path: Path) -> None:
    """A file source returns the file's stripped content as it is at each read (a rotated
    Secret is used at once) and is named by ``<key>_file``; its repr shows the path only."""
    path = tmp_path / "secret"
    path.write_text("first\n")
    source = SecretSource("identity.client_secret", file=path)
    assert source.read() == "first"
    path.write_text("  rotated  \n")
    assert source.read() == "rotated"
    assert source.where == "identity.client_secret_file"
    assert "rotated" not in repr(source)
    assert str(path) in repr(source)
    path.unlink()
    with pytest.raises(FileNotFoundError):
        source.read()


def test_an_inline_source_never_shows_its_value() -> None:
    """An inline source reads as its value, is named by its key, and prints masked."""
    source = SecretSource("session.redis_url", value="redis://:pw-123@127.0.0.1:6379/0")
    assert source.read() == "redis://:pw-123@127.0.0.1:6379/0"
    assert source.where == "session.redis_url"
    assert "pw-123" not in repr(source)
    assert "**********" in repr(source)


def test_a_source_is_a_value_or_a_file_exactly() -> None:
    """Neither or both is not a source (the models refuse both before one is made)."""
    with pytest.raises(ValueError, match="exactly one"):
        SecretSource("identity.password")
    with pytest.raises(ValueError, match="exactly one"):
        SecretSource("identity.password", value="p", file=Path("/p"))
