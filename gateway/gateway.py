"""The Gateway object: owns the policy store, the authenticator, the upstream pool and
forwarder, the audit log and the metrics; ``start()`` and ``close()`` bracket their life.

A test or an embedding program builds a ``Gateway`` from :class:`Settings`, starts it, and
serves it on any listener with the server :meth:`Gateway.make_server` builds (its handler is
the pipeline, and in proxy mode the callback path of :mod:`gateway.fastpath`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from yarl import URL

from . import __version__
from .audit import AuditLog
from .auth import Authenticator, CredentialCache, FailureThrottle
from .errors import GatewayError
from .fastpath import FastPath
from .forward import Forwarder
from .http.pool import Pool, exchange, request_head
from .http.server import Limits, Server
from .metrics import Metrics
from .pipeline import Pipeline
from .policy import PolicyStore, ReloadResult, watch
from .settings import Settings

log = logging.getLogger(__name__)


class Gateway:
    """One gateway: everything a request needs, built from :class:`Settings`."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: PolicyStore | None = None,
        audit: AuditLog | None = None,
        throttle: FailureThrottle | None = None,
    ) -> None:
        self.settings = settings
        self.version = __version__
        self.store = store or PolicyStore.open(settings.policy)
        self.auth = Authenticator(
            max_inflight=settings.max_bcrypt_inflight,
            cache=CredentialCache(ttl=settings.cache_ttl, max_entries=settings.cache_size),
            throttle=throttle or FailureThrottle(),
        )
        self.audit = audit or self.open_audit(settings)
        self.metrics = Metrics()
        self.metrics.watch_cache(self.auth.cache, self.auth)
        self.metrics.watch_audit(self.audit)
        self.store.on_swap(self.auth.prepare)
        self.store.on_result(self._count_reload)
        self.metrics.policy_loaded_at.set(self.store.loaded_at)
        url = URL(settings.upstream)
        self.upstream_host = url.host or "127.0.0.1"
        self.upstream_port = url.explicit_port or url.port or 80
        self.upstream_tls = url.scheme == "https"
        self.upstream_authority = url.raw_authority
        self.pipeline = Pipeline(self)
        self.server: Server | None = None  # set by whoever serves this gateway
        self.on_api_reload: Callable[[], None] | None = None
        self._pool: Pool | None = None
        self._forwarder: Forwarder | None = None
        self.fast: FastPath | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reloads: set[asyncio.Task[ReloadResult]] = set()

    @staticmethod
    def open_audit(settings: Settings) -> AuditLog:
        """The audit log the settings ask for (raises OSError for a path that can't be opened)."""
        if settings.audit_log == "off":
            return AuditLog(enabled=False)
        return AuditLog.to_file(settings.audit_log)

    @property
    def pool(self) -> Pool:
        assert self._pool is not None, "gateway not started"
        return self._pool

    @property
    def forwarder(self) -> Forwarder:
        assert self._forwarder is not None, "gateway not started"
        return self._forwarder

    async def start(self) -> None:
        """Open what needs a running event loop: the pool, the flush and watch tasks."""
        s = self.settings
        await self.auth.prepare(self.store.policy)
        self._pool = Pool(
            self.upstream_host,
            self.upstream_port,
            tls=self.upstream_tls,
            size=s.pool_size,
            connect_timeout=s.connect_timeout,
            read_timeout=s.upstream_timeout,
            per_client=s.max_upstream_per_client,
        )
        self._forwarder = Forwarder(self._pool, self.upstream_authority, s.max_body)
        self.pipeline.forwarder = self._forwarder
        # decide mode answers its own checks: the callback path only forwards
        self.fast = FastPath(self.pipeline, self._forwarder) if s.mode != "decide" else None
        self._tasks.append(asyncio.create_task(self.audit.flush_every(0.5)))
        if s.watch:
            self._tasks.append(asyncio.create_task(watch(self.store, s.watch_interval)))
        if s.handle_signals:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        for w in self.store.policy.warnings:
            log.warning("%s", w)
        policy = self.store.policy
        log.info(
            "policy %s loaded (sha256 %s, %d users, %d roles)",
            self.store.path,
            policy.sha256[:12],
            len(policy.users),
            len(policy.roles),
        )

    def make_server(self, limits: Limits) -> Server:
        """The HTTP server for this (started) gateway; it is :attr:`server` from now on."""
        self.server = Server(
            self.pipeline.handle,
            limits,
            on_refusal=lambda e: self.metrics.rejections.labels(e.code).inc(),
            fast=self.fast,
        )
        return self.server

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload("SIGHUP"))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def close(self) -> None:
        """Stop the background tasks, close the pool, flush the audit log."""
        if self.settings.handle_signals:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self._pool is not None:
            self._pool.close()
        self.auth.close()
        self.audit.flush()
        self.audit.close()

    async def reload(self, trigger: str) -> ReloadResult:
        """Reload the policy file (SIGHUP, API, watcher share this path)."""
        return await self.store.reload(trigger)

    async def probe_upstream(self) -> bool:
        """True when the upstream answers its health path below 500, through the pool."""
        head = request_head(
            b"GET",
            self.settings.upstream_health.encode(),
            self.upstream_authority.encode(),
            [b"Content-Length: 0\r\n"],
        )
        try:
            status = await asyncio.wait_for(exchange(self.pool, None, head, None, retry=True), 2.0)
        except (TimeoutError, GatewayError, OSError):
            return False
        return status < 500

    def audit_status(self) -> dict[str, object]:
        return self.audit.status()

    def upstream_status(self) -> dict[str, object]:
        pool = self._pool
        if pool is None:
            return {}
        return {
            "url": self.settings.upstream,
            "down": bool(pool.down_since),
            "busy": len(pool.busy),
            "size": pool.size,
            "exhausted": pool.exhausted,
        }

    def _count_reload(self, result: ReloadResult) -> None:
        m = self.metrics
        outcome = "refused" if not result.ok else "changed" if result.changed else "unchanged"
        m.reloads.labels(outcome).inc()
        m.policy_last_reload_failed.set(0 if result.ok else 1)
        if result.changed:
            m.policy_loaded_at.set(self.store.loaded_at)
            m.policy_load_seconds.set(self.store.stats.last_load_seconds)
