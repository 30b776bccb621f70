"""Command-line flags and environment variables → :class:`Settings`. Flags win.

This module is long because it is the one table of every ``serve`` flag: its environment
variable, default, help text and validation side by side, so none can drift from the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import ipaddress
import json
import os
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from yarl import URL

_DECISION_PREFIX = re.compile(r"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9\-._~]+)+")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``serve`` needs; built once at start."""

    policy: Path = Path("rbac.yaml")
    upstream: str = "http://127.0.0.1:8081"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1  # the CLI's default is 'auto' (one per usable CPU)
    reuse_port: bool = False  # share host:port with another process (SO_REUSEPORT)
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
    throttle_delay: float = 1.0  # a 429 for failed logins is answered after this delay
    trusted_proxies: tuple[Network, ...] = field(default_factory=tuple)
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = "INFO"
    handle_signals: bool = True
    # deadlines and caps of the HTTP layer
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    body_timeout: float = 60.0
    min_upload_rate: int = 1024
    max_connections: int = 0  # 0: derived from the file-descriptor limit
    pool_size: int = 256
    max_upstream_per_client: int = 0  # 0: no limit (many users may share one address)
    shutdown_grace: float = 35.0  # more than the upstream timeout: answers in flight finish
    # decision mode (gateway/decision.py)
    mode: str = "proxy"  # "decide": answer front proxies' check requests
    decision_prefix: str = "/-/decide"


class SettingsError(ValueError):
    """A flag or environment value is unusable; the message names both and says why."""


# Flag destination → its environment variable; filled by add_serve_arguments, read when a
# value is refused so that the message names both places it could have come from.
ENV_OF: dict[str, str] = {}


def _env(name: str, default: Any) -> Any:
    return os.environ.get(name, default)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SettingsError(f"{text!r} is not an integer") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SettingsError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SettingsError(f"{text!r} is not a finite number")
    return value


def _at_least(
    kind: Callable[[str], Any], low: float, high: float | None = None
) -> Callable[[str], Any]:
    """``kind`` with a lower (and optional upper) bound, refused in one wording."""

    def parse(text: str) -> Any:
        value = kind(text)
        if value < low or (high is not None and value > high):
            want = f"{low}..{high}" if high is not None else f"at least {low}"
            raise SettingsError(f"must be {want}, got {text!r}")
        return value

    return parse


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """``kind``, zero or more."""
    return _at_least(kind, 0)


def _above_zero(text: str) -> float:
    """A duration where zero makes no sense (a watcher that spins, a timeout that always fires)."""
    value = _number(text)
    if value <= 0:
        raise SettingsError(f"must be greater than 0, got {text!r}")
    return value


def _upstream(text: str) -> str:
    url = URL(text)
    if url.scheme not in ("http", "https") or not url.host:
        raise SettingsError(f"upstream must be an http(s)://host:port URL: {text}")
    if url.path not in ("", "/") or url.query_string:
        raise SettingsError(f"upstream must not carry a path or query: {text}")
    return str(url.with_path(""))


