"""The callback path: the common request forwarded and answered with no task and no coroutine.

A request qualifies when nothing on its way needs to wait: no body, an idempotent method, no
method-override header, a target the guard has accepted before, credentials verified before
(no bcrypt), a policy decision that allows it without looking at a body, and an idle upstream
connection at hand. Its head is forwarded from the client parser's ``on_headers_complete``;
the upstream relays the answer into the client connection as it does for the task path, and
its ``on_message_complete`` settles a :class:`FastExchange` instead of a future, which then
records the request and lets the connection go on, once the answer's last bytes were written
(called by the upstream connection at the end of the read that completed the answer). On a
kept-alive connection of a busy client that is most requests. Its audit line is the task
path's byte for byte, made from a template whose middle (client, user, method, path, rule)
is made once for requests that repeat it.

Anything else is the task path's (:meth:`gateway.pipeline.Pipeline.handle`), and so is every
way this one can go wrong: a request that stops qualifying half-way, an exchange that fails,
a reused upstream connection found closed (retried there, the method being idempotent). It
gets a :class:`~gateway.pipeline.Handoff` with what was done already, so nothing is done
twice (a cache lookup is counted once) and every error is answered and recorded in the one
place that does it. The connection still answers pipelined requests in order: while a
request is on this path the next ones wait in the queue, and a task takes them after it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .audit import milliseconds, now_iso, request_fields, request_line
from .forward import IDEMPOTENT, Forwarder
from .http.pool import Pool
from .http.request import Request
from .http.upstream import Stale, UpstreamConnection
from .pipeline import CUT_REASON, OVERRIDES, Handoff, new_record

if TYPE_CHECKING:
    from .guard import Target
    from .pipeline import Pipeline
    from .policy import Policy, User

_perf = time.perf_counter
_monotonic = time.monotonic  # the credential cache's clock
_FIELDS_MAX = 4096  # audit line middles remembered (client, user, method, path, rule)


class FastPath:
    """Starts callback-path exchanges for one gateway (proxy mode)."""

    def __init__(self, pipeline: Pipeline, forwarder: Forwarder) -> None:
        self.pipeline = pipeline
        self.forwarder = forwarder
        self.pool: Pool = forwarder.pool
        self.loop = self.pool.loop
        self.taken = 0  # requests forwarded on this path (/-/status shows it)
        self._fields: dict[tuple[str, str, str, str, str | None], bytes] = {}
        self.cache = pipeline.auth.cache

    def __call__(self, req: Request) -> FastExchange | None:
        """Forward ``req`` on this path, or return None (the task path takes it: with a
        :class:`Handoff` once credentials were looked up)."""
        started = _perf()
        policy = self.pipeline.store.policy
        plan = req.conn.plan
        if (
            plan is not None
            and plan[0] is req.headers
            and plan[1] == req.target
            and plan[2] == req.method
            and plan[3] is policy
            and plan[4] is self
            and _monotonic() < plan[5]
        ):
            # The same request as the last one here (the same Headers object: the same
            # lines), under the same policy, its credentials fresh: forwarded as it was.
            user, key, fields, head, decided = plan[6], plan[7], plan[8], plan[9], plan[10]
            self.cache.hits += 1  # the lookup this stands for
        else:
            made = self._plan(req, policy, started)
            if made is None:
                return None
            user, key, fields, head, decided = made
        conn = self.pool.try_acquire()
        if conn is None:
            req.handoff = Handoff(user, key, started)
            return None
        exchange = FastExchange(self, req, conn, fields, started, user, key, decided)
        transport = conn.transport
        try:
            conn.start(req, exchange, exchange.finish)
            req.conn.relay_source = transport
            exchange.upstream_started = _perf()
            transport.write(head)  # type: ignore[union-attr]
        except Exception:  # nothing was sent: the task path tries again, and answers
            exchange.release(broken=True)
            req.handoff = Handoff(user, key, started)
            return None
        self.taken += 1
        return exchange

    def _plan(
        self, req: Request, policy: Policy, started: float
    ) -> tuple[User, bytes, bytes, bytes, tuple[str, Target, str | None]] | None:
        """Whether ``req`` qualifies, and if so (user, credential key, audit line middle,
        upstream head, (client, target, rule)), also remembered on its connection for a
        repeat of it (see :meth:`__call__`). None: the task path's (with a :class:`Handoff`
        once the credentials were looked up)."""
        p = self.pipeline
        if req.method not in IDEMPOTENT or req.headers.has_any(OVERRIDES):
            return None
        target = p.targets.get(req.target)
        header = req.headers.get_raw(b"authorization")
        if target is None or target.own or header is None or self.pool.per_client:
            return None
        client = p.client_address(req) if p.trusted else req.remote or "unknown"
        user, key = p.cached_user(req, header, policy, client)
        if user is None:
            req.handoff = Handoff(None, key, started)
            return None
        # a denial is answered by the task path, which decides again (remembered)
        decision = p.decision(policy, user, req.method, target)
        if not decision.allowed or decision.body_keys:
            req.handoff = Handoff(user, key, started)
            return None
        rule = decision.rule.id if decision.rule else None
        fields_key = (client, user.name, req.method, target.path, rule)
        fields = self._fields.get(fields_key)
        if fields is None:
            if len(self._fields) >= _FIELDS_MAX:
                self._fields.clear()
            fields = self._fields[fields_key] = request_fields(*fields_key[:4], "allow", rule)
        head = self.forwarder.plain_head(req, target, user, client)
        # Valid while the credentials need no check (their cache entry is not yet due: a
        # due one is checked again by the next lookup) and the policy stays in force.
        fresh_until = self.cache.fresh_until(key)
        decided = (client, target, rule)
        if req.headers is req.conn.last_headers:  # kept (small): a repeat can be known
            req.conn.plan = (
                req.headers,
                req.target,
                req.method,
                policy,
                self,
                fresh_until,
                user,
                key,
                fields,
                head,
                decided,
            )
        return user, key, fields, head, decided


class FastExchange:
    """One callback-path exchange: the outcome an upstream connection delivers (as it would
    to a future), then the record and the connection's next step."""

    __slots__ = (
        "path",
        "req",
        "upstream",
        "time",
        "fields",
        "started",
        "upstream_started",
        "user",
        "key",
        "decided",
        "status",
        "error",
        "settled",
    )

    def __init__(
        self,
        path: FastPath,
        req: Request,
        upstream: UpstreamConnection,
        fields: bytes,
        started: float,
        user: User,
        key: bytes,
        decided: tuple[str, Target, str | None],
    ) -> None:
        self.path = path
        self.req = req
        self.upstream: UpstreamConnection | None = upstream
        self.time = now_iso()
        self.fields = fields
        self.started = started
        self.upstream_started = started
        self.user = user
        self.key = key
        self.decided = decided
        self.status = 0
        self.error: BaseException | None = None
        self.settled = False

    # -- what the upstream connection calls (the part of a future it uses, and finish)
    def done(self) -> bool:
        return self.settled

    def set_result(self, status: int) -> None:
        # Called from the upstream parser's callbacks: the answer's last bytes are written
        # when the read that carried them has been parsed; the connection calls finish then.
        self.settled = True
        self.status = status

    def set_exception(self, exc: BaseException) -> None:
        self.settled = True
        self.error = exc
        self.path.loop.call_soon(self.finish)  # from wherever it failed, on a clean stack

    def exception(self) -> BaseException | None:
        return self.error

    # -- the rest
    def release(self, broken: bool = False) -> None:
        """Give the upstream connection back to the pool (kept only if in step)."""
        conn = self.upstream
        if conn is None:
            return
        self.upstream = None
        if broken:
            conn.broken = True
        self.req.conn.relay_source = None
        self.path.pool.release(conn)

    def finish(self) -> None:
        """The answer was relayed (or the exchange failed): record, and go on."""
        conn = self.upstream
        if conn is None:
            return  # finished already, or cut at shutdown (recorded then)
        self.upstream = None
        req = self.req
        req.conn.relay_source = None
        path = self.path
        path.pool.release(conn)
        error = self.error
        if error is not None:
            # Nothing relayed on a Stale connection: the task path forwards the request
            # once more, on a fresh one. Any other failure is answered (or the client cut
            # off) and recorded there. Either way under this decision, not a new one.
            req.handoff = Handoff(
                self.user,
                self.key,
                self.started,
                None if isinstance(error, Stale) else error,
                self.decided,
            )
            req.conn.slow_path()
            return
        try:
            now = _perf()
            elapsed = now - self.started
            upstream = now - self.upstream_started
            p = path.pipeline
            p.audit.write_line(
                request_line(
                    self.time,
                    self.fields,
                    self.status,
                    milliseconds(upstream),
                    milliseconds(elapsed),
                )
            )
            p.metrics.observe("allow", self.status, elapsed, upstream)
        finally:
            req.conn.fast_done()

    def cut(self) -> None:
        """Shutdown cut the request short: recorded as the task path records a cancelled one."""
        if self.upstream is None:
            return
        self.release(broken=True)
        req = self.req
        req.conn.inflight = None
        record = new_record(req)
        client, target, rule = self.decided
        record.update(time=self.time, client=client, path=target.path, rule=rule)
        record["user"] = self.user.name
        record["decision"] = "cut"
        record["reason"] = CUT_REASON
        self.path.pipeline.write_record(record, 499, self.started, None)
