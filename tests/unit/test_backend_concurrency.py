"""Concurrent writes to the inventory backend: nothing lost, nothing half-written."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from inventory_backend import create_app

Client = TestClient[Any, Any]
ITEMS = "/api/inventory"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, tmp_path: Path) -> Client:
    return await aiohttp_client(create_app(tmp_path / "inv.db"))


def stored_rows(db: Path) -> dict[str, Any]:
    """Every row in the file, read with a separate connection; each body must be JSON."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT name, body FROM items").fetchall()
    return {name: json.loads(body) for name, body in rows}


async def test_concurrent_posts_of_distinct_names_all_land(client: Client, tmp_path: Path) -> None:
    async def post(i: int) -> int:
        body = json.dumps({"name": f"item-{i:03d}", "count": i})
        return (await client.post(ITEMS, data=body, headers=JSON)).status

    statuses = await asyncio.gather(*(post(i) for i in range(200)))

    assert statuses == [201] * 200
    rows = stored_rows(tmp_path / "inv.db")
    assert len(rows) == 201  # with the seed item
    assert all(rows[f"item-{i:03d}"] == {"name": f"item-{i:03d}", "count": i} for i in range(200))
    assert (await (await client.get(ITEMS, params={"limit": "0"})).json())["total"] == 201


async def test_concurrent_puts_to_few_names_create_each_exactly_once(
    client: Client, tmp_path: Path
) -> None:
    names = [f"hot-{k}" for k in range(5)]

    async def put(i: int) -> tuple[str, int]:
        name = names[i % len(names)]
        body = json.dumps({"count": i, "writer": i, "padding": "x" * (i * 37 % 2000)})
        resp = await client.put(ITEMS, data=body, headers=JSON, params={"name": name})
        return name, resp.status

    results = await asyncio.gather(*(put(i) for i in range(200)))

    assert Counter(status for _, status in results) == {201: len(names), 200: 200 - len(names)}
    assert {name for name, status in results if status == 201} == set(names)
    rows = stored_rows(tmp_path / "inv.db")
    for name in names:
        record = rows[name]
        # Whole records only: the final row is exactly one writer's body.
        assert record == {
            "name": name,
            "count": record["writer"],
            "writer": record["writer"],
            "padding": "x" * (record["writer"] * 37 % 2000),
        }
        assert names[record["writer"] % len(names)] == name


async def test_concurrent_posts_of_one_name_admit_exactly_one(client: Client) -> None:
    async def post(i: int) -> int:
        body = json.dumps({"name": "contested", "winner": i})
        return (await client.post(ITEMS, data=body, headers=JSON)).status

    statuses = await asyncio.gather(*(post(i) for i in range(50)))

    assert Counter(statuses) == {201: 1, 409: 49}


async def test_write_blocked_by_another_process_lock_is_503_and_writes_nothing(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    db = tmp_path / "inv.db"
    client = await aiohttp_client(create_app(db, busy_timeout=0.05))
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # holds the write lock, like a second writer would
        resp = await client.post(ITEMS, data=json.dumps({"name": "blocked"}), headers=JSON)
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert await resp.json() == {"error": "database is busy, retry later", "status": 503}
        # WAL: readers are not blocked by the writer.
        assert (await client.get(ITEMS, params={"limit": "0"})).status == 200
        assert (await client.get("/healthz")).status == 200
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert (await client.get(ITEMS, params={"name": "blocked"})).status == 404
    assert "blocked" not in stored_rows(db)
    resp = await client.post(ITEMS, data=json.dumps({"name": "blocked"}), headers=JSON)
    assert resp.status == 201