def _networks(text: str) -> tuple[Network, ...]:
    try:
        return tuple(
            ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip()
        )
    except ValueError as exc:
        raise SettingsError(f"bad CIDR in trusted proxies: {exc}") from None


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (v2
    ``cpu.max`` or v1 ``cpu.cfs_quota_us``; a container limited to 1.5 CPUs gets 2), at
    least 1."""
    count = len(os.sched_getaffinity(0))
    v1 = cgroup / "cpu"
    for files in (
        (cgroup / "cpu.max",),
        (v1 / "cpu.cfs_quota_us", v1 / "cpu.cfs_period_us"),
    ):
        try:
            quota, period = " ".join(f.read_text() for f in files).split()[:2]
            if quota not in ("max", "-1"):
                count = min(count, -(-int(quota) // int(period)))
            break
        except (OSError, ValueError):
            continue
    return max(1, count)


def _workers(text: str) -> int:
    """``auto`` (one per usable CPU) or a count of at least 1."""
    if text.strip().lower() == "auto":
        return usable_cpus()
    try:
        count = int(text)
    except ValueError:
        raise SettingsError(f"must be a count or 'auto', got {text!r}") from None
    if count < 1:
        raise SettingsError(f"must be at least 1, got {text!r}")
    return count


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"expected true/false, got {text!r}")


def _audit_log(text: str) -> str:
    """'-', 'off', or a file we can append to: its directory must exist now, not at the
    first request (where the error would name the listener instead of the file)."""
    if text in ("-", "off"):
        return text
    path = Path(text)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SettingsError(f"{text}: {os.strerror(errno.ENOENT)}")
    target = path if path.exists() else parent
    if path.is_dir():
        raise SettingsError(f"{text}: {os.strerror(errno.EISDIR)}")
    if not os.access(target, os.W_OK):
        raise SettingsError(f"{text}: {os.strerror(errno.EACCES)}")
    return text


def _readable(text: str) -> str:
    try:
        with open(text, "rb"):
            pass
    except OSError as exc:
        raise SettingsError(f"{text}: {exc.strerror}") from None
    return text


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The server-side TLS context for ``cert``/``key``; errors name the files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:  # an OSError too: catch it first
        raise SettingsError(
            f"{cert} / {key}: not a matching PEM certificate and private key ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise SettingsError(f"{exc.filename or cert}: {exc.strerror}") from None
    return ctx


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` flags; each default comes from its environment variable, which the help
    shows beside the flag."""
    d = Settings()

    def add(
        flag: str, env: str | None = None, default: Any = None, help: str = "", **kw: Any
    ) -> None:
        if env is not None:
            ENV_OF[flag.lstrip("-").replace("-", "_")] = env
            default = _env(env, default)
            help = f"{help} [{env}]" if help else f"[{env}]"
        p.add_argument(flag, default=default, help=help, **kw)

    add("--policy", "GATEWAY_POLICY", d.policy, type=Path, help="policy file (default rbac.yaml)")
    add(
        "--upstream", "GATEWAY_UPSTREAM", d.upstream, help="upstream base URL (default %(default)s)"
    )
    add("--host", "GATEWAY_HOST", d.host, help="listen address (default %(default)s)")
    add("--port", "GATEWAY_PORT", d.port, help="listen port, 0 for any free one (default 8080)")
    add(
        "--workers",
        "GATEWAY_WORKERS",
        "auto",
        help="worker processes sharing the port: a count, or 'auto' for one per usable CPU "
        f"(default: number of CPUs usable, {usable_cpus()} here)",
    )
    add(
        "--reuse-port",
        dest="reuse_port",
        action="store_true",
        default=None,
        help="share host:port with another process on purpose (SO_REUSEPORT); without it a "
        "port in use is refused [GATEWAY_REUSE_PORT=true]",
    )
    add(
        "--watch",
        dest="watch",
        action="store_true",
        help="reload when the policy file changes (the default) [GATEWAY_WATCH=true]",
    )
    add(
        "--no-watch",
        dest="watch",
        action="store_false",
        help="do not watch the policy file; reload on SIGHUP or POST /-/reload only "
        "[GATEWAY_WATCH=false]",
    )
    add(
        "--watch-interval",
        "GATEWAY_WATCH_INTERVAL",
        d.watch_interval,
        help="seconds between policy file checks, above 0 (default 1)",
    )
    add(
        "--audit-log",
        "GATEWAY_AUDIT_LOG",
        d.audit_log,
        help="audit log file, '-' for stdout, 'off' for none (default -)",
    )
    add(
        "--upstream-timeout",
        "GATEWAY_UPSTREAM_TIMEOUT",
        d.upstream_timeout,
        help="seconds to wait for upstream data before 504, above 0 (default 30)",
    )
    add(
        "--connect-timeout",
        "GATEWAY_CONNECT_TIMEOUT",
        d.connect_timeout,
        help="seconds to wait for an upstream connection, above 0 (default 5)",
    )
    add(
        "--upstream-health",
        "GATEWAY_UPSTREAM_HEALTH",
        d.upstream_health,
        help="upstream path probed by /-/ready (default /healthz)",
    )
    add(
        "--max-body",
        "GATEWAY_MAX_BODY",
        d.max_body,
        help="largest request body in bytes (default 10 MiB)",
    )
    add(
        "--throttle-delay",
        "GATEWAY_THROTTLE_DELAY",
        d.throttle_delay,
        help="seconds a client in login back-off waits for its 429 (default 1)",
    )
    add(
        "--trusted-proxy",
        "GATEWAY_TRUSTED_PROXIES",
        "",
        help="comma-separated CIDRs whose X-Forwarded-For is believed",
    )
    add("--tls-cert", "GATEWAY_TLS_CERT", None, help="PEM certificate for TLS")
    add("--tls-key", "GATEWAY_TLS_KEY", None, help="PEM private key for TLS")
    add(
        "--header-timeout",
        "GATEWAY_HEADER_TIMEOUT",
        d.header_timeout,
        help="seconds a client has to send a request head, else 408 (default 10)",
    )
    add(
        "--keepalive-timeout",
        "GATEWAY_KEEPALIVE_TIMEOUT",
        d.keepalive_timeout,
        help="seconds an idle keep-alive connection is kept open (default 75)",
    )
    add(
        "--body-timeout",
        "GATEWAY_BODY_TIMEOUT",
        d.body_timeout,
        help="seconds a whole request body may take, else 408 (default 60)",
    )
    add(
        "--min-upload-rate",
        "GATEWAY_MIN_UPLOAD_RATE",
        d.min_upload_rate,
        help="bytes/s a request body must average after its first 2 s, else 408; 0 disables"
        " (default 1024)",
    )
    add(
        "--max-connections",
        "GATEWAY_MAX_CONNECTIONS",
        d.max_connections,
        help="client connections per process; at the cap the longest-idle connection or the"
        " slowest head is closed (default 0: from the open-file limit)",
    )
    add(
        "--pool-size",
        "GATEWAY_POOL_SIZE",
        d.pool_size,
        help="upstream connections per process (default 256); uploads may hold half",
    )
    add(
        "--max-upstream-per-client",
        "GATEWAY_MAX_UPSTREAM_PER_CLIENT",
        d.max_upstream_per_client,
        help="upstream connections one client address may hold at once, else 503"
        " (default 0: no limit, as users behind one proxy or NAT share an address)",
    )
    add(
        "--shutdown-grace",
        "GATEWAY_SHUTDOWN_GRACE",
        d.shutdown_grace,
        help="seconds requests in flight get to finish on SIGTERM (default 35)",
    )
    add(
        "--server",
        "GATEWAY_SERVER",
        "httptools",
        help="removed: the gateway has one HTTP server (see docs/SECURITY.md)",
    )
    add(
        "--mode",
        "GATEWAY_MODE",
        d.mode,
        choices=["proxy", "decide"],
        help="proxy: authorize and forward (default); decide: answer the check requests of a"
        " front proxy (nginx auth_request, Caddy forward_auth, Traefik, Envoy), never"
        " forward",
    )
    add(
        "--decision-prefix",
        "GATEWAY_DECISION_PREFIX",
        d.decision_prefix,
        help="path of the check requests in decision mode; Envoy appends the original path"
        " to it (default /-/decide)",
    )
    add(
        "--log-level",
        "GATEWAY_LOG_LEVEL",
        d.log_level,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="least severe log level written to stderr (default INFO)",
    )


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """Validate the raw flag/env values (env values are strings) into :class:`Settings`.

    A refused value ends the program with one line, ``PROG: --flag (ENV_VAR): why``, and
    status 2; no usage dump, no traceback.
    """

    def conv(name: str, kind: Callable[[str], Any], value: Any) -> Any:
        try:
            return kind(str(value))
        except (SettingsError, argparse.ArgumentTypeError) as exc:
            fail(name, str(exc))

    def fail(name: str, why: str) -> NoReturn:
        flag = f"--{name.replace('_', '-')}"
        env = ENV_OF.get(name)
        parser.exit(2, f"{parser.prog}: {flag}{f' ({env})' if env else ''}: {why}\n")

    watch = args.watch
    if watch is None:
        watch = conv("watch", _bool, os.environ.get("GATEWAY_WATCH", "true"))
    reuse_port = args.reuse_port
    if reuse_port is None:
        reuse_port = conv("reuse_port", _bool, os.environ.get("GATEWAY_REUSE_PORT", "false"))
    port = conv("port", _at_least(_integer, 0, 65535), args.port)
    workers = conv("workers", _workers, args.workers)
    if args.server not in ("httptools", "fast"):
        fail(
            "server",
            f"{args.server}: the aiohttp server mode was removed (it decoded "
            "compressed request bodies: docs/SECURITY.md); omit --server",
        )
    if args.mode == "decide" and not str(args.trusted_proxy).strip(", "):
        fail(
            "mode",
            "--mode decide needs --trusted-proxy: the proxies whose check requests are believed",
        )
    if not _DECISION_PREFIX.fullmatch(args.decision_prefix) or args.decision_prefix in (
        "/-/healthz",
        "/-/ready",
        "/-/status",
        "/-/metrics",
        "/-/reload",
    ):
        fail(
            "decision_prefix",
            f"a path like /-/decide (no trailing '/', no '.' segments, "
            f"not a gateway endpoint): {args.decision_prefix!r}",
        )
    if bool(args.tls_cert) != bool(args.tls_key):
        fail("tls_cert", "--tls-cert and --tls-key go together")
    if args.tls_cert:
        conv("tls_cert", _readable, args.tls_cert)
        conv("tls_key", _readable, args.tls_key)
        try:
            tls_context(args.tls_cert, args.tls_key)
        except SettingsError as exc:
            fail("tls_cert", str(exc))
    return Settings(
        policy=Path(args.policy),
        upstream=conv("upstream", _upstream, args.upstream),
        host=args.host,
        port=port,
        workers=workers,
        reuse_port=reuse_port,
        watch=watch,
        watch_interval=conv("watch_interval", _above_zero, args.watch_interval),
        audit_log=conv("audit_log", _audit_log, args.audit_log),
        upstream_timeout=conv("upstream_timeout", _above_zero, args.upstream_timeout),
        connect_timeout=conv("connect_timeout", _above_zero, args.connect_timeout),
        upstream_health=args.upstream_health,
        max_body=conv("max_body", _positive(_integer), args.max_body),
        throttle_delay=conv("throttle_delay", _positive(_number), args.throttle_delay),
        trusted_proxies=conv("trusted_proxy", _networks, args.trusted_proxy),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        log_level=args.log_level,
        header_timeout=conv("header_timeout", _above_zero, args.header_timeout),
        keepalive_timeout=conv("keepalive_timeout", _above_zero, args.keepalive_timeout),
        body_timeout=conv("body_timeout", _above_zero, args.body_timeout),
        min_upload_rate=conv("min_upload_rate", _positive(_integer), args.min_upload_rate),
        max_connections=conv("max_connections", _positive(_integer), args.max_connections),
        pool_size=conv("pool_size", _at_least(_integer, 1), args.pool_size),
        max_upstream_per_client=conv(
            "max_upstream_per_client", _positive(_integer), args.max_upstream_per_client
        ),
        shutdown_grace=conv("shutdown_grace", _positive(_number), args.shutdown_grace),
        mode=args.mode,
        decision_prefix=args.decision_prefix,
    )


def parse_settings(argv: Sequence[str]) -> Settings:
    """Settings from a ``serve`` argument list (for tests and embedding)."""
    p = argparse.ArgumentParser(prog="gateway serve")
    add_serve_arguments(p)
    return settings_from_args(p.parse_args(list(argv)), p)


# -- settings handed to the workers of --workers N (gateway.supervisor) ---------------------


def encode_settings(settings: Settings) -> str:
    """Settings as JSON for a worker's environment (Paths and networks as strings)."""
    doc: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [str(v) for v in value]
        doc[f.name] = value
    return json.dumps(doc)


def decode_settings(text: str) -> Settings:
    """The inverse of :func:`encode_settings`; a field it does not carry keeps its default."""
    doc = json.loads(text)
    default = Settings()
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        if f.name not in doc:
            continue
        value, like = doc[f.name], getattr(default, f.name)
        if isinstance(like, Path):
            value = Path(value)
        elif isinstance(like, tuple):
            value = tuple(ipaddress.ip_network(v) for v in value)
        kwargs[f.name] = value
    return Settings(**kwargs)
