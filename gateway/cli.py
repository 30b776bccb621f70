"""The command line: ``serve``, ``check``, ``explain``, ``routes``, ``hash-password``, ``reload``.

Long because each command's arguments and its exact output (which the README shows and the
tests compare) live together; the work behind them is in ``policy/`` and ``process``.

Run as ``python -m gateway`` or as the ``rbac-gateway`` console script; messages name the
command the way it was invoked.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import bcrypt

from . import __version__
from .errors import PolicyError
from .policy import Decision, Policy, load_policy
from .policy.cost import RECOMMENDED, check_seconds
from .policy.grants import decide_user, role_matcher, routes, sample
from .policy.patterns import compile_pattern
from .settings import add_serve_arguments, settings_from_args
from .supervisor import worker_settings

DEFAULT_COST = 12
WARN_COST = RECOMMENDED[1]  # above: a warning with the time one check takes here
MAX_COST = 16  # above: refused unless --force (cost 20 is about a minute per login)


class _Parser(argparse.ArgumentParser):
    """One line per usage error (``PROG: message``) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run one command; the exit status is returned (0 ok, 1 refused, 2 usage, 3 denied)."""
    parser = _Parser(
        prog=prog or Path(sys.argv[0]).name,
        description="HTTP Basic + role-based authorization gateway (rbac.yaml).",
    )
    parser.add_argument("--version", action="version", version=f"rbac-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    add_serve_arguments(serve)

    check = sub.add_parser("check", help="validate a policy and run its test cases")
    check.add_argument(
        "policy",
        type=Path,
        nargs="?",
        help="policy file (default: what serve would use: $GATEWAY_POLICY, else rbac.yaml)",
    )
    check.add_argument("-q", "--quiet", action="store_true", help="print errors only")

    explain = sub.add_parser(
        "explain",
        help="show how a request would be decided, or all a user may do",
        description="With METHOD and TARGET: how the gateway decides that request. Without: "
        "every (method, path pattern) the user (or anonymous) may use.",
    )
    explain.add_argument("policy", type=Path)
    who = explain.add_mutually_exclusive_group()
    who.add_argument("--user", help="user name (omit for an anonymous request)")
    who.add_argument("--all-users", action="store_true", help="a decision for every user")
    explain.add_argument("method", nargs="?")
    explain.add_argument("target", nargs="?", help="request target, e.g. '/api/inventory?name=x'")
    explain.add_argument("--body", help="JSON body, for rules with a body constraint")

    rts = sub.add_parser("routes", help="the role × (method, path) matrix")
    rts.add_argument("policy", type=Path)
    rts.add_argument("--by", choices=["role", "user"], default="role")

    hp = sub.add_parser("hash-password", help="read a password, print its bcrypt hash")
    hp.add_argument(
        "--cost",
        type=int,
        default=DEFAULT_COST,
        help=f"bcrypt cost, 10-{WARN_COST} recommended (default {DEFAULT_COST})",
    )
    hp.add_argument(
        "--force",
        action="store_true",
        help=f"accept a cost above {MAX_COST} (each login then takes seconds)",
    )

    rl = sub.add_parser(
        "reload",
        help="ask the running gateway to reload its policy; print the result",
        description="POST /-/reload with the credentials in GATEWAY_ADMIN_USER and "
        "GATEWAY_ADMIN_PASSWORD (a user the policy allows POST /-/reload). "
        "Exit 0 when the policy is in force, 1 when it was refused.",
    )
    rl.add_argument(
        "--url",
        default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"),
        help="the gateway's base URL [GATEWAY_URL] (default %(default)s)",
    )
    rl.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the answer (default 30)"
    )

    args, extra = parser.parse_known_args(argv)
    if (
        args.command == "explain"
        and args.method is None
        and extra[:2]
        and not any(x.startswith("-") for x in extra[:2])
    ):
        # argparse settles optional positionals before it sees the options after them
        # (`explain rbac.yaml --user sales GET /x`): take the request from what is left.
        args.method, args.target = (extra[:2] + [None])[:2]
        extra = extra[2:]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "serve":
        # A worker of --workers N takes its settings from its supervisor, not from argv.
        settings = worker_settings() or settings_from_args(args, serve)
        from .process import serve as run_serve  # the network stack, for this command only

        return run_serve(settings)
    if args.command == "check":
        return cmd_check(
            args.policy or Path(os.environ.get("GATEWAY_POLICY", "rbac.yaml")), quiet=args.quiet
        )
    if args.command == "explain":
        if (args.method is None) != (args.target is None) or (
            args.all_users and args.method is None
        ):
            explain.error("give both METHOD and TARGET (or neither, with --user, for a summary)")
        if args.method is None:
            return cmd_summary(args.policy, args.user, prog=explain.prog)
        return cmd_explain(args, prog=explain.prog)
    if args.command == "routes":
        return cmd_routes(args.policy, by=args.by)
    if args.command == "reload":
        return cmd_reload(args.url, args.timeout, prog=rl.prog)
    return cmd_hash_password(args.cost, force=args.force, prog=hp.prog)


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
        print(
            f"{path}: OK (sha256 {policy.sha256[:12]}; {len(policy.roles)} roles, "
            f"{len(policy.users)} users, {rules} rules, {len(policy.tests)} tests passed, "
            f"{len(policy.warnings)} warnings)"
        )
    return 0


def _body_problem(decision: Decision, body: bytes) -> str | None:
    """Why ``body`` does not satisfy an allow with a body constraint, or ``None`` if it does."""
    if decision.allows_body(body):
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "the body is not JSON"
    if not isinstance(doc, dict):
        return "the body is not a JSON object"
    return f"the body's keys {{{', '.join(sorted(doc))}}} are not within " + " or ".join(
        "{" + ", ".join(sorted(k)) + "}" for k in decision.body_keys
    )


def _body_rule(decision: Decision) -> str:
    rule = decision.rule.describe() if decision.rule is not None else "a body-constrained rule"
    return f"{rule} admits only a JSON object body whose keys are within those"


def cmd_explain(args: argparse.Namespace, *, prog: str) -> int:
    policy = _load(args.policy)
    if policy is None:
        return 1
    users: list[str | None]
    if args.all_users:
        users = [None, *sorted(policy.users)]
    else:
        if args.user is not None and args.user not in policy.users:
            return _unknown_user(policy, args.user, prog)
        users = [args.user]
    body = args.body.encode() if args.body is not None else None
    if body is not None:
        try:
            json.loads(body)
        except ValueError as exc:
            print(f"{prog}: --body is not valid JSON: {exc}", file=sys.stderr)
            return 2
    rows = []
    for user in users:
        decision, path = policy.decide_request(user, args.method, args.target)
        verdict, note, reason = ("allow" if decision.allowed else "deny"), "", decision.reason
        if decision.allowed and decision.body_keys:
            if body is None:
                verdict, note = "allow", " (only with a JSON body within the rule's keys)"
                reason = _body_rule(decision)
            else:
                problem = _body_problem(decision, body)
                if problem is not None:
                    verdict, note = "deny", f" ({problem})"
                    reason = _body_rule(decision)
                else:
                    reason = (
                        f"allowed by {decision.rule.describe() if decision.rule else ''}"
                        " (the body fits)"
                    )
        rows.append((user or "(anonymous)", verdict, note, reason, path))
    if not args.all_users:
        user, verdict, note, reason, path = rows[0]
        print(f"request:   {args.method} {args.target}")
        print(f"canonical: {path if path is not None else '(rejected by the guard)'}")
        print(
            f"user:      {user}"
            + (f" (roles: {policy.users[args.user].roles_header})" if args.user else "")
        )
        print(f"decision:  {verdict.upper()}{note}")
        print(f"because:   {reason}")
        return 0 if verdict == "allow" else 3
    width = max(len(r[0]) for r in rows)
    canonical = rows[0][4]
    print(
        f"{args.method} {args.target}  →  canonical "
        f"{canonical if canonical is not None else '(rejected by the guard)'}"
    )
    for user, verdict, note, reason, _ in rows:
        print(f"  {user:<{width}}  {verdict.upper():<5}{note}  {reason}")
    return 0


def _unknown_user(policy: Policy, user: str, prog: str) -> int:
    print(
        f"{prog}: unknown user {user!r} (known: {', '.join(sorted(policy.users))})", file=sys.stderr
    )
    return 2


def cmd_summary(path: Path, user: str | None, *, prog: str) -> int:
    """Everything ``user`` may do: the rows of ``routes --by user`` it is allowed on."""
    policy = _load(path)
    if policy is None:
        return 1
    if user is not None and user not in policy.users:
        return _unknown_user(policy, user, prog)
    who = (
        f"{user} (roles: {policy.users[user].roles_header or 'none'})"
        if user is not None
        else "anonymous (no credentials)"
    )
    allowed = [(r, d) for r in routes(policy) if (d := decide_user(policy, user, r)).allowed]
    print(f"{who} may:")
    if not allowed:
        print("  nothing")
    width = max((len(r.method) for r, _ in allowed), default=0)
    for r, d in allowed:
        cond = (
            " if the JSON body's keys are within "
            + " or ".join("{" + ", ".join(sorted(k)) + "}" for k in d.body_keys)
            if d.body_keys
            else ""
        )
        below = " (and below)" if r.pattern.endswith("/**") else ""
        rule = d.rule.id if d.rule is not None else "?"
        print(f"  {r.method:<{width}}  {r.pattern}{below}{cond}   [{rule}]")
    print("everything else is denied (HEAD goes wherever GET does)")
    return 0


def cmd_routes(path: Path, *, by: str) -> int:
    """The matrix; every cell is the server's own decision on a sample path of the row."""
    policy = _load(path)
    if policy is None:
        return 1
    cols: list[str] = sorted(policy.roles) if by == "role" else sorted(policy.users)
    matchers = {name: role_matcher(policy, name) for name in cols} if by == "role" else {}
    rows = routes(policy)
    body = []
    for r in rows:
        cells = []
        segs = sample(compile_pattern(r.pattern))
        for name in cols:
            d = (
                matchers[name].decide(r.method, segs)
                if by == "role"
                else policy.decide(name, r.method, segs)
            )
            cells.append(_mark(d, name if by == "role" else None))
        cells.append(_mark(policy.decide(None, r.method, segs), None, public=True))
        body.append([r.pattern, r.method, *cells])
    head = ["PATH", "METHOD", *cols, "public"]
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
    for row in [head, *body]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    own = (
        "yes = granted by the role itself, inh = inherited, " if by == "role" else "yes = granted, "
    )
    print(
        f"\n{own}pub = open to anyone (public), body = only with an allowed JSON body, "
        "DENY = denied by a deny rule, - = not granted"
    )
    return 0


