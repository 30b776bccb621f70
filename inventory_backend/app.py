"""HTTP API of the inventory service; ``create_app`` builds it.

No authentication: the service listens on loopback and the gateway guards it.

=======  ==========================  ======================================================
GET      /healthz                    200 ``{"status": "ok"}`` once the database answers
GET      /api/inventory?name=N       200 the record; 404 if there is none
GET      /api/inventory              200 ``{"items": [...], "limit": L, "offset": O,
                                     "total": T}``, sorted by name; ``limit`` 0..1000
                                     (default 100), ``offset`` >= 0 (default 0)
POST     /api/inventory              201 the stored record (name from the JSON body) and a
                                     ``Location``; 409 if the name exists
PUT      /api/inventory[?name=N]     201 created / 200 replaced, with the stored record; the
                                     name comes from the query or the body, or both if equal
DELETE   /api/inventory?name=N       200 the record as it was before deletion; 404 if none
=======  ==========================  ======================================================

Every error is JSON, ``{"error": "<one line>", "status": N}``: 400 malformed JSON, a body
that is not an object, a missing/empty/too long name, a bad ``count``, bad or repeated
query parameters, query and body names that differ; 404 unknown item or route; 405 wrong
method (with ``Allow``); 409 duplicate on POST; 413 body over ``max_body``; 415 a body
that is not ``application/json`` (``charset=utf-8`` allowed); 503 database busy (with
``Retry-After``); 500 ``"internal error"`` for anything unexpected, whose traceback goes
to the log only.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final

from aiohttp import web
from yarl import URL

from . import records
from .db import Inventory
from .errors import (
    BadRequest,
    Conflict,
    InventoryError,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    UnsupportedMediaType,
)

__all__ = ["INVENTORY", "create_app"]

log = logging.getLogger(__name__)

#: The open database, present while the app runs.
INVENTORY: Final = web.AppKey("inventory", Inventory)
_MAX_BODY: Final = web.AppKey("max_body", int)

_ITEMS_PATH: Final = "/api/inventory"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    db_path: str | Path, *, max_body: int = 1 << 20, busy_timeout: float = 5.0
) -> web.Application:
    """Build the app; the database at ``db_path`` is opened on startup, closed on cleanup.

    ``max_body`` bounds request bodies in bytes (413 beyond it); ``busy_timeout`` is how
    many seconds a write waits for another process's lock before answering 503.
    """
    app = web.Application(middlewares=[_errors_as_json], client_max_size=max_body)
    app[_MAX_BODY] = max_body
    app.cleanup_ctx.append(_database(Path(db_path), busy_timeout))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get(_ITEMS_PATH, _get_items)
    app.router.add_post(_ITEMS_PATH, _post_item)
    app.router.add_put(_ITEMS_PATH, _put_item)
    app.router.add_delete(_ITEMS_PATH, _delete_item)
    return app


def _database(path: Path, busy_timeout: float) -> Callable[[web.Application], AsyncIterator[None]]:
    async def database(app: web.Application) -> AsyncIterator[None]:
        inventory = await Inventory.open(path, busy_timeout=busy_timeout)
        app[INVENTORY] = inventory
        try:
            yield
        finally:
            await inventory.close()

    return database


async def _healthz(request: web.Request) -> web.Response:
    try:
        await request.app[INVENTORY].ping()
    except sqlite3.Error as exc:
        log.warning("health check failed: %s", exc)
        raise Unavailable("database is not answering") from None
    return web.json_response({"status": "ok"})


async def _get_items(request: web.Request) -> web.Response:
    inventory = request.app[INVENTORY]
    name = _query_name(request)
    if name is None:
        limit, offset = records.parse_paging(
            _query_param(request, "limit"), _query_param(request, "offset")
        )
        items, total = await inventory.page(limit, offset)
        return web.json_response({"items": items, "limit": limit, "offset": offset, "total": total})
    record = await inventory.get(name)
    if record is None:
        raise NotFound(f"no item named {name!r}")
    return web.json_response(record)


async def _post_item(request: web.Request) -> web.Response:
    record = records.named_record(
        await _read_record(request), _query_name(request), body_name_required=True
    )
    name = record["name"]
    if not await request.app[INVENTORY].insert(name, records.encode_record(record)):
        raise Conflict(f"an item named {name!r} already exists")
    return web.json_response(record, status=201, headers={"Location": _location(name)})


async def _put_item(request: web.Request) -> web.Response:
    record = records.named_record(
        await _read_record(request), _query_name(request), body_name_required=False
    )
    name = record["name"]
    created = await request.app[INVENTORY].put(name, records.encode_record(record))
    if created:
        return web.json_response(record, status=201, headers={"Location": _location(name)})
    return web.json_response(record)


async def _delete_item(request: web.Request) -> web.Response:
    name = _query_name(request)
    if name is None:
        raise BadRequest("missing name: give ?name= in the query")
    record = await request.app[INVENTORY].delete(name)
    if record is None:
        raise NotFound(f"no item named {name!r}")
    return web.json_response(record)


def _query_param(request: web.Request, key: str) -> str | None:
    values = request.rel_url.query.getall(key, [])
    if len(values) > 1:
        raise BadRequest(f"query parameter {key!r} is given more than once")
    return values[0] if values else None


def _query_name(request: web.Request) -> str | None:
    name = _query_param(request, "name")
    return None if name is None else records.check_name(name)


def _location(name: str) -> str:
    return str(URL(_ITEMS_PATH).with_query(name=name))


async def _read_record(request: web.Request) -> records.Record:
    """The request's body as a validated record (415, 413 and 400 as appropriate)."""
    charset = (request.charset or "utf-8").lower()
    if request.content_type != "application/json" or charset not in ("utf-8", "utf8"):
        declared = request.headers.get("Content-Type", "none")
        raise UnsupportedMediaType(
            f"Content-Type must be application/json (UTF-8), not {declared[:60]!r}"
        )
    max_body = request.app[_MAX_BODY]
    too_large = f"request body is larger than {max_body} bytes"
    if request.content_length is not None and request.content_length > max_body:
        raise PayloadTooLarge(too_large)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:  # a chunked body that outgrew client_max_size
        raise PayloadTooLarge(too_large) from None
    return records.parse_record(body)


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one error hook: every error leaves as ``{"error": ..., "status": ...}``."""
    try:
        return await handler(request)
    except InventoryError as exc:
        headers = {"Retry-After": "1"} if isinstance(exc, Unavailable) else None
        return _error(exc.status, exc.message, headers)
    except web.HTTPException as exc:  # raised by aiohttp: unknown route, wrong method
        if exc.status < 400:
            raise
        return _error(exc.status, _describe(request, exc), _allow_header(exc))
    except sqlite3.OperationalError as exc:
        if (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF != sqlite3.SQLITE_BUSY:
            return _internal_error(request)
        log.warning("%s %s: database busy: %s", request.method, request.path, exc)
        return _error(503, "database is busy, retry later", {"Retry-After": "1"})
    except ConnectionResetError:  # the client went away mid-request; aiohttp handles it
        raise
    except Exception:
        return _internal_error(request)


def _internal_error(request: web.Request) -> web.Response:
    log.exception("internal error handling %s %s", request.method, request.path)
    return _error(500, "internal error")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status, headers=headers)


def _describe(request: web.Request, exc: web.HTTPException) -> str:
    path = request.path[:200]
    if isinstance(exc, web.HTTPNotFound):
        return f"no route for {path!r}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"method {exc.method} is not allowed on {path!r}; allowed: {allowed}"
    return exc.reason


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return None if allow is None else {"Allow": allow}
