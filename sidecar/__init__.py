"""sidecar: a local authenticating reverse proxy for one service identity.

The package splits into four roles joined by narrow interfaces:

* ``identity`` talks to the identity provider and produces :class:`~sidecar.tokens.Token`s;
* ``session`` holds the current token, schedules refreshes and owns single flight;
* ``store`` persists the session;
* ``proxy`` only reads the current token snapshot.
"""

from __future__ import annotations

__version__ = "0.1.0"

from sidecar.compiled import prefer_sources

prefer_sources()
