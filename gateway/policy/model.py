"""The compiled policy: rules, users, decisions. Immutable once built.

A :class:`Policy` is built by :mod:`gateway.policy.load` and never modified after; a reload
builds a new one. :meth:`Policy.decide` is the one place a request is decided: the server,
``explain``, ``routes`` and the reload diff all ask it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import Problem
from ..guard import Rejected, canonical_target, check_method
from .patterns import PathIndex, Pattern

ANY = "*"


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled ``allow``/``deny`` entry; ``id`` is its key path in the file."""

    id: str
    role: str | None  # None for public rules
    effect: str  # "allow" or "deny"
    order: int  # position in the file: the first matching rule is reported
    methods: frozenset[str]  # upper-case names, or {"*"}
    patterns: tuple[Pattern, ...]
    body_keys: frozenset[str] | None
    line: int | None

    def describe(self) -> str:
        """Human summary: ``roles.sales.allow[0] (GET /api/inventory)``."""
        methods = ",".join(sorted(self.methods))
        paths = " ".join(p.text for p in self.patterns)
        body = f" body keys ⊆ {{{', '.join(sorted(self.body_keys))}}}" if self.body_keys else ""
        return f"{self.id} ({methods} {paths}{body})"


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer. With ``body_keys`` the allow holds only for a JSON-object body
    whose keys are all within one of the sets."""

    allowed: bool
    rule: Rule | None
    reason: str
    body_keys: tuple[frozenset[str], ...] = ()

    def allows_body(self, body: bytes) -> bool:
        """Check a request body against this decision's body constraint."""
        if not self.body_keys:
            return self.allowed
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return False  # not JSON, or nested past the parser's depth: refused
        if not isinstance(doc, dict):
            return False
        keys = doc.keys()
        return any(keys <= allowed for allowed in self.body_keys)


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    description: str
    inherits: tuple[str, ...]
    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class User:
    name: str
    password_hash: bytes
    roles: tuple[str, ...]  # as listed
    effective_roles: frozenset[str]  # with everything inherited
    roles_header: str  # value of X-Authenticated-Roles


@dataclass(frozen=True, slots=True)
class TestCase:
    user: str | None
    method: str
    target: str
    expect: str
    body: bytes | None
    id: str
    line: int | None


class Matcher:
    """The rules one set of roles has, indexed by method and then by path."""

    __slots__ = ("roles", "_by_method", "_any", "_decisions")

    def __init__(self, roles: frozenset[str], rules: Iterable[Rule]) -> None:
        self.roles = roles
        rules = list(rules)
        named = {m for r in rules for m in r.methods if m != ANY}
        if "GET" in named:
            named.add("HEAD")
        self._by_method: dict[str, PathIndex[Rule]] = {}
        for method in named:
            idx: PathIndex[Rule] = PathIndex()
            for r in rules:
                if (
                    ANY in r.methods
                    or method in r.methods
                    or (method == "HEAD" and "GET" in r.methods)
                ):
                    for p in r.patterns:
                        idx.add(p, r)
            self._by_method[method] = idx
        self._decisions: dict[int, Decision] = {}  # by rule.order: unique per policy
        self._any: PathIndex[Rule] = PathIndex()
        for r in rules:
            if ANY in r.methods:
                for p in r.patterns:
                    self._any.add(p, r)

    def decide(self, method: str, segments: tuple[str, ...]) -> Decision:
        """Default deny; a matching deny rule wins; else the first matching allow rule."""
        idx = self._by_method.get(method, self._any)
        hits = idx.match(segments)
        if not hits:
            who = ", ".join(sorted(self.roles)) or "anonymous"
            return Decision(False, None, f"no rule for [{who}] allows {method} on this path")
        if len(hits) == 1 and hits[0].effect == "allow" and hits[0].body_keys is None:
            return self._decision(hits[0])  # the common case, decided once per rule
        denies = [r for r in hits if r.effect == "deny"]
        if denies:
            return self._decision(min(denies, key=_order))
        plain = [r for r in hits if r.body_keys is None]
        if plain:
            return self._decision(min(plain, key=_order))
        conditional = sorted(hits, key=_order)
        keys = tuple(r.body_keys for r in conditional if r.body_keys is not None)
        rule = conditional[0]
        return Decision(True, rule, f"allowed by {rule.describe()} if the body fits", keys)

    def _decision(self, rule: Rule) -> Decision:
        """The (immutable) decision a plain allow or a deny rule gives, built once."""
        d = self._decisions.get(rule.order)
        if d is None:
            verb = "allowed" if rule.effect == "allow" else "denied"
            d = self._decisions[rule.order] = Decision(
                rule.effect == "allow", rule, f"{verb} by {rule.describe()}"
            )
        return d


