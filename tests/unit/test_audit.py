"""Audit lines and metrics."""

from __future__ import annotations

import io
import json

from yarl import URL

from gateway.audit import AuditLog
from tests.helpers import basic


async def gateway_with_audit(make_gateway, settings):
    buf = io.StringIO()
    client = await make_gateway(audit=AuditLog(buf), audit_log="-")
    return client, buf


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


async def test_one_audit_line_per_request_with_decision_and_rule(make_gateway, settings):
    gw, buf = await gateway_with_audit(make_gateway, settings)
    await gw.get("/api/inventory?name=x", headers=basic("sales", "imsales"))
    await gw.post("/api/inventory", headers=basic("sales", "imsales"))
    await gw.get(URL("/api%2F..%2Fetc", encoded=True), headers=basic("sales", "imsales"))
    recs = [r for r in lines(buf) if r["event"] == "request"]
    assert len(recs) == 3
    ok, denied, rejected = recs
    assert ok["user"] == "sales" and ok["decision"] == "allow" and ok["status"] == 200
    assert ok["rule"] == "roles.sales.allow[0]" and ok["path"] == "/api/inventory"
    assert ok["client"] == "127.0.0.1" and ok["upstream_ms"] is not None
    assert ok["total_ms"] >= ok["upstream_ms"]
    assert denied["decision"] == "deny" and denied["status"] == 403
    assert rejected["decision"] == "reject" and rejected["status"] == 400
    for r in recs:
        assert {
            "time",
            "client",
            "user",
            "method",
            "path",
            "decision",
            "rule",
            "status",
            "upstream_ms",
            "total_ms",
        } <= set(r)


async def test_failed_authentication_is_its_own_event(make_gateway, settings):
    gw, buf = await gateway_with_audit(make_gateway, settings)
    await gw.get("/api/inventory", headers=basic("sales", "guess"))
    events = lines(buf)
    failure = [r for r in events if r["event"] == "auth_failure"]
    assert len(failure) == 1
    assert failure[0]["client"] == "127.0.0.1" and failure[0]["user"] == "sales"
    text = buf.getvalue()
    assert "guess" not in text and "$2b$" not in text and "Authorization" not in text


async def test_metrics_count_decisions_cache_and_rejections(gateway):
    await gateway.get("/api/inventory", headers=basic("sales", "imsales"))
    await gateway.get("/api/inventory", headers=basic("sales", "imsales"))
    await gateway.get("/api/inventory", headers=basic("sales", "nope"))
    await gateway.get(URL("/a%2Fb", encoded=True), headers=basic("sales", "imsales"))
    resp = await gateway.get("/-/metrics", headers=basic("ops", "imtheops"))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'gateway_requests_total{decision="allow",status="200"} 2.0' in text
    assert 'gateway_requests_total{decision="unauthenticated",status="401"} 1.0' in text
    assert 'gateway_guard_rejections_total{reason="encoded_separator"} 1.0' in text
    assert 'gateway_auth_failures_total{reason="invalid_credentials"} 1.0' in text
    assert 'gateway_credential_cache_total{result="hit"} 1.0' in text
    assert "gateway_request_seconds_bucket" in text
    assert "gateway_upstream_seconds_count" in text
    assert "gateway_policy_loaded_timestamp_seconds" in text
    assert "gateway_login_throttle_unanswered_total 0.0" in text


async def test_a_refused_request_names_who_was_refused(make_gateway, settings):
    gw, buf = await gateway_with_audit(make_gateway, settings)
    resp = await gw.delete("/api/inventory?name=x", headers=basic("sales", "imsales"))
    assert resp.status == 403
    line = [r for r in lines(buf) if r["event"] == "request"][-1]
    assert line["decision"] == "deny" and line["user"] == "sales"
    assert line["rule"] is None and "sales" in line["reason"]
