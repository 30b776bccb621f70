"""Command-line flags and environment variables → :class:`Settings`. Flags win."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from yarl import URL

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_DECISION_PREFIX = re.compile(r"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9\-._~]+)+")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``serve`` needs; built once at start."""

    policy: Path = Path("rbac.yaml")
    upstream: str = "http://127.0.0.1:8081"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    watch: bool = True
    watch_interval: float = 1.0
    audit_log: str = "-"
    connect_timeout: float = 5.0
    upstream_timeout: float = 30.0
    upstream_health: str = "/healthz"
    max_body: int = 10 * 1024 * 1024
    max_inspected_body: int = 1024 * 1024
    max_header_bytes: int = 8190
    cache_ttl: float = 300.0
    cache_size: int = 10_000
    max_bcrypt_inflight: int = 16
    throttle_delay: float = 1.0     # a 429 for failed logins is answered after this delay
    trusted_proxies: tuple[Network, ...] = field(default_factory=tuple)
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = "INFO"
    handle_signals: bool = True
    server: str = "fast"
    # -- decision mode (issue 12, gateway/decision.py)
    mode: str = "proxy"                   # "decide": answer front proxies' check requests
    decision_prefix: str = "/-/decide"


def _env(name: str, default: Any) -> Any:
    return os.environ.get(name, default)


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative: {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _upstream(text: str) -> str:
    url = URL(text)
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"upstream must be an http(s)://host:port URL: {text}")
    if url.path not in ("", "/") or url.query_string:
        raise argparse.ArgumentTypeError(f"upstream must not carry a path or query: {text}")
    return str(url.with_path(""))


