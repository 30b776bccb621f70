"""Adversarial review of decision mode (``serve --mode decide``) after 26a2d1c, f6f21ad,
0dde331 and 064d5c0: regression tests for the confirmed findings.

Each test states what must happen; each was a strict xfail until its fix landed. A real decision-mode gateway on 127.0.0.1, port 0, in-process."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.conftest import EXTRA_USERS
from tests.helpers import ROOT, basic, nginx_check, policy_doc, write_policy

LOCAL = (ipaddress.ip_network("127.0.0.0/8"),)
DECIDE = "/-/decide"
SALES = basic("sales", "imsales")
OPS = basic("ops", "imtheops")


# -- Finding 1 (HIGH): identity look-alikes pass a check and reach the service ------------

# Proxy mode strips every one of these (SECURITY.md, guarantee 4: "identity headers other
# proxies' upstreams trust"); in decision mode the front proxy forwards the client's headers
# itself, so the check request is the gateway's only chance to see them -- and it answers 200.
IDENTITY_LOOKALIKES = [
    "Remote-User",
    "X-Remote-User",
    "X-User",
    "X-Forwarded-User",
    "X-AuthenticatedUser",
    "X-Authenticated.User",
]


@pytest.mark.parametrize("name", IDENTITY_LOOKALIKES)
async def test_a_check_carrying_an_identity_lookalike_is_not_allowed(decider, name) -> None:
    r = await decider.get(
        DECIDE, headers={**nginx_check("GET", "/api/inventory"), **SALES, name: "manager"}
    )
    assert r.status == 400, f"{name}: manager claimed by sales was answered {r.status}"


# -- Finding 2 (MEDIUM): method-override look-alikes pass a check ----------------------------

OVERRIDE_LOOKALIKES = [
    "X_HTTP_Method_Override",
    "X_Method_Override",
    "X_HTTP_Method",
    "X-HTTP-Method.Override",
]


@pytest.mark.parametrize("name", OVERRIDE_LOOKALIKES)
async def test_a_check_carrying_a_method_override_lookalike_is_refused(decider, name) -> None:
    r = await decider.get(
        DECIDE, headers={**nginx_check("GET", "/api/inventory"), **SALES, name: "DELETE"}
    )
    assert r.status == 400, f"{name}: answered {r.status}"
    assert (await r.json())["code"] == "method_override"


# -- Finding 3 (MEDIUM): a lower-case original method escapes a method's deny rule -------

# llhttp refuses a lower-case method in proxy mode, so this is decision mode's alone: the
# method comes from a header, and Go-based proxies (Caddy, Traefik) accept and forward
# "delete" as it is; services that upper-case the method (Symfony/Laravel, Django, Werkzeug)
# then run a DELETE the policy denies.
LOCKED = {
    "description": "test-only: everything under /test except deleting",
    "allow": [{"methods": ["*"], "paths": ["/test/**"]}],
    "deny": [{"methods": ["DELETE"], "paths": ["/test/**"]}],
}


@pytest.mark.parametrize("spelling", ["delete", "Delete"])
async def test_a_lower_case_method_does_not_escape_a_deny_rule(
    make_gateway, policy_path, spelling
) -> None:
    write_policy(policy_path, policy_doc(EXTRA_USERS, {"tester": LOCKED}))
    gw = await make_gateway(mode="decide", trusted_proxies=LOCAL)
    tester = basic("tester", "testerpw")
    r = await gw.get(DECIDE, headers={**nginx_check("DELETE", "/test/x"), **tester})
    assert r.status == 403  # the deny rule holds for the upper-case spelling
    r = await gw.get(DECIDE, headers={**nginx_check(spelling, "/test/x"), **tester})
    assert r.status in (400, 403), f"{spelling} answered {r.status}"


# -- Finding 5 (LOW): an original target under /- is allowed -------------------------------


@pytest.mark.parametrize("method,uri", [("POST", "/-/reload"), ("GET", "/-/status")])
async def test_a_check_for_a_gateway_path_is_not_allowed(decider, method, uri) -> None:
    r = await decider.get(DECIDE, headers={**nginx_check(method, uri), **OPS})
    assert r.status in (403, 404), f"{method} {uri} answered {r.status}"


# -- Finding 6 (LOW): the audit line of a refused check does not name the user -----------


async def test_a_denied_check_is_audited_with_its_user(decider) -> None:
    r = await decider.get(DECIDE, headers={**nginx_check("DELETE", "/api/inventory"), **SALES})
    assert r.status == 403
    line = decider.audit_lines()[-1]
    assert line["decision"] == "deny"
    assert line["user"] == "sales", line


# -- Finding 7 (LOW): credential-cache hits are never counted in decision mode -----------


async def test_cached_checks_count_as_cache_hits(decider) -> None:
    check = {**nginx_check("GET", "/api/inventory"), **SALES}
    for _ in range(3):
        assert (await decider.get(DECIDE, headers=check)).status == 200
    cache = decider.gw.auth.cache
    assert decider.gw.auth.bcrypt_checks == 1  # two of the three came from the cache...
    assert cache.hits >= 2, (cache.hits, cache.misses)  # ...and are counted as hits


# -- Finding 4 (MEDIUM): the documented Envoy config lets clients choose their address ---


def test_documented_envoy_config_sets_use_remote_address() -> None:
    doc = Path(ROOT / "docs" / "DECISION.md").read_text()
    envoy = doc.split("### Envoy", 1)[1].split("\n### ", 1)[0]
    assert "x-forwarded-for" in envoy  # the gateway keys its throttle on it
    assert "use_remote_address: true" in envoy
