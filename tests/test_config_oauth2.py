"""Configuration of the standards OAuth2/OIDC identity: every missing or wrong key is named, the
private key is checked at load, and every example under config/ passes check-config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.checks import checked_config
from sidecar.cli import main
from sidecar.config.load import load_config
from sidecar.errors import ConfigError
from tests.helpers import oauth2_section
from tests.test_config import oauth2_config, problems, write

ROOT = Path(__file__).resolve().parent.parent


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def failures(tmp_path: Path, **identity: Any) -> list[str]:
    """The problem lines of loading a config with these identity settings (which must fail), with
    the roles' checks the composition root runs (the private key must sign)."""
    with pytest.raises(ConfigError) as exc:
        checked_config(write(tmp_path, oauth2_config(identity=identity)), env={})
    return problems(exc)


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        (
            {"grant": "token_exchange"},
            "identity.subject_token_file: required for grant token_exchange",
        ),
        (
            {"grant": "jwt_bearer"},
            "identity.assertion_file: required for grant jwt_bearer (or private_key_file to sign "
            "one)",
        ),
        (
            {"client_auth": "private_key_jwt", "client_secret": None},
            "identity.private_key_file: required for client_auth private_key_jwt",
        ),
        (
            {"client_auth": "private_key_jwt"},
            "identity.client_secret: not used with client_auth private_key_jwt",
        ),
        (
            {"token_url": None},
            "identity.token_url: required for kind oauth2 (or issuer, for discovery)",
        ),
        (
            {"validate": {"enabled": True}},
            "identity.validate.issuer: required when validate is enabled (or issuer)",
        ),
        (
            {"validate": {"enabled": True}},
            "identity.validate.audience: required when validate is enabled (or audience)",
        ),
        (
            {"validate": {"enabled": True}},
            "identity.jwks_url: required when validate is enabled (or issuer)",
        ),
        (
            {"actor_token_type": "urn:ietf:params:oauth:token-type:jwt"},
            "identity.actor_token_file: required with actor_token_type",
        ),
        (
            {"issuer": "ftp://idp.example.com"},
            "identity.issuer: 'ftp://idp.example.com' is not an http:// or https:// URL",
        ),
        (
            {"backup_token_urls": ["https://user:pw@idp2.example.com/token"]},
            "identity.backup_token_urls: credentials in the URL are not allowed",
        ),
        ({"validate": {"algorithms": ["HS256"]}}, "identity.validate.algorithms[0]:"),
        ({"validate": {"algorithms": ["none"]}}, "identity.validate.algorithms[0]:"),
        ({"signing_alg": "HS256"}, "identity.signing_alg:"),
        ({"validate": {"algorithms": []}}, "identity.validate.algorithms:"),
    ],
)
def test_each_problem_names_its_key(
    tmp_path: Path, identity: dict[str, Any], expected: str
) -> None:
    """Every missing or unsafe setting is reported with its dotted key."""
    lines = failures(tmp_path, **identity)
    assert any(line.startswith(expected) for line in lines), lines


def test_the_private_key_is_checked_at_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unreadable key, a non-key, a short RSA key and an algorithm the key cannot make are
    reported at load (check-config), never showing key material. Whether a key signs is the
    identity role's check: the config layer alone takes the file as data."""
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    not_a_key = tmp_path / "junk.pem"
    not_a_key.write_text("-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n")
    short = tmp_path / "short.pem"
    short.write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))  # noqa: S505 - the weak key under test
    base = {"client_auth": "private_key_jwt", "client_secret": None}
    assert failures(tmp_path, **base, private_key_file=str(tmp_path / "missing.pem"))[0].startswith(
        "identity.private_key_file: cannot read"
    )
    assert failures(tmp_path, **base, private_key_file=str(not_a_key)) == [
        "identity.private_key_file: not an unencrypted PEM private key (RSA, EC or Ed25519)"
    ]
    assert "too short" in failures(tmp_path, **base, private_key_file=str(short))[0]
    junk_config = write(
        tmp_path, oauth2_config(identity={**base, "private_key_file": str(not_a_key)})
    )
    assert oauth2_section(load_config(junk_config, env={})).private_key_file == not_a_key
    assert main(["check-config", "-c", str(junk_config)]) == 2
    assert "identity.private_key_file: not an unencrypted PEM" in capsys.readouterr().err
    assert failures(tmp_path, **base, private_key_file=str(rsa_key), signing_alg="ES256") == [
        "identity.signing_alg: signing_alg ES256 cannot be made with an RSA key"
    ]
    config = load_config(
        write(
            tmp_path,
            oauth2_config(
                identity={**base, "private_key_file": str(rsa_key), "signing_alg": "PS256"}
            ),
        ),
        env={},
    )
    assert oauth2_section(config).signing_alg == "PS256"


def test_validate_section_from_yaml_and_environment(tmp_path: Path) -> None:
    """identity.validate is read from the file and overridable by SIDECAR_IDENTITY_VALIDATE_*."""
    path = write(
        tmp_path,
        oauth2_config(
            identity={
                "issuer": "https://idp.example.com",
                "audience": "api://orders",
                "validate": {"enabled": True, "leeway": 10},
            }
        ),
    )
    config = load_config(path, env={"SIDECAR_IDENTITY_VALIDATE_LEEWAY": "5"})
    assert oauth2_section(config).validate_token.enabled
    assert oauth2_section(config).validate_token.leeway == 5
    assert oauth2_section(config).validate_token.algorithms == ("RS256", "ES256", "PS256", "EdDSA")


@pytest.mark.parametrize(
    "example", sorted(p.name for p in (ROOT / "config").glob("*.yaml")), ids=str
)
def test_every_example_config_passes_check_config(
    example: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each file under config/ is valid as shipped: its secret and key files are made up in a
    temporary directory given as SIDECAR_SECRETS_DIR (FINHUB_SECRETS_DIR for config/finhub.yaml,
    with the variables it documents), and check-config exits 0."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name in ("client-secret", "assertion.jwt", "actor-token", "password", "customer-secret"):
        (secrets / name).write_text("not-a-real-value\n")
    for name in ("FINHUB_USERNAME", "FINHUB_CUSTOMER_ID", "FINHUB_TENANT_ID"):
        monkeypatch.setenv(name, "not-a-real-" + name.lower())
    monkeypatch.setenv("FINHUB_SECRETS_DIR", str(secrets))
    (secrets / "token").write_text("not-a-real-service-account-token\n")
    (secrets / "client-key.pem").write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    monkeypatch.setenv("SIDECAR_SECRETS_DIR", str(secrets))
    assert main(["check-config", "-c", str(ROOT / "config" / example)]) == 0, capsys.readouterr()
    assert "not-a-real-value" not in capsys.readouterr().out


def test_the_documented_oauth2_variants_are_valid_configs() -> None:
    """Each YAML block of the OAuth2 section of docs/identity-providers.md is a complete, valid
    configuration."""
    import yaml

    from sidecar.config.models import Config

    readme = (ROOT / "docs" / "identity-providers.md").read_text()
    section = readme.split("## OAuth2 and OpenID Connect", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```yaml\n")[1:]]
    assert len(blocks) == 5
    for block in blocks:
        config = Config.model_validate(yaml.safe_load(block))
        assert config.identity.kind == "oauth2"
