"""Loading, validating and deciding with rbac.yaml."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.errors import PolicyError
from gateway.policy import load_policy, parse_policy
from tests.helpers import SHIPPED_POLICY, fast_hash

H = fast_hash("pw")


def load_text(tmp_path: Path, text: str, name: str = "p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n").replace("HASH", H))
    return load_policy(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(PolicyError) as exc:
        load_text(tmp_path, text)
    return [str(p) for p in exc.value.problems]


BASE = """
version: 1
roles:
  reader:
    allow:
      - {methods: [GET], paths: [/items, "/items/{id}"]}
users:
  alice: {password_hash: "HASH", roles: [reader]}
"""


def test_shipped_policy_loads_and_passes_its_tests() -> None:
    policy = load_policy(SHIPPED_POLICY)
    assert policy.realm == "inventory"
    assert set(policy.users) >= {"sales", "warehouse", "manager"}
    assert policy.users["manager"].effective_roles == {"manager", "warehouse", "sales"}
    assert len(policy.tests) > 10
    for u in ("sales", "warehouse", "manager", "ops"):  # cost 12, as shipped
        assert policy.users[u].password_hash.startswith(b"$2b$12$")


def test_a_good_policy_decides(tmp_path) -> None:
    p = load_text(tmp_path, BASE)
    assert p.decide("alice", "GET", ("items",)).allowed
    assert p.decide("alice", "GET", ("items", "42")).allowed
    assert p.decide("alice", "HEAD", ("items", "42")).allowed
    assert not p.decide("alice", "GET", ("items", "42", "x")).allowed
    assert not p.decide("alice", "POST", ("items",)).allowed
    assert not p.decide("alice", "get", ("items",)).allowed  # methods are case-sensitive
    assert not p.decide(None, "GET", ("items",)).allowed
    assert not p.decide("bob", "GET", ("items",)).allowed


def test_syntax_error_is_located(tmp_path) -> None:
    out = problems(tmp_path, BASE + "  bob: {password_hash: [unclosed\n")
    assert len(out) == 1 and "YAML syntax error" in out[0]
    assert out[0].startswith(f"{tmp_path / 'p.yaml'}:9:") or ":10:" in out[0]


def test_errors_name_file_line_and_key_path(tmp_path) -> None:
    out = problems(
        tmp_path,
        """
        version: 1
        roles:
          reader:
            allow:
              - methods: [GET, fetch]
                paths: [/items, items-no-slash, /a/**/b]
                colour: blue
        users:
          alice: {password_hash: "HASH", roles: [reader, nosuchrole]}
          bob: {password: "secret", roles: [reader]}
          carol: {password_hash: "plaintext", roles: [reader]}
        """,
    )
    path = tmp_path / "p.yaml"
    joined = "\n".join(out)
    assert len(out) == 7, joined  # every problem at once, not just the first
    assert f"{path}:5: roles.reader.allow[0].methods[1]: bad method 'fetch'" in joined
    assert f"{path}:6: roles.reader.allow[0].paths[1]: bad path pattern" in joined
    assert f"{path}:6: roles.reader.allow[0].paths[2]: bad path pattern" in joined
    assert f"{path}:7: roles.reader.allow[0].colour: unknown key" in joined
    assert f"{path}:9: users.alice.roles[1]: unknown role 'nosuchrole'" in joined
    assert f"{path}:10: users.bob.password: plaintext passwords are refused" in joined
    assert f"{path}:11: users.carol.password_hash: not a bcrypt hash" in joined


def test_inheritance_cycle_is_refused(tmp_path) -> None:
    out = problems(
        tmp_path,
        """
        version: 1
        roles:
          a: {inherits: [b]}
          b: {inherits: [c]}
          c: {inherits: [a]}
        users: {}
        """,
    )
    assert any("inheritance cycle: a -> b -> c -> a" in o for o in out)


def test_unknown_parent_role_and_bad_version(tmp_path) -> None:
    out = problems(
        tmp_path,
        """
        version: 2
        roles:
          a: {inherits: [ghost]}
        """,
    )
    assert any("version: unsupported policy version 2" in o for o in out)
    assert any("roles.a.inherits[0]: unknown role 'ghost'" in o for o in out)


def test_duplicate_keys_are_refused(tmp_path) -> None:
    out = problems(tmp_path, BASE + '  alice: {password_hash: "HASH", roles: []}\n')
    assert any(":8: users.alice: duplicate key" in o for o in out)


def test_failing_test_case_refuses_the_policy_naming_it(tmp_path) -> None:
    out = problems(
        tmp_path,
        BASE
        + """
