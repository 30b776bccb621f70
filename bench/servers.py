"""The servers a bench run starts, each on 127.0.0.1 and a free ephemeral port.

- the fixed upstream: nginx answering 200 "ok" to anything (bodies read and discarded), or,
  without nginx, `bench.upstream` (aiohttp; much slower, so through-gateway ratios shrink)
- the gateway: `python -m gateway serve`, audit log to a file in the run's temp dir
- the Python floor: `../shared/bench/py_floor.py`, run in place (never copied), with this
  venv's Python when it has httptools+uvloop+bcrypt, else a throwaway venv under bench/.peers
- peers (with --peers): nginx (auth_basic with a `{PLAIN}` password + proxy_pass keep-alive),
  HAProxy (http_auth on an insecure-password userlist), Caddy (basicauth bcrypt +
  reverse_proxy) without and with its JSON access log, nginx auth_request from
  deploy/nginx/rbac-gateway.conf + the gateway in decision mode; with --slow-peers also nginx auth_basic
  with the bcrypt htpasswd and the tutorial's Flask app (throwaway venv under bench/.peers)
- the real inventory backend, for the full-stack scenario

All peers get the same user, password (and, where they hash, cost-12 bcrypt hash) as the
gateway, and the same upstream. Tools are detected, never installed: a missing one is reported
with the apt line.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import policies
from bench.policies import Credentials
from bench.procs import BenchError, Proc, free_port, http_status, start, wait_http

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / "bench" / ".peers"
APT_HINT = "apt-get install wrk caddy nginx-light haproxy"
FLASK_REQUIREMENTS = ["Flask==3.1.3", "requests==2.34.2"]
# What py_floor.py imports, pinned like the project (constraints.txt) where the project has them.
FLOOR_REQUIREMENTS = ["httptools==0.8.0", "uvloop==0.23.0", "bcrypt==5.0.0"]
FLOOR_NAME = "py_floor.py"


@dataclass
class Server:
    """A running candidate: where to send requests and whose CPU to bill."""

    key: str
    label: str
    base_url: str
    procs: list[Proc]
    notes: list[str] = field(default_factory=list)

    @property
    def cpu_roots(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


def tool_version(argv: list[str]) -> str | None:
    """First line of a tool's version output, or None when the tool is absent."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else argv[0]


def nginx_binary() -> str | None:
    for cand in ("nginx", "/usr/sbin/nginx"):
        if path := shutil.which(cand):
            return path
    return None


