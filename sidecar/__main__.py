"""``python -m sidecar`` is the same as the ``sidecar`` console script."""

from __future__ import annotations

import sys

from sidecar.cli import main

sys.exit(main())
