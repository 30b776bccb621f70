"""The audit log file of a real gateway process: one JSON line per request, promptly."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import basic, wait_until

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("GATEWAY_URL")), reason="reads the audit file of a process it started"
)


def test_audit_lines_reach_the_file_within_a_second(stack) -> None:
    audit = stack.gateway.log.parent / "audit.log"
    marker = f"/api/inventory?name=audit-{time.time_ns()}"
    req = urllib.request.Request(stack.gateway_url + marker, headers=basic("sales", "nope"))
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=5)
    assert exc.value.code == 401
    lines: list[dict] = []

    def written() -> bool:
        lines[:] = [json.loads(x) for x in audit.read_text().splitlines() if x.strip()]
        return any(
            r.get("event") == "auth_failure"
            and r.get("user") == "sales"
            and r.get("client") == "127.0.0.1"
            for r in lines
        ) and any(r.get("event") == "request" and r.get("status") == 401 for r in lines)

    wait_until(written, 5, 0.05, what=lambda: f"audit lines not written in time: {lines[-3:]}")
    assert "nope" not in audit.read_text()
