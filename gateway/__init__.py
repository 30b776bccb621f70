"""rbac-gateway: HTTP Basic + role-based authorization in front of services without their own."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rbac-gateway")
except PackageNotFoundError:  # a source tree run without `pip install` (make venv installs it)
    __version__ = "0+unknown"
