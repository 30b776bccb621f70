"""Security: one case per known bypass class, throttling, bounded bcrypt, equal failures."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time

import bcrypt
import pytest

from gateway.auth import Authenticator, Credentials, FailureThrottle
from gateway.errors import Overloaded, TooManyRequests, Unauthenticated
from gateway.policy import parse_policy
from tests.conftest import raw_get
from tests.helpers import basic, eventually

SALES = basic("sales", "imsales")
MANAGER = basic("manager", "imthemanager")


def req(line: bytes, *headers: bytes, body: bytes = b"") -> bytes:
    return (
        line
        + b"\r\nHost: gateway.test\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"Connection: close\r\n\r\n"
        + body
    )


AUTH_SALES = b"Authorization: " + SALES["Authorization"].encode()
AUTH_MANAGER = b"Authorization: " + MANAGER["Authorization"].encode()

# (bypass class, raw request, acceptable statuses). None of these may reach the upstream.
BYPASSES = [
    (
        "dot-segment (Envoy CVE-2019-9901)",
        req(b"GET /api/inventory/../admin HTTP/1.1", AUTH_MANAGER),
        {400},
    ),
    ("encoded dot-segment", req(b"GET /api/inventory/%2e%2e/admin HTTP/1.1", AUTH_MANAGER), {400}),
    ("mixed-case encoded dots", req(b"GET /api/%2E%2e/x HTTP/1.1", AUTH_MANAGER), {400}),
    ("half-encoded dots", req(b"GET /api/.%2e/x HTTP/1.1", AUTH_MANAGER), {400}),
    (
        "encoded slash + dots (Envoy CVE-2021-29492)",
        req(b"GET /api/inventory%2F..%2Fadmin HTTP/1.1", AUTH_MANAGER),
        {400},
    ),
    ("encoded backslash", req(b"GET /api/inventory%5C..%5Cadmin HTTP/1.1", AUTH_MANAGER), {400}),
    ("raw backslash", req(b"GET /api\\inventory HTTP/1.1", AUTH_MANAGER), {400}),
    ("double encoding", req(b"GET /api/%252e%252e/admin HTTP/1.1", AUTH_MANAGER), {400}),
    ("overlong UTF-8 dot", req(b"GET /api/%C0%AE%C0%AE/admin HTTP/1.1", AUTH_MANAGER), {400}),
    ("invalid UTF-8", req(b"GET /api/%FF HTTP/1.1", AUTH_MANAGER), {400}),
    ("raw non-ASCII byte", req(b"GET /api/caf\xc3\xa9 HTTP/1.1", AUTH_MANAGER), {400}),
    (
        "double slash (Istio CVE-2021-31920)",
        req(b"GET //api/inventory HTTP/1.1", AUTH_SALES),
        {400},
    ),
    ("empty segment inside", req(b"GET /api//inventory HTTP/1.1", AUTH_SALES), {400}),
    (
        "path parameter (Shiro CVE-2020-1957)",
        req(b"GET /api/inventory/..;/x HTTP/1.1", AUTH_MANAGER),
        {400},
    ),
    ("path parameter on allowed path", req(b"GET /api/inventory;a=b HTTP/1.1", AUTH_SALES), {400}),
    (
        "query string inside the matcher (oauth2-proxy CVE-2025-54576)",
        req(b"GET /-/status?/api/inventory HTTP/1.1", AUTH_SALES),
        {403},
    ),
    ("query smuggling a path", req(b"GET /admin?x=/api/inventory HTTP/1.1", AUTH_SALES), {403}),
    ("fragment", req(b"GET /api/inventory#/admin HTTP/1.1", AUTH_SALES), {400}),
    ("NUL byte encoded", req(b"GET /api/inventory%00.json HTTP/1.1", AUTH_SALES), {400}),
    ("control character encoded", req(b"GET /api/inventory%0d%0aX: y HTTP/1.1", AUTH_SALES), {400}),
    ("bad percent escape", req(b"GET /api/inventory%G1 HTTP/1.1", AUTH_SALES), {400}),
    (
        "absolute-form target",
        req(b"GET http://backend:8081/api/inventory HTTP/1.1", AUTH_SALES),
        {400},
    ),
    (
        "absolute-form to another host",
        req(b"GET http://127.0.0.1:1/admin HTTP/1.1", AUTH_MANAGER),
        {400},
    ),
    ("authority-form CONNECT", req(b"CONNECT 127.0.0.1:8081 HTTP/1.1", AUTH_MANAGER), {400}),
    ("TRACE", req(b"TRACE /api/inventory HTTP/1.1", AUTH_MANAGER), {400}),
    ("lower-case method is not GET", req(b"get /api/inventory HTTP/1.1", AUTH_SALES), {400}),
    (
        "method override header",
        req(
            b"POST /api/inventory HTTP/1.1",
            AUTH_SALES,
            b"X-HTTP-Method-Override: GET",
            b"Content-Length: 0",
        ),
        {400},
    ),
    (
        "method override to escalate",
        req(b"GET /api/inventory HTTP/1.1", AUTH_SALES, b"X-Method-Override: DELETE"),
        {400},
    ),
    (
        "X-HTTP-Method",
        req(b"GET /api/inventory HTTP/1.1", AUTH_SALES, b"X-HTTP-Method: PUT"),
        {400},
    ),
    ("OPTIONS needs its own rule", req(b"OPTIONS /api/inventory HTTP/1.1", AUTH_MANAGER), {403}),
    ("case variation of a literal", req(b"GET /API/inventory HTTP/1.1", AUTH_SALES), {403}),
    ("trailing slash is another path", req(b"DELETE /api/inventory/ HTTP/1.1", AUTH_SALES), {403}),
    (
        "spoofed identity header on a denied request",
        req(
            b"DELETE /api/inventory HTTP/1.1",
            AUTH_SALES,
            b"X-Authenticated-User: manager",
            b"X-Authenticated-Roles: manager",
        ),
        {403},
    ),
    (
        "spoofed identity without credentials",
        req(b"GET /api/inventory HTTP/1.1", b"X-Authenticated-User: manager"),
        {401},
    ),
    (
        "spoofed X-Forwarded-For without credentials",
        req(b"GET /api/inventory HTTP/1.1", b"X-Forwarded-For: 127.0.0.1"),
        {401},
    ),
    (
        "smuggling: Content-Length with Transfer-Encoding",
        req(
            b"POST /api/inventory HTTP/1.1",
            AUTH_MANAGER,
            b"Content-Length: 4",
            b"Transfer-Encoding: chunked",
            body=b"0\r\n\r\n",
        ),
        {400},
    ),
    (
        "smuggling: duplicated Content-Length",
        req(
            b"POST /api/inventory HTTP/1.1",
            AUTH_MANAGER,
            b"Content-Length: 2",
            b"Content-Length: 3",
            body=b"{}x",
        ),
        {400},
    ),
    (
        "smuggling: obfuscated Transfer-Encoding",
        req(
            b"POST /api/inventory HTTP/1.1",
            AUTH_MANAGER,
            b"Transfer-Encoding: xchunked",
            body=b"0\r\n\r\n",
        ),
        {400, 501},
    ),
    (
        "smuggling: Transfer-Encoding not last chunked",
        req(
            b"POST /api/inventory HTTP/1.1",
            AUTH_MANAGER,
            b"Transfer-Encoding: chunked, gzip",
            body=b"0\r\n\r\n",
        ),
        {400, 501},
    ),
    (
        "header with obs-fold",
        req(b"GET /api/inventory HTTP/1.1", AUTH_SALES, b"X-A: a\r\n b"),
        {400},
    ),
    (
        "oversize header",
        req(b"GET /api/inventory HTTP/1.1", AUTH_SALES, b"X-Big: " + b"a" * 9000),
        {431},
    ),
    (
        "header over the parser's own limit",
        req(b"GET /api/inventory HTTP/1.1", AUTH_SALES, b"X-Big: " + b"a" * 200_000),
        {431},
    ),
    (
        "100 KB Authorization",
        req(b"GET /api/inventory HTTP/1.1", b"Authorization: Basic " + b"QUFB" * 25_000),
        {401},
    ),
    (
        "too many headers",
        req(b"GET /api/inventory HTTP/1.1", AUTH_SALES, *[b"X-H%d: v" % i for i in range(150)]),
        {431},
    ),
    ("asterisk-form", req(b"OPTIONS * HTTP/1.1", AUTH_MANAGER), {400}),
    ("no credentials", req(b"DELETE /api/inventory?name=X HTTP/1.1"), {401}),
    (
        "malformed credentials",
        req(b"DELETE /api/inventory HTTP/1.1", b"Authorization: Basic bWFuYWdlcg=="),
        {401},
    ),
]


@pytest.mark.parametrize("name,raw,statuses", BYPASSES, ids=[b[0] for b in BYPASSES])
async def test_bypass_attempt_is_refused_and_never_forwarded(
    raw_gateway, name, raw, statuses
) -> None:
    status, headers, body = await raw_gateway.send(raw)
    assert status in statuses, (name, status, body)
    if body:
        doc = json.loads(body)
        assert doc["status"] == status and doc["error"], doc
        assert "Traceback" not in doc["error"]
    assert raw_gateway.upstream.seen == [], name


async def test_allowed_request_is_forwarded_byte_for_byte(raw_gateway) -> None:
    status, _, _ = await raw_gateway.send(
        req(b"GET /api/inventory?name=a%2Fb+c HTTP/1.1", AUTH_SALES)
    )
    assert status == 200
    assert raw_gateway.upstream.seen[-1].path_qs == "/api/inventory?name=a%2Fb+c"
    status, _, _ = await raw_gateway.send(
        req(
            b"GET /test/caf%c3%a9/%41 HTTP/1.1",
            b"Authorization: " + basic("tester", "testerpw")["Authorization"].encode(),
        )
    )
    assert status == 200
    assert raw_gateway.upstream.seen[-1].path_qs == "/test/caf%C3%A9/A"


async def test_parser_errors_are_json_without_traceback(raw_gateway, caplog) -> None:
    status, headers, body = await raw_gateway.send(b"GARBAGE\r\n\r\n")
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["status"] == 400
    assert "Traceback" not in caplog.text


def test_aiohttp_c_parser_is_in_use() -> None:
    import os

    from aiohttp import http_parser

    assert "AIOHTTP_NO_EXTENSIONS" not in os.environ
    assert http_parser.HttpRequestParser is not http_parser.HttpRequestParserPy


# ---------------------------------------------------------------- throttling

ATTACKER, VICTIM = "203.0.113.7", "198.51.100.9"  # documentation addresses: header values only


def xff(address: str, creds: dict[str, str]) -> dict[str, str]:
    return {**creds, "X-Forwarded-For": address}


@pytest.fixture
async def proxied_gateway(make_gateway):
    import ipaddress

    return await make_gateway(trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))


async def test_failed_logins_back_off_with_429_and_retry_after(proxied_gateway) -> None:
    gw = proxied_gateway
    statuses = []
    for i in range(8):
        resp = await gw.get("/api/inventory", headers=xff(ATTACKER, basic("sales", f"g{i}")))
        statuses.append(resp.status)
    assert statuses[:5] == [401] * 5
    assert 429 in statuses[5:]
    resp = await gw.get("/api/inventory", headers=xff(ATTACKER, basic("sales", "again")))
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert json.loads(await resp.read())["code"] == "too_many_failed_logins"


async def test_attacker_cannot_lock_out_the_victim_from_elsewhere(proxied_gateway) -> None:
    gw = proxied_gateway
    for i in range(30):
        await gw.get("/api/inventory", headers=xff(ATTACKER, basic("sales", f"g{i}")))
    resp = await gw.get("/api/inventory", headers=xff(VICTIM, basic("sales", "imsales")))
    assert resp.status == 200
    resp = await gw.get("/api/inventory", headers=xff(VICTIM, basic("warehouse", "imthewarehouse")))
    assert resp.status == 200


async def test_cached_users_are_not_throttled_from_an_attacked_address(proxied_gateway):
    gw = proxied_gateway
    assert (await gw.get("/api/inventory", headers=xff(ATTACKER, SALES))).status == 200
    for i in range(30):
        await gw.get("/api/inventory", headers=xff(ATTACKER, basic("manager", f"g{i}")))
    assert (await gw.get("/api/inventory", headers=xff(ATTACKER, SALES))).status == 200


async def test_x_forwarded_for_is_ignored_unless_from_a_trusted_proxy(gateway, upstream):
    for i in range(25):  # rotating the header does not escape the per-address throttle
        resp = await gateway.get(
            "/api/inventory", headers=xff(f"192.0.2.{i}", basic("sales", f"g{i}"))
        )
    assert resp.status == 429
    # and the upstream sees the real peer, not the claimed address
    upstream.seen.clear()
    gw_ok = await gateway.get("/api/inventory", headers=xff("192.0.2.1", MANAGER))
    assert gw_ok.status == 200
    assert upstream.seen[-1].headers["X-Forwarded-For"] == "127.0.0.1"


async def test_trusted_proxy_chain_yields_the_client_address(proxied_gateway, upstream):
    resp = await proxied_gateway.get(
        "/api/inventory", headers={**SALES, "X-Forwarded-For": f"192.0.2.66, {VICTIM}, 127.0.0.2"}
    )
    assert resp.status == 200
    assert upstream.seen[-1].headers["X-Forwarded-For"] == VICTIM


# ---------------------------------------------------------------- bcrypt bounds and timing


def policy_with_cost(cost: int):
    h = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=cost)).decode()
    return parse_policy(
        f"""