def _networks(text: str) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(p.strip(), strict=False)
                     for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad CIDR in trusted proxies: {exc}") from None


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false: {text}")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` flags; each default comes from its environment variable."""
    d = Settings()
    add = p.add_argument
    add("--policy", type=Path, default=_env("GATEWAY_POLICY", d.policy),
        help="policy file (GATEWAY_POLICY, default rbac.yaml)")
    add("--upstream", default=_env("GATEWAY_UPSTREAM", d.upstream),
        help="upstream base URL (GATEWAY_UPSTREAM, default %(default)s)")
    add("--host", default=_env("GATEWAY_HOST", d.host), help="listen address (GATEWAY_HOST)")
    add("--port", default=_env("GATEWAY_PORT", d.port),
        help="listen port, 0 for any free one (GATEWAY_PORT, default 8080)")
    add("--workers", default=_env("GATEWAY_WORKERS", d.workers),
        help="worker processes sharing the port (GATEWAY_WORKERS, default 1)")
    add("--watch", dest="watch", action="store_true", default=None,
        help="reload when the policy file changes (default; GATEWAY_WATCH=false to disable)")
    add("--no-watch", dest="watch", action="store_false")
    add("--watch-interval", default=_env("GATEWAY_WATCH_INTERVAL", d.watch_interval),
        help="seconds between policy file checks (default 1)")
    add("--audit-log", default=_env("GATEWAY_AUDIT_LOG", d.audit_log),
        help="audit log file, '-' for stdout, 'off' for none (GATEWAY_AUDIT_LOG)")
    add("--upstream-timeout", default=_env("GATEWAY_UPSTREAM_TIMEOUT", d.upstream_timeout),
        help="seconds to wait for upstream data before 504 (default 30)")
    add("--connect-timeout", default=_env("GATEWAY_CONNECT_TIMEOUT", d.connect_timeout),
        help="seconds to wait for an upstream connection before 502 (default 5)")
    add("--upstream-health", default=_env("GATEWAY_UPSTREAM_HEALTH", d.upstream_health),
        help="upstream path probed by /-/ready (default /healthz)")
    add("--max-body", default=_env("GATEWAY_MAX_BODY", d.max_body),
        help="largest request body in bytes (GATEWAY_MAX_BODY, default 10 MiB)")
    add("--throttle-delay", default=_env("GATEWAY_THROTTLE_DELAY", d.throttle_delay),
        help="seconds a client in login back-off waits for its 429 (default 1)")
    add("--trusted-proxy", default=_env("GATEWAY_TRUSTED_PROXIES", ""),
        help="comma-separated CIDRs whose X-Forwarded-For is believed (GATEWAY_TRUSTED_PROXIES)")
    add("--tls-cert", default=_env("GATEWAY_TLS_CERT", None), help="PEM certificate for TLS")
    add("--tls-key", default=_env("GATEWAY_TLS_KEY", None), help="PEM private key for TLS")
    add("--server", default=_env("GATEWAY_SERVER", d.server), choices=["fast", "aiohttp"],
        help="HTTP server: fast (the gateway's lean HTTP/1.1 server, default) or aiohttp")
    add("--log-level", default=_env("GATEWAY_LOG_LEVEL", d.log_level),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    # -- decision mode (issue 12, gateway/decision.py)
    add("--mode", default=_env("GATEWAY_MODE", d.mode), choices=["proxy", "decide"],
        help="proxy (default): forward to --upstream; decide: answer a front proxy's "
             "auth subrequests, never forward (GATEWAY_MODE)")
    add("--decision-prefix", default=_env("GATEWAY_DECISION_PREFIX", d.decision_prefix),
        help="path of the check requests in decision mode; Envoy appends the original "
             "path to it (GATEWAY_DECISION_PREFIX, default /-/decide)")


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """Validate the raw flag/env values (env values are strings) into :class:`Settings`."""

    def conv(name: str, kind: Callable[[str], Any], value: Any) -> Any:
        try:
            return kind(str(value))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            parser.error(f"--{name.replace('_', '-')}: {exc}")

    watch = args.watch
    if watch is None:
        watch = conv("watch", _bool, os.environ.get("GATEWAY_WATCH", "true"))
    port = conv("port", _positive(int), args.port)
    if port > 65535:
        parser.error("--port: must be 0..65535")
    workers = conv("workers", _positive(int), args.workers)
    if workers < 1:
        parser.error("--workers: must be at least 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    # -- decision mode (issue 12)
    if args.mode not in ("proxy", "decide"):
        parser.error(f"--mode: expected proxy or decide, not {args.mode!r}")
    if args.mode == "decide" and not str(args.trusted_proxy).strip(", "):
        parser.error("--mode decide needs --trusted-proxy: the proxies whose check requests "
                     "are believed")
    if not _DECISION_PREFIX.fullmatch(args.decision_prefix) or args.decision_prefix in (
            "/-/healthz", "/-/ready", "/-/status", "/-/metrics", "/-/reload"):
        parser.error(f"--decision-prefix: a path like /-/decide (no trailing '/', no '.' "
                     f"segments, not a gateway endpoint): {args.decision_prefix!r}")
    return Settings(
        policy=Path(args.policy), upstream=conv("upstream", _upstream, args.upstream),
        host=args.host, port=port, workers=workers, watch=watch,
        watch_interval=conv("watch_interval", _positive(float), args.watch_interval),
        audit_log=args.audit_log,
        upstream_timeout=conv("upstream_timeout", _positive(float), args.upstream_timeout),
        connect_timeout=conv("connect_timeout", _positive(float), args.connect_timeout),
        upstream_health=args.upstream_health,
        max_body=conv("max_body", _positive(int), args.max_body),
        throttle_delay=conv("throttle_delay", _positive(float), args.throttle_delay),
        trusted_proxies=conv("trusted_proxy", _networks, args.trusted_proxy),
        tls_cert=args.tls_cert, tls_key=args.tls_key, log_level=args.log_level,
        server=args.server,
        mode=args.mode, decision_prefix=args.decision_prefix)


def parse_settings(argv: Sequence[str]) -> Settings:
    """Settings from a ``serve`` argument list (for tests and embedding)."""
    p = argparse.ArgumentParser(prog="gateway serve")
    add_serve_arguments(p)
    return settings_from_args(p.parse_args(list(argv)), p)
