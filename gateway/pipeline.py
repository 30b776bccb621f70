"""The per-request path:

    guard → authenticate → authorize → forward → record

``handle`` (with ``admit`` for the first three), no middleware chain; the common request
takes the callback path of :mod:`gateway.fastpath` instead and comes here only when that
cannot finish it. Every :class:`GatewayError` becomes a JSON answer in one place; anything unexpected becomes a JSON 500; the record step (audit line and metrics) runs in
``finally``, so every request is recorded however it ends — also one cut at shutdown.
The gateway owns ``/-`` and everything under ``/-/``: those paths are never forwarded, whatever
the policy says; the policy only decides who may reach them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .admin import Admin
from .audit import milliseconds, now_iso
from .auth import client_behind_proxies, is_canonical, parse_basic
from .decision import Decider
from .errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    PayloadTooLarge,
    TooManyRequests,
    Unauthenticated,
    UnprocessablePolicy,
)
from .forward import Forwarder, read_body
from .guard import (
    OVERRIDE_HEADERS,
    REJECTED_METHODS,
    Rejected,
    Target,
    canonical_target,
    check_framing,
    check_method,
)
from .http.message import JSON_TYPE, json_body
from .http.request import Request
from .http.upstream import ClientGone
from .policy import Decision, Policy, User

if TYPE_CHECKING:
    from .gateway import Gateway

log = logging.getLogger(__name__)

_perf = time.perf_counter
_TARGET_CACHE = 4096
_AUTH_MEMO_MAX = 1024  # bytes of Authorization value a connection keeps for its next request
CUT_REASON = "the gateway shut down before the answer was complete"
OVERRIDES = frozenset(h.lower().encode() for h in OVERRIDE_HEADERS)


class Handoff:
    """What the callback path (:mod:`gateway.fastpath`) knew when it gave a request to this
    one: the cached-credential lookup (done once, so it is counted once) and when the request
    began; once it had decided and forwarded the request, also that decision and the failure
    of its exchange to answer (None: a pooled connection found closed, forward it once more
    on a fresh one)."""

    __slots__ = ("user", "key", "started", "error", "decided")

    def __init__(
        self,
        user: User | None,
        key: bytes,
        started: float,
        error: BaseException | None = None,
        decided: tuple[str, Target, str | None] | None = None,
    ) -> None:
        self.user = user
        self.key = key
        self.started = started
        self.error = error
        # (client, target, rule) once the request was decided and forwarded
        self.decided = decided


def new_record(req: Request) -> dict[str, object]:
    """The audit record of a request before anything is known of it."""
    return {
        "event": "request",
        "time": now_iso(),
        "client": None,
        "user": None,
        "method": req.method,
        "path": None,
        "decision": "error",
        "rule": None,
    }


class Pipeline:
    """Holds references fixed at start; per-request state is local."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.settings = gw.settings
        self.store = gw.store
        self.auth = gw.auth
        self.audit = gw.audit
        self.metrics = gw.metrics
        self.admin = Admin(gw)
        self.trusted = self.settings.trusted_proxies
        self.forwarder: Forwarder | None = None  # set by Gateway.start
        self.targets: dict[str, Target] = {}
        # Decisions are pure functions of (policy, user, method, path): remembered per policy.
        self._memo: dict[tuple[str, str, str], Decision] = {}
        self._memo_policy: Policy | None = None
        self.decider = (
            Decider(self.settings, self.store, self.auth, self.audit, self.metrics)
            if self.settings.mode == "decide"
            else None
        )

    async def handle(self, req: Request) -> None:
        """Answer one request and record it."""
        if self.decider is not None and self.decider.owns(req.target):
            await self.decide(req)
            return
        handoff: Handoff | None = req.handoff  # type: ignore[assignment]
        started = _perf() if handoff is None else handoff.started
        record = new_record(req)
        upstream_ms = None
        status = 500
        try:
            if handoff is not None and handoff.decided is not None:
                # The callback path decided and forwarded this request: that decision stands
                # (one policy snapshot per request). Its failure is answered here; a pooled
                # connection it found closed is replaced by a fresh one, once.
                client, target, rule = handoff.decided
                user = handoff.user
                record.update(client=client, path=target.path, rule=rule, decision="allow")
                record["user"] = user.name if user is not None else None
                if handoff.error is not None:
                    raise handoff.error
                inspected = None
            else:
                client, target, user, inspected = await self.admit(req, handoff, record)
            if target.own:
                status, headers, body = await self.admin.dispatch(req, target)
                await req.respond(status, headers, body)
            else:
                t_up = _perf()
                forwarder = self.forwarder
                assert forwarder is not None, "gateway not started"
                status = await forwarder.forward(
                    req,
                    target,
                    user,
                    client,
                    inspected,
                    fresh=handoff is not None and handoff.decided is not None,
                )
                upstream_ms = milliseconds(_perf() - t_up)
        except GatewayError as exc:
            status = exc.status
            await self.answer_error(req, exc, record)
        except (ClientGone, ConnectionError):
            status = 499  # nginx's "client closed request"
            record["decision"] = "client_gone"
            req.abort()
        except asyncio.CancelledError:
            status = 499
            record["decision"] = "cut"
            record["reason"] = CUT_REASON
            raise
        except Exception:
            log.exception("error handling %s %s", req.method, req.target[:200])
            status = 500
            await self.answer_error(req, GatewayError("internal error"), record)
        finally:
            self.write_record(record, status, started, upstream_ms)

    async def admit(
        self, req: Request, handoff: Handoff | None, record: dict[str, object]
    ) -> tuple[str, Target, User | None, bytes | None]:
        """Guard, authenticate and authorize ``req``: (client, target, user, the body a
        body-constrained rule inspected), or a :class:`GatewayError`."""
        client = record["client"] = (
            self.client_address(req) if self.trusted else req.remote or "unknown"
        )
        if req.method in REJECTED_METHODS or req.headers.has_any(OVERRIDES):
            check_method(req.method, req.headers)
        if req.chunked:
            check_framing(req.headers)
        target = self.targets.get(req.target)
        if target is None:
            target = self.canonical(req.target)
        record["path"] = target.path
        policy = self.store.policy  # one snapshot for the whole request
        user = None
        header = req.headers.get_raw(b"authorization")
        if header is not None:
            if handoff is None:
                user, key = self.cached_user(req, header, policy, client)
            else:  # looked up by the callback path already
                user, key = handoff.user, handoff.key
            if user is None:
                user = await self.authenticate(req, target, client, policy, header, key)
            record["user"] = user.name
        decision = self.authorize(req, target, user, policy, record)
        inspected = None
        if decision.body_keys:
            inspected = await self.inspect_body(req, decision, user)
        record["decision"] = "allow" if user is not None else "public"
        return client, target, user, inspected

    def write_record(
        self, record: dict[str, object], status: int, started: float, upstream_ms: float | None
    ) -> None:
        """The audit line and the metrics of one request, however it ended."""
        elapsed = _perf() - started
        record["status"] = status
        record["upstream_ms"] = upstream_ms
        record["total_ms"] = milliseconds(elapsed)
        self.audit.write(record)
        self.metrics.observe(
            str(record["decision"]),
            status,
            elapsed,
            upstream_ms / 1000 if upstream_ms is not None else None,
        )

    async def decide(self, req: Request) -> None:
        """Decision mode: answer a front proxy's check request (recorded by the decider);
        nothing is forwarded."""
        status, headers, body = await self.decider.decide(  # type: ignore[union-attr]
            req.method, req.target, req.headers, tuple(req.headers.raw), req.remote
        )
        try:
            await req.respond(status, headers, body)
        except ConnectionError:
            req.abort()  # the front proxy is gone

    def canonical(self, raw: str) -> Target:
        """The guard's verdict on a raw target; accepted ones are remembered (targets repeat,
        and a Target is immutable), rejections are not."""
        target = canonical_target(raw)
        if len(self.targets) >= _TARGET_CACHE:
            self.targets.clear()
        self.targets[raw] = target
        return target

    def client_address(self, req: Request) -> str:
        peer = req.remote or "unknown"
        if not self.trusted:
            return peer
        return client_behind_proxies(peer, req.headers.getall("X-Forwarded-For"), self.trusted)

    def cached_user(
        self, req: Request, header: bytes, policy: Policy, client: str
    ) -> tuple[User | None, bytes]:
        """The user of credentials verified before (no decoding, no bcrypt), or None; and the
        credentials' cache key, which the uncached path needs too."""
        cache = self.auth.cache
        # A kept-alive client repeats its header: its keyed hash is remembered on the
        # connection (for as long as the connection, not in the process-wide cache).
        memo = req.conn.auth_key
        if memo is not None and memo[0] is cache and memo[1] == header:
            key = memo[2]
        else:
            key = cache.key(header)
            # kept for the connection's next request unless large (an idle connection holds
            # little; a real Basic value is far shorter)
            req.conn.auth_key = (cache, header, key) if len(header) <= _AUTH_MEMO_MAX else None
        user, due = cache.hit(key, policy)
        if due:
            self.auth.refresh(policy, header, key, client)
        return user, key

    def authorize(
        self,
        req: Request,
        target: Target,
        user: User | None,
        policy: Policy,
        record: dict[str, object],
    ) -> Decision:
        """The policy's decision for ``user`` (None: no credentials were sent); 401 or 403
        unless it allows the request."""
        if user is None:
            decision = policy.decide(None, req.method, target.segments)
            if not decision.allowed:
                raise Unauthenticated("authentication required", realm=policy.realm)
            return decision
        decision = self.decision(policy, user, req.method, target)
        record["rule"] = decision.rule.id if decision.rule else None
        if not decision.allowed:
            raise Forbidden(f"user {user.name!r} may not {req.method} {target.path}")
        return decision

    def decision(self, policy: Policy, user: User, method: str, target: Target) -> Decision:
        """The policy's decision for a user, remembered per policy."""
        if policy is not self._memo_policy:  # a reload: decisions start afresh
            self._memo.clear()
            self._memo_policy = policy
        memo_key = (user.name, method, target.path)
        known = self._memo.get(memo_key)
        if known is None:
            known = policy.decide(user.name, method, target.segments)
            if len(self._memo) >= _TARGET_CACHE:
                self._memo.clear()
            self._memo[memo_key] = known
        return known

    async def authenticate(
        self, req: Request, target: Target, client: str, policy: Policy, header: bytes, key: bytes
    ) -> User:
        """The uncached path: parse the credentials, check them with bcrypt."""
        try:
            creds = parse_basic(header.decode("latin-1"), policy.realm)
        except Unauthenticated:
            self.metrics.auth_failures.labels("malformed").inc()
            raise
        assert creds is not None
        try:
            return await self.auth.authenticate(
                policy, creds, client, key, remember_key=is_canonical(header, creds)
            )
        except Unauthenticated:
            self.metrics.auth_failures.labels("invalid_credentials").inc()
            self.audit.write(
                {
                    "event": "auth_failure",
                    "time": now_iso(),
                    "client": client,
                    "user": creds.user,
                    "method": req.method,
                    "path": target.path,
                }
            )
            raise
        except TooManyRequests:
            self.metrics.throttled.inc()
            # Tarpit: a client in back-off waits for its answer, so a flood over a few
            # connections slows to a few requests per second.
            if self.settings.throttle_delay:
                await asyncio.sleep(self.settings.throttle_delay)
            raise

    async def inspect_body(self, req: Request, decision: Decision, user: User | None) -> bytes:
        """Read the body a body-constrained rule must see; 403 unless it fits."""
        limit = self.settings.max_inspected_body
        if req.content_length is not None and req.content_length > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes cannot be inspected")
        if req.headers.get_raw(b"content-encoding") not in (None, b"identity"):
            raise Forbidden("a body this rule must inspect cannot be content-encoded")
        body = await read_body(req, limit) if req.body is not None else b""
        if not decision.allows_body(body):
            who = user.name if user else "anonymous"
            allowed = " or ".join("{" + ", ".join(sorted(k)) + "}" for k in decision.body_keys)
            raise Forbidden(
                f"user {who!r} may only send a JSON object with keys within {allowed} here"
            )
        return body

    async def answer_error(
        self, req: Request, exc: GatewayError, record: dict[str, object]
    ) -> None:
        if isinstance(exc, Rejected):
            self.metrics.rejections.labels(exc.code).inc()
        if exc.audit_decision is not None:
            record["decision"] = exc.audit_decision
        elif isinstance(exc, BadRequest) and record["decision"] == "error":
            record["decision"] = "reject"  # refused before any decision (framing, body)
        record["reason"] = exc.message
        if req.started:  # the answer is under way: all that is left is to cut it short
            req.abort()
            return
        doc: dict[str, object] = {"error": exc.message, "status": exc.status, "code": exc.code}
        if isinstance(exc, UnprocessablePolicy):
            doc["errors"] = exc.errors
        try:
            await req.respond(
                exc.status, {"Content-Type": JSON_TYPE, **exc.headers()}, json_body(doc)
            )
        except ConnectionError:
            pass  # the client is gone already
