"""Warnings that do not refuse a policy: shadowed rules, unused roles, odd bcrypt costs.

Lint reads only the compiled model; the loader calls it last.
"""

from __future__ import annotations

from ..errors import Problem
from .cost import RECOMMENDED, bcrypt_cost, check_seconds
from .model import Policy, Rule, role_closure
from .patterns import PathIndex, Pattern

_PROBE_PARAM = "\x00{param}"  # a segment no literal pattern can equal


def lint(policy: Policy, lines: dict[str, int]) -> list[Problem]:
    """Every warning for ``policy``, each located like an error."""
    out: list[Problem] = []

    def warn(key: str, message: str) -> None:
        out.append(Problem(policy.source, lines.get(key), key, f"warning: {message}"))

    held = {r for u in policy.users.values() for r in u.effective_roles}
    for name in policy.roles:
        if name not in held:
            warn(f"roles.{name}", f"role {name!r} is held by no user (directly or inherited)")
    for rule_id, by in _shadowed(policy):
        warn(rule_id, f"rule is shadowed by {by} and never decides anything")
    for rule_id, message in _gateway_paths(policy):
        warn(rule_id, message)
    costs: dict[int, list[str]] = {}
    for u in policy.users.values():
        costs.setdefault(bcrypt_cost(u.password_hash), []).append(u.name)
    low, high = RECOMMENDED
    for cost, names in sorted(costs.items()):
        if cost < low or cost > high:
            ms = check_seconds(cost) * 1000
            side = "below" if cost < low else "above"
            key = f"users.{names[0]}.password_hash"
            warn(
                key,
                f"bcrypt cost {cost} is {side} {low}-{high} for "
                f"{', '.join(sorted(names))}: one check costs ~{ms:.1f} ms of CPU here",
            )
    return out


# The gateway's own endpoints; everything else under /- is answered 404, never forwarded.
GATEWAY_ENDPOINTS = ("healthz", "ready", "reload", "status", "metrics")
_PROBE_OTHER = ("-", "\x00not-an-endpoint")


def _gateway_paths(policy: Policy) -> list[tuple[str, str]]:
    """Allow rules that grant paths under ``/-`` other than the gateway's endpoints: the
    gateway owns ``/-`` and never forwards it, so such a grant reaches nothing upstream."""
    out = []
    rules = [*policy.public, *(r for role in policy.roles.values() for r in role.allow)]
    for rule in rules:
        for p in rule.patterns:
            if p.segments[:1] != ("-",):
                continue  # catch-alls like /** are not meant for /- paths
            if (
                p.matches(("-",))
                or p.matches(_PROBE_OTHER)
                or (
                    len(p.segments) > 1
                    and p.segments[1] is not None
                    and p.segments[1] not in GATEWAY_ENDPOINTS
                )
            ):
                out.append(
                    (
                        rule.id,
                        f"{p.text} grants paths under /- that are not gateway "
                        f"endpoints ({', '.join('/-/' + e for e in GATEWAY_ENDPOINTS)}"
                        f"); the gateway owns /- and never forwards them (404)",
                    )
                )
    return out


def _shadowed(policy: Policy) -> list[tuple[str, str]]:
    """Allow rules every (method, path) of which an earlier allow rule already grants."""
    found: dict[str, str] = {}
    for own in policy.roles:
        closure = role_closure(policy, own)
        rules = sorted(
            (r for name in closure for r in policy.roles[name].allow if r.body_keys is None),
            key=lambda r: r.order,
        )
        index: dict[str, PathIndex[tuple[Rule, Pattern]]] = {}
        for rule in rules:
            if rule.role == own and rule.id not in found:
                cover = _covered_by(rule, index)
                if cover is not None:
                    found[rule.id] = cover
            for m in rule.methods:
                idx = index.setdefault(m, PathIndex())
                for p in rule.patterns:
                    idx.add(p, (rule, p))
    return sorted(found.items())


def _covered_by(rule: Rule, index: dict[str, PathIndex[tuple[Rule, Pattern]]]) -> str | None:
    """The id of an earlier rule that covers every (method, pattern) of ``rule``, if any."""
    by: str | None = None
    for m in rule.methods:
        for p in rule.patterns:
            probe = tuple(_PROBE_PARAM if s is None else s for s in p.segments)
            hits = []
            for key in {m, "*"}:
                if key in index:
                    hits += [r for r, q in index[key].match(probe) if q.covers(p)]
            if not hits:
                return None
            by = by or hits[0].id
    return by
