"""The gateway's own endpoints under ``/-/``; who may call them is the policy's decision.

GET  /-/healthz   200 while the process serves
GET  /-/ready     200 when a policy is loaded, the upstream answers and the pool has room
POST /-/reload    reload the policy now (every worker of a supervisor reloads)
GET  /-/status    policy file, digest, load times, last reload error, counters
GET  /-/metrics   Prometheus text
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .errors import GatewayError, MethodNotAllowed, NotFound, UnprocessablePolicy
from .guard import Target
from .http.message import JSON_TYPE, json_body
from .http.request import Request
from .supervisor import worker_status

if TYPE_CHECKING:
    from .gateway import Gateway

Answer = tuple[int, dict[str, str], bytes]


class NotReady(GatewayError):
    status, code = 503, "not_ready"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


def json_answer(doc: object, status: int = 200) -> Answer:
    return status, {"Content-Type": JSON_TYPE}, json_body(doc)


class Admin:
    """Dispatches ``/-/`` paths (after the pipeline authorized them)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._probed_at = 0.0
        self._probe_ok = False
        self.routes: dict[str, tuple[str, Callable[[], Awaitable[Answer]]]] = {
            "/-/healthz": ("GET", self.healthz),
            "/-/ready": ("GET", self.ready),
            "/-/reload": ("POST", self.reload),
            "/-/status": ("GET", self.status),
            "/-/metrics": ("GET", self.metrics),
        }

    async def dispatch(self, req: Request, target: Target) -> Answer:
        entry = self.routes.get(target.path)
        if entry is None:
            raise NotFound(f"no gateway endpoint {target.path}")
        method, handler = entry
        if req.method != method and not (method == "GET" and req.method == "HEAD"):
            raise MethodNotAllowed(f"{target.path} takes {method}")
        return await handler()

    async def healthz(self) -> Answer:
        return json_answer({"status": "ok"})

    async def ready(self) -> Answer:
        gw = self.gw
        if gw.pool.exhausted:  # checked first: a probe would only queue for a slot
            raise NotReady(
                "not ready: every upstream connection is busy", code="upstream_pool_exhausted"
            )
        now = time.monotonic()
        if now - self._probed_at > 1.0:
            self._probe_ok = await gw.probe_upstream()
            self._probed_at = now
        if not self._probe_ok:
            raise NotReady("not ready: the upstream does not answer", code="upstream_down")
        return json_answer({"status": "ready", "policy": gw.store.policy.sha256, "upstream": "ok"})

    async def reload(self) -> Answer:
        gw = self.gw
        result = await gw.store.reload("api")
        if result.ok and gw.on_api_reload is not None:
            gw.on_api_reload()  # the supervisor tells the other workers
        if not result.ok:
            raise UnprocessablePolicy(
                "the new policy was refused; the old one stays in force", list(result.errors)
            )
        doc: dict[str, object] = {
            "status": "reloaded" if result.changed else "unchanged",
            "sha256": result.sha256,
        }
        if result.changes:
            doc["changes"] = list(result.changes)
        return json_answer(doc)

    async def status(self) -> Answer:
        gw = self.gw
        store, policy = gw.store, gw.store.policy
        stats = store.stats
        auth = gw.auth
        return json_answer(
            {
                "version": gw.version,
                "pid": os.getpid(),
                "policy": str(store.path),
                "sha256": policy.sha256,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(store.loaded_at)),
                "users": len(policy.users),
                "roles": len(policy.roles),
                "warnings": [str(w) for w in policy.warnings],
                "reloads": {"ok": stats.ok, "failed": stats.failed, "unchanged": stats.unchanged},
                "last_reload_error": stats.last_error,
                "credential_cache": {
                    "entries": len(auth.cache),
                    "hits": auth.cache.hits,
                    "misses": auth.cache.misses,
                },
                "bcrypt_checks": auth.bcrypt_checks,
                "login_throttle": {
                    "shared": auth.throttle.shared,
                    "unanswered": auth.throttle.unanswered,
                },
                "audit": gw.audit_status(),
                "upstream": gw.upstream_status(),
                "connections": len(gw.server.connections) if gw.server is not None else 0,
                "callback_path": gw.fast.taken if gw.fast is not None else 0,
                "worker": worker_status(),
            }
        )

    async def metrics(self) -> Answer:
        m = self.gw.metrics
        return 200, {"Content-Type": m.content_type}, m.render()
