"""The gateway in process (real create_app, real bcrypt) in front of a recording upstream."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from aiohttp import web
from yarl import URL

from tests.conftest import error_of
from tests.helpers import PASSWORDS, basic, eventually

ITEM = "/api/inventory?name=X-Men+1+(1991)"
BODY = json.dumps({"name": "X-Men 1 (1991)", "count": 3})

# role × method on /api/inventory: the tutorial's matrix (HEAD rides on GET).
MATRIX = {
    "sales": {"GET": 200, "HEAD": 200, "POST": 403, "PUT": 403, "DELETE": 403},
    "warehouse": {"GET": 200, "HEAD": 200, "POST": 403, "PUT": 200, "DELETE": 403},
    "manager": {"GET": 200, "HEAD": 200, "POST": 200, "PUT": 200, "DELETE": 200},
    "ops": {"GET": 403, "HEAD": 403, "POST": 403, "PUT": 403, "DELETE": 403},
}


@pytest.mark.parametrize(
    "user,method,status", [(u, m, s) for u, row in MATRIX.items() for m, s in row.items()]
)
async def test_role_method_matrix(gateway, upstream, user, method, status) -> None:
    data = BODY if method in ("POST", "PUT") else None
    resp = await gateway.request(
        method,
        ITEM,
        data=data,
        headers={**basic(user, PASSWORDS[user]), "Content-Type": "application/json"},
    )
    assert resp.status == status
    if status == 200:
        assert upstream.seen[-1].method == method
        assert upstream.seen[-1].headers["X-Authenticated-User"] == user
    else:
        assert upstream.seen == []
        if method != "HEAD":
            assert error_of(await resp.read())["status"] == 403


async def test_sales_cannot_post_and_gets_403_not_401(gateway, upstream) -> None:
    resp = await gateway.post("/api/inventory", data=BODY, headers=basic("sales", "imsales"))
    assert resp.status == 403
    body = error_of(await resp.read())
    assert body["code"] == "forbidden" and "sales" in body["error"]
    assert "WWW-Authenticate" not in resp.headers


async def test_warehouse_may_only_set_quantities(gateway, upstream) -> None:
    ok = await gateway.put(
        ITEM,
        data=json.dumps({"name": "X", "count": 1}),
        headers=basic("warehouse", "imthewarehouse"),
    )
    assert ok.status == 200
    assert json.loads(upstream.seen[-1].body) == {"name": "X", "count": 1}
    for bad in ('{"name": "X", "price": 9}', "[1, 2]", "not json", ""):
        resp = await gateway.put(ITEM, data=bad, headers=basic("warehouse", "imthewarehouse"))
        assert resp.status == 403, bad
    assert len(upstream.seen) == 1


async def test_manager_may_put_any_fields(gateway, upstream) -> None:
    resp = await gateway.put(
        ITEM, data='{"name": "X", "price": 9}', headers=basic("manager", "imthemanager")
    )
    assert resp.status == 200


@pytest.mark.parametrize(
    "headers,why",
    [
        ({}, "no credentials"),
        (basic("sales", "wrong"), "wrong password"),
        (basic("nobody", "imsales"), "unknown user"),
        (basic("sales", ""), "empty password"),
        ({"Authorization": "Bearer abc"}, "not Basic"),
        ({"Authorization": "Basic"}, "no token"),
        ({"Authorization": "Basic !!!notbase64"}, "bad base64"),
        ({"Authorization": "Basic " + base64.b64encode(b"nocolon").decode()}, "no colon"),
        ({"Authorization": "Basic " + base64.b64encode(b":pw").decode()}, "empty user"),
        ({"Authorization": "Basic " + base64.b64encode(b"sales:\xff\xfe").decode()}, "not UTF-8"),
        ({"Authorization": "Basic " + "QUFB" * 2000}, "very long"),
    ],
)
async def test_bad_credentials_get_401_with_challenge(gateway, upstream, headers, why) -> None:
    resp = await gateway.get(ITEM, headers=headers)
    assert resp.status == 401, why
    assert resp.headers["WWW-Authenticate"].startswith('Basic realm="inventory"')
    assert error_of(await resp.read())["status"] == 401
    assert upstream.seen == []


async def test_unknown_user_and_wrong_password_look_the_same(gateway) -> None:
    a = await gateway.get(ITEM, headers=basic("nobody", "x"))
    b = await gateway.get(ITEM, headers=basic("sales", "x"))
    assert (a.status, await a.read()) == (b.status, await b.read())


async def test_password_containing_colons_works(gateway, upstream) -> None:
    resp = await gateway.get(ITEM, headers=basic("colon", "pa:ss:word"))
    assert resp.status == 200
    assert upstream.seen[-1].headers["X-Authenticated-User"] == "colon"


async def test_second_request_does_not_run_bcrypt_again(gateway) -> None:
    auth = gateway.gw.auth
    first = await gateway.get(ITEM, headers=basic("sales", "imsales"))
    assert first.status == 200
    checks = auth.bcrypt_checks
    assert checks == 1
    for _ in range(5):
        again = await gateway.get(ITEM, headers=basic("sales", "imsales"))
        assert again.status == 200
    assert auth.bcrypt_checks == checks
    # a different (wrong) password is not served from the cache
    assert (await gateway.get(ITEM, headers=basic("sales", "imsalez"))).status == 401
    assert auth.bcrypt_checks == checks + 1


async def test_upstream_sees_identity_not_credentials(gateway, upstream) -> None:
    resp = await gateway.get(
        ITEM,
        headers={
            **basic("warehouse", "imthewarehouse"),
            "X-Authenticated-User": "manager",
            "x-authenticated-roles": "manager",
            "X-Authenticated-Anything": "spoof",
            "X-Forwarded-For": "1.2.3.4",
            "Forwarded": "for=1.2.3.4",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "should-not-pass",
            "Proxy-Authorization": "Basic eDp5",
            "TE": "trailers",
            "X-Custom": "kept",
            "Host": "public.example",
        },
    )
    assert resp.status == 200
    seen = upstream.seen[-1]
    names = [n.lower() for n, _ in seen.header_items]
    assert "authorization" not in names and "proxy-authorization" not in names
    assert names.count("x-authenticated-user") == 1
    assert seen.headers["X-Authenticated-User"] == "warehouse"
    assert seen.headers["X-Authenticated-Roles"] == "sales,warehouse"
    assert "x-authenticated-anything" not in names
    assert "x-secret-hop" not in names and "te" not in names
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    assert "forwarded" not in names
    assert seen.headers["X-Forwarded-Proto"] == "http"
    assert seen.headers["X-Forwarded-Host"] == "public.example"
    assert seen.headers["X-Custom"] == "kept"


async def test_response_hop_by_hop_headers_are_removed(gateway) -> None:
    resp = await gateway.get(ITEM, headers=basic("sales", "imsales"))
    assert resp.headers["X-Upstream"] == "yes"
    assert "X-Upstream-Secret" not in resp.headers  # named in the upstream's Connection
    assert "Keep-Alive" not in resp.headers


async def test_query_string_passes_through_unchanged(gateway, upstream) -> None:
    raw = "/api/inventory?name=X-Men%201%20(1991)&b=%2F..%2F&c=a+b&empty="
    resp = await gateway.get(URL(raw, encoded=True), headers=basic("sales", "imsales"))
    assert resp.status == 200
    assert upstream.seen[-1].path_qs == raw


async def test_head_is_allowed_where_get_is(gateway, upstream) -> None:
    get = await gateway.get(ITEM, headers=basic("sales", "imsales"))
    resp = await gateway.head(ITEM, headers=basic("sales", "imsales"))
    assert resp.status == 200
    assert upstream.seen[-1].method == "HEAD"
    # the upstream's length of the GET body ("HEAD" is one letter longer than "GET" in it)
    assert int(resp.headers["Content-Length"]) == int(get.headers["Content-Length"]) + 1
    assert await resp.read() == b""


async def test_multi_megabyte_upload_is_streamed_not_buffered(gateway, upstream) -> None:
    started = upstream.events.setdefault("upload_started", asyncio.Event())
    total = 8 * 1024 * 1024
    sent = 0

    async def body():
        nonlocal sent
        chunk = b"z" * 65536
        yield chunk
        sent += len(chunk)
        # The upstream must see bytes before the client has sent the rest: no full buffering.
        await asyncio.wait_for(started.wait(), timeout=10)
        while sent < total:
            yield chunk
            sent += len(chunk)

    resp = await gateway.post("/test/upload", data=body(), headers=basic("tester", "testerpw"))
    assert resp.status == 200
    assert (await resp.json())["received"] == total


async def test_multi_megabyte_download_is_streamed(gateway, upstream) -> None:
    got_first = upstream.events.setdefault("client_got_first", asyncio.Event())
    resp = await gateway.get("/test/download", headers=basic("tester", "testerpw"))
    assert resp.status == 200
    first = await resp.content.readexactly(65536)  # arrives before the upstream sent the rest
    assert first == b"x" * 65536
    got_first.set()
    rest = await resp.read()
    assert len(rest) == 63 * 65536


async def test_body_over_the_limit_gets_413(make_gateway, upstream) -> None:
    gw = await make_gateway(max_body=1000)
    resp = await gw.post("/test/echo", data=b"a" * 5000, headers=basic("tester", "testerpw"))
    assert resp.status == 413
    assert error_of(await resp.read())["status"] == 413

    async def chunked():
        for _ in range(10):
            yield b"b" * 500

    resp = await gw.post("/test/echo", data=chunked(), headers=basic("tester", "testerpw"))
    assert resp.status == 413
    assert upstream.seen == []


async def test_upstream_down_gives_502_json(gateway, upstream) -> None:
    await upstream.server.close()
    resp = await gateway.get(ITEM, headers=basic("sales", "imsales"))
    assert resp.status == 502
    assert error_of(await resp.read())["code"] == "upstream_unreachable"


async def test_slow_upstream_gives_504_json(gateway) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    resp = await gateway.get("/test/slow", headers=basic("tester", "testerpw"))
    assert resp.status == 504
    assert error_of(await resp.read())["code"] == "upstream_timeout"
    assert loop.time() - t0 < 4  # the 1 s read timeout, not the upstream's 5 s


async def test_health_and_ready_need_no_credentials(gateway) -> None:
    assert (await gateway.get("/-/healthz")).status == 200
    resp = await gateway.get("/-/ready")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ready"


async def test_ready_is_503_when_upstream_is_down(gateway, upstream) -> None:
    await upstream.server.close()
    resp = await gateway.get("/-/ready")
    assert resp.status == 503


async def test_gateway_endpoints_are_authorized_by_policy(gateway, upstream) -> None:
    assert (await gateway.get("/-/status")).status == 401
    assert (await gateway.get("/-/status", headers=basic("manager", "imthemanager"))).status == 403
    resp = await gateway.get("/-/status", headers=basic("ops", "imtheops"))
    assert resp.status == 200
    assert len((await resp.json())["sha256"]) == 64
    resp = await gateway.get("/-/nothing", headers=basic("ops", "imtheops"))
    assert resp.status == 403  # ops is granted the three endpoints, nothing else under /-
    assert upstream.seen == []  # /-/ is the gateway's own: never forwarded


async def test_anonymous_request_is_401_even_for_unknown_paths(gateway, upstream) -> None:
    resp = await gateway.get("/anything/else")
    assert resp.status == 401


async def test_default_deny_for_paths_no_rule_names(gateway, upstream) -> None:
    for path in ("/api", "/api/inventory/1", "/api/inventoryx", "/API/inventory", "/"):
        resp = await gateway.get(path, headers=basic("manager", "imthemanager"))
        assert resp.status == 403, path
    assert upstream.seen == []


async def test_upstream_error_statuses_pass_through(make_gateway, tmp_path) -> None:
    from aiohttp.test_utils import TestServer

    async def teapot(request: web.Request) -> web.Response:
        return web.json_response({"error": "nope"}, status=409)

    up = web.Application()
    up.router.add_route("*", "/{t:.*}", teapot)
    server = TestServer(up)
    await server.start_server()
    try:
        gw = await make_gateway(upstream=str(server.make_url("")).rstrip("/"))
        resp = await gw.post("/api/inventory", data=BODY, headers=basic("manager", "imthemanager"))
        assert resp.status == 409
        assert await resp.json() == {"error": "nope"}
    finally:
        await server.close()


async def test_pool_retries_a_connection_the_upstream_closed_while_idle(
    aiohttp_server, make_gateway
) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    up_app = web.Application()
    up_app.router.add_route("*", "/{t:.*}", ok)
    up = await aiohttp_server(up_app, keepalive_timeout=0.05)
    gw = await make_gateway(upstream=str(up.make_url("")).rstrip("/"))
    assert (await gw.get(ITEM, headers=basic("sales", "imsales"))).status == 200
    pool = gw.gw.pool
    assert pool.idle == 1
    await eventually(lambda: pool.idle == 0)  # the upstream has closed it
    for _ in range(3):
        resp = await gw.get(ITEM, headers=basic("sales", "imsales"))
        assert resp.status == 200


async def test_every_connection_header_names_hop_by_hop_headers(gateway, upstream) -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict(basic("sales", "imsales"))
    headers.add("Connection", "keep-alive")
    headers.add("Connection", "X-Secret")
    headers.add("X-Secret", "s")
    assert (await gateway.get(ITEM, headers=headers)).status == 200
    assert "X-Secret" not in upstream.seen[-1].headers


async def test_underscored_header_names_are_dropped(gateway, upstream) -> None:
    resp = await gateway.get(
        ITEM,
        headers={
            **basic("sales", "imsales"),
            "X-Authenticated_User": "manager",
            "X_Forwarded_For": "6.6.6.6",
            "X-Fine": "yes",
        },
    )
    assert resp.status == 200
    names = [n.lower() for n, _ in upstream.seen[-1].header_items]
    assert not [n for n in names if "_" in n]
    assert upstream.seen[-1].headers["X-Fine"] == "yes"


async def test_malformed_host_is_refused_not_forwarded(gateway, upstream) -> None:
    resp = await gateway.get(
        ITEM, headers={**basic("sales", "imsales"), "Host": "evil.example, other"}
    )
    assert resp.status == 400  # RFC 9112 3.2
    assert upstream.seen == []


async def test_ready_names_a_down_upstream(make_gateway, upstream) -> None:
    gw = await make_gateway()
    await upstream.server.close()
    resp = await gw.get("/-/ready")
    assert resp.status == 503
    assert (await resp.json())["code"] == "upstream_down"


async def test_public_rule_for_health_endpoints_is_the_policys_decision(
    make_gateway, tmp_path
) -> None:
    """Without the public rule, /-/healthz needs credentials, as `explain` says."""
    from tests.helpers import policy_doc, write_policy

    doc = policy_doc()
    doc.pop("public")
    doc["tests"] = [
        t for t in doc.get("tests", []) if not t.get("path", "").startswith("/-/") or t.get("user")
    ]
    policy = write_policy(tmp_path / "nopublic.yaml", doc)
    gw = await make_gateway(policy=policy)
    assert (await gw.get("/-/healthz")).status == 401
    from gateway.policy import load_policy

    decision, _ = load_policy(policy).decide_request(None, "GET", "/-/healthz")
    assert not decision.allowed


async def test_one_client_cannot_hold_every_upstream_connection(make_gateway, upstream) -> None:
    """Two clients behind a trusted proxy: the first holds its share of the pool with slow
    requests; its next one is refused at once (503), the other client is still served."""
    import ipaddress

    gw = await make_gateway(
        pool_size=4,
        max_upstream_per_client=2,
        upstream_timeout=10.0,
        trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
    )
    tester = basic("tester", "testerpw")
    first = {**tester, "X-Forwarded-For": "10.0.0.1"}
    slow = [asyncio.ensure_future(gw.get("/test/slow", headers=first)) for _ in range(2)]
    await eventually(lambda: gw.gw.pool.in_use == 2)
    resp = await gw.get("/test/fast", headers=first)
    assert resp.status == 503
    assert (await resp.json())["code"] == "upstream_client_limit"
    other = await gw.get("/test/fast", headers={**tester, "X-Forwarded-For": "10.0.0.2"})
    assert other.status == 200
    for task in slow:
        task.cancel()
