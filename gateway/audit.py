"""Recording: one JSON audit line per request, and Prometheus metrics.

Each app owns its own metrics registry (no module-level state), so tests can build many apps
in one process and every worker process exports its own figures.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .auth import Authenticator, CredentialCache

_LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


class AuditLog:
    """Writes one JSON object per line; never credentials, never hashes."""

    def __init__(self, stream: IO[str] | None = None, *, enabled: bool = True) -> None:
        self._stream = stream or sys.stdout
        self.enabled = enabled
        self._encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    @classmethod
    def to_file(cls, path: str) -> AuditLog:
        if path == "-":
            return cls(sys.stdout)
        return cls(open(path, "a", encoding="utf-8", buffering=1))  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self._stream.write(self._encode(record) + "\n")

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        if self._stream not in (sys.stdout, sys.stderr):
            self._stream.close()


_second: list[Any] = [-1, ""]


def now_iso() -> str:
    """UTC time with milliseconds; the part up to the second is formatted once a second."""
    t = time.time()
    sec = int(t)
    if _second[0] != sec:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{int((t - sec) * 1000):03d}Z"


class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("gateway_requests", "Requests by decision and status",
                                ["decision", "status"], registry=r)
        self.latency = Histogram("gateway_request_seconds", "Total time in the gateway",
                                 ["decision"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_latency = Histogram("gateway_upstream_seconds",
                                          "Time until the upstream's response headers",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.rejections = Counter("gateway_guard_rejections", "Requests the guard refused",
                                  ["reason"], registry=r)
        self.auth_failures = Counter("gateway_auth_failures", "Failed authentications",
                                     ["reason"], registry=r)
        self.throttled = Counter("gateway_throttled", "Requests refused by the login throttle",
                                 registry=r)
        self.reloads = Counter("gateway_policy_reloads", "Policy reloads by result",
                               ["result"], registry=r)
        self.policy_load_seconds = Gauge("gateway_policy_load_seconds",
                                         "Time the last successful policy load took",
                                         registry=r)
        self.policy_loaded_at = Gauge("gateway_policy_loaded_timestamp_seconds",
                                      "When the policy in force was loaded", registry=r)
        self.policy_last_reload_failed = Gauge(
            "gateway_policy_last_reload_failed", "1 while the last reload attempt was refused",
            registry=r)
        self._req_children: dict[tuple[str, str], Any] = {}
        self._lat_children: dict[str, Any] = {}

    def watch_cache(self, cache: CredentialCache, auth: Authenticator) -> None:
        """Export the credential cache's own counters at scrape time (no per-request cost)."""
        self.registry.register(_CacheCollector(cache, auth))

    def observe(self, decision: str, status: int, seconds: float) -> None:
        """Count one finished request (children are cached: labels() takes a lock)."""
        key = (decision, str(status))
        child = self._req_children.get(key)
        if child is None:
            child = self._req_children[key] = self.requests.labels(*key)
        child.inc()
        lat = self._lat_children.get(decision)
        if lat is None:
            lat = self._lat_children[decision] = self.latency.labels(decision)
        lat.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector(Collector):
    def __init__(self, cache: CredentialCache, auth: Authenticator) -> None:
        self.cache, self.auth = cache, auth

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        lookups = CounterMetricFamily("gateway_credential_cache", "Credential cache lookups",
                                      labels=["result"])
        lookups.add_metric(["hit"], self.cache.hits)
        lookups.add_metric(["miss"], self.cache.misses)
        yield lookups
        yield GaugeMetricFamily("gateway_credential_cache_entries", "Cached credentials",
                                value=len(self.cache))
        yield CounterMetricFamily("gateway_bcrypt_checks", "Password hash checks run",
                                  value=self.auth.bcrypt_checks)
        yield GaugeMetricFamily("gateway_bcrypt_inflight", "Password checks in progress",
                                value=self.auth.inflight)