def _order(rule: Rule) -> int:
    return rule.order


@dataclass(frozen=True, slots=True)
class Policy:
    """A compiled policy. Immutable: reload builds a new one and swaps the reference."""

    source: str
    sha256: str
    version: int
    realm: str
    roles: Mapping[str, Role]
    users: Mapping[str, User]
    public: tuple[Rule, ...]
    tests: tuple[TestCase, ...]
    files: tuple[str, ...]
    warnings: tuple[Problem, ...]
    _matchers: Mapping[str, Matcher] = field(repr=False)
    _public: Matcher = field(repr=False)

    def decide(self, user: str | None, method: str, segments: tuple[str, ...]) -> Decision:
        """Decide for ``user`` (``None``: anonymous) on guard-canonical path ``segments``."""
        matcher = self._public if user is None else self._matchers.get(user)
        if matcher is None:
            return Decision(False, None, f"unknown user {user!r}")
        return matcher.decide(method, segments)

    def decide_request(
        self, user: str | None, method: str, target: str, headers: Mapping[str, str] | None = None
    ) -> tuple[Decision, str | None]:
        """Run the guard and the decision on a raw target, as the gateway does.

        Returns the decision and the canonical path (``None`` when the guard refused it).
        """
        try:
            check_method(method, headers or {})
            tgt = canonical_target(target)
        except Rejected as exc:
            return Decision(False, None, f"rejected by the request guard: {exc.message}"), None
        return self.decide(user, method, tgt.segments), tgt.path

    def rules_of(self, user: str | None) -> list[Rule]:
        """Every rule that applies to ``user`` (public rules included), in file order."""
        if user is None:
            return list(self.public)
        return self.rules_for_roles(self.users[user].effective_roles)

    def rules_for_roles(self, roles: Iterable[str]) -> list[Rule]:
        """Every rule a holder of exactly ``roles`` (already closed under inheritance) is
        decided by, public rules included, in file order."""
        rules = {r for name in roles for r in (*self.roles[name].allow, *self.roles[name].deny)}
        return sorted(rules | set(self.public), key=_order)


def role_closure(policy: Policy, name: str) -> set[str]:
    """``name`` and every role it inherits, directly or not."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(policy.roles[n].inherits)
    return seen


def run_case(policy: Policy, case: TestCase) -> str | None:
    """Run one test case; ``None`` when it passes, else what went wrong."""
    decision, _ = policy.decide_request(case.user, case.method, case.target)
    allowed = decision.allowed
    if allowed and decision.body_keys and case.body is not None:
        allowed = decision.allows_body(case.body)
    got = "allow" if allowed else "deny"
    if got == case.expect:
        return None
    who = case.user or "anonymous"
    return (
        f"test failed: {who} {case.method} {case.target} expected {case.expect}, "
        f"got {got} ({decision.reason})"
    )


def digest(contents: Sequence[bytes]) -> str:
    """sha256 of a policy's files: the policy file, then its ``users_file`` if any.

    The one definition of a policy's identity: the loader stamps it on the :class:`Policy`
    and the store's watcher compares the files on disk against it.
    """
    h = hashlib.sha256()
    for i, data in enumerate(contents):
        h.update(data if i == 0 else b"\0users_file\0" + data)
    return h.hexdigest()
