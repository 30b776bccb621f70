"""``python -m gateway`` — see :mod:`gateway.cli`."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main(prog="python -m gateway"))
