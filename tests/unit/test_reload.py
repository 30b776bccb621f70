"""Reload: every trigger, every failure mode, atomic swaps under load, cache invalidation."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import signal
from pathlib import Path

import pytest
import yaml

from tests.helpers import basic, eventually, fast_hash, policy_doc, write_policy

OPS = basic("ops", "imtheops")
SALES = basic("sales", "imsales")


def revoke_sales_get(doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    doc["roles"]["sales"]["allow"] = [{"methods": ["OPTIONS"], "paths": ["/api/inventory"]}]
    doc["tests"] = [
        t
        for t in doc["tests"]
        if t.get("user") not in ("sales", "warehouse", "manager")
        or t["method"] not in ("GET", "HEAD")
    ]
    return doc


@pytest.fixture
def base_doc(policy_path: Path) -> dict:
    return yaml.safe_load(policy_path.read_text())


async def status_of(gw) -> dict:
    resp = await gw.get("/-/status", headers=OPS)
    assert resp.status == 200
    return await resp.json()


async def test_reload_endpoint_swaps_policy_and_reports_sha(gateway, policy_path, base_doc):
    assert (await gateway.get("/api/inventory", headers=SALES)).status == 200
    write_policy(policy_path, revoke_sales_get(base_doc))
    resp = await gateway.post("/-/reload", headers=OPS)
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "reloaded" and len(body["sha256"]) == 64
    assert (await gateway.get("/api/inventory", headers=SALES)).status == 403
    assert (await status_of(gateway))["sha256"] == body["sha256"]
    again = await gateway.post("/-/reload", headers=OPS)
    assert (await again.json())["status"] == "unchanged"


async def test_reload_endpoint_is_authorized_by_the_policy(gateway):
    assert (await gateway.post("/-/reload")).status == 401
    assert (await gateway.post("/-/reload", headers=SALES)).status == 403
    assert (await gateway.get("/-/reload", headers=OPS)).status == 403  # ops: POST only


BROKEN = {
    "syntax error": lambda p, d: p.write_text("version: 1\nroles: {sales: [unclosed\n"),
    "schema error": lambda p, d: write_policy(
        p,
        {
            **d,
            "roles": {**d["roles"], "x": {"allow": [{"methods": ["GET"], "paths": ["no-slash"]}]}},
        },
    ),
    "failing test case": lambda p, d: write_policy(
        p,
        {
            **d,
            "tests": [
                *d["tests"],
                {"user": "sales", "method": "DELETE", "path": "/api/inventory", "expect": "allow"},
            ],
        },
    ),
    "plaintext password": lambda p, d: write_policy(
        p, {**d, "users": {**d["users"], "eve": {"password": "secret", "roles": ["sales"]}}}
    ),
    "unreadable file": lambda p, d: os.chmod(p, 0),
    "file deleted": lambda p, d: p.unlink(),
}


@pytest.mark.parametrize("how", sorted(BROKEN))
async def test_reload_failure_keeps_the_old_policy(gateway, policy_path, base_doc, how):
    if how == "unreadable file" and os.geteuid() == 0:
        # root reads any file: make it a directory instead, which nobody can read as a file
        policy_path.unlink()
        policy_path.mkdir()
    else:
        BROKEN[how](policy_path, base_doc)
    before = await status_of(gateway)
    resp = await gateway.post("/-/reload", headers=OPS)
    assert resp.status == 422
    body = await resp.json()
    assert body["status"] == 422 and body["errors"], body
    assert all(str(policy_path) in e for e in body["errors"]), body["errors"]
    assert (await gateway.get("/api/inventory", headers=SALES)).status == 200
    after = await status_of(gateway)
    assert after["sha256"] == before["sha256"]
    assert after["last_reload_error"] and after["reloads"]["failed"] == 1
    metrics = await (await gateway.get("/-/metrics", headers=OPS)).text()
    assert 'gateway_policy_reloads_total{result="refused"} 1.0' in metrics
    assert "gateway_policy_last_reload_failed 1.0" in metrics


async def test_sighup_reloads(make_gateway, policy_path, base_doc):
    gw = await make_gateway(handle_signals=True)
    write_policy(policy_path, revoke_sales_get(base_doc))
    os.kill(os.getpid(), signal.SIGHUP)

    async def denied() -> bool:
        return (await gw.get("/api/inventory", headers=SALES)).status == 403

    await eventually(denied, timeout=10.0, interval=0.02)


@pytest.mark.parametrize("how", ["in-place write", "rename over", "symlink swap"])
async def test_watcher_sees_every_kind_of_edit(make_gateway, policy_path, base_doc, how, tmp_path):
    if how == "symlink swap":
        # Kubernetes ConfigMap layout: rbac.yaml -> ..data/rbac.yaml, ..data -> ..v1
        v1, v2 = tmp_path / "..v1", tmp_path / "..v2"
        v1.mkdir(), v2.mkdir()
        write_policy(v1 / "rbac.yaml", base_doc)
        write_policy(v2 / "rbac.yaml", revoke_sales_get(base_doc))
        (tmp_path / "..data").symlink_to("..v1")
        policy_path.unlink()
        policy_path.symlink_to("..data/rbac.yaml")
    gw = await make_gateway(watch=True, watch_interval=0.05)
    assert (await gw.get("/api/inventory", headers=SALES)).status == 200
    new = revoke_sales_get(base_doc)
    if how == "in-place write":
        with open(policy_path, "r+") as fh:  # same inode, truncated and rewritten
            fh.truncate(0)
            fh.write(yaml.safe_dump(new, sort_keys=False))
    elif how == "rename over":
        write_policy(policy_path, new)  # temp file + rename: a new inode
    else:
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to("..v2")
        tmp_link.replace(tmp_path / "..data")  # atomic symlink swap

    async def denied() -> bool:
        return (await gw.get("/api/inventory", headers=SALES)).status == 403

    await eventually(denied, timeout=10.0, interval=0.02)
    assert gw.gw.store.stats.ok == 1


async def test_watcher_keeps_old_policy_on_a_broken_save_and_takes_the_fix(
    make_gateway, policy_path, base_doc
):
    gw = await make_gateway(watch=True, watch_interval=0.05)
    policy_path.write_text("version: 1\nroles: [broken\n")

    async def refused() -> bool:
        return gw.gw.store.stats.failed >= 1

    await eventually(refused, timeout=10.0, interval=0.02)
    assert (await gw.get("/api/inventory", headers=SALES)).status == 200
    failed = gw.gw.store.stats.failed
    write_policy(policy_path, revoke_sales_get(base_doc))

    async def denied() -> bool:
        return (await gw.get("/api/inventory", headers=SALES)).status == 403

    await eventually(denied, timeout=10.0, interval=0.02)
    assert gw.gw.store.stats.failed == failed  # the broken content was tried once only


async def test_password_change_drops_cached_credentials(gateway, policy_path, base_doc):
    assert (await gateway.get("/api/inventory", headers=SALES)).status == 200  # now cached
    doc = copy.deepcopy(base_doc)
    doc["users"]["sales"]["password_hash"] = fast_hash("newpass")
    write_policy(policy_path, doc)
    assert (await gateway.post("/-/reload", headers=OPS)).status == 200
    assert (await gateway.get("/api/inventory", headers=SALES)).status == 401
    assert (await gateway.get("/api/inventory", headers=basic("sales", "newpass"))).status == 200


async def test_removed_user_is_refused_at_once(gateway, policy_path, base_doc):
    assert (await gateway.get("/api/inventory", headers=SALES)).status == 200
    doc = copy.deepcopy(base_doc)
    del doc["users"]["sales"]
    doc["tests"] = [t for t in doc["tests"] if t.get("user") != "sales"]
    write_policy(policy_path, doc)
    assert (await gateway.post("/-/reload", headers=OPS)).status == 200
    assert (await gateway.get("/api/inventory", headers=SALES)).status == 401


async def test_reload_logs_what_changed(gateway, policy_path, base_doc, caplog):
    doc = revoke_sales_get(base_doc)
    doc["users"]["newbie"] = {"password_hash": fast_hash("x"), "roles": ["sales"]}
    del doc["users"]["colon"]
    write_policy(policy_path, doc)
    with caplog.at_level(logging.INFO, logger="gateway.policy.store"):
        assert (await gateway.post("/-/reload", headers=OPS)).status == 200
    text = caplog.text
    assert "policy reloaded (api)" in text
    assert "users added: newbie" in text and "users removed: colon" in text
    assert "user sales loses: GET /api/inventory" in text
    assert "user sales gains: OPTIONS /api/inventory" in text


async def test_100_reloads_under_load_fail_no_request_and_mix_no_policies(
    gateway, upstream, policy_path, base_doc
):
    doc_a = base_doc
    doc_b = copy.deepcopy(base_doc)
    doc_b["roles"]["sales"]["allow"].append({"methods": ["GET"], "paths": ["/test/**"]})
    # (user, method, path) -> the statuses policy A and policy B give
    cases = [
        (SALES, "GET", "/test/x", {403, 200}),  # differs between A and B
        (SALES, "GET", "/api/inventory", {200}),
        (SALES, "DELETE", "/api/inventory", {403}),
        (basic("tester", "testerpw"), "GET", "/test/y", {200}),
        ({}, "GET", "/api/inventory", {401}),
    ]
    for headers, *_ in cases:  # warm the credential cache so the load is about the swap
        await gateway.get("/api/inventory", headers=headers)
    stop = asyncio.Event()
    seen: dict[int, set[int]] = {i: set() for i in range(len(cases))}
    counts = {"requests": 0}

    async def client(k: int) -> None:
        i = k
        while not stop.is_set():
            headers, method, path, allowed = cases[i % len(cases)]
            resp = await gateway.request(method, path, headers=headers)
            await resp.read()
            assert resp.status in allowed, (method, path, resp.status)
            seen[i % len(cases)].add(resp.status)
            counts["requests"] += 1
            i += 1

    workers = [asyncio.create_task(client(k)) for k in range(8)]
    try:
        for n in range(100):
            write_policy(policy_path, doc_b if n % 2 == 0 else doc_a)
            resp = await gateway.post("/-/reload", headers=OPS)
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["status"] == "reloaded"
            await asyncio.sleep(0)  # let the load run between reloads
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert gateway.gw.store.stats.ok == 100
    assert counts["requests"] > 200
    assert seen[0] == {200, 403}  # both policies really were in force during the run


# --------------------------------------------------------------------------- the store alone


async def test_undoing_a_typo_clears_the_failure_flag_and_tells_listeners(tmp_path, caplog):
    """good → typo (refused, flag set) → the exact content in force again (`git checkout`)
    → flag cleared, counted as recovered, logged, and the listeners told (metric back to 0)."""
    from gateway.policy import PolicyStore, ReloadResult, watch

    path = write_policy(tmp_path / "rbac.yaml", policy_doc())
    good = path.read_bytes()
    store = PolicyStore.open(path)
    told: list[ReloadResult] = []
    store.on_result(told.append)
    task = asyncio.create_task(watch(store, 0.02))
    try:
        path.write_text(good.decode().replace("allow:", "alow:", 1))

        async def refused() -> bool:
            return store.stats.last_error is not None

        await eventually(refused, timeout=10.0, interval=0.02)
        assert told[-1].ok is False and "alow" in told[-1].errors[0]
        with caplog.at_level(logging.INFO, logger="gateway.policy.store"):
            path.write_bytes(good)

            async def cleared() -> bool:
                return store.stats.last_error is None

            await eventually(cleared, timeout=10.0, interval=0.02)
    finally:
        task.cancel()
    assert told[-1].ok and not told[-1].changed and told[-1].recovered
    assert store.stats.recovered == 1 and store.stats.failed == 1
    assert "back to the policy in force" in caplog.text


async def test_watcher_restoring_the_content_in_force_resets_the_metric(make_gateway, policy_path):
    gw = await make_gateway(watch=True, watch_interval=0.05)
    good = policy_path.read_bytes()
    policy_path.write_text("version: 1\nroles: [broken\n")

    async def failed_metric(value: str) -> bool:
        text = await (await gw.get("/-/metrics", headers=OPS)).text()
        return f"gateway_policy_last_reload_failed {value}" in text

    await eventually(lambda: failed_metric("1.0"), timeout=10.0, interval=0.02)
    policy_path.write_bytes(good)
    await eventually(lambda: failed_metric("0.0"), timeout=10.0, interval=0.02)
    assert (await status_of(gw))["last_reload_error"] is None


async def test_reload_result_carries_the_diff_lines(tmp_path):
    from gateway.policy import PolicyStore

    path = write_policy(tmp_path / "rbac.yaml", policy_doc())
    store = PolicyStore.open(path)
    write_policy(path, revoke_sales_get(policy_doc()))
    result = await store.reload("test")
    assert result.changed
    assert "user sales loses: GET /api/inventory" in result.changes
    assert (await store.reload("test")).changes == ()


def test_reload_diff_compares_what_users_can_do_not_rule_lists():
    """Revoking warehouse's PUT: manager keeps PUT through its own rule, so only warehouse
    (and nobody who still can) is reported."""
    from gateway.policy import describe_changes, parse_policy

    doc = policy_doc()
    old = parse_policy(yaml.safe_dump(doc).encode())
    doc = copy.deepcopy(doc)
    doc["roles"]["warehouse"]["allow"] = []
    doc["tests"] = [
        t for t in doc["tests"] if not (t.get("user") == "warehouse" and t["method"] == "PUT")
    ]
    new = parse_policy(yaml.safe_dump(doc).encode())
    lines = describe_changes(old, new)
    assert lines == ["user warehouse loses: PUT /api/inventory"]


def test_a_password_change_alone_is_reported_without_a_grant_diff():
    from gateway.policy import describe_changes, parse_policy

    doc = policy_doc()
    old = parse_policy(yaml.safe_dump(doc).encode())
    doc = copy.deepcopy(doc)
    doc["users"]["sales"]["password_hash"] = fast_hash("another")
    new = parse_policy(yaml.safe_dump(doc).encode())
    assert describe_changes(old, new) == [
        "user sales: password changed (cached credentials dropped)"
    ]


# ------------------------------------------------- a big policy reloaded beside the serving loop


def big_doc(roles: int, rules_per_role: int) -> dict:
    """The shipped policy plus ``roles`` roles of distinct rules, each inheriting sales."""
    extra = {
        f"svc{r}": {
            "inherits": ["sales"],
            "allow": [
                {"methods": ["GET"], "paths": [f"/svc{r}/k{k}/{{item}}"]}
                for k in range(rules_per_role)
            ],
        }
        for r in range(roles)
    }
    return policy_doc(
        extra_users={"svc": ("svcpass", list(extra))},
        extra_roles=extra,
    )


@pytest.fixture
def frozen_objects_released():
    """settle() freezes the test process's objects too; give them back to the collector."""
    import gc

    yield
    gc.unfreeze()


