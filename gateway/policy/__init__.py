"""The policy: what rbac.yaml says, compiled, checked and kept current.

::

    model.py     Policy, Rule, User, Decision: the immutable compiled policy and its decide()
    patterns.py  path patterns compiled into a segment trie (PathIndex)
    yamlsrc.py   YAML → plain values, with the line of every key path
    load.py      load_policy / parse_policy: validate, compile, run the policy's tests, lint
    lint.py      warnings that do not refuse a policy (shadowed rules, unused roles, costs)
    cost.py      bcrypt cost of a hash, and what one check costs here
    grants.py    per-user decisions on every (method, pattern): routes, explain, reload diff
    store.py     PolicyStore (the one mutable object): reload, swap, watch the file

Nothing here touches the network; the modules import in that order, with no cycle.
"""

from __future__ import annotations

from .cost import bcrypt_cost, check_seconds
from .grants import Route, describe_changes, user_grants, verdict
from .load import load_policy, parse_policy
from .model import Decision, Policy, Role, Rule, TestCase, User, digest, role_closure, run_case
from .patterns import PathIndex, Pattern, PatternError, compile_pattern
from .store import PolicyStore, ReloadResult, ReloadStats, watch

__all__ = [
    "Decision",
    "PathIndex",
    "Pattern",
    "PatternError",
    "Policy",
    "PolicyStore",
    "ReloadResult",
    "ReloadStats",
    "Role",
    "Route",
    "Rule",
    "TestCase",
    "User",
    "bcrypt_cost",
    "check_seconds",
    "compile_pattern",
    "describe_changes",
    "digest",
    "load_policy",
    "parse_policy",
    "role_closure",
    "run_case",
    "user_grants",
    "verdict",
    "watch",
]
