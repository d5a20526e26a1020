"""The configuration checks that need a role, run by the composition root.

The config layer validates data alone (:func:`sidecar.config.load.load_config`). Whether a
private key signs is the identity role's knowledge, whether a redis URL is one the client can use
or a session directory is sidecar's alone is the store's: ``sidecar check-config``, ``sidecar
run`` and every SIGHUP reload load through :func:`checked_config`, which adds those checks, so
their problems are reported with the others, each naming its key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from sidecar.config.load import load_config
from sidecar.config.models import Config
from sidecar.config.oauth2 import OAuth2Section
from sidecar.store.opening import store_problems


def role_problems(config: Config) -> list[str]:
    """What the roles find wrong with a valid configuration, one ``"dotted.key: message"``
    line each."""
    problems = store_problems(config.session)
    identity = config.identity
    keys = isinstance(identity, OAuth2Section) and (
        identity.private_key_file is not None or identity.previous_private_key_files
    )
    if isinstance(identity, OAuth2Section) and keys:
        # PyJWT and cryptography are loaded only for a configured private key (idle memory)
        from sidecar.identity.assertions import signing_key_problems

        problems = signing_key_problems(identity) + problems
    return problems


def checked_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """:func:`~sidecar.config.load.load_config` with the roles' checks: a ConfigError lists
    every problem, the config layer's and the roles' alike."""
    return load_config(path, env, checks=(role_problems,))