def _mark(d: Decision, role: str | None, public: bool = False) -> str:
    if not d.allowed:
        return "DENY" if d.rule is not None else "-"
    if d.body_keys:
        return "body"
    if d.rule is None or d.rule.role is None:
        return "yes" if public else "pub"
    return "yes" if role is None or d.rule.role == role else "inh"


def cmd_hash_password(cost: int, *, force: bool = False, prog: str = "hash-password") -> int:
    if not 4 <= cost <= 31:
        print(
            f"{prog}: --cost must be between 4 and 31 (10-{WARN_COST} recommended)", file=sys.stderr
        )
        return 2
    if cost > WARN_COST:
        took = _duration(check_seconds(cost))
        if cost > MAX_COST and not force:
            print(
                f"{prog}: --cost {cost} makes every password check take ~{took} of CPU here; "
                f"refused above {MAX_COST} without --force (10-{WARN_COST} recommended)",
                file=sys.stderr,
            )
            return 2
        print(
            f"{prog}: warning: --cost {cost} makes every password check take ~{took} of "
            f"CPU here (10-{WARN_COST} recommended)",
            file=sys.stderr,
        )
    try:
        if sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                print(f"{prog}: the passwords differ", file=sys.stderr)
                return 1
        else:
            password = sys.stdin.readline().rstrip("\r\n")
    except (EOFError, KeyboardInterrupt):
        print(f"\n{prog}: no password given", file=sys.stderr)
        return 1
    raw = password.encode("utf-8")
    if not raw:
        print(f"{prog}: empty password refused", file=sys.stderr)
        return 1
    if len(raw) > 72:
        print(
            f"{prog}: bcrypt uses at most 72 bytes of a password; choose a shorter one",
            file=sys.stderr,
        )
        return 1
    print(bcrypt.hashpw(raw, bcrypt.gensalt(rounds=cost)).decode())
    return 0


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min"