async def test_files_identical_to_the_policy_in_force_are_not_parsed_again(tmp_path, monkeypatch):
    """SIGHUP with nothing changed (a reflex, a ConfigMap resync) costs a digest, not a
    compile; and undoing a refused edit recovers without one either."""
    import gateway.policy.store as store_mod
    from gateway.policy import PolicyStore

    path = write_policy(tmp_path / "rbac.yaml", policy_doc())
    good = path.read_bytes()
    store = PolicyStore.open(path)
    parsed: list[Path] = []
    real = store_mod.load_policy

    def counting(p):
        parsed.append(p)
        return real(p)

    monkeypatch.setattr(store_mod, "load_policy", counting)
    result = await store.reload("test")
    assert result.ok and not result.changed and parsed == []
    path.write_text(good.decode().replace("allow:", "alow:", 1))
    assert not (await store.reload("test")).ok and len(parsed) == 1
    path.write_bytes(good)
    result = await store.reload("test")
    assert result.ok and result.recovered and not result.changed and len(parsed) == 1
    assert store.stats.last_error is None
    write_policy(path, revoke_sales_get(policy_doc()))
    assert (await store.reload("test")).changed and len(parsed) == 2


def test_a_compiled_policy_has_no_reference_cycles(tmp_path):
    """A reload freezes the new policy (gc.freeze) so full collections skip it; the one it
    replaces must then go by reference counting alone, or every reload leaks a policy. Any
    cyclic garbage the loader leaves would be frozen with it and leak the same way."""
    import gc

    from gateway.policy import load_policy

    path = write_policy(tmp_path / "rbac.yaml", big_doc(roles=5, rules_per_role=20))
    gc.collect()
    gc.disable()
    try:
        policy = load_policy(path)
        assert len(policy.roles) > 5 and policy.roles["svc0"].inherits == ("sales",)
        del policy
        assert gc.collect() == 0
    finally:
        gc.enable()


async def test_reloads_do_not_pile_up_frozen_policies(tmp_path, frozen_objects_released):
    import gc
    import sys

    from gateway.policy import PolicyStore

    doc = big_doc(roles=10, rules_per_role=30)
    path = write_policy(tmp_path / "rbac.yaml", doc)
    store = PolicyStore.open(path)
    interval = sys.getswitchinterval()
    text = path.read_text()
    path.write_text(text + "# edit 0\n")
    assert (await store.reload("test")).ok
    after_first = gc.get_freeze_count()
    for n in range(1, 6):
        path.write_text(text + f"# edit {n}\n")  # a new digest: a full load every time
        assert (await store.reload("test")).ok
    path.write_text("version: 1\nroles: [broken\n")
    assert not (await store.reload("test")).ok
    grown = gc.get_freeze_count() - after_first
    # one leaked policy is ~20 objects per rule, 300 rules: 6,000 per reload
    assert grown < 1500, f"{grown} more frozen objects after 5 reloads"
    assert gc.isenabled() and sys.getswitchinterval() == interval