def _nginx_conf(prefix: Path, workers: int | str, servers: str, upstreams: str = "") -> Path:
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""\
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_max_body_size 16m;
    client_body_buffer_size 1m;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
{upstreams}
{servers}
}}
""")
    return conf


def _start_nginx(name: str, prefix: Path, conf: Path) -> Proc:
    nginx = nginx_binary()
    assert nginx is not None
    return start(
        name,
        [
            nginx,
            "-e",
            str(prefix / "logs" / "error.log"),
            "-p",
            str(prefix),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ],
        prefix / "stdout.log",
    )


def start_upstream(tmp: Path, *, workers: int, force_python: bool = False) -> Server:
    """The fixed upstream: nginx `return 200 "ok"` (any method; bodies discarded)."""
    port = free_port()
    if nginx_binary() and not force_python:
        prefix = tmp / "upstream-nginx"
        conf = _nginx_conf(
            prefix,
            workers,
            f"""\
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{ return 200 "ok"; }}
    }}""",
        )
        proc = _start_nginx("upstream (nginx)", prefix, conf)
        server = Server(
            "upstream", f"nginx return 200 ×{workers}", f"http://127.0.0.1:{port}", [proc]
        )
    else:
        proc = start(
            "upstream (python)",
            [sys.executable, "-m", "bench.upstream", "--port", str(port)],
            tmp / "upstream-python.log",
            cwd=ROOT,
        )
        server = Server(
            "upstream",
            "aiohttp upstream",
            f"http://127.0.0.1:{port}",
            [proc],
            [
                ("--python-upstream" if nginx_binary() else f"nginx absent ({APT_HINT})")
                + ": aiohttp upstream; through-gateway ratios understate the gateway's cost"
            ],
        )
    return _ready(server, proc, "/", deadline_s=20)


@dataclass(frozen=True)
class GatewayCli:
    """What this checkout's `gateway serve` accepts (it is being written alongside)."""

    ok: bool
    flags: frozenset[str]
    problem: str = ""
    # `serve`'s own default for --workers, read from its --help; None when it doesn't say.
    workers_default: int | None = None

    @classmethod
    def probe(cls) -> GatewayCli:
        try:
            out = subprocess.run(
                [sys.executable, "-m", "gateway", "serve", "--help"],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return cls(False, frozenset(), str(exc))
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
            return cls(False, frozenset(), " | ".join(tail) or f"exit {out.returncode}")
        return cls(
            True,
            frozenset(re.findall(r"--[a-z][a-z-]+", out.stdout)),
            workers_default=_workers_default(out.stdout),
        )


def _workers_default(help_text: str) -> int | None:
    """The default of `--workers` as `serve --help` states it: a number, or the CPU count."""
    flat = " ".join(help_text.split())
    at = flat.rfind("--workers ")  # the options section, after the usage line
    if at < 0:
        return None
    text = re.split(r" --[a-z]", flat[at + len("--workers ") :], maxsplit=1)[0]
    d = re.search(r"default:? *(\d+|nproc|cpu|number of cpu|os\.cpu_count)", text, re.IGNORECASE)
    if d is None:
        return None
    return int(d.group(1)) if d.group(1).isdigit() else len(os.sched_getaffinity(0))


def start_gateway(
    tmp: Path,
    key: str,
    *,
    policy: Path,
    upstream: str,
    workers: int | None,
    cli: GatewayCli,
    creds: Credentials,
    extra_args: list[str],
    label: str = "gateway",
) -> Server:
    port = free_port()
    audit = tmp / f"{key}-audit.log"
    argv = gateway_argv(policy, upstream, port)
    notes: list[str] = []
    if workers is not None and "--workers" in cli.flags:
        argv += ["--workers", str(workers)]
    if "--audit-log" in cli.flags:
        argv += ["--audit-log", str(audit)]
        notes.append("audit log → file")
    else:
        notes.append(
            "no --audit-log flag: audit goes wherever the gateway sends it (stdout → file)"
        )
    argv += extra_args
    # Flags win over the environment, but don't let a caller's GATEWAY_* leak into the run.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = start(key, argv, tmp / f"{key}.log", env=env, cwd=ROOT)
    server = Server(key, label, f"http://127.0.0.1:{port}", [proc], notes)
    return _ready(server, proc, "/-/healthz", deadline_s=60)


@contextmanager
def scratch(
    prefix: str,
) -> Iterator[tuple[Path, Credentials, dict[str, Path], list[Server]]]:
    """A private temporary folder with the bench credentials and policies written in it, and a
    list for the servers the caller starts: all of them are stopped, and the folder removed,
    when the block ends, however it ends."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    tmp.chmod(0o711)
    started: list[Server] = []
    try:
        creds = policies.make_credentials(cost=12)
        yield tmp, creds, policies.write_policies(tmp, creds), started
    finally:
        for s in reversed(started):
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def gateway_argv(policy: Path, upstream: str, port: int) -> list[str]:
    """``python -m gateway serve`` on 127.0.0.1:``port`` with a policy and an upstream."""
    return [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--policy",
        str(policy),
        "--upstream",
        upstream,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def start_gateway_on_upstream(
    tmp: Path, creds: Credentials, policy: Path, workers: int | None, started: list[Server]
) -> Server:
    """The fixed upstream and one gateway in front of it, started as `make bench` starts them
    (audit log to a file); both go on `started`, for the caller to stop."""
    up = start_upstream(tmp, workers=1)
    started.append(up)
    gw = start_gateway(
        tmp,
        "gateway",
        policy=policy,
        upstream=up.base_url,
        workers=workers,
        cli=GatewayCli.probe(),
        creds=creds,
        extra_args=[],
    )
    started.append(gw)
    return gw


def caddy_supports_plain_hash(version: str) -> bool:
    """Caddy ≥ 2.8 spells it `basic_auth` and takes the bcrypt string as is."""
    m = re.search(r"v?(\d+)\.(\d+)", version)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (2, 8)


def start_caddy(tmp: Path, creds: Credentials, upstream: str, *, access_log: bool) -> Server:
    version = tool_version(["caddy", "version"])
    if version is None:
        raise BenchError(f"caddy not installed ({APT_HINT})")
    port = free_port()
    home = tmp / ("caddy-log" if access_log else "caddy")
    home.mkdir(exist_ok=True)
    if caddy_supports_plain_hash(version):
        directive, hashed = "basic_auth", creds.bcrypt_hash
    else:
        directive, hashed = "basicauth", base64.b64encode(creds.bcrypt_hash.encode()).decode()
    log = f"\n\tlog {{\n\t\toutput file {home}/access.log\n\t}}" if access_log else ""
    caddyfile = home / "Caddyfile"
    caddyfile.write_text(f"""\
{{
	admin off
	auto_https off
	storage file_system {home}/data
	servers {{
		protocols h1
	}}
}}

http://127.0.0.1:{port} {{
	{directive} bcrypt bench {{
		{creds.user} {hashed}
	}}
	reverse_proxy {upstream.removeprefix("http://")}{log}
}}
""")
    env = dict(os.environ, HOME=str(home), XDG_DATA_HOME=str(home), XDG_CONFIG_HOME=str(home))
    proc = start(
        "caddy",
        ["caddy", "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
        home / "caddy.log",
        env=env,
    )
    notes = [version.split()[0], "access log → file" if access_log else "no access log"]
    label = "Caddy basicauth+reverse_proxy" + (", JSON access log" if access_log else "")
    server = Server(
        "caddy-log" if access_log else "caddy", label, f"http://127.0.0.1:{port}", [proc], notes
    )
    return _ready(server, proc, "/", deadline_s=30, ok=lambda s: s == 401)


def start_nginx_bcrypt(tmp: Path, creds: Credentials, upstream: str) -> Server:
    if nginx_binary() is None:
        raise BenchError(f"nginx not installed ({APT_HINT})")
    return _start_nginx_auth(
        tmp,
        "nginx-bcrypt",
        f"{creds.user}:{creds.bcrypt_hash}\n",
        upstream,
        "nginx auth_basic (bcrypt)+proxy_pass",
        "bcrypt on every request (no cache)",
    )


def _start_nginx_auth(
    tmp: Path, key: str, htpasswd_line: str, upstream: str, label: str, note: str
) -> Server:
    port = free_port()
    prefix = tmp / key
    prefix.mkdir(parents=True, exist_ok=True)
    htpasswd = prefix / "htpasswd"
    htpasswd.write_text(htpasswd_line)
    htpasswd.chmod(0o644)  # workers run as nobody when started by root
    conf = _nginx_conf(
        prefix,
        "auto",
        f"""\
    server {{
        # reuseport: the kernel spreads connections over both workers; without it one worker
        # may take them all and nginx would look half as fast as it is.
        listen 127.0.0.1:{port} reuseport;
        location / {{
            auth_basic "bench";
            auth_basic_user_file {htpasswd};
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}""",
        f"""\
    upstream bench_upstream {{
        server {upstream.removeprefix("http://")};
        keepalive 64;
    }}""",
    )
    proc = _start_nginx(key, prefix, conf)
    server = Server(key, label, f"http://127.0.0.1:{port}", [proc], [note])
    return _ready(server, proc, "/", deadline_s=20, ok=lambda s: s == 401)


def start_nginx_decide(tmp: Path, upstream: str, gateway: Server) -> Server:
    """nginx from deploy/nginx/rbac-gateway.conf (auth_request) in front of ``upstream``, asking
    ``gateway`` (serve --mode decide). Only its three addresses change; billed for both nginx's
    and the decision gateway's CPU."""
    if nginx_binary() is None:
        raise BenchError(f"nginx not installed ({APT_HINT})")
    port = free_port()
    prefix = tmp / "nginx-decide"
    site = (ROOT / "deploy" / "nginx" / "rbac-gateway.conf").read_text()
    for old, new in (
        ("server 127.0.0.1:9000;", f"server {gateway.base_url.removeprefix('http://')};"),
        ("server 127.0.0.1:8081;", f"server {upstream.removeprefix('http://')};"),
        # reuseport: both nginx workers get connections (as for the other nginx peers)
        ("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{port} reuseport;"),
    ):
        if site.count(old) != 1:
            raise BenchError(f"deploy/nginx/rbac-gateway.conf: expected {old!r} once")
        site = site.replace(old, new)
    conf = _nginx_conf(prefix, "auto", site)
    proc = _start_nginx("nginx-decide", prefix, conf)
    server = Server(
        "nginx-decide",
        "nginx auth_request + gateway --mode decide",
        f"http://127.0.0.1:{port}",
        [proc, *gateway.procs],
        ["CPU: nginx + the decision gateway", *gateway.notes],
    )
    return _ready(server, proc, "/", deadline_s=20, ok=lambda s: s == 401)


def peer_python(name: str, requirements: list[str], log: Path) -> tuple[str | None, str]:
    """Python of the throwaway venv bench/.peers/NAME-venv (created on first use, git-ignored);
    (None, why) if it cannot be made."""
    venv = PEERS_DIR / f"{name}-venv"
    py = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = " ".join(requirements)
    if py.exists() and stamp.exists() and stamp.read_text() == wanted:
        return str(py), ""
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    (PEERS_DIR / ".gitignore").write_text("*\n")
    with open(log, "ab") as out:
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
        ]
        for argv in steps:
            try:
                rc = subprocess.run(
                    argv, stdout=out, stderr=subprocess.STDOUT, timeout=300
                ).returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                return None, f"{argv[2]}: {exc}"
            if rc != 0:
                return None, f"`{' '.join(argv[:4])} …` failed (exit {rc}); see {log}"
    stamp.write_text(wanted)
    return str(py), ""


def flask_python(log: Path) -> tuple[str | None, str]:
    return peer_python("flask", FLASK_REQUIREMENTS, log)


def find_floor(explicit: Path | None = None) -> Path | None:
    """`../shared/bench/py_floor.py` seen from the checkout (or from the worktree folder)."""
    cands = (
        [explicit]
        if explicit
        else [
            ROOT.parent / "shared" / "bench" / FLOOR_NAME,
            ROOT.parent.parent / "shared" / "bench" / FLOOR_NAME,
        ]
    )
    return next((c.resolve() for c in cands if c is not None and c.is_file()), None)


def floor_python(log: Path) -> tuple[str | None, str, str]:
    """(python, why-not, which): this venv's Python if it imports what the floor needs."""
    probe = subprocess.run(
        [sys.executable, "-c", "import httptools, uvloop, bcrypt"], capture_output=True, timeout=60
    )
    if probe.returncode == 0:
        return sys.executable, "", "the project's venv"
    py, why = peer_python("floor", FLOOR_REQUIREMENTS, log)
    return py, why, "bench/.peers/floor-venv (" + " ".join(FLOOR_REQUIREMENTS) + ")"


def start_floor(tmp: Path, creds: Credentials, upstream: str, floor: Path | None = None) -> Server:
    """The yardstick: py_floor.py run where it lives, from its own folder, with its own flags."""
    script = find_floor(floor)
    if script is None:
        raise BenchError(
            f"{FLOOR_NAME} not found (looked in ../shared/bench and ../../shared/bench; "
            "--floor PATH)"
        )
    py, why, which = floor_python(tmp / "floor-venv.log")
    if py is None:
        raise BenchError(f"floor: no Python with httptools+uvloop+bcrypt: {why}")
    port = free_port()
    proc = start(
        "floor",
        [
            py,
            script.name,
            "--upstream",
            upstream,
            "--user",
            f"{creds.user}:{creds.bcrypt_hash}",
            "--port",
            str(port),
        ],
        tmp / "floor.log",
        cwd=script.parent,
    )
    server = Server(
        "floor",
        "Python floor (py_floor.py)",
        f"http://127.0.0.1:{port}",
        [proc],
        [f"{script}", f"Python: {which}"],
    )
    return _ready(server, proc, "/", deadline_s=30, ok=lambda s: s == 401)


def start_nginx_plain(tmp: Path, creds: Credentials, upstream: str) -> Server:
    """nginx auth_basic with a `{PLAIN}` password (no hash) + proxy_pass with a keep-alive pool."""
    if nginx_binary() is None:
        raise BenchError(f"nginx not installed ({APT_HINT})")
    return _start_nginx_auth(
        tmp,
        "nginx-plain",
        f"{creds.user}:{{PLAIN}}{creds.password}\n",
        upstream,
        "nginx auth_basic {PLAIN}+proxy_pass",
        "plain password compare",
    )


def start_haproxy(tmp: Path, creds: Credentials, upstream: str) -> Server:
    """HAProxy: `http_auth` on a userlist with an insecure-password (plain) user, one backend."""
    haproxy = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if haproxy is None:
        raise BenchError(f"haproxy not installed ({APT_HINT})")
    port = free_port()
    home = tmp / "haproxy"
    home.mkdir(exist_ok=True)
    cfg = home / "haproxy.cfg"
    cfg.write_text(f"""\
global
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 75s

userlist bench_users
    user {creds.user} insecure-password {creds.password}

frontend bench
    bind 127.0.0.1:{port}
    http-request auth realm bench unless {{ http_auth(bench_users) }}
    default_backend upstream

backend upstream
    http-reuse always
    server up {upstream.removeprefix("http://")}
""")
    proc = start("haproxy", [haproxy, "-db", "-f", str(cfg)], home / "haproxy.log")
    version = tool_version([haproxy, "-v"]) or "haproxy"
    server = Server(
        "haproxy",
        "HAProxy http_auth+backend",
        f"http://127.0.0.1:{port}",
        [proc],
        [version.split(" - ")[0], "insecure-password userlist"],
    )
    return _ready(server, proc, "/", deadline_s=20, ok=lambda s: s == 401)


def start_flask(tmp: Path, creds: Credentials, upstream: str) -> Server:
    py, why = flask_python(tmp / "flask-venv.log")
    if py is None:
        raise BenchError(f"Flask peer unavailable: {why}")
    hash_file = tmp / "flask.hash"
    made = subprocess.run(
        [
            py,
            "-c",
            "import sys; from werkzeug.security import generate_password_hash as g; "
            "print(g(sys.stdin.read(), method='pbkdf2'))",
        ],
        input=creds.password,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if made.returncode != 0:
        raise BenchError(f"Flask peer: cannot hash the password: {made.stderr.strip()[-300:]}")
    hash_file.write_text(made.stdout.strip())
    method = made.stdout.split("$", 1)[0]
    port = free_port()
    proc = start(
        "flask",
        [
            py,
            str(ROOT / "bench" / "flask_app.py"),
            "--port",
            str(port),
            "--upstream",
            upstream,
            "--user",
            creds.user,
            "--hash-file",
            str(hash_file),
        ],
        tmp / "flask.log",
    )
    server = Server(
        "flask",
        "tutorial Flask app",
        f"http://127.0.0.1:{port}",
        [proc],
        [f"werkzeug {method} on every request, requests per call, dev server threaded"],
    )
    return _ready(server, proc, "/", deadline_s=30, ok=lambda s: s == 401)


def start_backend(tmp: Path, seed_items: int = 20) -> Server:
    """The real inventory backend on a fresh SQLite file, seeded with a few items."""
    port = free_port()
    db = tmp / "inventory.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    proc = start(
        "backend",
        [
            sys.executable,
            "-m",
            "inventory_backend",
            "--db",
            str(db),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        tmp / "backend.log",
        env=env,
        cwd=ROOT,
    )
    server = Server("backend", "inventory backend", f"http://127.0.0.1:{port}", [proc])
    try:
        wait_http(proc, server.base_url + "/healthz", deadline_s=30)
        _seed(server.base_url, seed_items)
    except BenchError:
        server.stop()
        raise
    return server


def _seed(base_url: str, n: int) -> None:
    import json
    import urllib.error
    import urllib.request

    for i in range(n):
        body = json.dumps({"name": f"bench-item-{i:03d}", "count": i}).encode()
        req = urllib.request.Request(
            base_url + "/api/inventory",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise BenchError(
                    f"backend: seeding item {i} got {exc.code}: {exc.read()[:200]!r}"
                ) from None
        except OSError as exc:
            raise BenchError(f"backend: seeding failed: {exc}") from None


def prime(server: Server, path: str, auth: str | None, deadline_s: float = 60.0) -> None:
    """One authenticated request, so the credential cache (where there is one) is warm."""
    import time

    deadline = time.monotonic() + deadline_s
    headers = {"Authorization": auth} if auth else {}
    status = None
    while time.monotonic() < deadline:
        status = http_status(
            server.base_url + path, headers, timeout=max(1.0, deadline - time.monotonic())
        )
        if status == 200:
            return
        if status is not None and status not in (502, 503, 504):
            break
    raise BenchError(
        f"{server.key}: GET {path} with the bench credentials answered {status}, not 200"
    )


def _ready(
    server: Server,
    proc: Proc,
    path: str,
    *,
    deadline_s: float,
    ok: Callable[[int], bool] = lambda s: s == 200,
) -> Server:
    """Wait until ``server`` answers on ``path``; stop it (and re-raise) if it never does."""
    try:
        wait_http(proc, server.base_url + path, ok, deadline_s=deadline_s)
    except BenchError:
        server.stop()
        raise
    return server
