"""The tutorial's curl session and the role matrix, against real processes (or GATEWAY_URL)."""

from __future__ import annotations

import uuid

import aiohttp
import pytest

from tests.helpers import PASSWORDS, basic

HULK = "Incredible Hulk 2"


def auth(user: str, password: str | None = None) -> dict[str, str]:
    return basic(user, PASSWORDS[user] if password is None else password)


@pytest.fixture
async def http(stack):
    async with aiohttp.ClientSession(base_url=stack.gateway_url + "/") as s:
        yield s


async def call(http, method, target, user=None, password=None, json=None):
    headers = auth(user, password) if user else {}
    async with http.request(method, target.lstrip("/"), json=json, headers=headers) as r:
        body = await r.json(content_type=None) if r.status != 204 else None
        return r.status, body, r.headers


async def test_tutorial_session(http) -> None:
    await call(http, "DELETE", f"/api/inventory?name={HULK}", "manager")   # idempotent start

    status, body, _ = await call(http, "GET", "/api/inventory?name=X-Men+1+(1991)", "sales")
    assert (status, body) == (200, {"name": "X-Men 1 (1991)", "count": 5000})

    new = {"name": HULK, "count": 2}
    status, body, _ = await call(http, "POST", "/api/inventory", "sales", json=new)
    assert status == 403 and body["status"] == 403

    status, body, _ = await call(http, "POST", "/api/inventory", "manager", json=new)
    assert (status, body) == (201, new)

    status, body, _ = await call(http, "PUT", f"/api/inventory?name={HULK}", "manager",
                                 json={"name": HULK, "count": 1})
    assert (status, body) == (200, {"name": HULK, "count": 1})

    status, body, _ = await call(http, "PUT", f"/api/inventory?name={HULK}", "warehouse",
                                 json={"name": HULK, "count": 7})
    assert (status, body) == (200, {"name": HULK, "count": 7})

    status, _, _ = await call(http, "POST", "/api/inventory", "warehouse", json=new)
    assert status == 403
    status, _, _ = await call(http, "DELETE", f"/api/inventory?name={HULK}", "warehouse")
    assert status == 403

    status, body, _ = await call(http, "DELETE", f"/api/inventory?name={HULK}", "manager")
    assert status == 200

    status, body, headers = await call(http, "GET", "/api/inventory")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith('Basic realm="inventory"')

    status, body, _ = await call(http, "GET", "/api/inventory", "sales", "wrong")
    assert status == 401 and body["status"] == 401


EXPECTED = {
    "sales": {"GET", "HEAD"},
    "warehouse": {"GET", "HEAD", "PUT"},
    "manager": {"GET", "HEAD", "PUT", "POST", "DELETE"},
    "ops": set(),
}


@pytest.mark.parametrize("user", sorted(EXPECTED))
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE"])
async def test_role_matrix_against_the_real_backend(http, user, method) -> None:
    name = f"matrix-{uuid.uuid4().hex[:8]}"
    status, _, _ = await call(http, "POST", "/api/inventory", "manager",
                              json={"name": name, "count": 1})
    assert status == 201
    try:
        body = {"name": name, "count": 2} if method in ("POST", "PUT") else None
        target = "/api/inventory" if method == "POST" else f"/api/inventory?name={name}"
        if method == "POST":
            body = {"name": name + "-new", "count": 2}
        async with http.request(method, target.lstrip("/"), json=body,
                                headers=auth(user)) as r:
            status = r.status
        if method in EXPECTED[user]:
            assert status in (200, 201), (user, method, status)
        else:
            assert status == 403, (user, method, status)
    finally:
        for n in (name, name + "-new"):
            await call(http, "DELETE", f"/api/inventory?name={n}", "manager")
