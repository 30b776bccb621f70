"""A plain inventory REST service over SQLite, with no security of its own.

It is the upstream that the rbac-gateway protects; see ``app`` for the HTTP API and
``__main__`` for the command line.
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
