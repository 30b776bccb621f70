"""The inventory backend through its real app (SQLite file in a tmp dir), and its process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from inventory_backend import create_app
from inventory_backend.__main__ import parse_args
from inventory_backend.app import INVENTORY
from inventory_backend.records import parse_record
from tests.helpers import eventually

Client = TestClient[Any, Any]
ITEMS = "/api/inventory"
SEED = {"name": "X-Men 1 (1991)", "count": 5000}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, tmp_path: Path) -> Client:
    return await aiohttp_client(create_app(tmp_path / "inv.db"))


async def send(
    client: Client, method: str, body: Any, *, query: str = ""
) -> aiohttp.ClientResponse:
    return await client.request(method, ITEMS + query, data=json.dumps(body), headers=JSON)


async def assert_error(resp: aiohttp.ClientResponse, status: int) -> str:
    """The response is the JSON error shape with ``status``; returns the message."""
    assert resp.status == status
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body == {"error": body["error"], "status": status}
    assert isinstance(body["error"], str) and body["error"] and "\n" not in body["error"]
    return body["error"]


# --- seeding and health ------------------------------------------------------------------


async def test_new_database_is_seeded_with_the_single_item(client: Client) -> None:
    resp = await client.get(ITEMS)
    assert resp.status == 200
    assert await resp.json() == {"items": [SEED], "limit": 100, "offset": 0, "total": 1}


async def test_existing_empty_database_is_not_seeded_again(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    first = await aiohttp_client(create_app(tmp_path / "inv.db"))
    assert (await first.delete(ITEMS, params={"name": SEED["name"]})).status == 200
    await first.close()

    second = await aiohttp_client(create_app(tmp_path / "inv.db"))
    body = await (await second.get(ITEMS)).json()
    assert body["items"] == [] and body["total"] == 0


async def test_missing_parent_directory_is_created(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(tmp_path / "a" / "b" / "inv.db"))
    assert (await client.get("/healthz")).status == 200
    assert (tmp_path / "a" / "b" / "inv.db").is_file()


async def test_database_file_is_in_wal_mode(client: Client, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "inv.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_healthz_answers_ok(client: Client) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


# --- reading -------------------------------------------------------------------------------


async def test_get_by_name_returns_the_record(client: Client) -> None:
    resp = await client.get(ITEMS, params={"name": SEED["name"]})
    assert resp.status == 200
    assert await resp.json() == SEED


async def test_get_unknown_name_is_404(client: Client) -> None:
    message = await assert_error(await client.get(ITEMS, params={"name": "nope"}), 404)
    assert "nope" in message


async def test_list_is_sorted_by_name_and_paged_with_total(client: Client) -> None:
    names = ["delta", "Alpha", "charlie", "bravo", "échelle", "a"]
    for name in names:
        assert (await send(client, "POST", {"name": name})).status == 201
    everything = sorted([*names, SEED["name"]])

    body = await (await client.get(ITEMS)).json()
    assert [item["name"] for item in body["items"]] == everything
    assert (body["limit"], body["offset"], body["total"]) == (100, 0, 7)

    body = await (await client.get(ITEMS, params={"limit": "2", "offset": "3"})).json()
    assert [item["name"] for item in body["items"]] == everything[3:5]
    assert (body["limit"], body["offset"], body["total"]) == (2, 3, 7)

    body = await (await client.get(ITEMS, params={"limit": "0", "offset": "99"})).json()
    assert body == {"items": [], "limit": 0, "offset": 99, "total": 7}


@pytest.mark.parametrize(
    "query",
    [
        "limit=abc",
        "limit=-1",
        "limit=1001",
        "limit=1.5",
        "limit=",
        "limit=+5",
        "limit=%205",
        "limit=5_0",
        "limit=%D9%A3",  # ARABIC-INDIC DIGIT THREE: int() takes it, we do not
        "offset=-1",
        "offset=x",
        "offset=9223372036854775808",
        "offset=" + "9" * 5000,
        "limit=1&limit=2",
        "name=a&name=b",
        "name=",
        "name=" + "n" * 257,
    ],
)
async def test_bad_query_parameters_are_400(client: Client, query: str) -> None:
    await assert_error(await client.get(f"{ITEMS}?{query}"), 400)


# --- writing -------------------------------------------------------------------------------


async def test_post_creates_with_201_and_location(client: Client) -> None:
    resp = await send(client, "POST", {"name": "Spawn #1", "count": 3})
    assert resp.status == 201
    assert await resp.json() == {"name": "Spawn #1", "count": 3}
    assert resp.headers["Location"] == "/api/inventory?name=Spawn+%231"
    resp = await client.get(resp.headers["Location"])
    assert await resp.json() == {"name": "Spawn #1", "count": 3}


async def test_post_of_existing_name_is_409_and_keeps_the_original(client: Client) -> None:
    await assert_error(await send(client, "POST", {"name": SEED["name"], "count": 1}), 409)
    assert await (await client.get(ITEMS, params={"name": SEED["name"]})).json() == SEED


async def test_post_takes_the_name_from_the_body_only(client: Client) -> None:
    await assert_error(await send(client, "POST", {"count": 1}, query="?name=a"), 400)
    await assert_error(await send(client, "POST", {"name": "b"}, query="?name=a"), 400)
    assert (await send(client, "POST", {"name": "a"}, query="?name=a")).status == 201


async def test_put_creates_with_201_then_replaces_with_200(client: Client) -> None:
    resp = await send(client, "PUT", {"name": "a", "count": 1, "tag": "x"}, query="?name=a")
    assert resp.status == 201
    assert await resp.json() == {"name": "a", "count": 1, "tag": "x"}

    resp = await send(client, "PUT", {"name": "a", "count": 2}, query="?name=a")
    assert resp.status == 200
    assert await resp.json() == {"name": "a", "count": 2}
    # Replaced, not merged: the old "tag" is gone.
    stored = await (await client.get(ITEMS, params={"name": "a"})).json()
    assert stored == {"name": "a", "count": 2}


async def test_put_takes_the_name_from_the_query_or_the_body(client: Client) -> None:
    resp = await send(client, "PUT", {"count": 7}, query="?name=from-query")
    assert resp.status == 201
    assert await resp.json() == {"name": "from-query", "count": 7}
    resp = await send(client, "PUT", {"name": "from-body"})
    assert resp.status == 201
    assert await (await client.get(ITEMS, params={"name": "from-body"})).json() == {
        "name": "from-body"
    }


async def test_put_rejects_differing_or_missing_names(client: Client) -> None:
    await assert_error(await send(client, "PUT", {"name": "b"}, query="?name=a"), 400)
    await assert_error(await send(client, "PUT", {"count": 1}), 400)
    assert (await (await client.get(ITEMS)).json())["total"] == 1


async def test_delete_returns_the_record_and_then_it_is_gone(client: Client) -> None:
    resp = await client.delete(ITEMS, params={"name": SEED["name"]})
    assert resp.status == 200
    assert await resp.json() == SEED
    await assert_error(await client.get(ITEMS, params={"name": SEED["name"]}), 404)
    await assert_error(await client.delete(ITEMS, params={"name": SEED["name"]}), 404)


async def test_delete_without_name_is_400(client: Client) -> None:
    await assert_error(await client.delete(ITEMS), 400)


async def test_other_fields_are_preserved_exactly(client: Client) -> None:
    record = {
        "name": 'Ünïcode ✓ "quoted" \\ \n',
        "count": 0,
        "price": 2.5,
        "big": 10**30,
        "tags": ["a", None, True, {"deep": [[], {}]}],
        "note": None,
        "lone": "\ud800",
    }
    assert (await send(client, "PUT", record)).status == 201
    stored = await (await client.get(ITEMS, params={"name": record["name"]})).json()
    assert stored == record
    assert list(stored) == list(record)  # key order too


# --- every client mistake is a JSON error, never a 500 ----------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest.mark.parametrize(
    "body",
    [
        b'{"name": "a",',
        b"",
        b"[]",
        b'[{"name": "a"}]',
        b'"a"',
        b"null",
        b"{}",
        b'{"count": 1}',
        b'{"name": ""}',
        b'{"name": null}',
        b'{"name": 5}',
        b'{"name": "' + b"n" * 257 + b'"}',
        b'{"name": "\\ud800"}',
        b'{"name": "a", "count": -1}',
        b'{"name": "a", "count": "5"}',
        b'{"name": "a", "count": true}',
        b'{"name": "a", "count": 1.5}',
        b'{"name": "a", "count": null}',
        b'{"name": "a", "count": NaN}',
        b'{"name": "a", "x": Infinity}',
        b'{"name": "a", "name": "b"}',
        b'{"name": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"name": "\xff"}',
        b'{"name": "a", "n": ' + b"9" * 5000 + b"}",
    ],
)
async def test_bad_body_is_400(client: Client, method: str, body: bytes) -> None:
    resp = await client.request(method, ITEMS, data=body, headers=JSON)
    await assert_error(resp, 400)
    assert (await (await client.get(ITEMS)).json())["total"] == 1


async def test_oversize_body_is_413(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(tmp_path / "inv.db", max_body=64))
    body = json.dumps({"name": "big", "x": "y" * 100}).encode()
    await assert_error(await client.post(ITEMS, data=body, headers=JSON), 413)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length to check up front
        for i in range(0, len(body), 16):
            yield body[i : i + 16]

    await assert_error(await client.put(ITEMS, data=chunked(), headers=JSON), 413)
    await assert_error(await client.get(ITEMS, params={"name": "big"}), 404)
    assert (await send(client, "POST", {"name": "small"})).status == 201


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1", None],
)
async def test_body_that_is_not_json_is_415(client: Client, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    resp = await client.post(
        ITEMS, data=b'{"name": "a"}', headers=headers, skip_auto_headers=["Content-Type"]
    )
    await assert_error(resp, 415)


async def test_json_with_utf8_charset_is_accepted(client: Client) -> None:
    headers = {"Content-Type": "application/json; charset=UTF-8"}
    resp = await client.post(ITEMS, data='{"name": "é"}'.encode(), headers=headers)
    assert resp.status == 201


@pytest.mark.parametrize("path", ["/", "/api", "/api/inventory/", "/api/inventory/x", "/healthz/x"])
async def test_unknown_route_is_json_404(client: Client, path: str) -> None:
    await assert_error(await client.get(path), 404)


@pytest.mark.parametrize(("method", "path"), [("PATCH", ITEMS), ("POST", "/healthz")])
async def test_wrong_method_is_json_405_with_allow(client: Client, method: str, path: str) -> None:
    resp = await client.request(method, path)
    await assert_error(resp, 405)
    assert "GET" in resp.headers["Allow"]


async def test_unexpected_error_is_json_500_with_traceback_only_in_the_log(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(name: str) -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(client.app[INVENTORY], "get", broken)
    with caplog.at_level(logging.ERROR, logger="inventory_backend"):
        resp = await client.get(ITEMS, params={"name": "a"})
        assert resp.status == 500
        assert await resp.json() == {"error": "internal error", "status": 500}
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)


async def test_rejected_write_leaves_the_existing_record_unchanged(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(tmp_path / "inv.db", max_body=200))
    original = {"name": "a", "count": 1}
    assert (await send(client, "PUT", original)).status == 201
    attempts = [
        b'{"name": "a", "count": 2, "x": ',
        b'{"name": "a", "count": -2}',
        json.dumps({"name": "a", "count": 2, "pad": "x" * 300}).encode(),
    ]
    for body in attempts:
        resp = await client.put(ITEMS, data=body, headers=JSON, params={"name": "a"})
        assert resp.status in (400, 413)
    assert await (await client.get(ITEMS, params={"name": "a"})).json() == original


# --- record validation as a property ------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    name=st.text(min_size=1, max_size=256),
    count=st.none() | st.integers(min_value=0),
    extra=st.dictionaries(
        st.text().filter(lambda k: k not in ("name", "count")), json_values, max_size=4
    ),
)
def test_any_valid_record_round_trips_through_parsing(
    name: str, count: int | None, extra: dict[str, Any]
) -> None:
    record = {"name": name, **extra} if count is None else {"name": name, "count": count, **extra}
    assert parse_record(json.dumps(record).encode()) == record


# --- command line ---------------------------------------------------------------------------


def test_flags_win_over_environment_which_wins_over_defaults() -> None:
    env = {"INVENTORY_DB": "/env.db", "INVENTORY_HOST": "0.0.0.0", "INVENTORY_PORT": "9000"}
    args = parse_args(["--port", "0", "--db", "/flag.db"], env)
    assert (args.db, args.host, args.port) == (Path("/flag.db"), "0.0.0.0", 0)
    args = parse_args([], {})
    assert (args.db, args.host, args.port, args.log_level) == (
        Path("data/inventory.db"),
        "127.0.0.1",
        8081,
        "info",
    )


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--port", "x"], {}),
        (["--port", "65536"], {}),
        (["--bogus"], {}),
        (["--log-level", "loud"], {}),
        ([], {"INVENTORY_PORT": "http"}),
    ],
)
def test_bad_flags_or_environment_exit_2_with_one_error_line(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv, env)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without INVENTORY_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    return {**env, **(extra or {})}


async def start_backend(
    *args: str, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``python -m inventory_backend ARGS`` and return it with its base URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "inventory_backend",
        *args,
        env=clean_env(env),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    prefix = b"inventory_backend listening on "
    deadline = time.monotonic() + 15
    try:
        while True:
            line = await asyncio.wait_for(proc.stderr.readline(), deadline - time.monotonic())
            if not line:
                raise AssertionError(f"backend exited with {await proc.wait()} before listening")
            if line.startswith(prefix):
                return proc, line[len(prefix) :].decode().strip()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise


async def wait_healthy(session: aiohttp.ClientSession, url: str) -> None:

    async def healthy() -> bool:
        try:
            async with session.get(f"{url}/healthz") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await eventually(healthy, 10, 0.05, what="backend never became healthy")


async def stop_backend(proc: asyncio.subprocess.Process, signum: int) -> tuple[int, str]:
    proc.send_signal(signum)
    _, stderr = await asyncio.wait_for(proc.communicate(), 15)
    return proc.returncode if proc.returncode is not None else -1, stderr.decode()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_process_serves_on_an_ephemeral_port_and_stops_cleanly(
    tmp_path: Path, signum: int
) -> None:
    proc, url = await start_backend("--port", "0", "--db", str(tmp_path / "d" / "inv.db"))
    try:
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, url)
            async with session.get(f"{url}{ITEMS}", params={"name": SEED["name"]}) as resp:
                assert resp.status == 200
                assert await resp.json() == SEED
        code, stderr = await stop_backend(proc, signum)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "d" / "inv.db-wal").exists()  # closed cleanly, WAL checkpointed


async def test_process_reads_its_settings_from_the_environment(tmp_path: Path) -> None:
    env = {"INVENTORY_DB": str(tmp_path / "env.db"), "INVENTORY_PORT": "0"}
    proc, url = await start_backend("--log-level", "warning", env=env)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, url)
        code, stderr = await stop_backend(proc, signal.SIGTERM)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0 and (tmp_path / "env.db").is_file()
    assert "Traceback" not in stderr


@pytest.mark.parametrize("kind", ["directory", "not-sqlite", "parent-is-a-file"])
async def test_process_with_unusable_database_exits_1_with_one_line(
    tmp_path: Path, kind: str
) -> None:
    db = tmp_path / "inv.db"
    if kind == "directory":
        db.mkdir()
    elif kind == "not-sqlite":
        db.write_bytes(b"this is not a database, just some text" * 100)
    else:
        (tmp_path / "file").write_text("x")
        db = tmp_path / "file" / "inv.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "inventory_backend",
        "--port",
        "0",
        "--db",
        str(db),
        env=clean_env(),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 15)
    lines = stderr.decode().splitlines()
    assert proc.returncode == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"inventory_backend: cannot open database {db}: ")
