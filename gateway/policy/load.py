"""rbac.yaml → a validated, compiled, immutable :class:`~gateway.policy.model.Policy`.

Long because it validates every key of the policy format, each with its own FILE:LINE message.

Loading reads the file, parses it (keeping line numbers), validates every key, compiles the
path patterns into per-method indexes, runs the policy's own ``tests`` cases and lints it. Any
problem raises :class:`~gateway.errors.PolicyError` listing ``FILE:LINE: key.path: message``
for each one found, so an operator fixes them all in one pass.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import PolicyError, Problem
from .cost import BCRYPT_HASH
from .lint import lint
from .model import ANY, Matcher, Policy, Role, Rule, TestCase, User, digest, run_case
from .patterns import Pattern, PatternError, compile_pattern
from .yamlsrc import load_yaml

_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")  # fullmatch: "$" would let a final "\n" in
_NAME = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")
_TOP_KEYS = {"version", "realm", "roles", "users", "users_file", "public", "tests"}
_ROLE_KEYS = {"description", "inherits", "allow", "deny"}
_RULE_KEYS = {"methods", "paths", "body", "description"}
_USER_KEYS = {"password_hash", "roles", "description"}
_TEST_KEYS = {"user", "method", "path", "expect", "body"}


def load_policy(path: str | Path) -> Policy:
    """Read, validate and compile the policy at ``path`` (and its ``users_file``)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError(
            [Problem(source, None, "", f"cannot read policy: {exc.strerror}")]
        ) from None
    return parse_policy(raw, source=source, base_dir=Path(path).parent)