tests:
  - {user: alice, method: GET, path: /items, expect: allow}
  - {user: alice, method: DELETE, path: /items, expect: allow}
""",
    )
    assert len(out) == 1
    assert ":11: tests[1]: test failed: alice DELETE /items expected allow, got deny" in out[0]


def test_empty_and_non_mapping_files_are_refused(tmp_path) -> None:
    assert problems(tmp_path, "")
    assert problems(tmp_path, "- just\n- a list\n")


def test_unreadable_file_is_a_policy_error(tmp_path) -> None:
    with pytest.raises(PolicyError) as exc:
        load_policy(tmp_path / "missing.yaml")
    assert "cannot read policy" in str(exc.value)


def test_deny_rules_win_over_allow(tmp_path) -> None:
    p = load_text(
        tmp_path,
        """
        version: 1
        roles:
          staff:
            allow: [{methods: ["*"], paths: [/api/**]}]
            deny:  [{methods: ["*"], paths: [/api/admin/**]}]
        users:
          alice: {password_hash: "HASH", roles: [staff]}
        """,
    )
    assert p.decide("alice", "DELETE", ("api", "items")).allowed
    d = p.decide("alice", "GET", ("api", "admin", "x"))
    assert not d.allowed and d.rule is not None and d.rule.id == "roles.staff.deny[0]"
    assert not p.decide("alice", "GET", ("api", "admin")).allowed


def test_prefix_pattern_matches_itself_and_below_only(tmp_path) -> None:
    p = load_text(
        tmp_path,
        """
        version: 1
        roles:
          r: {allow: [{methods: [GET], paths: [/files/**]}]}
        users:
          alice: {password_hash: "HASH", roles: [r]}
        """,
    )
    assert p.decide("alice", "GET", ("files",)).allowed
    assert p.decide("alice", "GET", ("files", "a", "b")).allowed
    assert not p.decide("alice", "GET", ("filesystem",)).allowed


def test_body_constraint(tmp_path) -> None:
    p = load_text(
        tmp_path,
        """
        version: 1
        roles:
          r: {allow: [{methods: [PUT], paths: [/x], body: {json_keys: [name, count]}}]}
        users:
          alice: {password_hash: "HASH", roles: [r]}
        """,
    )
    d = p.decide("alice", "PUT", ("x",))
    assert d.allowed and d.body_keys
    assert d.allows_body(b'{"name": "a", "count": 1}')
    assert d.allows_body(b'{"count": 1}')
    assert not d.allows_body(b'{"name": "a", "price": 1}')
    assert not d.allows_body(b"[1]")
    assert not d.allows_body(b"garbage")


def test_users_file_htpasswd_with_roles_from_policy(tmp_path) -> None:
    (tmp_path / "users.htpasswd").write_text(f"# comment\nalice:{H}\ndave:{H}\n")
    p = load_text(
        tmp_path,
        """
        version: 1
        users_file: users.htpasswd
        roles:
          reader: {allow: [{methods: [GET], paths: [/items]}]}
        users:
          alice: {roles: [reader]}
        """,
    )
    assert p.users["alice"].password_hash == H.encode()
    assert p.decide("alice", "GET", ("items",)).allowed
    assert not p.decide("dave", "GET", ("items",)).allowed  # authenticated, no roles
    assert any("dave" in str(w) for w in p.warnings)


def test_users_file_rejects_non_bcrypt_entries(tmp_path) -> None:
    (tmp_path / "users.htpasswd").write_text("alice:$apr1$abc$def\n")
    out = problems(
        tmp_path,
        """
        version: 1
        users_file: users.htpasswd
        roles: {}
        users: {}
        """,
    )
    assert any("users.htpasswd:1: alice: only bcrypt entries" in o for o in out)


def test_lint_warns_about_shadowed_rules_unused_roles_and_cost(tmp_path) -> None:
    p = load_text(
        tmp_path,
        """
        version: 1
        roles:
          base: {allow: [{methods: [GET], paths: [/api/**]}]}
          child:
            inherits: [base]
            allow: [{methods: [GET], paths: ["/api/items/{id}"]}]
          lonely: {allow: [{methods: [GET], paths: [/x]}]}
        users:
          alice: {password_hash: "HASH", roles: [child]}
        """,
    )
    text = "\n".join(str(w) for w in p.warnings)
    assert "roles.child.allow[0]: warning: rule is shadowed by roles.base.allow[0]" in text
    assert "roles.lonely: warning: role 'lonely' is held by no user" in text
    assert "bcrypt cost 4 is below 10-13" in text and "ms of CPU here" in text


def test_parse_is_deterministic_and_hash_is_of_content(tmp_path) -> None:
    raw = SHIPPED_POLICY.read_bytes()
    a = parse_policy(raw, source="a")
    b = parse_policy(raw, source="b")
    assert a.sha256 == b.sha256


def test_10k_rule_policy_compiles(tmp_path) -> None:
    rules = "\n".join(
        f'      - {{methods: [GET], paths: ["/r{i}/{{id}}/x{i}"]}}' for i in range(10_000)
    )
    p = load_text(
        tmp_path,
        f"""
version: 1
roles:
  big:
    allow:
{rules}
users:
  alice: {{password_hash: "HASH", roles: [big]}}
""",
    )
    assert p.decide("alice", "GET", ("r5000", "7", "x5000")).allowed
    assert not p.decide("alice", "GET", ("r5000", "7", "x5001")).allowed


def test_lint_warns_about_grants_under_dash_that_reach_nothing(tmp_path) -> None:
    p = load_text(
        tmp_path,
        """
        version: 1
        roles:
          ops: {allow: [{methods: [GET, POST], paths: [/-/**]}]}
          odd: {allow: [{methods: [GET], paths: [/-/api]}]}
          fine: {allow: [{methods: [GET], paths: [/-/status, /-/metrics, /**]}]}
        users:
          alice: {password_hash: "HASH", roles: [ops, odd, fine]}
        """,
    )
    text = "\n".join(str(w) for w in p.warnings)
    assert "roles.ops.allow[0]: warning: /-/** grants paths under /- that are not gateway" in text
    assert "roles.odd.allow[0]: warning: /-/api grants paths under /-" in text
    assert "roles.fine" not in text  # endpoints and catch-alls are not flagged


def test_shipped_policy_has_no_warnings() -> None:
    assert load_policy(SHIPPED_POLICY).warnings == ()


@pytest.mark.parametrize("name", ['"evil\\n"', '"a b"', '"x\\r"'])
def test_a_user_name_with_a_line_break_or_space_is_refused(tmp_path, name) -> None:
    """A name ending in a newline once passed the ``^...$`` check (``$`` matches before a
    final newline) and went into the upstream head as a bare LF (the second review of the
    callback path)."""
    text = f"""
    version: 1
    roles:
      r:
        allow:
          - methods: [GET]
            paths: [/x]
    users:
      {name}:
        password_hash: HASH
        roles: [r]
    """
    found = problems(tmp_path, text)
    assert any("users" in p for p in found), found
