"""The gateway's Prometheus metrics.

Each app owns its own metrics registry (no module-level state), so tests can build many apps
in one process and every worker process exports its own figures.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .audit import AuditLog
    from .auth import Authenticator, CredentialCache

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # Per-request figures are plain counters exported at scrape time: the client
        # library's objects take a lock and walk every bucket on each observation.
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.upstream_latency = _Histogram()
        r.register(_RequestCollector(self))
        self.rejections = Counter(
            "gateway_guard_rejections", "Requests the guard refused", ["reason"], registry=r
        )
        self.auth_failures = Counter(
            "gateway_auth_failures", "Failed authentications", ["reason"], registry=r
        )
        self.throttled = Counter(
            "gateway_throttled", "Requests refused by the login throttle", registry=r
        )
        self.reloads = Counter(
            "gateway_policy_reloads", "Policy reloads by result", ["result"], registry=r
        )
        self.policy_load_seconds = Gauge(
            "gateway_policy_load_seconds", "Time the last successful policy load took", registry=r
        )
        self.policy_loaded_at = Gauge(
            "gateway_policy_loaded_timestamp_seconds",
            "When the policy in force was loaded",
            registry=r,
        )
        self.policy_last_reload_failed = Gauge(
            "gateway_policy_last_reload_failed",
            "1 while the last reload attempt was refused",
            registry=r,
        )

    def watch_cache(self, cache: CredentialCache, auth: Authenticator) -> None:
        """Export the credential cache's own counters at scrape time (no per-request cost)."""
        self.registry.register(_CacheCollector(cache, auth))

    def watch_audit(self, audit: AuditLog) -> None:
        """Export the audit log's write errors and dropped lines at scrape time."""
        self.registry.register(_AuditCollector(audit))

    def observe(
        self, decision: str, status: int, seconds: float, upstream_seconds: float | None = None
    ) -> None:
        """Count one finished request."""
        key = (decision, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        hist = self.latency.get(decision)
        if hist is None:
            hist = self.latency[decision] = _Histogram()
        # a _Histogram's bucket and sum, kept here: this runs once per request
        hist.counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        hist.total += seconds
        if upstream_seconds is not None:
            up = self.upstream_latency
            up.counts[bisect_left(_LATENCY_BUCKETS, upstream_seconds)] += 1
            up.total += upstream_seconds

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector(Collector):
    def __init__(self, cache: CredentialCache, auth: Authenticator) -> None:
        self.cache, self.auth = cache, auth

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        lookups = CounterMetricFamily(
            "gateway_credential_cache", "Credential cache lookups", labels=["result"]
        )
        lookups.add_metric(["hit"], self.cache.hits)
        lookups.add_metric(["miss"], self.cache.misses)
        yield lookups
        yield GaugeMetricFamily(
            "gateway_credential_cache_entries", "Cached credentials", value=len(self.cache)
        )
        yield CounterMetricFamily(
            "gateway_bcrypt_checks", "Password hash checks run", value=self.auth.bcrypt_checks
        )
        yield GaugeMetricFamily(
            "gateway_bcrypt_inflight", "Password checks in progress", value=self.auth.inflight
        )
        yield CounterMetricFamily(  # a worker throttling alone: its supervisor is not answering
            "gateway_login_throttle_unanswered",
            "Shared login throttle questions the supervisor did not answer",
            value=self.auth.throttle.unanswered,
        )


class _AuditCollector(Collector):
    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "gateway_audit_write_errors",
            "Failed writes to the audit log (lines dropped whole)",
            value=self.audit.write_errors,
        )
        yield CounterMetricFamily(
            "gateway_audit_dropped_lines",
            "Audit lines dropped because writing failed",
            value=self.audit.dropped_lines,
        )


class _Histogram:
    """Bucket counts kept as a list; cumulated only when scraped."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, count in zip((*map(str, _LATENCY_BUCKETS), "+Inf"), self.counts):
            acc += count
            out.append((bound, acc))
        return out


class _RequestCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "gateway_requests", "Requests by decision and status", labels=["decision", "status"]
        )
        for (decision, status), n in sorted(self.m.requests.items()):
            requests.add_metric([decision, str(status)], n)
        yield requests
        latency = HistogramMetricFamily(
            "gateway_request_seconds", "Total time in the gateway", labels=["decision"]
        )
        for decision, hist in sorted(self.m.latency.items()):
            latency.add_metric([decision], hist.buckets(), hist.total)
        yield latency
        up = HistogramMetricFamily(
            "gateway_upstream_seconds", "Time the upstream took to answer (forwarded requests)"
        )
        up.add_metric([], self.m.upstream_latency.buckets(), self.m.upstream_latency.total)
        yield up
