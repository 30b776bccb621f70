"""What each subject may do, asked of the real decision logic, one (method, pattern) at a time.

``routes``, ``explain --user X`` (without a request) and the reload diff all read this, so none
of them can disagree with the server: every cell is :meth:`Matcher.decide` on a sample path of
the row's pattern, never a reading of rule text (which misses overlaps such as ``/-/**``
granting ``/-/status``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .model import Decision, Matcher, Policy, role_closure
from .patterns import Pattern, compile_pattern

# A segment no literal pattern can equal (literals may not contain braces) but that a
# ``{param}`` matches: the sample stands for "any value" of the parameter.
_ANY_SEGMENT = "{…}"


@dataclass(frozen=True, slots=True, order=True)
class Route:
    """One row: a path pattern as written in the policy and a method (``*`` = any other)."""

    pattern: str
    method: str


def routes(*policies: Policy) -> list[Route]:
    """Every (pattern, method) some rule of these policies names, sorted."""
    out: set[Route] = set()
    for policy in policies:
        rules = [*policy.public] + [
            r for role in policy.roles.values() for r in (*role.allow, *role.deny)
        ]
        for rule in rules:
            for p in rule.patterns:
                for m in rule.methods:
                    out.add(Route(p.text, m))
    return sorted(out)


def sample(pattern: Pattern) -> tuple[str, ...]:
    """A path the pattern matches that stands for all of them: parameters become a segment no
    literal equals, and ``/prefix/**`` a path below the prefix."""
    segs = tuple(_ANY_SEGMENT if s is None else s for s in pattern.segments)
    return segs + (_ANY_SEGMENT,) if pattern.prefix else segs


def _segments(route: Route) -> tuple[str, ...]:
    return sample(compile_pattern(route.pattern))


def decide_user(policy: Policy, user: str | None, route: Route) -> Decision:
    """What the server decides for ``user`` (``None``: anonymous) on a sample of ``route``."""
    return policy.decide(user, route.method, _segments(route))


def role_matcher(policy: Policy, role: str) -> Matcher:
    """The matcher a user holding only ``role`` (and what it inherits) would get."""
    closure = frozenset(role_closure(policy, role))
    return Matcher(closure, policy.rules_for_roles(closure))


def verdict(decision: Decision) -> str:
    """``allow``, ``allow if body keys ⊆ {…}`` or ``deny``: what a diff compares."""
    if not decision.allowed:
        return "deny"
    if decision.body_keys:
        alts = " or ".join("{" + ", ".join(sorted(k)) + "}" for k in decision.body_keys)
        return f"allow if the JSON body's keys are within {alts}"
    return "allow"


def user_grants(
    policy: Policy, user: str | None, rows: Iterable[Route] | None = None
) -> dict[Route, Decision]:
    """The decision for ``user`` on every row (by default every row of ``policy``)."""
    return {r: decide_user(policy, user, r) for r in (routes(policy) if rows is None else rows)}


def describe_changes(old: Policy, new: Policy) -> list[str]:
    """Human lines: roles/users added and removed, and per user what the server now decides
    differently. Effective decisions are compared, so revoking a rule a user does not depend
    on (another of its roles grants the same) reports nothing for that user."""
    out: list[str] = []
    for kind, a, b in (("role", old.roles, new.roles), ("user", old.users, new.users)):
        added = sorted(set(b) - set(a))
        removed = sorted(set(a) - set(b))
        if added:
            out.append(f"{kind}s added: {', '.join(added)}")
        if removed:
            out.append(f"{kind}s removed: {', '.join(removed)}")
    rows: list[Route] | None = None
    samples: dict[Route, tuple[str, ...]] = {}
    for name in [None, *sorted(set(old.users) & set(new.users))]:
        if name is not None and old.users[name].password_hash != new.users[name].password_hash:
            password = f"user {name}: password changed (cached credentials dropped)"
        else:
            password = None
        if _signature(old, name) == _signature(new, name):
            # the same rules in the same order: the server decides every row the same way
            if password:
                out.append(password)
            continue
        if rows is None:
            rows = routes(old, new)
            samples = {row: _segments(row) for row in rows}
        gained, lost, changed = [], [], []
        for row in rows:
            was = verdict(old.decide(name, row.method, samples[row]))
            now = verdict(new.decide(name, row.method, samples[row]))
            if was == now:
                continue
            what = f"{row.method} {row.pattern}"
            if was == "deny":
                gained.append(what if now == "allow" else f"{what} ({now})")
            elif now == "deny":
                lost.append(what)
            else:
                changed.append(f"{what}: {was} -> {now}")
        who = f"user {name}" if name is not None else "anonymous"
        if gained:
            out.append(f"{who} gains: {'; '.join(gained)}")
        if lost:
            out.append(f"{who} loses: {'; '.join(lost)}")
        if changed:
            out.append(f"{who} changes: {'; '.join(changed)}")
        if password:
            out.append(password)
    return out


def _signature(policy: Policy, user: str | None) -> list[tuple[object, ...]]:
    """What ``user``'s decisions depend on: the rules that apply, in file order, without their
    position or line (an edit elsewhere in the file moves those)."""
    return [
        (r.effect, r.methods, tuple(p.text for p in r.patterns), r.body_keys)
        for r in policy.rules_of(user)
    ]
