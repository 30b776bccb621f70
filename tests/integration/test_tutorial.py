"""The README's tutorial session and the role matrix, against real processes (or GATEWAY_URL)."""

from __future__ import annotations

import asyncio
import sys
import uuid

import aiohttp
import pytest

from tests.helpers import PASSWORDS, ROOT, basic

sys.path.insert(0, str(ROOT / "scripts"))
import readme_session  # noqa: E402  (scripts/ is not a package)

sys.path.remove(str(ROOT / "scripts"))

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


async def test_tutorial_session(http, stack, tmp_path) -> None:
    """The README's tutorial session (its first ``<!-- session -->`` block), command by
    command with curl, must print what the README shows: the README is the one source."""
    await call(http, "DELETE", f"/api/inventory?name={HULK}", "manager")  # idempotent start
    block = readme_session.parse(readme_session.README.read_text())[0]
    assert any("X-Men" in s.command for s in block.steps), "the first session is the tutorial"
    actual = await asyncio.to_thread(
        readme_session.run_block, block, tmp_path, stack.gateway_url, stack.backend_url
    )
    problems = readme_session.differences(block, actual)
    assert not problems, "\n".join(problems)


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
    status, _, _ = await call(
        http, "POST", "/api/inventory", "manager", json={"name": name, "count": 1}
    )
    assert status == 201
    try:
        body = {"name": name, "count": 2} if method in ("POST", "PUT") else None
        target = "/api/inventory" if method == "POST" else f"/api/inventory?name={name}"
        if method == "POST":
            body = {"name": name + "-new", "count": 2}
        async with http.request(method, target.lstrip("/"), json=body, headers=auth(user)) as r:
            status = r.status
        if method in EXPECTED[user]:
            assert status in (200, 201), (user, method, status)
        else:
            assert status == 403, (user, method, status)
    finally:
        for n in (name, name + "-new"):
            await call(http, "DELETE", f"/api/inventory?name={n}", "manager")
