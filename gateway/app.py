"""create_app(settings): the request pipeline and the gateway's own /-/ endpoints.

    guard → authenticate → authorize → forward → record

One route catches every request; the pipeline is one coroutine so that the hot path pays for
no middleware chain, and every :class:`GatewayError` is turned into a JSON answer in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import time
from typing import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from yarl import URL

from .audit import AuditLog, Metrics, now_iso
from .auth import Authenticator, CredentialCache, FailureThrottle, parse_basic
from .decision import Decider   # decision mode (issue 12)
from .errors import (BadRequest, Forbidden, GatewayError, MethodNotAllowed, NotFound,
                     Overloaded, PayloadTooLarge, RequestTimeout, TooManyRequests,
                     Unauthenticated, UnprocessablePolicy)
from .guard import (Rejected, Target, canonical_target, check_framing, check_header_sizes,
                    check_method)
from .policy import Decision, Policy, User
from .exchange import JSON_TYPE, AiohttpExchange, Exchange, json_body
from .proxy import Forwarder, Upstream
from .upstream import PoolForwarder
from .settings import Settings
from .store import PolicyStore, ReloadResult, watch

log = logging.getLogger(__name__)

WORKER_ENV = "GATEWAY_WORKER_OF"   # set in worker processes: the supervisor's pid

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", PolicyStore)
AUTH = web.AppKey("auth", Authenticator)
FORWARDER = web.AppKey("forwarder", Forwarder)
AUDIT = web.AppKey("audit", AuditLog)
METRICS = web.AppKey("metrics", Metrics)

MAX_PARSED_FIELD = 128 * 1024


def create_app(settings: Settings, *, store: PolicyStore | None = None,
               audit: AuditLog | None = None) -> web.Application:
    """Build the gateway app. Raises :class:`~gateway.errors.PolicyError` on a bad policy."""
    store = store or PolicyStore.open(settings.policy)
    # The parser's own field limit is generous so that an oversize Authorization header can
    # be answered 401 like any bad credential; every other header is held to
    # max_header_bytes by the guard (431).
    app = web.Application(handler_args={"max_field_size": MAX_PARSED_FIELD,
                                        "max_line_size": settings.max_header_bytes,
                                        "max_headers": 100})
    app[SETTINGS] = settings
    app[STORE] = store
    app[AUTH] = Authenticator(
        max_inflight=settings.max_bcrypt_inflight,
        cache=CredentialCache(ttl=settings.cache_ttl, max_entries=settings.cache_size),
        throttle=FailureThrottle())
    upstream = Upstream(URL(settings.upstream), settings.connect_timeout,
                        settings.upstream_timeout)
    app[FORWARDER] = PoolForwarder(upstream, settings.max_body)
    app[AUDIT] = audit or (AuditLog(enabled=False) if settings.audit_log == "off"
                           else AuditLog.to_file(settings.audit_log))
    app[METRICS] = metrics = Metrics()
    metrics.watch_cache(app[AUTH].cache, app[AUTH])
    store.on_swap(app[AUTH].prepare)
    store.on_result(lambda r: _count_reload(metrics, store, r))
    metrics.policy_loaded_at.set(store.loaded_at)
    app.cleanup_ctx.append(_lifecycle)
    pipeline = Pipeline(app)
    # The middleware is the entry for every request, also those no route can match
    # (authority-form CONNECT, asterisk-form OPTIONS), so the guard answers them too; the
    # catch-all route only lets aiohttp cache the middleware chain for ordinary targets.
    app.middlewares.append(pipeline.entry)
    app.router.add_route("*", "/{tail:.*}", _unreachable)
    app[PIPELINE] = pipeline
    return app


async def _unreachable(request: web.Request) -> web.StreamResponse:  # pragma: no cover
    raise AssertionError("the pipeline middleware answers every request")


def _count_reload(metrics: Metrics, store: PolicyStore, result: ReloadResult) -> None:
    outcome = "refused" if not result.ok else "changed" if result.changed else "unchanged"
    metrics.reloads.labels(outcome).inc()
    metrics.policy_last_reload_failed.set(0 if result.ok else 1)
    if result.changed:
        metrics.policy_loaded_at.set(store.loaded_at)
        metrics.policy_load_seconds.set(store.stats.last_load_seconds)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings, store = app[SETTINGS], app[STORE]
    await app[AUTH].prepare(store.policy)
    await app[FORWARDER].start()
    tasks = [asyncio.create_task(app[AUDIT].flush_every(0.5))]
    if settings.watch:
        tasks.append(asyncio.create_task(watch(store, settings.watch_interval)))
    loop = asyncio.get_running_loop()
    if settings.handle_signals:
        async def reload_on_sighup() -> None:
            await store.reload("SIGHUP")

        loop.add_signal_handler(
            signal.SIGHUP, lambda: tasks.append(asyncio.create_task(reload_on_sighup())))
    for w in store.policy.warnings:
        log.warning("%s", w)
    log.info("policy %s loaded (sha256 %s, %d users, %d roles)", store.path,
             store.policy.sha256[:12], len(store.policy.users), len(store.policy.roles))
    yield
    if settings.handle_signals:
        loop.remove_signal_handler(signal.SIGHUP)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
    await app[FORWARDER].close()
    app[AUTH].close()
    app[AUDIT].flush()
    app[AUDIT].close()


Answer = tuple[int, dict[str, str], bytes]


def json_answer(doc: object, status: int = 200,
                headers: dict[str, str] | None = None) -> Answer:
    return status, {"Content-Type": JSON_TYPE, **(headers or {})}, json_body(doc)


class Pipeline:
    """The per-request path. Holds references fixed at build time; per-request state is local."""

    def __init__(self, app: web.Application) -> None:
        self.settings = app[SETTINGS]
        self.store = app[STORE]
        self.auth = app[AUTH]
        self.forwarder = app[FORWARDER]
        self.audit = app[AUDIT]
        self.metrics = app[METRICS]
        self.trusted = self.settings.trusted_proxies
        self.header_limit = self.settings.max_header_bytes
        self._ready_at = 0.0
        self._ready_ok = False
        self.internal = {
            "/-/reload": ("POST", self.reload),
            "/-/status": ("GET", self.status),
            "/-/metrics": ("GET", self.metrics_page),
        }
        # -- decision mode (issue 12, gateway/decision.py) ---------------------------------
        self.decider = (Decider(self.settings, self.store, self.auth, self.audit, self.metrics)
                        if self.settings.mode == "decide" else None)

    @web.middleware
    async def entry(self, request: web.Request, handler: object) -> web.StreamResponse:
        """aiohttp's entry: every request, also those no route could match."""
        ex = AiohttpExchange(request)
        await self.handle(ex)
        assert ex.response is not None
        return ex.response

    async def handle(self, ex: Exchange) -> int:
        """Run the pipeline for one exchange; return the status answered."""
        # -- decision mode (issue 12): a check request is answered, never forwarded --------
        if self.decider is not None and self.decider.owns(ex.raw_path):
            status, headers, body = await self.decider.decide(
                ex.method, ex.raw_path, ex.headers, ex.raw_headers, ex.remote)
            with contextlib.suppress(ConnectionError):   # the front proxy may be gone
                await ex.respond(status, headers, body)
            return status
        # -----------------------------------------------------------------------------------
        started = time.perf_counter()
        record: dict[str, object] = {"event": "request", "time": now_iso(),
                                     "client": None, "user": None,
                                     "method": ex.method, "path": None,
                                     "decision": "error", "rule": None}
        upstream_ms = None
        status = 500
        try:
            client = record["client"] = self.client_address(ex)
            check_header_sizes(ex.raw_headers, self.header_limit)
            check_method(ex.method, ex.headers)
            check_framing(ex.headers)
            target = canonical_target(ex.raw_path)
            record["path"] = target.path
            if target.path in ("/-/healthz", "/-/ready") and ex.method in ("GET", "HEAD"):
                record["decision"] = "public"
                status, headers, body = await (
                    self.healthz() if target.path == "/-/healthz" else self.ready())
                await ex.respond(status, headers, body)
            else:
                policy = self.store.policy  # one snapshot for the whole request
                user, decision = await self.authorize(ex, target, client, policy)
                record["user"] = user.name if user else None
                record["rule"] = decision.rule.id if decision.rule else None
                inspected = None
                if decision.body_keys:
                    inspected = await self.inspect_body(ex, decision, user)
                record["decision"] = "allow"
                if target.path.startswith("/-/"):
                    status, headers, body = await self.dispatch_internal(ex, target)
                    await ex.respond(status, headers, body)
                else:
                    t_up = time.perf_counter()
                    status = await self.forwarder.forward(ex, target, user, client, inspected)
                    upstream_ms = round((time.perf_counter() - t_up) * 1000, 3)
        except GatewayError as exc:
            status = exc.status
            with contextlib.suppress(ConnectionError):   # the client may be gone already
                await self.answer_error(ex, exc, record)
        elapsed = time.perf_counter() - started
        record["status"] = status
        record["upstream_ms"] = upstream_ms
        record["total_ms"] = round(elapsed * 1000, 3)
        self.audit.write(record)
        self.metrics.observe(str(record["decision"]), status, elapsed,
                             upstream_ms / 1000 if upstream_ms is not None else None)
        return status

    def client_address(self, ex: Exchange) -> str:
        peer = ex.remote or "unknown"
        if not self.trusted:
            return peer
        return _client_behind_proxies(peer, ex.headers.getall("X-Forwarded-For", ()),
                                      self.trusted)

    async def authorize(self, ex: Exchange, target: Target, client: str,
                        policy: Policy) -> tuple[User | None, Decision]:
        realm = policy.realm
        creds = parse_basic(ex.headers.get("Authorization"), realm)
        if creds is None:
            decision = policy.decide(None, ex.method, target.segments)
            if not decision.allowed:
                raise Unauthenticated("authentication required", realm=realm)
            return None, decision
        try:
            user = await self.auth.authenticate(policy, creds, client)
        except Unauthenticated:
            self.metrics.auth_failures.labels("invalid_credentials").inc()
            self.audit.write({"event": "auth_failure", "time": now_iso(), "client": client,
                              "user": creds.user, "method": ex.method,
                              "path": target.path})
            raise
        except TooManyRequests:
            self.metrics.throttled.inc()
            # Tarpit: a client in back-off waits for its answer, so a flood over a few
            # connections slows to a few requests per second instead of costing us a full
            # request cycle thousands of times a second.
            if self.settings.throttle_delay:
                await asyncio.sleep(self.settings.throttle_delay)
            raise
        decision = policy.decide(user.name, ex.method, target.segments)
        if not decision.allowed:
            raise Forbidden(f"user {user.name!r} may not {ex.method} {target.path}")
        return user, decision

    async def inspect_body(self, ex: Exchange, decision: Decision,
                           user: User | None) -> bytes:
        limit = self.settings.max_inspected_body
        if ex.content_length is not None and ex.content_length > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes cannot be inspected")
        chunks, size = [], 0
        read = ex.content.readany
        while True:
            try:
                chunk = await asyncio.wait_for(read(), self.settings.upstream_timeout)
            except asyncio.TimeoutError:
                raise RequestTimeout("the request body stopped arriving") from None
            except RequestPayloadError as exc:
                raise BadRequest(f"malformed request body: {exc}") from None
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body over {limit} bytes cannot be inspected")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not decision.allows_body(body):
            who = user.name if user else "anonymous"
            allowed = " or ".join("{" + ", ".join(sorted(k)) + "}" for k in decision.body_keys)
            raise Forbidden(f"user {who!r} may only send a JSON object with keys within "
                            f"{allowed} here")
        return body

    # -- the gateway's own endpoints
    async def dispatch_internal(self, ex: Exchange, target: Target) -> Answer:
        entry = self.internal.get(target.path)
        if entry is None:
            raise NotFound(f"no gateway endpoint {target.path}")
        method, handler = entry
        if ex.method != method and not (method == "GET" and ex.method == "HEAD"):
            raise MethodNotAllowed(f"{target.path} takes {method}")
        return await handler()

    async def healthz(self) -> Answer:
        return json_answer({"status": "ok"})

    async def ready(self) -> Answer:
        now = time.monotonic()
        if now - self._ready_at > 1.0:
            self._ready_ok = await self.forwarder_probe()
            self._ready_at = now
        if not self._ready_ok:
            raise Overloaded("not ready: the upstream does not answer")
        return json_answer({"status": "ready", "policy": self.store.policy.sha256,
                            "upstream": "ok"})

    async def forwarder_probe(self) -> bool:
        url = self.settings.upstream.rstrip("/") + self.settings.upstream_health
        timeout = aiohttp.ClientTimeout(total=2)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url) as r:
                return r.status < 500
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False

    async def reload(self) -> Answer:
        result = await self.store.reload("api")
        supervisor = os.environ.get(WORKER_ENV)
        if supervisor and result.ok:
            # Other workers of this supervisor reload too (it forwards SIGHUP to all).
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(supervisor), signal.SIGHUP)
        if not result.ok:
            raise UnprocessablePolicy("the new policy was refused; the old one stays in force",
                                      list(result.errors))
        return json_answer({"status": "reloaded" if result.changed else "unchanged",
                            "sha256": result.sha256})

    async def status(self) -> Answer:
        store, policy = self.store, self.store.policy
        stats = store.stats
        return json_answer({
            "pid": os.getpid(), "policy": str(store.path), "sha256": policy.sha256,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(store.loaded_at)),
            "users": len(policy.users), "roles": len(policy.roles),
            "warnings": [str(w) for w in policy.warnings],
            "reloads": {"ok": stats.ok, "failed": stats.failed, "unchanged": stats.unchanged},
            "last_reload_error": stats.last_error,
            "credential_cache": {"entries": len(self.auth.cache), "hits": self.auth.cache.hits,
                                 "misses": self.auth.cache.misses},
            "bcrypt_checks": self.auth.bcrypt_checks,
        })

    async def metrics_page(self) -> Answer:
        m = self.metrics
        return 200, {"Content-Type": m.content_type}, m.render()

    async def answer_error(self, ex: Exchange, exc: GatewayError,
                           record: dict[str, object]) -> None:
        if isinstance(exc, Rejected):
            record["decision"] = "reject"
            self.metrics.rejections.labels(exc.code).inc()
        elif isinstance(exc, Unauthenticated):
            record["decision"] = "unauthenticated"
        elif isinstance(exc, Forbidden):
            record["decision"] = "deny"
        elif isinstance(exc, TooManyRequests):
            record["decision"] = "throttled"
        record["reason"] = exc.message
        if ex.started:    # the answer is under way: all that is left is to cut it short
            ex.abort()
            return
        doc: dict[str, object] = {"error": exc.message, "status": exc.status, "code": exc.code}
        if isinstance(exc, UnprocessablePolicy):
            doc["errors"] = exc.errors
        await ex.respond(*json_answer(doc, exc.status, exc.headers()))


PIPELINE = web.AppKey("pipeline", Pipeline)


def _client_behind_proxies(peer: str, forwarded: tuple[str, ...] | list[str],
                           trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
                           ) -> str:
    """The right-most address that is not a trusted proxy, walking back from the peer."""
    chain = [a.strip() for v in forwarded for a in v.split(",") if a.strip()]
    hop = peer
    for hop in [peer, *reversed(chain)]:
        try:
            ip = ipaddress.ip_address(hop)
        except ValueError:
            return peer          # a hop that is not an address: believe only the peer
        if not any(ip in net for net in trusted):
            return hop
    return hop
