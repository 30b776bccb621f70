"""SQLite storage of inventory records, kept off the event loop.

One ``ThreadPoolExecutor(max_workers=1)`` owns the only connection: every call runs on
that thread, so this process's writes are serialized and none is lost. Each write is
its own ``BEGIN IMMEDIATE`` transaction, which also serializes it against other
processes using the same file and makes it all-or-nothing. The file is in WAL mode
(readers never wait for the writer) with ``synchronous=NORMAL``; a writer that finds
the file locked waits up to the busy timeout, then gets ``sqlite3.OperationalError``
(``SQLITE_BUSY``).

Records are stored as JSON text keyed by name; the table refuses text that is not
valid JSON.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

from .errors import StorageError

__all__ = ["SEED", "Inventory"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
Record = dict[str, Any]

#: The records a new database starts with (and an existing one never gets again).
SEED: Final[tuple[Record, ...]] = ({"name": "X-Men 1 (1991)", "count": 5000},)

_SCHEMA: Final = """
CREATE TABLE items (
    name TEXT PRIMARY KEY NOT NULL,
    body TEXT NOT NULL CHECK (json_valid(body))
) STRICT
"""


class Inventory:
    """Inventory records keyed by name in one SQLite file; open with ``Inventory.open``."""

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._conn = conn
        self._executor = executor

    @classmethod
    async def open(cls, path: Path, *, busy_timeout: float = 5.0) -> Inventory:
        """Open (creating and seeding it if new) the database at ``path``.

        Raises ``StorageError`` with a one-line reason when that is impossible.
        """
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inventory-db")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, path, busy_timeout)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(conn, executor)

    async def close(self) -> None:
        """Close the connection (on its own thread) and stop the thread."""
        try:
            await self._call(_close)
        finally:
            self._executor.shutdown(wait=True)

    async def ping(self) -> None:
        """Run a trivial query; raises ``sqlite3.Error`` if the database does not answer."""
        await self._call(_ping)

    async def get(self, name: str) -> Record | None:
        """The record called ``name``, or None."""
        return await self._call(_get, name)

    async def page(self, limit: int, offset: int) -> tuple[list[Record], int]:
        """Up to ``limit`` records sorted by name from ``offset``, and the total count."""
        return await self._call(_page, limit, offset)

    async def insert(self, name: str, body: str) -> bool:
        """Store a new record; False (and nothing written) if ``name`` exists."""
        return await self._call(_insert, name, body)

    async def put(self, name: str, body: str) -> bool:
        """Create or replace the record ``name``; True if it was created."""
        return await self._call(_put, name, body)

    async def delete(self, name: str) -> Record | None:
        """Delete the record ``name`` and return it, or None if there was none."""
        return await self._call(_delete, name)

    async def _call(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        loop = asyncio.get_running_loop()
        job = functools.partial(fn, self._conn, *args, **kwargs)
        return await loop.run_in_executor(self._executor, job)


# Everything below runs on the database thread.


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = f"cannot create directory {path.parent}: {exc.strerror or exc}"
        raise StorageError(f"cannot open database {path}: {reason}") from None
    try:
        # isolation_level=None: transactions are exactly the BEGIN/COMMIT written here.
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path}: {exc}") from None
    try:
        (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode != "wal":
            log.warning("database %s stays in journal mode %s, not wal", path, mode)
        conn.execute("PRAGMA synchronous=NORMAL")
        created = _ensure_schema(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise StorageError(f"cannot open database {path}: {exc}") from None
    log.info("opened database %s%s", path, " (new, seeded)" if created else "")
    return conn


def _ensure_schema(conn: sqlite3.Connection) -> bool:
    """Create and seed the table if the database is new; True if it was."""
    with _transaction(conn):
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'items'"
        if conn.execute(query).fetchone() is not None:
            return False
        conn.execute(_SCHEMA)
        conn.executemany(
            "INSERT INTO items (name, body) VALUES (?, ?)",
            [(record["name"], json.dumps(record)) for record in SEED],
        )
        return True


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """Run the block in one transaction: committed if it returns, rolled back if it raises."""
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise


def _close(conn: sqlite3.Connection) -> None:
    conn.close()


def _ping(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT 1 FROM items LIMIT 1").fetchall()


def _get(conn: sqlite3.Connection, name: str) -> Record | None:
    row = conn.execute("SELECT body FROM items WHERE name = ?", (name,)).fetchone()
    return None if row is None else _load(row[0])


def _page(conn: sqlite3.Connection, limit: int, offset: int) -> tuple[list[Record], int]:
    with _transaction(conn, "BEGIN"):  # one snapshot for the page and its total
        (total,) = conn.execute("SELECT count(*) FROM items").fetchone()
        rows = conn.execute(
            "SELECT body FROM items ORDER BY name LIMIT ? OFFSET ?", (limit, offset)
        ).fetchall()
    return [_load(body) for (body,) in rows], total


def _insert(conn: sqlite3.Connection, name: str, body: str) -> bool:
    with _transaction(conn):
        cursor = conn.execute(
            "INSERT INTO items (name, body) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            (name, body),
        )
        return cursor.rowcount == 1


def _put(conn: sqlite3.Connection, name: str, body: str) -> bool:
    with _transaction(conn):
        existed = conn.execute("SELECT 1 FROM items WHERE name = ?", (name,)).fetchone()
        conn.execute(
            "INSERT INTO items (name, body) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET body = excluded.body",
            (name, body),
        )
        return existed is None


def _delete(conn: sqlite3.Connection, name: str) -> Record | None:
    with _transaction(conn):
        row = conn.execute("SELECT body FROM items WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        conn.execute("DELETE FROM items WHERE name = ?", (name,))
        return _load(row[0])


def _load(body: str) -> Record:
    record: Record = json.loads(body)
    return record
