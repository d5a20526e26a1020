"""config/finhub.yaml itself, against the FinHub-shaped fake: the six headers on every request,
proactive refresh with rotated refresh tokens across several lifetimes, logout on shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.app import Sidecar
from sidecar.config.load import load_config
from sidecar.config.models import Config
from tests.conftest import proxy_url
from tests.fakes.clock import FakeClock
from tests.fakes.finhub import PREFIX, FinHub
from tests.helpers import advance, eventually, json_login_section

CONFIG = Path(__file__).resolve().parent.parent / "config" / "finhub.yaml"


@pytest.fixture
def clock(finhub: FinHub) -> FakeClock:
    """The fake clock the FinHub fake runs on, shared with the sidecar."""
    assert isinstance(finhub.clock, FakeClock)
    return finhub.clock


def finhub_env(finhub: FinHub, url: str, secrets_dir: Path, **extra: str) -> dict[str, str]:
    """The environment config/finhub.yaml documents, pointed at the fake, plus overrides."""
    secrets_dir.mkdir(exist_ok=True)
    (secrets_dir / "password").write_text(finhub.password + "\n")
    (secrets_dir / "customer-secret").write_text(finhub.customer_secret + "\n")
    return {
        "FINHUB_USERNAME": finhub.username,
        "FINHUB_CUSTOMER_ID": finhub.customer_id,
        "FINHUB_TENANT_ID": finhub.tenant_id,
        "FINHUB_API_URL": url,
        "FINHUB_SECRETS_DIR": str(secrets_dir),
        "SIDECAR_LISTEN_PORT": "0",
        "SIDECAR_ADMIN_PORT": "0",
        "SIDECAR_SESSION_PATH": str(secrets_dir.parent / "session.json"),
        **extra,
    }


@pytest.fixture
async def started() -> AsyncIterator[list[Sidecar]]:
    """Sidecars a test starts; stopped at the end (logging out, as the config says)."""
    sidecars: list[Sidecar] = []
    yield sidecars
    for sidecar in reversed(sidecars):
        await sidecar.stop()


def load_finhub(env: dict[str, str]) -> Config:
    """config/finhub.yaml, with ``env`` as the whole environment."""
    return load_config(CONFIG, env=env)


async def test_finhub_yaml_loads_with_the_documented_environment(
    finhub: FinHub, finhub_url: str, tmp_path: Path
) -> None:
    """The shipped file validates with exactly the variables and secret files it documents, and
    says what the seed says: 5 min lead, tenant from the login answer, six headers."""
    config = load_finhub(finhub_env(finhub, finhub_url, tmp_path / "secrets"))
    assert config.identity.kind == "json_login"
    assert config.refresh.lead_time == 300
    assert config.refresh.lead_fraction == 0
    assert config.headers.tenant_id == "{{ session.tenant_id }}"
    assert config.headers.request_id == "generate"
    assert config.identity.response.access_token == "userSessionToken"
    assert config.session.logout_on_shutdown is True
    assert config.identity.tls.min_version == "1.3"


def test_finhub_yaml_takes_env_overrides_for_lead_time_and_backups(
    finhub: FinHub, tmp_path: Path
) -> None:
    """SIDECAR_* overrides reach the refresh section and the optional login/refresh sections
    (backup endpoints for disaster recovery, as the file's comments say)."""
    backup = "https://dr.finhub.example/api/v2.1/auth/login"
    env = finhub_env(
        finhub,
        "https://api.finhub.example",
        tmp_path / "secrets",
        SIDECAR_REFRESH_LEAD_TIME="30",
        SIDECAR_IDENTITY_LOGIN_BACKUP_URLS=f'["{backup}"]',
    )
    config = load_finhub(env)
    assert config.refresh.lead_time == 30
    login = json_login_section(config).login
    assert login is not None
    assert login.urls == (
        "https://api.finhub.example/api/v2.1/auth/login",
        backup,
    )


async def test_finhub_traffic_across_refreshes_has_zero_rejections(
    finhub: FinHub,
    finhub_url: str,
    clock: FakeClock,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    started: list[Sidecar],
) -> None:
    """Requests every 30 s of fake time across four 1800 s lifetimes: the fake (which checks the
    six headers, the tenant, uuid4 request ids never reused and the token) rejects none; the
    session is refreshed (not re-logged-in) each time, with each refresh token used once and
    replaced by the newest; on shutdown the session is logged out."""
    env = finhub_env(finhub, finhub_url, tmp_path / "secrets")
    sidecar = Sidecar(load_finhub(env), clock=clock, drain_timeout=1.0)
    await sidecar.start()
    started.append(sidecar)
    await eventually(lambda: sidecar.session.usable() is not None, what="login at start")
    statuses = []
    for _ in range(4 * 60):
        await advance(clock, 30)
        for _ in range(2):
            async with http.get(proxy_url(sidecar, f"{PREFIX}/accounts?x=1")) as resp:
                statuses.append(resp.status)
    assert finhub.rejected == []
    assert statuses == [200] * len(statuses)
    assert len(finhub.auth_calls("login")) == 1
    refreshes = finhub.auth_calls("token/refresh")
    assert len(refreshes) >= 4
    presented = [c.json["refreshToken"] for c in refreshes]
    assert len(set(presented)) == len(presented)  # each refresh token used once
    assert presented == finhub.used_refresh_tokens
    await sidecar.stop()
    started.remove(sidecar)
    logouts = finhub.auth_calls("logout")
    assert len(logouts) == 1
    assert finhub.logged_out
