"""Policies and credentials the bench generates for itself, into the run's temp dir.

Both policies grant the bench user the same request (`GET`/`POST /api/inventory`, through the
shipped role chain sales → warehouse → manager), so the difference between them is the rule
count alone:

- `small.yaml`: the shipped policy's shape (four roles, three users, public health, tests).
- `rules10k.yaml`: the same plus 100 roles of 100 rules each (10,000 rules; distinct literal,
  `{param}` and `/**` paths, three fifths of them under `/api/` like the granted path). The bench user
  holds all 100 roles and the rule that grants its request is rule 5,050 of 10,000.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import yaml

BENCH_PATH = "/api/inventory"
RULE_ROLES = 100
RULES_PER_ROLE = 100
MATCHING_ROLE = 50
MATCHING_RULE = 50


@dataclass(frozen=True, slots=True)
class Credentials:
    """The bench user's credentials; `bcrypt_hash` is cost 12 like the shipped policy."""

    user: str
    password: str
    bcrypt_hash: str

    def header(self, password: str | None = None) -> str:
        token = base64.b64encode(f"{self.user}:{password or self.password}".encode()).decode()
        return f"Basic {token}"


def make_credentials(cost: int = 12) -> Credentials:
    password = secrets.token_urlsafe(12)
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()
    return Credentials("bench", password, hashed)


def _base(creds: Credentials, other_hash: str) -> dict[str, Any]:
    return {
        "version": 1,
        "realm": "bench",
        "roles": {
            "sales": {
                "description": "Sales staff may look items up.",
                "allow": [{"methods": ["GET"], "paths": [BENCH_PATH]}],
            },
            "warehouse": {
                "inherits": ["sales"],
                "allow": [{"methods": ["PUT"], "paths": [BENCH_PATH]}],
            },
            "manager": {
                "inherits": ["warehouse"],
                "allow": [{"methods": ["POST", "DELETE"], "paths": [BENCH_PATH]}],
            },
            "ops": {"allow": [{"methods": ["GET", "POST"], "paths": ["/-/**"]}]},
        },
        "users": {
            "sales": {"password_hash": other_hash, "roles": ["sales"]},
            "warehouse": {"password_hash": other_hash, "roles": ["warehouse"]},
            "manager": {"password_hash": other_hash, "roles": ["manager"]},
            "ops": {"password_hash": other_hash, "roles": ["ops"]},
            creds.user: {"password_hash": creds.bcrypt_hash, "roles": ["manager"]},
        },
        "public": [{"methods": ["GET"], "paths": ["/-/healthz", "/-/ready"]}],
        "tests": [
            {"user": "sales", "method": "GET", "path": BENCH_PATH, "expect": "allow"},
            {"user": "sales", "method": "POST", "path": BENCH_PATH, "expect": "deny"},
            {"user": "manager", "method": "DELETE", "path": BENCH_PATH, "expect": "allow"},
            {"user": creds.user, "method": "GET", "path": BENCH_PATH, "expect": "allow"},
            {"user": creds.user, "method": "POST", "path": BENCH_PATH, "expect": "allow"},
        ],
    }


def _filler_rule(role: int, k: int) -> dict[str, Any]:
    idx = role * RULES_PER_ROLE + k
    methods = (["GET"], ["GET", "PUT"], ["POST"], ["DELETE"])[idx % 4]
    shape = k % 5
    if shape == 0:
        path = f"/api/r{idx}/items"
    elif shape == 1:
        path = f"/api/r{idx}/items/{{item}}"
    elif shape == 2:
        path = f"/api/{{tenant}}/r{idx}/orders/{{order}}"
    elif shape == 3:
        path = f"/svc{role}/k{k}/{{tenant}}/lines"
    else:
        path = f"/svc{role}/k{k}/static/**"
    return {"methods": methods, "paths": [path]}


def _rules10k(creds: Credentials, other_hash: str) -> tuple[dict[str, Any], int]:
    doc = _base(creds, other_hash)
    roles: dict[str, Any] = doc["roles"]
    names: list[str] = []
    for r in range(RULE_ROLES):
        rules = [_filler_rule(r, k) for k in range(RULES_PER_ROLE)]
        if r == MATCHING_ROLE:
            rules[MATCHING_RULE] = {"methods": ["GET", "POST"], "paths": [BENCH_PATH]}
        name = f"svc{r:03d}"
        roles[name] = {"allow": rules}
        names.append(name)
    # The bench user gets its grant from the middle of the 10,000 rules, not from `manager`.
    doc["users"][creds.user] = {"password_hash": creds.bcrypt_hash, "roles": names}
    doc["tests"].append(
        {"user": creds.user, "method": "DELETE", "path": BENCH_PATH, "expect": "deny"}
    )
    return doc, RULE_ROLES * RULES_PER_ROLE


def write_policies(tmp: Path, creds: Credentials) -> dict[str, Path]:
    """Write small.yaml and rules10k.yaml; return their paths by name."""
    other = bcrypt.hashpw(
        secrets.token_bytes(16).hex().encode(), bcrypt.gensalt(rounds=12)
    ).decode()
    small = tmp / "small.yaml"
    small.write_text(yaml.safe_dump(_base(creds, other), sort_keys=False))
    big_doc, _ = _rules10k(creds, other)
    big = tmp / "rules10k.yaml"
    big.write_text(yaml.safe_dump(big_doc, sort_keys=False, width=200))
    return {"small": small, "rules10k": big}


def count_rules(doc: dict[str, Any]) -> int:
    return sum(len(role.get("allow", ())) for role in doc["roles"].values())