def parse_policy(raw: bytes, *, source: str = "<policy>", base_dir: Path | None = None) -> Policy:
    """Validate and compile policy bytes; raise :class:`PolicyError` with every problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError([Problem(source, None, "", f"not UTF-8 text ({exc.reason})")]) from None
    data, lines = load_yaml(text, source)
    return _Builder(source, lines, base_dir or Path(".")).build(data, raw)


class _Builder:
    def __init__(self, source: str, lines: dict[str, int], base_dir: Path) -> None:
        self.source = source
        self.lines = lines
        self.base_dir = base_dir
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.order = 0

    # -- reporting
    def err(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.source, self._line(key), key, message))

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(Problem(self.source, self._line(key), key, f"warning: {message}"))

    def _line(self, key: str) -> int | None:
        while key:
            if key in self.lines:
                return self.lines[key]
            cut = max(key.rfind("."), key.rfind("["))
            key = key[:cut] if cut > 0 else ""
        return None

    def keys(self, obj: dict[str, Any], allowed: set[str], key: str) -> None:
        for k in obj:
            if k not in allowed:
                where = f"{key}.{k}" if key else str(k)
                self.err(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    # -- the whole file
    def build(self, data: Any, raw: bytes) -> Policy:
        if not isinstance(data, dict):
            self.err("", "the policy must be a YAML mapping (version, roles, users, ...)")
            raise PolicyError(self.problems)
        self.keys(data, _TOP_KEYS, "")
        version = data.get("version")
        if version != 1:
            self.err("version", f"unsupported policy version {version!r}: expected 1")
        realm = data.get("realm", "rbac-gateway")
        if not isinstance(realm, str) or not realm or '"' in realm or "\\" in realm:
            self.err("realm", "realm must be a non-empty string without quotes or backslashes")
            realm = "rbac-gateway"
        roles = self.roles(data.get("roles", {}))
        public = self.rule_list(data.get("public", []), "public", None, "allow")
        file_hashes, files, contents = self.users_file(data.get("users_file"))
        users = self.users(data.get("users", {}), roles, file_hashes)
        if self.problems:
            raise PolicyError(self.problems)
        effective = self.effective_roles(roles)
        if self.problems:
            raise PolicyError(self.problems)
        user_objs = {
            name: User(
                name,
                pw,
                tuple(rs),
                frozenset(x for r in rs for x in effective[r]),
                ",".join(sorted({x for r in rs for x in effective[r]})),
            )
            for name, (pw, rs) in users.items()
        }
        by_roles: dict[frozenset[str], Matcher] = {}
        matchers: dict[str, Matcher] = {}
        for u in user_objs.values():
            m = by_roles.get(u.effective_roles)
            if m is None:
                rules = [
                    r for name in u.effective_roles for r in roles[name].allow + roles[name].deny
                ] + list(public)
                m = by_roles[u.effective_roles] = Matcher(u.effective_roles, rules)
            matchers[u.name] = m
        tests = self.tests(data.get("tests", []), user_objs)
        if self.problems:
            raise PolicyError(self.problems)
        policy = Policy(
            source=self.source,
            sha256=digest([raw, *contents]),
            version=1,
            realm=realm,
            roles=MappingProxyType(roles),
            users=MappingProxyType(user_objs),
            public=public,
            tests=tests,
            files=(self.source, *files),
            warnings=(),
            _matchers=MappingProxyType(matchers),
            _public=Matcher(frozenset(), public),
        )
        self.run_tests(policy)
        if self.problems:
            raise PolicyError(self.problems)
        self.warnings.extend(lint(policy, self.lines))
        return replace(policy, warnings=tuple(self.warnings))

    # -- roles and rules
    def roles(self, obj: Any) -> dict[str, Role]:
        if not isinstance(obj, dict):
            self.err("roles", "roles must be a mapping of role name to role")
            return {}
        out: dict[str, Role] = {}
        for name, spec in obj.items():
            key = f"roles.{name}"
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                self.err(key, "role names are 1-64 letters, digits or . _ @ + -")
                continue
            if spec is None:
                spec = {}
            if not isinstance(spec, dict):
                self.err(key, "a role must be a mapping (description, inherits, allow, deny)")
                continue
            self.keys(spec, _ROLE_KEYS, key)
            desc = spec.get("description", "")
            if not isinstance(desc, str):
                self.err(f"{key}.description", "description must be a string")
                desc = ""
            inherits = spec.get("inherits", [])
            if not isinstance(inherits, list) or not all(isinstance(i, str) for i in inherits):
                self.err(f"{key}.inherits", "inherits must be a list of role names")
                inherits = []
            allow = self.rule_list(spec.get("allow", []), f"{key}.allow", name, "allow")
            deny = self.rule_list(spec.get("deny", []), f"{key}.deny", name, "deny")
            out[name] = Role(name, desc, tuple(inherits), allow, deny)
        for name, role in out.items():
            for i, parent in enumerate(role.inherits):
                if parent not in out:
                    self.err(f"roles.{name}.inherits[{i}]", f"unknown role {parent!r}")
        return out

    def rule_list(self, obj: Any, key: str, role: str | None, effect: str) -> tuple[Rule, ...]:
        if obj is None:
            return ()
        if not isinstance(obj, list):
            self.err(key, "must be a list of rules ({methods: [...], paths: [...]})")
            return ()
        rules = []
        for i, spec in enumerate(obj):
            rule = self.rule(spec, f"{key}[{i}]", role, effect)
            if rule is not None:
                rules.append(rule)
        return tuple(rules)

    def rule(self, spec: Any, key: str, role: str | None, effect: str) -> Rule | None:
        if not isinstance(spec, dict):
            self.err(key, "a rule must be a mapping with methods and paths")
            return None
        self.keys(spec, _RULE_KEYS, key)
        ok = True
        methods = spec.get("methods")
        if not isinstance(methods, list) or not methods:
            self.err(f"{key}.methods", "methods must be a non-empty list")
            methods, ok = [], False
        for j, m in enumerate(methods):
            if m != ANY and (not isinstance(m, str) or not _METHOD.fullmatch(m)):
                self.err(
                    f"{key}.methods[{j}]",
                    f'bad method {m!r}: use upper-case names like GET, or "*"',
                )
                ok = False
        paths = spec.get("paths")
        patterns: list[Pattern] = []
        if not isinstance(paths, list) or not paths:
            self.err(f"{key}.paths", "paths must be a non-empty list of path patterns")
            ok = False
        else:
            for j, p in enumerate(paths):
                try:
                    patterns.append(compile_pattern(p))
                except PatternError as exc:
                    self.err(f"{key}.paths[{j}]", f"bad path pattern {p!r}: {exc}")
                    ok = False
        body_keys = None
        if "body" in spec:
            body_keys = self.body(spec["body"], f"{key}.body", effect)
            ok = ok and body_keys is not None
        if not ok:
            return None
        self.order += 1
        return Rule(
            key,
            role,
            effect,
            self.order,
            frozenset(methods),
            tuple(patterns),
            body_keys,
            self.lines.get(key),
        )

    def body(self, spec: Any, key: str, effect: str) -> frozenset[str] | None:
        if effect != "allow":
            self.err(key, "a body constraint only makes sense on an allow rule")
            return None
        if not isinstance(spec, dict) or set(spec) != {"json_keys"}:
            self.err(key, "body must be {json_keys: [allowed top-level keys]}")
            return None
        keys = spec["json_keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            self.err(f"{key}.json_keys", "json_keys must be a list of non-empty strings")
            return None
        return frozenset(keys)

    def effective_roles(self, roles: dict[str, Role]) -> dict[str, frozenset[str]]:
        done: dict[str, frozenset[str]] = {}
        for name in roles:
            self._inherit(name, (), roles, done)
        return done

    def _inherit(
        self,
        name: str,
        trail: tuple[str, ...],
        roles: dict[str, Role],
        done: dict[str, frozenset[str]],
    ) -> frozenset[str]:
        # A method, not a closure: a recursive nested function is a reference cycle that would
        # keep the whole builder (every rule) alive until a full collection finds it.
        if name in done:
            return done[name]
        if name in trail:
            cycle = " -> ".join(trail[trail.index(name) :] + (name,))
            self.err(f"roles.{trail[-1]}.inherits", f"inheritance cycle: {cycle}")
            return frozenset()
        acc = {name}
        for parent in roles[name].inherits:
            if parent in roles:
                acc |= self._inherit(parent, trail + (name,), roles, done)
        done[name] = frozenset(acc)
        return done[name]

    # -- users
    def users_file(self, obj: Any) -> tuple[dict[str, bytes], list[str], list[bytes]]:
        """The htpasswd file's hashes by user, its path and its raw content (for the digest)."""
        if obj is None:
            return {}, [], []
        if not isinstance(obj, str) or not obj:
            self.err("users_file", "users_file must be a path to an htpasswd file")
            return {}, [], []
        path = (self.base_dir / obj) if not Path(obj).is_absolute() else Path(obj)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            self.err("users_file", f"cannot read {path}: {exc.strerror}")
            return {}, [], []
        out: dict[str, bytes] = {}
        for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, hashed = line.partition(":")
            where = f"{path}:{n}"
            if not sep or not _NAME.fullmatch(name):
                self.problems.append(Problem(str(path), n, "", "expected 'user:bcrypt-hash'"))
            elif not BCRYPT_HASH.fullmatch(hashed):
                self.problems.append(
                    Problem(
                        str(path),
                        n,
                        name,
                        "only bcrypt entries ($2y$/$2b$) are accepted (htpasswd -B)",
                    )
                )
            elif name in out:
                self.problems.append(Problem(str(path), n, name, f"duplicate user ({where})"))
            else:
                out[name] = hashed.encode()
        return out, [str(path)], [raw]

    def users(
        self, obj: Any, roles: dict[str, Role], file_hashes: dict[str, bytes]
    ) -> dict[str, tuple[bytes, list[str]]]:
        if obj is None:
            obj = {}
        if not isinstance(obj, dict):
            self.err("users", "users must be a mapping of user name to {password_hash, roles}")
            return {}
        out: dict[str, tuple[bytes, list[str]]] = {}
        for name, spec in obj.items():
            key = f"users.{name}"
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                self.err(key, "user names are 1-64 letters, digits or . _ @ + - (no ':')")
                continue
            if not isinstance(spec, dict):
                self.err(key, "a user must be a mapping {password_hash, roles}")
                continue
            if "password" in spec:
                self.err(
                    f"{key}.password",
                    "plaintext passwords are refused: store a bcrypt "
                    "password_hash (python -m gateway hash-password)",
                )
                continue
            self.keys(spec, _USER_KEYS, key)
            pw = spec.get("password_hash")
            if pw is None:
                if name not in file_hashes:
                    self.err(key, "password_hash is missing (and the user is not in users_file)")
                    continue
                hashed = file_hashes[name]
            elif not isinstance(pw, str) or not BCRYPT_HASH.fullmatch(pw):
                self.err(
                    f"{key}.password_hash",
                    "not a bcrypt hash ($2b$NN$ + 53 characters); "
                    "plaintext passwords are refused: use python -m gateway hash-password",
                )
                continue
            else:
                hashed = pw.encode()
            rs = spec.get("roles", [])
            if not isinstance(rs, list) or not all(isinstance(r, str) for r in rs):
                self.err(f"{key}.roles", "roles must be a list of role names")
                continue
            for i, r in enumerate(rs):
                if r not in roles:
                    self.err(f"{key}.roles[{i}]", f"unknown role {r!r}")
            out[name] = (hashed, rs)
        for name, hashed in file_hashes.items():
            if name not in out:
                out[name] = (hashed, [])
                self.warn("users_file", f"user {name!r} from users_file has no roles in users:")
        return out

    # -- the policy's own test cases
    def tests(self, obj: Any, users: dict[str, User]) -> tuple[TestCase, ...]:
        if obj is None:
            return ()
        if not isinstance(obj, list):
            self.err("tests", "tests must be a list of {user, method, path, expect}")
            return ()
        out = []
        for i, spec in enumerate(obj):
            key = f"tests[{i}]"
            if not isinstance(spec, dict):
                self.err(key, "a test case must be a mapping {user, method, path, expect}")
                continue
            self.keys(spec, _TEST_KEYS, key)
            user = spec.get("user")
            method, target, expect = spec.get("method"), spec.get("path"), spec.get("expect")
            bad = False
            if user is not None and (not isinstance(user, str) or user not in users):
                self.err(f"{key}.user", f"unknown user {user!r} (omit user for anonymous)")
                bad = True
            if not isinstance(method, str) or not method:
                self.err(f"{key}.method", "method must be a string such as GET")
                bad = True
            if not isinstance(target, str) or not target:
                self.err(f"{key}.path", "path must be a request target such as /api/inventory")
                bad = True
            if expect not in ("allow", "deny"):
                self.err(f"{key}.expect", "expect must be allow or deny")
                bad = True
            body = spec.get("body")
            body_bytes = None
            if body is not None:
                body_bytes = (body if isinstance(body, str) else json.dumps(body)).encode()
            if not bad:
                out.append(
                    TestCase(
                        user,
                        str(method),
                        str(target),
                        str(expect),
                        body_bytes,
                        key,
                        self.lines.get(key),
                    )
                )
        return tuple(out)

    def run_tests(self, policy: Policy) -> None:
        for case in policy.tests:
            verdict = run_case(policy, case)
            if verdict is not None:
                self.err(case.id, verdict)
