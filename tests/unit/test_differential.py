"""Differential property tests: what is forwarded is exactly what was decided on.

Targets come from a grammar rich in the characters that broke other gateways. Each is sent as
raw bytes (no client-side normalisation) through the real gateway to a recording upstream;
the gateway's behaviour is compared with ``explain``'s (``Policy.decide_request``), which runs
the same guard and decision offline.
"""

from __future__ import annotations

import base64

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.helpers import PASSWORDS

PIECES = [
    "api",
    "inventory",
    "test",
    "admin",
    "-",
    "a",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2e%2e",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "\\",
    ";",
    ";x=1",
    "%3b",
    "%00",
    "%0a",
    "%25",
    "%252e",
    "%",
    "%zz",
    "%4",
    "%41",
    "%C3%A9",
    "%c3%a9",
    "%c0%ae",
    "%ff",
    "~",
    "_",
    "!",
    "$",
    "&",
    "'",
    "(",
    ")",
    "*",
    "+",
    ",",
    "=",
    ":",
    "@",
    "#",
    "?",
    "é",
    "\t",
    "{id}",
    "",
]
QUERY_PIECES = [
    "name=X",
    "a=%2F..%2F",
    "/api/inventory",
    "..",
    "&",
    "=",
    "+",
    "%zz",
    "#",
    "é",
    "?",
    "",
]
USERS = [None, "sales", "warehouse", "manager", "tester", "tester", "tester"]
PASSWORDS_ALL = {**PASSWORDS, "tester": "testerpw"}

SAFE = [
    "a",
    "b",
    "x",
    "%41",
    "%C3%A9",
    "%c3%a9",
    "-",
    "~",
    "!",
    "$",
    "(",
    ")",
    "*",
    "+",
    ",",
    "=",
    ":",
    "@",
    "%3b",
    "%20",
    ".a",
    "a.",
    "...",
    "%7E",
]
segment = st.one_of(
    st.lists(st.sampled_from(SAFE), min_size=1, max_size=3).map("".join),
    st.lists(st.sampled_from(PIECES), max_size=3).map("".join),
)
query = st.none() | st.lists(st.sampled_from(QUERY_PIECES), max_size=4).map("".join)
targets = st.builds(
    lambda prefix, segs, q: prefix + "/".join(segs) + ("" if q is None else f"?{q}"),
    st.sampled_from(["/", "/test/", "/test/", "/api/inventory/", "/api/", ""]),
    st.lists(segment, max_size=4),
    query,
)
prefixed = st.one_of(
    targets, st.builds(lambda q: "/api/inventory" + ("" if q is None else f"?{q}"), query)
)


def request_bytes(method: str, target: str, user: str | None) -> bytes:
    head = f"{method} ".encode() + target.encode("utf-8") + b" HTTP/1.1\r\nHost: t\r\n"
    if user:
        token = base64.b64encode(f"{user}:{PASSWORDS_ALL[user]}".encode()).decode()
        head += f"Authorization: Basic {token}\r\n".encode()
    if method in ("POST", "PUT"):
        head += b"Content-Length: 0\r\n"
    return head + b"Connection: close\r\n\r\n"


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]),
    target=prefixed,
    user=st.sampled_from(USERS),
)
async def test_forwarded_path_is_the_decided_path(raw_gateway, method, target, user) -> None:
    await check(raw_gateway, method, target, user)


mostly_safe = st.lists(
    st.one_of(
        st.sampled_from(SAFE), st.sampled_from(SAFE), st.sampled_from(SAFE), st.sampled_from(PIECES)
    ),
    min_size=1,
    max_size=3,
).map("".join)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]),
    segs=st.lists(mostly_safe, max_size=4),
    q=query,
)
async def test_allowed_targets_arrive_canonical(raw_gateway, method, segs, q) -> None:
    target = "/test/" + "/".join(segs) + ("" if q is None else f"?{q}")
    await check(raw_gateway, method, target, "tester")


async def check(raw_gateway, method: str, target: str, user: str | None) -> None:
    policy = raw_gateway.gw.store.policy
    decision, canonical = policy.decide_request(user, method, target)
    seen = raw_gateway.upstream.seen
    before = len(seen)
    status, _, _ = await raw_gateway.send(request_bytes(method, target, user))
    forwarded = len(seen) > before
    event(f"forwarded={forwarded} status={status}")
    if forwarded:
        assert decision.allowed, (method, target, user, decision.reason)
        query = target.partition("?")[2]
        expected = canonical + (f"?{query}" if query else "")  # an empty '?' is dropped
        assert seen[-1].path_qs == expected, (target, seen[-1].path_qs)
        assert seen[-1].method == method
        assert seen[-1].headers.get("X-Authenticated-User") == user
        assert status == 200
    else:
        assert status in (400, 401, 403), (method, target, user, status)
        if decision.allowed and not decision.body_keys:
            # explain allowed it, so only the HTTP parser itself may have refused it
            assert status == 400, (method, target, user, status)
            assert any(c in target for c in "\t é#"), (method, target)