def cmd_reload(url: str, timeout: float, *, prog: str) -> int:
    """POST /-/reload on the running gateway; print the new digest and changes, or the
    refusal with its FILE:LINE lines. Exit 0 when a valid policy is in force, else 1."""
    user = os.environ.get("GATEWAY_ADMIN_USER")
    password = os.environ.get("GATEWAY_ADMIN_PASSWORD")
    if not user or password is None:
        print(
            f"{prog}: set GATEWAY_ADMIN_USER and GATEWAY_ADMIN_PASSWORD (a user the policy "
            "allows POST /-/reload)",
            file=sys.stderr,
        )
        return 2
    endpoint = url.rstrip("/") + "/-/reload"
    if not endpoint.startswith(("http://", "https://")):
        print(f"{prog}: --url must be http(s)://host:port, got {url!r}", file=sys.stderr)
        return 2
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request(
        endpoint, data=b"", method="POST", headers={"Authorization": f"Basic {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", None) or exc
        why = getattr(why, "strerror", None) or why
        print(f"{prog}: cannot reach {url}: {why}", file=sys.stderr)
        return 1
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if status == 200:
        state = answer.get("status", "reloaded")
        print(f"{state}: sha256 {answer.get('sha256', '?')}")
        for line in answer.get("changes", []):
            print(f"  {line}")
        return 0
    if status == 422:
        print(f"{prog}: the new policy was refused; the one in force stays", file=sys.stderr)
        for line in answer.get("errors", []):
            print(line, file=sys.stderr)
        return 1
    why = answer.get("error") or raw[:200].decode(errors="replace")
    print(f"{prog}: {endpoint} answered {status}: {why}", file=sys.stderr)
    return 1
