"""Decision mode in-process: the check-request forms, trust, the answers and the record."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.decision import UntrustedPeer, original_request
from gateway.errors import NotFound
from gateway.guard import Rejected
from gateway.settings import Settings, parse_settings
from tests.conftest import EXTRA_USERS, TEST_ROLE
from tests.helpers import basic, nginx_check, policy_doc, write_policy

LOCAL = (ipaddress.ip_network("127.0.0.0/8"),)
DECIDE = "/-/decide"


def hdrs(**kw: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict((k.replace("_", "-"), v) for k, v in kw.items()))


def settings_for(**kw: Any) -> Settings:
    return replace(Settings(), mode="decide", trusted_proxies=LOCAL, **kw)


# -- original_request: the three forms ----------------------------------------------------


def test_caddy_and_traefik_form_is_read_from_x_forwarded_headers() -> None:
    orig = original_request(
        "GET",
        DECIDE,
        hdrs(
            X_Forwarded_Method="PUT",
            X_Forwarded_Uri="/api/inventory?name=x",
            X_Forwarded_Host="shop",
            X_Forwarded_Proto="https",
        ),
        "127.0.0.1",
        settings_for(),
    )
    assert (orig.method, orig.raw_target, orig.host, orig.proto, orig.form) == (
        "PUT",
        "/api/inventory?name=x",
        "shop",
        "https",
        "forwarded",
    )


def test_nginx_form_is_read_from_x_original_headers() -> None:
    orig = original_request(
        "GET",
        DECIDE,
        hdrs(X_Original_Method="DELETE", X_Original_URI="/api/inventory"),
        "127.0.0.1",
        settings_for(),
    )
    assert (orig.method, orig.raw_target, orig.form) == ("DELETE", "/api/inventory", "original")


def test_envoy_form_is_the_check_requests_own_method_and_target_after_the_prefix() -> None:
    orig = original_request(
        "POST", DECIDE + "/api/inventory?name=x", hdrs(), "127.0.0.1", settings_for()
    )
    assert (orig.method, orig.raw_target, orig.form) == ("POST", "/api/inventory?name=x", "prefix")
    orig = original_request(
        "GET", "/authz/api", hdrs(), "127.0.0.1", settings_for(decision_prefix="/authz")
    )
    assert orig.raw_target == "/api"


def test_a_check_request_from_an_untrusted_peer_is_refused() -> None:
    with pytest.raises(UntrustedPeer) as err:
        original_request(
            "GET",
            DECIDE,
            hdrs(X_Forwarded_Method="GET", X_Forwarded_Uri="/"),
            "10.1.2.3",
            settings_for(),
        )
    assert err.value.status == 403 and err.value.code == "untrusted_peer"
    with pytest.raises(UntrustedPeer):
        original_request("GET", DECIDE + "/api", hdrs(), None, settings_for())


@pytest.mark.parametrize(
    "method,target,headers,code",
    [
        ("GET", DECIDE, {"X_Forwarded_Method": "GET"}, "decision_incomplete"),
        ("GET", DECIDE, {"X_Original_URI": "/api"}, "decision_incomplete"),
        ("GET", DECIDE, {}, "decision_incomplete"),
        ("GET", DECIDE + "?x=1", {}, "decision_incomplete"),
        (
            "GET",
            DECIDE,
            {
                "X_Forwarded_Method": "GET",
                "X_Forwarded_Uri": "/a",
                "X_Original_Method": "GET",
                "X_Original_URI": "/b",
            },
            "decision_ambiguous",
        ),
        (
            "GET",
            DECIDE + "/api",
            {"X_Forwarded_Method": "GET", "X_Forwarded_Uri": "/a"},
            "decision_ambiguous",
        ),
        ("GET", DECIDE, {"X_Forwarded_Method": "GET POST", "X_Forwarded_Uri": "/a"}, "method"),
    ],
)
def test_an_incomplete_or_ambiguous_description_is_a_400(method, target, headers, code) -> None:
    with pytest.raises(Rejected) as err:
        original_request(method, target, hdrs(**headers), "127.0.0.1", settings_for())
    assert err.value.status == 400 and err.value.code == code


def test_a_repeated_description_header_is_a_400() -> None:
    h = CIMultiDictProxy(
        CIMultiDict(
            [
                ("X-Original-Method", "GET"),
                ("X-Original-URI", "/api/inventory"),
                ("X-Original-URI", "/-/status"),
            ]
        )
    )
    with pytest.raises(Rejected) as err:
        original_request("GET", DECIDE, h, "127.0.0.1", settings_for())
    assert err.value.code == "decision_ambiguous"


def test_a_target_outside_the_prefix_is_a_404() -> None:
    for target in ("/api/inventory", "/-/decider", "/-/decidex/api"):
        with pytest.raises(NotFound):
            original_request("GET", target, hdrs(), "127.0.0.1", settings_for())


# -- settings ------------------------------------------------------------------------------


def test_decide_mode_needs_trusted_proxies(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--mode", "decide"])
    assert "--mode decide needs --trusted-proxy" in capsys.readouterr().err
    s = parse_settings(["--mode", "decide", "--trusted-proxy", "10.0.0.5"])
    assert (s.mode, s.decision_prefix) == ("decide", "/-/decide")


@pytest.mark.parametrize(
    "prefix", ["", "/", "decide", "/-/decide/", "/a/../b", "/-/ready", "/a b", "/a?x"]
)
def test_a_bad_decision_prefix_is_refused(prefix, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_settings(
            ["--mode", "decide", "--trusted-proxy", "10.0.0.5", "--decision-prefix", prefix]
        )
    assert "--decision-prefix" in capsys.readouterr().err


# -- the gateway in decision mode, in-process --------------------------------------------


async def test_allowed_request_answers_200_with_identity(decider, upstream) -> None:
    r = await decider.get(
        DECIDE, headers={**nginx_check("GET", "/api/inventory?name=x"), **basic("sales", "imsales")}
    )
    assert r.status == 200
    assert r.headers["X-Authenticated-User"] == "sales"
    assert r.headers["X-Authenticated-Roles"] == "sales"
    assert await r.read() == b""  # no body: nginx keeps the connection to us alive
    assert upstream.seen == []  # decision mode never forwards
    line = decider.audit_lines()[-1]
    assert line["event"] == "decision" and line["mode"] == "decision"
    assert (line["user"], line["method"], line["path"], line["decision"], line["status"]) == (
        "sales",
        "GET",
        "/api/inventory",
        "allow",
        200,
    )
    assert "imsales" not in json.dumps(decider.audit_lines())


async def test_no_credentials_answer_401_with_www_authenticate(decider) -> None:
    r = await decider.get(DECIDE, headers=nginx_check("GET", "/api/inventory"))
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].startswith('Basic realm="inventory"')
    r = await decider.get(
        DECIDE, headers={**nginx_check("GET", "/api/inventory"), **basic("sales", "nope")}
    )
    assert r.status == 401 and "WWW-Authenticate" in r.headers


async def test_not_allowed_answers_403(decider) -> None:
    r = await decider.get(
        DECIDE,
        headers={
            "X-Forwarded-Method": "DELETE",
            "X-Forwarded-Uri": "/api/inventory?name=x",
            **basic("sales", "imsales"),
        },
    )
    assert r.status == 403
    assert decider.audit_lines()[-1]["decision"] == "deny"


async def test_guard_rejection_of_the_original_target_answers_400(decider) -> None:
    for uri in (
        "/api/inventory/../admin",
        "/api/%2e%2e/x",
        "/api%2Finventory",
        "//api",
        "/api;x",
        "http://h/api/inventory",
    ):
        r = await decider.get(
            DECIDE, headers={**nginx_check("GET", uri), **basic("manager", "imthemanager")}
        )
        assert r.status == 400, uri
    r = await decider.get(
        DECIDE,
        headers={
            **nginx_check("GET", "/api/inventory"),
            "X-HTTP-Method-Override": "DELETE",
            **basic("manager", "imthemanager"),
        },
    )
    assert r.status == 400 and (await r.json())["code"] == "method_override"
    r = await decider.get(
        DECIDE,
        headers={**nginx_check("TRACE", "/api/inventory"), **basic("manager", "imthemanager")},
    )
    assert r.status == 400


async def test_body_key_rule_is_denied_with_its_reason(decider) -> None:
    r = await decider.get(
        DECIDE,
        headers={
            **nginx_check("PUT", "/api/inventory?name=x"),
            **basic("warehouse", "imthewarehouse"),
        },
    )
    assert r.status == 403
    doc = await r.json()
    assert doc["code"] == "body_not_inspectable"
    assert "carries no body" in doc["error"]
    # a user with a plain allow for the same route is unaffected
    r = await decider.get(
        DECIDE,
        headers={**nginx_check("PUT", "/api/inventory?name=x"), **basic("manager", "imthemanager")},
    )
    assert r.status == 200


async def test_envoy_form_decides_on_the_path_after_the_prefix(decider) -> None:
    r = await decider.post(DECIDE + "/api/inventory", headers=basic("manager", "imthemanager"))
    assert r.status == 200 and r.headers["X-Authenticated-User"] == "manager"
    r = await decider.post(DECIDE + "/api/inventory", headers=basic("sales", "imsales"))
    assert r.status == 403


async def test_public_route_is_allowed_anonymously_with_empty_identity(
    make_gateway, policy_path
) -> None:
    doc = policy_doc()
    doc["public"].append({"methods": ["GET"], "paths": ["/docs/**"]})
    write_policy(policy_path, doc)
    gw = await make_gateway(mode="decide", trusted_proxies=LOCAL)
    r = await gw.get(DECIDE, headers=nginx_check("GET", "/docs/intro"))
    assert r.status == 200
    assert r.headers["X-Authenticated-User"] == "" and r.headers["X-Authenticated-Roles"] == ""


async def test_a_public_gateway_path_is_not_allowed_for_the_service(decider) -> None:
    """/-/healthz is public for the gateway's own listener; a front proxy asking about it is
    asking whether to pass it to the service, which the gateway never does."""
    r = await decider.get(DECIDE, headers=nginx_check("GET", "/-/healthz"))
    assert r.status == 403 and (await r.json())["code"] == "gateway_path"


async def test_untrusted_peer_gets_403_with_a_reason(make_gateway) -> None:
    client = await make_gateway(
        mode="decide", trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),)
    )
    r = await client.get(
        DECIDE, headers={**nginx_check("GET", "/api/inventory"), **basic("manager", "imthemanager")}
    )
    assert r.status == 403
    assert (await r.json())["code"] == "untrusted_peer"


async def test_decision_listener_keeps_its_own_endpoints_and_forwards_nothing(
    decider, upstream
) -> None:
    assert (await decider.get("/-/healthz")).status == 200
    r = await decider.get("/-/ready")  # no upstream probe in decision mode
    assert r.status == 200 and (await r.json())["mode"] == "decide"
    assert (await decider.get("/-/status")).status == 401
    r = await decider.get("/-/status", headers=basic("ops", "imtheops"))
    assert r.status == 200
    r = await decider.get("/api/inventory", headers=basic("manager", "imthemanager"))
    assert r.status == 404
    assert upstream.seen == []


async def test_throttled_client_gets_429_in_decision_mode(decider) -> None:
    statuses = []
    for i in range(30):
        r = await decider.get(
            DECIDE,
            headers={
                **nginx_check("GET", "/api/inventory"),
                "X-Forwarded-For": "192.0.2.7",
                **basic("sales", f"wrong{i}"),
            },
        )
        statuses.append(r.status)
    assert 429 in statuses
    # the throttle keys on the client behind the proxy, not on the proxy: others still pass
    r = await decider.get(
        DECIDE,
        headers={
            **nginx_check("GET", "/api/inventory"),
            "X-Forwarded-For": "192.0.2.8",
            **basic("sales", "imsales"),
        },
    )
    assert r.status == 200


async def test_a_reload_changes_the_next_decision(decider, policy_path) -> None:
    check = {**nginx_check("POST", "/api/inventory"), **basic("sales", "imsales")}
    assert (await decider.get(DECIDE, headers=check)).status == 403
    doc = policy_doc(EXTRA_USERS, {"tester": TEST_ROLE})
    doc["roles"]["sales"]["allow"].append({"methods": ["POST"], "paths": ["/api/inventory"]})
    doc["tests"] = [
        t
        for t in doc["tests"]  # sales and warehouse may POST now
        if not (t["method"] == "POST" and t["expect"] == "deny")
    ]
    write_policy(policy_path, doc)
    r = await decider.post("/-/reload", headers=basic("ops", "imtheops"))
    assert r.status == 200, await r.text()
    assert (await decider.get(DECIDE, headers=check)).status == 200
