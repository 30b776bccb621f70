"""The command line: ``serve``, ``check``, ``explain``, ``routes``, ``hash-password``."""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from pathlib import Path
from typing import Sequence

import bcrypt

from .errors import PolicyError
from .policy import Policy, Rule, load_policy, role_closure
from .settings import add_serve_arguments, settings_from_args
from .supervisor import worker_settings

log = logging.getLogger("gateway")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="HTTP Basic + role-based authorization gateway (rbac.yaml).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    add_serve_arguments(serve)

    check = sub.add_parser("check", help="validate a policy and run its test cases")
    check.add_argument("policy", type=Path)
    check.add_argument("-q", "--quiet", action="store_true", help="print errors only")

    explain = sub.add_parser("explain", help="show how a request would be decided")
    explain.add_argument("policy", type=Path)
    who = explain.add_mutually_exclusive_group()
    who.add_argument("--user", help="user name (omit for an anonymous request)")
    who.add_argument("--all-users", action="store_true", help="a decision for every user")
    explain.add_argument("method")
    explain.add_argument("target", help="request target, e.g. '/api/inventory?name=x'")
    explain.add_argument("--body", help="JSON body, for rules with a body constraint")

    routes = sub.add_parser("routes", help="the role × (method, path) matrix")
    routes.add_argument("policy", type=Path)
    routes.add_argument("--by", choices=["role", "user"], default="role")

    hp = sub.add_parser("hash-password", help="read a password, print its bcrypt hash")
    hp.add_argument("--cost", type=int, default=12, help="bcrypt cost, 10-14 (default 12)")

    args = parser.parse_args(argv)
    if args.command == "serve":
        # A worker of --workers N takes its settings from its supervisor, not from argv.
        settings = worker_settings() or settings_from_args(args, serve)
        from .server import serve as run_serve
        return run_serve(settings)
    if args.command == "check":
        return cmd_check(args.policy, quiet=args.quiet)
    if args.command == "explain":
        return cmd_explain(args)
    if args.command == "routes":
        return cmd_routes(args.policy, by=args.by)
    return cmd_hash_password(args.cost)


def _load(path: Path) -> Policy | None:
    try:
        return load_policy(path)
    except PolicyError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return None


def cmd_check(path: Path, *, quiet: bool = False) -> int:
    policy = _load(path)
    if policy is None:
        print(f"{path}: refused", file=sys.stderr)
        return 1
    for w in policy.warnings:
        print(w, file=sys.stderr)
    if not quiet:
        rules = sum(len(r.allow) + len(r.deny) for r in policy.roles.values()) + len(policy.public)
        print(f"{path}: OK (sha256 {policy.sha256[:12]}; {len(policy.roles)} roles, "
              f"{len(policy.users)} users, {rules} rules, {len(policy.tests)} tests passed, "
              f"{len(policy.warnings)} warnings)")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    policy = _load(args.policy)
    if policy is None:
        return 1
    users: list[str | None]
    if args.all_users:
        users = [None, *sorted(policy.users)]
    else:
        if args.user is not None and args.user not in policy.users:
            print(f"explain: unknown user {args.user!r} (known: "
                  f"{', '.join(sorted(policy.users))})", file=sys.stderr)
            return 2
        users = [args.user]
    body = args.body.encode() if args.body is not None else None
    rows = []
    for user in users:
        decision, path = policy.decide_request(user, args.method, args.target)
        allowed = decision.allowed
        note = ""
        if allowed and decision.body_keys:
            if body is None:
                note = " (only with a JSON body within the rule's keys)"
            else:
                allowed = decision.allows_body(body)
                note = "" if allowed else " (body not allowed)"
        rows.append((user or "(anonymous)", "allow" if allowed else "deny", note,
                     decision.reason, path))
    if not args.all_users:
        user, verdict, note, reason, path = rows[0]
        print(f"request:   {args.method} {args.target}")
        print(f"canonical: {path if path is not None else '(rejected by the guard)'}")
        print(f"user:      {user}"
              + (f" (roles: {policy.users[args.user].roles_header})" if args.user else ""))
        print(f"decision:  {verdict.upper()}{note}")
        print(f"because:   {reason}")
        return 0 if verdict == "allow" else 3
    width = max(len(r[0]) for r in rows)
    canonical = rows[0][4]
    print(f"{args.method} {args.target}  →  canonical "
          f"{canonical if canonical is not None else '(rejected by the guard)'}")
    for user, verdict, note, reason, _ in rows:
        print(f"  {user:<{width}}  {verdict.upper():<5}{note}  {reason}")
    return 0


def cmd_routes(path: Path, *, by: str) -> int:
    policy = _load(path)
    if policy is None:
        return 1
    subjects: list[tuple[str, set[str] | None]]
    if by == "role":
        subjects = [(name, {name}) for name in sorted(policy.roles)]
    else:
        subjects = [(name, None) for name in sorted(policy.users)]
    routes: dict[tuple[str, str], dict[str, str]] = {}

    def mark(subject: str, rules: list[Rule], effective: bool) -> None:
        for r in rules:
            for m in sorted(r.methods):
                for p in r.patterns:
                    cell = routes.setdefault((p.text, m), {})
                    mark_ = ("DENY" if r.effect == "deny" else "body" if r.body_keys
                             else "yes" if effective else "inh")
                    if _RANK[mark_] > _RANK.get(cell.get(subject, "-"), 0):
                        cell[subject] = mark_

    for name, roles in subjects:
        if roles is not None:
            closure = role_closure(policy, name)
            mark(name, [*policy.roles[name].allow, *policy.roles[name].deny], True)
            inherited = [r for n in closure - {name} for r in (*policy.roles[n].allow,
                                                                *policy.roles[n].deny)]
            mark(name, inherited, False)
        else:
            mark(name, policy.rules_of(name), True)
    mark("public", list(policy.public), True)
    cols = [s for s, _ in subjects] + ["public"]
    head = ["PATH", "METHOD", *cols]
    body = [[p, m, *(routes[(p, m)].get(c, "-") for c in cols)]
            for (p, m) in sorted(routes)]
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
    for row in [head, *body]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    if by == "role":
        print("\nyes = granted by the role itself, inh = inherited, body = only with an allowed "
              "JSON body, DENY = denied (deny wins), - = not granted")
    return 0


_RANK = {"-": 0, "body": 1, "inh": 2, "yes": 3, "DENY": 4}


def cmd_hash_password(cost: int) -> int:
    if not 4 <= cost <= 31:
        print("hash-password: --cost must be between 4 and 31 (10-14 recommended)",
              file=sys.stderr)
        return 2
    try:
        if sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                print("hash-password: the passwords differ", file=sys.stderr)
                return 1
        else:
            password = sys.stdin.readline().rstrip("\r\n")
    except (EOFError, KeyboardInterrupt):
        print("\nhash-password: no password given", file=sys.stderr)
        return 1
    raw = password.encode("utf-8")
    if not raw:
        print("hash-password: empty password refused", file=sys.stderr)
        return 1
    if len(raw) > 72:
        print("hash-password: bcrypt uses at most 72 bytes of a password; choose a shorter one",
              file=sys.stderr)
        return 1
    print(bcrypt.hashpw(raw, bcrypt.gensalt(rounds=cost)).decode())
    return 0
