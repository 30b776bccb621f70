"""The command line, run as a user would (a real `python -m gateway` process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bcrypt

from tests.helpers import ROOT, SHIPPED_POLICY


def gateway(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_check_accepts_the_shipped_policy() -> None:
    r = gateway("check", str(SHIPPED_POLICY))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "tests passed" in r.stdout


def test_check_reports_every_problem_as_file_line_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nroles:\n  r:\n    allow:\n      - {methods: [get], paths: [x]}\n"
                   "users:\n  u: {password_hash: hunter2, roles: [r]}\n")
    r = gateway("check", str(bad))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert f"{bad}:5: roles.r.allow[0].methods[0]: bad method 'get'" in lines[0]
    assert any(f"{bad}:5: roles.r.allow[0].paths[0]: bad path pattern" in x for x in lines)
    assert any(f"{bad}:7: users.u.password_hash: not a bcrypt hash" in x for x in lines)
    assert "Traceback" not in r.stderr


def test_check_prints_warnings_without_refusing(tmp_path: Path) -> None:
    h = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    p = tmp_path / "p.yaml"
    p.write_text(f"version: 1\nroles:\n  r: {{allow: [{{methods: [GET], paths: [/x]}}]}}\n"
                 f"  unused: {{}}\nusers:\n  u: {{password_hash: '{h}', roles: [r]}}\n")
    r = gateway("check", str(p))
    assert r.returncode == 0
    assert "warning: role 'unused' is held by no user" in r.stderr
    assert "warning: bcrypt cost 4" in r.stderr


def test_explain_shows_canonical_path_decision_and_rule() -> None:
    r = gateway("explain", str(SHIPPED_POLICY), "--user", "sales", "GET",
                "/api/inventory?name=x")
    assert r.returncode == 0, r.stderr
    assert "canonical: /api/inventory" in r.stdout
    assert "decision:  ALLOW" in r.stdout
    assert "roles.sales.allow[0] (GET /api/inventory)" in r.stdout
    r = gateway("explain", str(SHIPPED_POLICY), "--user", "sales", "DELETE", "/api/inventory")
    assert r.returncode == 3 and "decision:  DENY" in r.stdout
    assert "no rule for [sales] allows DELETE" in r.stdout


def test_explain_runs_the_request_guard() -> None:
    r = gateway("explain", str(SHIPPED_POLICY), "--user", "manager", "GET",
                "/api/%2e%2e/admin")
    assert r.returncode == 3
    assert "(rejected by the guard)" in r.stdout and "dot-segments" in r.stdout


def test_explain_all_users_matrix() -> None:
    r = gateway("explain", str(SHIPPED_POLICY), "--all-users", "POST", "/api/inventory")
    assert r.returncode == 0
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[1:]}
    assert rows == {"(anonymous)": "DENY", "manager": "ALLOW", "ops": "DENY",
                    "sales": "DENY", "warehouse": "DENY"}


def test_explain_unknown_user_is_a_clear_error() -> None:
    r = gateway("explain", str(SHIPPED_POLICY), "--user", "mallory", "GET", "/")
    assert r.returncode == 2 and "unknown user 'mallory'" in r.stderr


def test_routes_prints_the_role_matrix() -> None:
    r = gateway("routes", str(SHIPPED_POLICY))
    assert r.returncode == 0
    rows = [line.split() for line in r.stdout.splitlines()]
    head = rows[0]
    assert head[:2] == ["PATH", "METHOD"] and "manager" in head
    delete = next(row for row in rows if row[:2] == ["/api/inventory", "DELETE"])
    assert delete[head.index("manager")] == "yes" and delete[head.index("sales")] == "-"
    get = next(row for row in rows if row[:2] == ["/api/inventory", "GET"])
    assert get[head.index("warehouse")] == "inh"


def test_hash_password_from_stdin_verifies() -> None:
    r = gateway("hash-password", "--cost", "4", stdin="correct horse:battery\n")
    assert r.returncode == 0, r.stderr
    hashed = r.stdout.strip().encode()
    assert hashed.startswith(b"$2b$04$")
    assert bcrypt.checkpw(b"correct horse:battery", hashed)


def test_hash_password_refuses_empty_and_too_long() -> None:
    assert gateway("hash-password", "--cost", "4", stdin="\n").returncode == 1
    r = gateway("hash-password", "--cost", "4", stdin="x" * 80 + "\n")
    assert r.returncode == 1 and "72 bytes" in r.stderr


def test_serve_refuses_a_broken_policy_with_location(tmp_path: Path) -> None:
    bad = tmp_path / "rbac.yaml"
    bad.write_text("version: 1\nusers:\n  u: {password: plain, roles: []}\n")
    r = gateway("serve", "--policy", str(bad), "--port", "0")
    assert r.returncode == 1
    assert f"{bad}:3: users.u.password: plaintext passwords are refused" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_flags_and_env_get_one_line_errors() -> None:
    r = gateway("serve", "--port", "http")
    assert r.returncode == 2 and "--port" in r.stderr and "Traceback" not in r.stderr
    r = gateway("serve", "--upstream", "ftp://x")
    assert r.returncode == 2 and "upstream must be" in r.stderr