version: 1
roles: {{r: {{allow: [{{methods: [GET], paths: [/x]}}]}}}}
users: {{alice: {{password_hash: "{h}", roles: [r]}}}}
""".encode()
    )


async def test_bcrypt_checks_in_flight_are_bounded_503_quickly() -> None:
    policy = policy_with_cost(10)
    auth = Authenticator(
        max_inflight=2, threads=1, throttle=FailureThrottle(per_user=10**6, per_address=10**6)
    )
    await auth.prepare(policy)
    loop = asyncio.get_running_loop()

    async def attempt(i: int) -> tuple[str, float]:
        t0 = loop.time()
        try:
            await auth.authenticate(policy, Credentials("alice", f"wrong{i}"), f"a{i}")
        except Overloaded:
            return "503", loop.time() - t0
        except Unauthenticated:
            return "401", loop.time() - t0
        return "200", loop.time() - t0

    results = await asyncio.gather(*(attempt(i) for i in range(10)))
    refused = [t for s, t in results if s == "503"]
    assert len(refused) == 8 and sum(1 for s, _ in results if s == "401") == 2
    assert max(refused) < 0.05  # refused at once, not after queueing
    auth.close()


async def test_cached_user_served_during_a_wrong_password_flood(make_gateway) -> None:
    gw = await make_gateway(max_bcrypt_inflight=4)
    assert (await gw.get("/api/inventory", headers=SALES)).status == 200
    stop = asyncio.Event()
    flood_statuses: list[int] = []

    async def flood(k: int) -> None:
        i = 0
        while not stop.is_set():
            r = await gw.get("/api/inventory", headers=basic("manager", f"x{k}-{i}"))
            flood_statuses.append(r.status)
            i += 1

    tasks = [asyncio.create_task(flood(k)) for k in range(16)]
    try:
        for _ in range(50):
            assert (await gw.get("/api/inventory", headers=SALES)).status == 200
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert set(flood_statuses) <= {401, 429, 503} and flood_statuses


async def test_unknown_user_costs_the_same_as_a_wrong_password() -> None:
    policy = policy_with_cost(9)
    auth = Authenticator(throttle=FailureThrottle(per_user=10**6, per_address=10**6))
    await auth.prepare(policy)
    # Robust on a shared machine: each unknown-user attempt is paired with the wrong-password
    # attempt right after it (both see the same load), and the median of the pair ratios must
    # be near 1. A dummy hash of a cheaper cost (9 vs 4 is 32x) fails this by far.
    ratios = []
    for i in range(21):
        pair = []
        for user in (f"ghost{i}", "alice"):
            checks = auth.bcrypt_checks
            t0 = time.perf_counter()
            with pytest.raises(Unauthenticated) as exc:
                await auth.authenticate(policy, Credentials(user, f"pw{i}"), "addr")
            pair.append(time.perf_counter() - t0)
            assert exc.value.message == "invalid credentials"
            assert auth.bcrypt_checks == checks + 1  # a real bcrypt check each time
        ratios.append(pair[0] / pair[1])
    assert 0.67 < statistics.median(ratios) < 1.5, sorted(ratios)
    auth.close()


async def test_unknown_user_and_wrong_password_same_status_and_body(raw_gateway) -> None:
    a = await raw_gateway.send(raw_get("/api/inventory", basic("ghost", "x")))
    b = await raw_gateway.send(raw_get("/api/inventory", basic("sales", "x")))
    assert a[0] == b[0] == 401
    assert a[2] == b[2]
    assert a[1]["www-authenticate"] == b[1]["www-authenticate"]


async def test_concurrent_first_requests_share_one_bcrypt_check(make_gateway) -> None:
    gw = await make_gateway()
    auth = gw.gw.auth
    results = await asyncio.gather(*(gw.get("/api/inventory", headers=SALES) for _ in range(20)))
    assert [r.status for r in results] == [200] * 20
    assert auth.bcrypt_checks == 1


async def test_one_address_gets_few_password_checks_in_flight() -> None:
    policy = policy_with_cost(8)
    auth = Authenticator(
        per_address_inflight=2,
        max_inflight=100,
        throttle=FailureThrottle(per_user=10**6, per_address=10**6),
    )
    await auth.prepare(policy)

    async def attempt(i: int, address: str) -> str:
        try:
            await auth.authenticate(policy, Credentials("alice", f"wrong{i}"), address)
        except TooManyRequests as exc:
            assert exc.retry_after == 1
            return "429"
        except Unauthenticated:
            return "401"
        return "200"

    flood = await asyncio.gather(*(attempt(i, "203.0.113.7") for i in range(10)))
    assert flood.count("401") == 2 and flood.count("429") == 8
    others = await asyncio.gather(*(attempt(i, f"198.51.100.{i}") for i in range(5)))
    assert others == ["401"] * 5  # other addresses are not limited by it
    auth.close()


async def test_throttled_clients_wait_for_their_429(make_gateway) -> None:
    import time as _time

    gw = await make_gateway(throttle_delay=0.3)
    for i in range(6):
        await gw.get("/api/inventory", headers=basic("sales", f"guess{i}"))
    t0 = _time.monotonic()
    resp = await gw.get("/api/inventory", headers=basic("sales", "again"))
    assert resp.status == 429
    assert _time.monotonic() - t0 >= 0.29  # uvloop's timers have 1 ms resolution


async def test_deeply_nested_json_on_a_body_checked_route_is_403_not_500(gateway, upstream) -> None:
    deep = b'{"count": ' + b"[" * 5000 + b"]" * 5000 + b', "name": "x"}'
    resp = await gateway.put(
        "/api/inventory?name=x",
        data=deep,
        headers={**basic("warehouse", "imthewarehouse"), "Content-Type": "application/json"},
    )
    assert resp.status == 403
    doc = await resp.json()
    assert doc["status"] == 403 and "may only send a JSON object" in doc["error"]
    assert upstream.seen == []


async def test_compressed_body_on_a_body_checked_route_is_refused(gateway, upstream) -> None:
    import gzip

    resp = await gateway.put(
        "/api/inventory?name=x",
        data=gzip.compress(b'{"name": "x", "count": 1}'),
        headers={**basic("warehouse", "imthewarehouse"), "Content-Encoding": "gzip"},
    )
    assert resp.status == 403
    assert upstream.seen == []


async def test_credentials_verified_once_whatever_the_header_spelling(make_gateway) -> None:
    """The cache is keyed by the raw header for speed; another spelling of the same
    credentials (scheme case, extra spaces) must not cost a second bcrypt check."""
    gw = await make_gateway()
    token = basic("sales", "imsales")["Authorization"].split(" ", 1)[1]
    for spelling in (f"Basic {token}", f"basic {token}", f"BASIC  {token}"):
        resp = await gw.get("/api/inventory", headers={"Authorization": spelling})
        assert resp.status == 200, spelling
    assert gw.gw.auth.bcrypt_checks == 1


async def test_an_active_user_never_waits_for_bcrypt_when_the_cache_entry_expires(
    make_gateway,
) -> None:
    """In the last tenth of its TTL an entry is checked again in the background while the
    request is served from the cache; the renewed entry outlives the original TTL."""
    gw = await make_gateway(cache_ttl=1.0)
    auth = gw.gw.auth
    header = basic("sales", "imsales")["Authorization"].encode()
    key = auth.cache.key(header)
    assert (await gw.get("/api/inventory", headers=SALES)).status == 200
    assert auth.bcrypt_checks == 1
    await eventually(lambda: auth.cache.due(key), timeout=2.0)
    assert (await gw.get("/api/inventory", headers=SALES)).status == 200  # from the cache
    await eventually(lambda: auth.bcrypt_checks == 2 and not auth.cache.due(key), timeout=2.0)
    hits = auth.cache.hits
    await eventually(lambda: auth.cache.due(key), timeout=2.0)  # past the first expiry now
    assert (await gw.get("/api/inventory", headers=SALES)).status == 200
    assert auth.cache.hits == hits + 1  # still a hit: no request waited for bcrypt


async def test_decoded_credentials_are_refreshed_ahead_too() -> None:
    """Decision mode looks credentials up by their decoded key: the same refresh applies."""
    from gateway.auth import CredentialCache

    policy = policy_with_cost(4)
    auth = Authenticator(cache=CredentialCache(ttl=1.0))
    await auth.prepare(policy)
    creds = Credentials("alice", "right")
    key = auth.cache.key_of(creds)
    try:
        await auth.authenticate(policy, creds, "addr")
        assert auth.bcrypt_checks == 1
        await eventually(lambda: auth.cache.due(key), timeout=2.0)
        await auth.authenticate(policy, creds, "addr")  # served from the cache
        await eventually(lambda: auth.bcrypt_checks == 2 and not auth.cache.due(key), timeout=2.0)
    finally:
        auth.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling classes")
def test_bcrypt_threads_yield_to_the_event_loop_at_once() -> None:
    """bcrypt threads run in the idle scheduling class (preempted as soon as a loop wakes),
    and only they: the thread that sets it up keeps its own class."""
    import threading

    from gateway.auth import _lower_priority

    seen: dict[str, int] = {}

    def bcrypt_thread() -> None:
        _lower_priority()
        seen["class"] = os.sched_getscheduler(0)

    t = threading.Thread(target=bcrypt_thread)
    t.start()
    t.join()
    assert seen["class"] == os.SCHED_IDLE
    assert os.sched_getscheduler(0) != os.SCHED_IDLE
