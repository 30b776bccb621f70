"""Errors of the inventory service.

Errors a client can cause carry the HTTP ``status`` that ``app``'s one error
middleware answers with, as ``{"error": message, "status": status}``::

    InventoryError            500  base class; never raised directly
    ├── BadRequest            400  malformed JSON, bad fields, bad query parameters
    ├── NotFound              404  no such item
    ├── Conflict              409  POST of a name that already exists
    ├── PayloadTooLarge       413  body larger than the app's ``max_body``
    ├── UnsupportedMediaType  415  body that is not ``application/json``
    └── Unavailable           503  the database is busy or not answering

``StorageError`` is separate: the database cannot be opened at startup, which the
command line reports in one line before exiting with status 1.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BadRequest",
    "Conflict",
    "InventoryError",
    "NotFound",
    "PayloadTooLarge",
    "StorageError",
    "Unavailable",
    "UnsupportedMediaType",
]


class InventoryError(Exception):
    """An error answered to the client with ``status`` and a one-line ``message``."""

    status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(InventoryError):
    """The request's body or query parameters are invalid."""

    status = 400


class NotFound(InventoryError):
    """The named item does not exist."""

    status = 404


class Conflict(InventoryError):
    """An item with that name already exists."""

    status = 409


class PayloadTooLarge(InventoryError):
    """The request body exceeds the configured limit."""

    status = 413


class UnsupportedMediaType(InventoryError):
    """The request body is not declared as UTF-8 JSON."""

    status = 415


class Unavailable(InventoryError):
    """The database is busy (locked by another writer) or not answering."""

    status = 503


class StorageError(Exception):
    """The database file cannot be opened or prepared."""
