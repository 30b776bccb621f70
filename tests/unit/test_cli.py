"""The command line, run as a user would (a real `python -m gateway` process)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest

from gateway.policy import load_policy
from tests.helpers import (
    PASSWORDS,
    ROOT,
    SHIPPED_POLICY,
    Process,
    fast_hash,
    policy_doc,
    write_policy,
)


def gateway(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_in(ROOT, *args, stdin=stdin, env=env)


def run_in(
    cwd: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m gateway ARGS`` in ``cwd``, with no GATEWAY_* variable but those given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_check_accepts_the_shipped_policy() -> None:
    r = gateway("check", str(SHIPPED_POLICY))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "tests passed" in r.stdout


def test_check_reports_every_problem_as_file_line_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nroles:\n  r:\n    allow:\n      - {methods: [get], paths: [x]}\n"
        "users:\n  u: {password_hash: hunter2, roles: [r]}\n"
    )
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
    p.write_text(
        f"version: 1\nroles:\n  r: {{allow: [{{methods: [GET], paths: [/x]}}]}}\n"
        f"  unused: {{}}\nusers:\n  u: {{password_hash: '{h}', roles: [r]}}\n"
    )
    r = gateway("check", str(p))
    assert r.returncode == 0
    assert "warning: role 'unused' is held by no user" in r.stderr
    assert "warning: bcrypt cost 4" in r.stderr


def test_explain_shows_canonical_path_decision_and_rule() -> None:
    r = gateway("explain", str(SHIPPED_POLICY), "--user", "sales", "GET", "/api/inventory?name=x")
    assert r.returncode == 0, r.stderr
    assert "canonical: /api/inventory" in r.stdout
    assert "decision:  ALLOW" in r.stdout
    assert "roles.sales.allow[0] (GET /api/inventory)" in r.stdout
    r = gateway("explain", str(SHIPPED_POLICY), "--user", "sales", "DELETE", "/api/inventory")
    assert r.returncode == 3 and "decision:  DENY" in r.stdout
    assert "no rule for [sales] allows DELETE" in r.stdout


def test_explain_runs_the_request_guard() -> None:
    r = gateway("explain", str(SHIPPED_POLICY), "--user", "manager", "GET", "/api/%2e%2e/admin")
    assert r.returncode == 3
    assert "(rejected by the guard)" in r.stdout and "dot-segments" in r.stdout


def test_explain_all_users_matrix() -> None:
    r = gateway("explain", str(SHIPPED_POLICY), "--all-users", "POST", "/api/inventory")
    assert r.returncode == 0
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[1:]}
    assert rows == {
        "(anonymous)": "DENY",
        "manager": "ALLOW",
        "ops": "DENY",
        "sales": "DENY",
        "warehouse": "DENY",
    }


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


# --------------------------------------------------------------------------- operator experience


def test_version_on_the_module_and_on_the_console_script() -> None:
    r = gateway("--version")
    assert r.returncode == 0 and r.stdout == "rbac-gateway 0.2.0\n"
    script = Path(sys.executable).parent / "rbac-gateway"
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "rbac-gateway 0.2.0\n"


def test_console_script_checks_and_names_itself(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "rbac-gateway"
    r = subprocess.run(
        [str(script), "check", str(SHIPPED_POLICY)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and " OK (sha256 " in r.stdout
    r = subprocess.run(
        [str(script), "serve", "--port", "abc"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert r.stderr == "rbac-gateway serve: --port (GATEWAY_PORT): 'abc' is not an integer\n"


def test_check_without_argument_checks_what_serve_would_use(tmp_path: Path) -> None:
    shutil.copy(SHIPPED_POLICY, tmp_path / "rbac.yaml")
    r = run_in(tmp_path, "check")
    assert r.returncode == 0 and r.stdout.startswith("rbac.yaml: OK (sha256 "), r.stderr
    other = tmp_path / "other.yaml"
    other.write_text("version: 2\n")
    r = run_in(tmp_path, "check", env={"GATEWAY_POLICY": str(other)})
    assert r.returncode == 1
    assert (
        r.stderr.splitlines()[0] == f"{other}:1: version: unsupported policy version 2: expected 1"
    )


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--port", "abc"], {}, "--port (GATEWAY_PORT): 'abc' is not an integer"),
        ([], {"GATEWAY_PORT": "abc"}, "--port (GATEWAY_PORT): 'abc' is not an integer"),
        (["--port", "70000"], {}, "--port (GATEWAY_PORT): must be 0..65535, got '70000'"),
        (["--workers", "0"], {}, "--workers (GATEWAY_WORKERS): must be at least 1, got '0'"),
        (["--workers", "-3"], {}, "--workers (GATEWAY_WORKERS): must be at least 1, got '-3'"),
        (
            ["--workers", "many"],
            {},
            "--workers (GATEWAY_WORKERS): must be a count or 'auto', got 'many'",
        ),
        (
            ["--watch-interval", "0"],
            {},
            "--watch-interval (GATEWAY_WATCH_INTERVAL): must be greater than 0, got '0'",
        ),
        (
            ["--upstream-timeout", "0"],
            {},
            "--upstream-timeout (GATEWAY_UPSTREAM_TIMEOUT): must be greater than 0, got '0'",
        ),
        (
            [],
            {"GATEWAY_CONNECT_TIMEOUT": "0"},
            "--connect-timeout (GATEWAY_CONNECT_TIMEOUT): must be greater than 0, got '0'",
        ),
        (
            ["--audit-log", "/nonexistent/dir/a.log"],
            {},
            "--audit-log (GATEWAY_AUDIT_LOG): /nonexistent/dir/a.log: No such file or directory",
        ),
        (
            ["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"],
            {},
            "--tls-cert (GATEWAY_TLS_CERT): /nonexistent/cert.pem: No such file or directory",
        ),
        (
            ["--server", "aiohttp"],
            {},
            "--server (GATEWAY_SERVER): aiohttp: the aiohttp server "
            "mode was removed (it decoded compressed request bodies: docs/SECURITY.md); omit --server",
        ),
    ],
)
def test_serve_refuses_bad_values_in_one_line_naming_flag_and_variable(
    args: list[str], env: dict[str, str], message: str
) -> None:
    r = gateway("serve", "--policy", str(SHIPPED_POLICY), *args, env=env)
    assert r.returncode == 2
    assert r.stderr == f"python -m gateway serve: {message}\n"


def test_serve_names_a_tls_file_that_is_not_pem(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    r = gateway("serve", "--tls-cert", str(cert), "--tls-key", str(key))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(
        f"python -m gateway serve: --tls-cert (GATEWAY_TLS_CERT): {cert} "
        f"/ {key}: not a matching PEM certificate and private key"
    )


def test_serve_help_names_the_variable_of_every_flag() -> None:
    r = gateway("serve", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout[r.stdout.index("options:") :].split())
    flags = set(re.findall(r"^\s+(--[a-z-]+)", r.stdout, re.M)) - {"--help"}
    assert len(flags) >= 18, flags
    for flag in flags:
        entry = text[text.index(f"{flag} ") :]
        entry = entry[: entry.index("]") + 1]
        assert "[GATEWAY_" in entry, entry
    assert "--no-watch do not watch the policy file" in text
    assert "--log-level {DEBUG,INFO,WARNING,ERROR} least severe log level" in text


def test_hash_password_refuses_a_cost_that_takes_minutes() -> None:
    r = gateway("hash-password", "--cost", "20", stdin="pw\n")
    assert r.returncode == 2 and r.stdout == ""
    assert re.fullmatch(
        r"python -m gateway hash-password: --cost 20 makes every password check "
        r"take ~[\d.]+ (s|min) of CPU here; refused above 16 without --force "
        r"\(10-13 recommended\)\n",
        r.stderr,
    ), r.stderr


def test_hash_password_warns_above_13_with_the_time_it_takes() -> None:
    r = gateway("hash-password", "--cost", "14", stdin="pw\n")
    assert r.returncode == 0 and r.stdout.startswith("$2b$14$")
    assert re.fullmatch(
        r"python -m gateway hash-password: warning: --cost 14 makes every "
        r"password check take ~[\d.]+ (ms|s) of CPU here \(10-13 recommended\)\n",
        r.stderr,
    ), r.stderr


def test_explain_does_not_contradict_itself_on_a_body_that_does_not_fit() -> None:
    r = gateway(
        "explain",
        str(SHIPPED_POLICY),
        "--user",
        "warehouse",
        "PUT",
        "/api/inventory",
        "--body",
        '{"name": "x", "price": 1}',
    )
    assert r.returncode == 3
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines())
    assert lines["decision"].strip() == (
        "DENY (the body's keys {name, price} are not within {count, name})"
    )
    assert "allowed" not in lines["because"]
    r = gateway(
        "explain",
        str(SHIPPED_POLICY),
        "--user",
        "warehouse",
        "PUT",
        "/api/inventory",
        "--body",
        '{"name": "x", "count": 1}',
    )
    assert r.returncode == 0 and "decision:  ALLOW\n" in r.stdout
    assert "(the body fits)" in r.stdout


def test_explain_reports_bad_json_as_bad_json() -> None:
    r = gateway(
        "explain",
        str(SHIPPED_POLICY),
        "--user",
        "warehouse",
        "PUT",
        "/api/inventory",
        "--body",
        "{bad json",
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("python -m gateway explain: --body is not valid JSON: ")
    assert len(r.stderr.splitlines()) == 1


def test_explain_without_a_request_lists_what_the_user_may_do() -> None:
    r = gateway("explain", str(SHIPPED_POLICY), "--user", "warehouse")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "warehouse (roles: sales,warehouse) may:",
        "  GET  /-/healthz   [public[0]]",
        "  GET  /-/ready   [public[0]]",
        "  GET  /api/inventory   [roles.sales.allow[0]]",
        "  PUT  /api/inventory if the JSON body's keys are within {count, name}   "
        "[roles.warehouse.allow[0]]",
        "everything else is denied (HEAD goes wherever GET does)",
    ]


OVERLAP = """\
version: 1
roles:
  ops: {allow: [{methods: [GET, POST], paths: [/-/**]}]}
  watcher: {allow: [{methods: [GET], paths: [/-/status]}]}
  sales:
    allow: [{methods: [GET], paths: ["/api/{item}", "/api/**"]}]
    deny: [{methods: [GET], paths: [/api/secret]}]
users:
  o: {password_hash: "HASH", roles: [ops]}
  w: {password_hash: "HASH", roles: [watcher]}
  s: {password_hash: "HASH", roles: [sales]}
"""


def test_routes_agrees_with_explain_when_patterns_overlap(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(OVERLAP.replace("HASH", bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode()))
    r = gateway("routes", str(p))
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith(("PATH", "/"))]
    head = rows[0]
    cell = {(row[0], row[1], col): row[i] for row in rows[1:] for i, col in enumerate(head)}
    assert cell[("/-/status", "GET", "ops")] == "yes"  # through /-/**, as explain says
    assert cell[("/api/secret", "GET", "sales")] == "DENY"
    for (path, method, col), mark in cell.items():
        if col in ("ops", "watcher", "sales") and not path.endswith(("}", "**")):
            user = {"ops": "o", "watcher": "w", "sales": "s"}[col]
            e = gateway("explain", str(p), "--user", user, method, path)
            assert (mark in ("yes", "inh")) == (e.returncode == 0), (path, method, col, mark)


def test_reload_command_reports_the_digest_or_the_refusal_with_location(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "rbac.yaml", policy_doc())
    server = Process(
        [
            "-m",
            "gateway",
            "serve",
            "--port",
            "0",
            "--policy",
            str(policy),
            "--upstream",
            "http://127.0.0.1:9",
            "--audit-log",
            "off",
            "--no-watch",
        ],
        tmp_path / "gateway.log",
    )
    try:
        url = server.wait_listening()
        server.wait_healthy("/-/healthz")
        admin = {"GATEWAY_ADMIN_USER": "ops", "GATEWAY_ADMIN_PASSWORD": PASSWORDS["ops"]}
        r = gateway("reload", "--url", url, env=admin)
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"unchanged: sha256 {load_policy(policy).sha256}\n"

        doc = policy_doc()
        doc["users"]["newbie"] = {"password_hash": fast_hash("x"), "roles": ["sales"]}
        write_policy(policy, doc)
        r = gateway("reload", "--url", url, env=admin)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0] == f"reloaded: sha256 {load_policy(policy).sha256}"

        policy.write_text(policy.read_text().replace("allow:", "alow:", 1))
        r = gateway("reload", "--url", url, env=admin)
        assert r.returncode == 1 and r.stdout == ""
        lines = r.stderr.splitlines()
        assert lines[0] == (
            "python -m gateway reload: the new policy was refused; the one in force stays"
        )
        assert re.match(
            rf"{re.escape(str(policy))}:\d+: roles\.sales\.alow: unknown key", lines[1]
        ), lines

        r = gateway("reload", "--url", url, env={**admin, "GATEWAY_ADMIN_PASSWORD": "wrong"})
        assert r.returncode == 1
        assert (
            r.stderr == f"python -m gateway reload: {url}/-/reload answered 401: "
            "invalid credentials\n"
        )
        r = gateway("reload", "--url", url)
        assert r.returncode == 2 and "GATEWAY_ADMIN_USER" in r.stderr
    finally:
        server.stop()
    r = gateway("reload", "--url", url, env=admin)
    assert r.returncode == 1
    assert r.stderr == f"python -m gateway reload: cannot reach {url}: Connection refused\n"


def test_workers_default_to_one_per_usable_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.settings import parse_settings, usable_cpus

    monkeypatch.delenv("GATEWAY_WORKERS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    assert 1 <= usable_cpus() <= cpus
    assert parse_settings([]).workers == usable_cpus()
    assert parse_settings(["--workers", "auto"]).workers == usable_cpus()
    assert parse_settings(["--workers", "3"]).workers == 3
    monkeypatch.setenv("GATEWAY_WORKERS", "1")
    assert parse_settings([]).workers == 1
    monkeypatch.setenv("GATEWAY_WORKERS", "AUTO")
    assert parse_settings([]).workers == usable_cpus()


def test_auto_workers_respect_a_containers_cpu_quota(tmp_path: Path) -> None:
    from gateway.settings import usable_cpus

    cpus = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == cpus  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == cpus
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: one worker
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{cpus * 100000 + 1} 100000\n")  # more than we have
    assert usable_cpus(tmp_path) == cpus
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == cpus
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("garbage\n")
    assert usable_cpus(tmp_path) == cpus
