"""Scenarios, interleaved rounds, medians, target ratios; prints a table and writes JSON.

A scenario is a set of candidates answering the same request shape. Every candidate is started
once, primed (one authenticated request, so credential caches are warm) and warmed up; then
`--rounds` rounds run each candidate for `--duration` s, in an order rotated every round, and
the figure reported is the median over the rounds. Between runs the harness waits until every
server it started is idle, so a slow candidate's backlog is never billed to the next one.

CPU-µs per request is the CPU time of the candidate's whole process tree (from /proc) over the
measured window divided by the requests completed in it: the figure that survives a noisy
machine. req/s and latency depend on what else runs on the cores, the load generator included.

A round whose p99 is more than 3× the median p99 of the candidate's other rounds is flagged as
a stall. The targets are issue 9's Done-when, as ratios of medians (and round by round).
Columns and targets are explained in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import load as loadmod
from bench import policies, servers
from bench.load import Flood, FloodClient, Load, run_load
from bench.procs import CLK_TCK, BenchError, system_ticks, tree_cpu_ticks, wait_quiet
from bench.servers import APT_HINT, GatewayCli, Server

RESULTS = Path(__file__).resolve().parent / "results"
# What each server proxies to: kept running while a later scenario needs the front server.
DEPENDS = {
    "gateway": ("upstream",),
    "gateway-alt": ("upstream",),
    "gateway-10k": ("upstream",),
    "floor": ("upstream",),
    "nginx-plain": ("upstream",),
    "haproxy": ("upstream",),
    "caddy": ("upstream",),
    "caddy-log": ("upstream",),
    "nginx-bcrypt": ("upstream",),
    "flask": ("upstream",),
    "gateway-backend": ("backend",),
    "caddy-backend": ("backend",),
    "nginx-decide": ("upstream",),
}
SCENARIOS = ("get", "post64k", "rules10k", "flood", "fullstack")
DEFAULT_SCENARIOS = (
    "get",
    "post64k",
    "rules10k",
    "flood",
)  # issue 9's Done-when; fullstack on request
PEER_KEYS = {
    "nginx-plain",
    "haproxy",
    "caddy",
    "caddy-log",
    "caddy+flood",
    "nginx-decide",
    "nginx-decide+flood",
}
DECIDE = "nginx auth_request + gateway --mode decide"
STALL_FACTOR = 3.0  # a round whose p99 is > 3× the median p99 of the other rounds is a stall


@dataclass(frozen=True)
class Candidate:
    key: str
    label: str
    server: str
    load: Load
    flood: Flood | None = None


@dataclass
class Scenario:
    key: str
    title: str
    candidates: list[Candidate]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def machine_info() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


class Bench:
    """One run: owns the temp dir, the servers it starts and the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="rbac-bench-"))
        # nginx started by root reads auth_basic_user_file as `nobody`: let it traverse.
        self.tmp.chmod(0o711)
        self.machine = machine_info()
        self.servers: dict[str, Server] = {}
        self.notes_by_server: dict[str, list[str]] = {}
        self.unavailable: dict[str, str] = {}
        self.notes: list[str] = []
        self.tool = self._pick_tool()
        self.cli = GatewayCli.probe()
        self.creds = policies.make_credentials(cost=12)
        self.policy_files = policies.write_policies(self.tmp, self.creds)
        self._plan_workers()

    def _plan_workers(self) -> None:
        """The gateway as shipped (no --workers: `serve`'s own default) and one other count.

        `main_flag` is what the main candidate passes (None: no flag, as shipped), `main_count`
        how many workers that is (None: unknown), `alt_flag` the second candidate's --workers
        (None: no second candidate): the machine's CPU count when the default differs from it,
        else 1, so the run always shows what a second worker buys.
        """
        a, nproc = self.args, self.machine["nproc"]
        self.main_flag: int | None = None
        self.main_count: int | None = None
        self.alt_flag: int | None = None
        self.as_shipped = a.workers is None
        if not self.cli.ok:
            self.notes.append(
                f"gateway not runnable yet ({self.cli.problem}): gateway candidates skipped"
            )
            return
        if "--workers" not in self.cli.flags:
            self.notes.append(
                "gateway has no --workers flag: run with its default, no second worker count"
            )
            return
        if a.workers is None:
            self.main_count = self.cli.workers_default
            if self.main_count is None:
                self.notes.append(
                    "`serve --help` does not state the --workers default: "
                    f"as shipped = no flag; also measured with --workers {nproc}"
                )
                self.alt_flag = nproc
            elif self.main_count != nproc:
                self.alt_flag = nproc
            elif nproc > 1:
                self.alt_flag = 1
        else:
            self.main_flag = self.main_count = a.workers
            self.alt_flag = 1 if a.workers > 1 and not a.no_alt_workers else None
        if a.no_alt_workers:
            self.alt_flag = None

    # -- setup --------------------------------------------------------------------------

    def _pick_tool(self) -> str:
        wanted = self.args.load_tool
        if wanted == "wrk" and not loadmod.wrk_available():
            raise SystemExit(f"--load-tool wrk: wrk not found ({APT_HINT})")
        if wanted == "auto":
            if loadmod.wrk_available():
                return "wrk"
            self.notes.append(
                f"wrk not found: Python load generator ({APT_HINT}); "
                "req/s of fast candidates is then bounded by the generator"
            )
            return "python"
        return str(wanted)

    def server(self, key: str) -> Server | None:
        """The server for `key`, started on first use; None (reason recorded) if it can't run."""
        if key in self.servers:
            return self.servers[key]
        if key in self.unavailable:
            return None
        try:
            server = self._start(key)
        except BenchError as exc:
            self.unavailable[key] = str(exc)
            print(f"  ! {key}: {str(exc).splitlines()[0]}", flush=True)
            return None
        self.servers[key] = server
        self.notes_by_server[key] = list(server.notes)
        return server

    def _start(self, key: str) -> Server:
        a, tmp, creds = self.args, self.tmp, self.creds
        if key == "upstream":
            up = servers.start_upstream(
                tmp, workers=a.upstream_workers, force_python=a.python_upstream
            )
            self.notes.extend(up.notes)
            return up
        if key.startswith("gateway"):
            if not self.cli.ok:
                raise BenchError(f"gateway not runnable: {self.cli.problem}")
            upstream_key = "backend" if key == "gateway-backend" else "upstream"
            upstream = self.server(upstream_key)
            if upstream is None:
                raise BenchError(f"no {upstream_key}")
            policy = self.policy_files["rules10k" if key == "gateway-10k" else "small"]
            alt = key == "gateway-alt"
            workers = self.alt_flag if alt else self.main_flag
            return servers.start_gateway(
                tmp,
                key,
                policy=policy,
                upstream=upstream.base_url,
                workers=workers,
                cli=self.cli,
                creds=creds,
                extra_args=a.gateway_arg,
                label=self.gateway_label(alt),
            )
        if key in ("caddy", "caddy-log", "caddy-backend"):
            upstream = self.server("backend" if key == "caddy-backend" else "upstream")
            if upstream is None:
                raise BenchError("no upstream")
            caddy = servers.start_caddy(
                tmp, creds, upstream.base_url, access_log=key == "caddy-log"
            )
            caddy.key = key
            return caddy
        simple = {
            "nginx-bcrypt": servers.start_nginx_bcrypt,
            "nginx-plain": servers.start_nginx_plain,
            "haproxy": servers.start_haproxy,
            "floor": lambda t, c, u: servers.start_floor(t, c, u, a.floor),
        }
        if key in simple:
            up = self.server("upstream")
            if up is None:
                raise BenchError("no upstream")
            return simple[key](tmp, creds, up.base_url)
        if key == "nginx-decide":
            return self._start_nginx_decide()
        if key == "flask":
            up = self.server("upstream")
            if up is None:
                raise BenchError("no upstream")
            print(
                "  … Flask peer: preparing its throwaway venv (bench/.peers) if needed", flush=True
            )
            return servers.start_flask(tmp, creds, up.base_url)
        if key == "backend":
            return servers.start_backend(tmp)
        raise AssertionError(key)

    def _start_nginx_decide(self) -> Server:
        """nginx (deploy/nginx/rbac-gateway.conf, auth_request) asking a gateway started in
        decision mode for this candidate alone; one Server billed for both."""
        if servers.nginx_binary() is None:
            raise BenchError(f"nginx not installed ({APT_HINT})")
        if not self.cli.ok:
            raise BenchError(f"gateway not runnable: {self.cli.problem}")
        if not {"--mode", "--trusted-proxy"} <= self.cli.flags:
            raise BenchError("gateway serve has no --mode decide / --trusted-proxy")
        up = self.server("upstream")
        if up is None:
            raise BenchError("no upstream")
        # --upstream is never used in decision mode; --trusted-proxy: nginx's X-Forwarded-For
        # ($remote_addr) names the client, so the flood from 127.0.0.2 is not the legit client.
        gw = servers.start_gateway(
            self.tmp,
            "gateway-decide",
            policy=self.policy_files["small"],
            upstream=up.base_url,
            workers=self.main_flag,
            cli=self.cli,
            creds=self.creds,
            extra_args=[
                *self.args.gateway_arg,
                "--mode",
                "decide",
                "--trusted-proxy",
                "127.0.0.1/32",
            ],
            label="gateway --mode decide",
        )
        try:
            return servers.start_nginx_decide(self.tmp, up.base_url, gw)
        except BenchError:
            gw.stop()
            raise

    def gateway_label(self, alt: bool = False) -> str:
        if alt:
            return f"gateway --workers {self.alt_flag}"
        if not self.as_shipped:
            return f"gateway --workers {self.main_flag} (not as shipped)"
        n = "?" if self.main_count is None else str(self.main_count)
        return f"gateway as shipped (×{n} worker{'' if n == '1' else 's'})"

    def stop_all(self) -> None:
        # Front servers first, upstreams last, so nothing logs a flood of upstream errors.
        for key in sorted(self.servers, key=lambda k: k in ("upstream", "backend")):
            try:
                self.servers[key].stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"  ! stopping {key}: {exc}", file=sys.stderr)
        self.servers.clear()

    def stop_unneeded(self, needed: set[str]) -> None:
        for key in [k for k in self.servers if k not in needed]:
            self.servers.pop(key).stop()

    # -- scenarios ----------------------------------------------------------------------

    def scenarios(self) -> list[Scenario]:
        a, c = self.args, self.creds
        path = policies.BENCH_PATH
        get = Load(path, c.header(), connections=a.connections, threads=a.threads)
        post = Load(
            path,
            c.header(),
            method="POST",
            body_bytes=64 * 1024,
            connections=a.connections,
            threads=a.threads,
        )
        legit = Load(path, c.header(), connections=a.legit_connections, threads=1)
        gw = self.gateway_label()
        alt = self.alt_flag is not None
        caddy = "Caddy basicauth+reverse_proxy"

        get_c = [
            Candidate("direct", "upstream direct (nginx return 200)", "upstream", get),
            Candidate("floor", "Python floor (py_floor.py)", "floor", get),
            Candidate("gateway", gw, "gateway", get),
        ]
        if alt:
            get_c.append(Candidate("gateway-alt", self.gateway_label(alt=True), "gateway-alt", get))
        post_c = [Candidate("gateway", gw, "gateway", post)]
        flood_c = [Candidate("gateway", f"{gw}, alone", "gateway", legit)]
        for src in self.flood_sources:
            flood = Flood(
                c.user, path, connections=a.flood_connections, rate=a.flood_rate, source=src
            )
            flood_c.append(
                Candidate(
                    f"gateway+flood@{src}", f"{gw}, flood from {src}", "gateway", legit, flood
                )
            )
        full_c = [
            Candidate("direct", "inventory backend direct", "backend", get),
            Candidate("gateway", f"{gw} → backend", "gateway-backend", get),
        ]
        if a.peers:
            get_c += [
                Candidate("nginx-plain", "nginx auth_basic {PLAIN}+proxy_pass", "nginx-plain", get),
                Candidate("haproxy", "HAProxy http_auth (insecure-password)", "haproxy", get),
                Candidate("caddy", f"{caddy}, no access log", "caddy", get),
                Candidate("caddy-log", f"{caddy}, JSON access log", "caddy-log", get),
                Candidate("nginx-decide", DECIDE, "nginx-decide", get),
            ]
            post_c.append(Candidate("caddy", f"{caddy}, no access log", "caddy", post))
            flood_c.append(Candidate("caddy", "Caddy, alone", "caddy", legit))
            src = self.flood_sources[0] if self.flood_sources else "127.0.0.2"
            flood = Flood(
                c.user, path, connections=a.flood_connections, rate=a.flood_rate, source=src
            )
            flood_c.append(
                Candidate("caddy+flood", f"Caddy, flood from {src}", "caddy", legit, flood)
            )
            flood_c += [
                Candidate("nginx-decide", "nginx + decision mode, alone", "nginx-decide", legit),
                Candidate(
                    "nginx-decide+flood",
                    f"nginx + decision mode, flood from {src}",
                    "nginx-decide",
                    legit,
                    flood,
                ),
            ]
            full_c.append(Candidate("caddy", "Caddy → backend", "caddy-backend", get))
        if a.slow_peers:
            # bcrypt/pbkdf2 on every request: CPU-bound at any concurrency, so a few connections
            # give the same req/s without a backlog of seconds (and fit in a short run).
            slow = Load(path, c.header(), connections=a.slow_connections, threads=1)
            get_c += [
                Candidate(
                    "nginx-bcrypt",
                    f"nginx auth_basic bcrypt, c={a.slow_connections}",
                    "nginx-bcrypt",
                    slow,
                ),
                Candidate("flask", f"tutorial Flask app, c={a.slow_connections}", "flask", slow),
            ]
        rate = "unpaced" if a.flood_rate <= 0 else f"paced {a.flood_rate:g}/s"
        all_s = [
            Scenario("get", f"cached GET {path}, c={a.connections}", get_c),
            Scenario("post64k", f"POST {path} with a 64 KiB body, c={a.connections}", post_c),
            Scenario(
                "rules10k",
                f"cached GET, shipped-size policy vs 10,000 rules, c={a.connections}",
                [
                    Candidate("small", f"{gw}, shipped-size policy", "gateway", get),
                    Candidate("rules10k", f"{gw}, 10,000 rules", "gateway-10k", get),
                ],
            ),
            Scenario(
                "flood",
                f"legit client c={a.legit_connections} (cached, from 127.0.0.1) vs a unique "
                f"wrong-password flood c={a.flood_connections}, {rate}, from "
                f"{' / '.join(self.flood_sources)}",
                flood_c,
            ),
            Scenario("fullstack", f"GET {path} on the real backend, c={a.connections}", full_c),
        ]
        wanted = a.only.split(",") if a.only else DEFAULT_SCENARIOS
        return [s for s in all_s if s.key in wanted]

    @property
    def flood_sources(self) -> list[str]:
        return [x.strip() for x in self.args.flood_source.split(",") if x.strip()]

    def run_scenario(self, scn: Scenario, later: list[Scenario]) -> None:
        print(f"\n== {scn.key}: {scn.title}", flush=True)
        ready: list[Candidate] = []
        for cand in scn.candidates:
            server = self.server(cand.server)
            if server is None:
                scn.skipped[cand.key] = self.unavailable.get(
                    cand.server, "unavailable"
                ).splitlines()[0]
                continue
            try:
                servers.prime(server, cand.load.path, cand.load.auth)
            except BenchError as exc:
                scn.skipped[cand.key] = str(exc)
                print(f"  ! {cand.key}: {exc}", flush=True)
                continue
            ready.append(cand)
        if self.args.warmup > 0:
            for cand in ready:
                try:
                    run_load(
                        self.tool,
                        self.servers[cand.server].base_url,
                        cand.load,
                        self.args.warmup,
                        self.args.timeout,
                    )
                except BenchError as exc:
                    print(f"  ! warm-up {cand.key}: {exc}", flush=True)
                self.quiet()
        for rnd in range(self.args.rounds):
            shift = rnd % max(1, len(ready))
            for cand in ready[shift:] + ready[:shift]:
                try:
                    sample = self.measure(cand)
                except BenchError as exc:
                    print(f"  ! {cand.key} round {rnd + 1}: {exc}", flush=True)
                    scn.samples.setdefault(cand.key, []).append({"error": str(exc)})
                    continue
                scn.samples.setdefault(cand.key, []).append(sample)
                print(f"  r{rnd + 1} {cand.label:<44} {_short(sample)}", flush=True)
        found = {c.key: stalls(scn.samples.get(c.key, [])) for c in ready}
        for cand in ready:
            for st in found[cand.key]:
                same = [
                    c.label
                    for c in ready
                    if c is not cand and any(x["round"] == st["round"] for x in found[c.key])
                ]
                also = (
                    f"; same round also stalled: {', '.join(same)} (the machine?)" if same else ""
                )
                print(
                    f"  ! stall: {cand.label}, round {st['round']} (at {st['at_s']:.0f} s, host busy "
                    f"{st['busy']:.0%}, loadavg {st['loadavg1']}): p99 {st['p99_ms']:.1f} ms = "
                    f"{st['factor']:.1f}× the other rounds' median {st['others_ms']:.1f} ms{also}",
                    flush=True,
                )
        needed = {c.server for s in later for c in s.candidates}
        self.stop_unneeded(needed | {dep for key in needed for dep in DEPENDS.get(key, ())})

    def quiet(self) -> float:
        roots = [pid for s in self.servers.values() for pid in s.cpu_roots]
        return wait_quiet(roots)

    def measure(self, cand: Candidate) -> dict[str, Any]:
        server = self.servers[cand.server]
        flood: FloodClient | None = None
        try:
            if cand.flood is not None:
                flood = FloodClient(self.tool, server.base_url, cand.flood, self.args.duration + 2)
                flood.wait_sending()
            roots = server.cpu_roots
            # What the candidate's upstream spends too: a proxy that opens fewer or more
            # upstream connections changes the cost of the whole stack, not only its own.
            up_roots = [
                pid
                for dep in DEPENDS.get(cand.server, ())
                if dep in self.servers
                for pid in self.servers[dep].cpu_roots
            ]
            u0, c0, (b0, t0), w0 = (
                tree_cpu_ticks(up_roots),
                tree_cpu_ticks(roots),
                system_ticks(),
                time.monotonic(),
            )
            res = run_load(
                self.tool, server.base_url, cand.load, self.args.duration, self.args.timeout
            )
            c1, u1, (b1, t1), w1 = (
                tree_cpu_ticks(roots),
                tree_cpu_ticks(up_roots),
                system_ticks(),
                time.monotonic(),
            )
            flood_res = flood.result() if flood is not None else None
        finally:
            if flood is not None:
                flood.kill()
        quiet_s = self.quiet()
        sample = summarize(
            res, (c1 - c0) / CLK_TCK, w1 - w0, (b1 - b0) / max(1, t1 - t0), flood_res, quiet_s
        )
        n = sample["requests"]
        sample["upstream_cpu_us_per_req"] = (
            (u1 - u0) / CLK_TCK * 1e6 / n if up_roots and n else None
        )
        # When in the run, and how loaded the machine was: a stall shared by every candidate
        # measured in the same minute is the machine's, not a candidate's.
        sample["at_s"] = round(w0 - self.t0, 1)
        sample["loadavg1"] = float(Path("/proc/loadavg").read_text().split()[0])
        return sample

    # -- the whole run ------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = datetime.now(UTC)
        self.t0 = time.monotonic()
        scns = self.scenarios()
        for i, scn in enumerate(scns):
            self.run_scenario(scn, scns[i + 1 :])
        finished = datetime.now(UTC)
        medians = {s.key: {k: median(v) for k, v in s.samples.items()} for s in scns}
        return {
            "started": started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "wall_s": round((finished - started).total_seconds()),
            "machine": dict(
                self.machine, loadavg_end=Path("/proc/loadavg").read_text().split()[:3]
            ),
            "tools": self.tools(),
            "commit": _git_describe(),
            "config": {k: v for k, v in vars(self.args).items()},
            "load_tool": self.tool,
            "gateway_workers": {
                "as_shipped": self.as_shipped,
                "main_flag": self.main_flag,
                "main_count": self.main_count,
                "alt_flag": self.alt_flag,
                "serve_default": self.cli.workers_default,
            },
            "notes": self.notes,
            "unavailable": self.unavailable,
            "scenarios": {
                s.key: {
                    "title": s.title,
                    "candidates": {
                        c.key: {
                            "label": c.label,
                            "server": c.server,
                            "server_notes": self.notes_by_server.get(c.server, []),
                            "samples": s.samples.get(c.key, []),
                            "median": medians[s.key].get(c.key),
                            "stalls": stalls(s.samples.get(c.key, [])),
                        }
                        for c in s.candidates
                        if c.key in s.samples
                    },
                    "skipped": s.skipped,
                }
                for s in scns
            },
            "targets": targets(
                medians, {s.key: s.samples for s in scns}, self.flood_sources, self.args.peers
            ),
        }

    def tools(self) -> dict[str, str | None]:
        return {
            "wrk": servers.tool_version(["wrk", "-v"]),
            "nginx": servers.tool_version([servers.nginx_binary() or "nginx", "-v"]),
            "caddy": servers.tool_version(["caddy", "version"]),
            "haproxy": servers.tool_version(["haproxy", "-v"]),
            "floor": str(servers.find_floor(self.args.floor)),
            "flask_peer": " ".join(servers.FLASK_REQUIREMENTS) if self.args.slow_peers else None,
        }


def _short(s: dict[str, Any]) -> str:
    flood = ""
    if s.get("flood"):
        f = s["flood"]
        flood = f"  flood {f['rps']:,.0f}/s {f['statuses']}"
    bad = f"  ERRORS {s['errors']}" if s["errors"] else ""
    return (
        f"{s['rps']:>10,.0f} req/s  p50 {s['p50_ms']:7.2f}  p99 {s['p99_ms']:7.2f} ms  "
        f"{s['cpu_us_per_req']:8.1f} CPU-µs/req  {s['cpu_cores']:.2f} cores{bad}{flood}"
    )


def summarize(
    res: dict[str, Any],
    cpu_s: float,
    wall_s: float,
    busy: float,
    flood: dict[str, Any] | None,
    quiet_s: float,
) -> dict[str, Any]:
    n = int(res["requests"])
    dur = res["duration_us"] / 1e6
    lat = res["latency_us"]
    errors = sum(res["errors"].values())
    sample: dict[str, Any] = {
        "requests": n,
        "rps": n / dur if dur else 0.0,
        "p50_ms": lat["p50"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "p999_ms": lat["p99.9"] / 1000,
        "max_ms": lat["max"] / 1000,
        "cpu_s": cpu_s,
        "cpu_us_per_req": cpu_s * 1e6 / n if n else float("inf"),
        "cpu_cores": cpu_s / wall_s if wall_s else 0.0,
        "machine_busy": round(busy, 3),
        "errors": errors,
        "error_detail": res["errors"],
        "valid": n > 0 and errors <= 0.01 * n,
        "quiet_wait_s": round(quiet_s, 2),
    }
    if flood is not None:
        fd = flood["duration_us"] / 1e6
        sample["flood"] = {
            "requests": flood["requests"],
            "rps": flood["requests"] / fd if fd else 0.0,
            "statuses": flood.get("statuses", {}),
            "p99_ms": flood["latency_us"]["p99"] / 1000,
            "tool": flood.get("tool"),
        }
    return sample


def median(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    good = [s for s in samples if "error" not in s]
    if not good:
        return None
    out: dict[str, Any] = {
        "rounds": len(good),
        "valid": all(s["valid"] for s in good),
        "errors": sum(s["errors"] for s in good),
    }
    for key in (
        "rps",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "cpu_us_per_req",
        "cpu_cores",
        "machine_busy",
    ):
        out[key] = statistics.median(s[key] for s in good)
    for key in ("cpu_us_per_req", "p99_ms", "rps"):
        out[key + "_range"] = [min(s[key] for s in good), max(s[key] for s in good)]
    ups = [
        s["upstream_cpu_us_per_req"] for s in good if s.get("upstream_cpu_us_per_req") is not None
    ]
    if ups:
        out["upstream_cpu_us_per_req"] = statistics.median(ups)
    floods = [s["flood"] for s in good if "flood" in s]
    if floods:
        statuses: dict[str, int] = {}
        for f in floods:
            for k, v in f["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        out["flood"] = {"rps": statistics.median(f["rps"] for f in floods), "statuses": statuses}
    return out


def stalls(samples: list[dict[str, Any]], factor: float = STALL_FACTOR) -> list[dict[str, Any]]:
    """Rounds whose p99 is more than `factor` × the median p99 of the candidate's other rounds."""
    out = []
    for i, s in enumerate(samples):
        if "error" in s:
            continue
        others = [o["p99_ms"] for j, o in enumerate(samples) if j != i and "error" not in o]
        if not others:
            continue
        ref = statistics.median(others)
        if ref > 0 and s["p99_ms"] > factor * ref:
            out.append(
                {
                    "round": i + 1,
                    "p99_ms": s["p99_ms"],
                    "others_ms": ref,
                    "factor": s["p99_ms"] / ref,
                    "at_s": s.get("at_s", 0.0),
                    "busy": s.get("machine_busy", 0.0),
                    "loadavg1": s.get("loadavg1", "?"),
                }
            )
    return out


def targets(
    med: dict[str, dict[str, Any]],
    samples: dict[str, dict[str, list[dict[str, Any]]]],
    flood_sources: list[str],
    peers: bool = True,
) -> list[dict[str, Any]]:
    """Issue 9's Done-when as ratios of medians from this one run (plus INFO rows).

    Each row also carries the ratio round by round (round i of one candidate against round i
    of the other, measured within seconds of each other), which shows how much of a ratio of
    medians is the machine's noise.
    """
    out: list[dict[str, Any]] = []

    def add(
        tid: str,
        text: str,
        scn: str,
        a: str,
        b: str,
        metric: str,
        op: str,
        limit: float,
        info_if_missing: bool = False,
    ) -> None:
        ma, mb = med.get(scn, {}).get(a), med.get(scn, {}).get(b)
        row: dict[str, Any] = {"id": tid, "text": text, "op": op, "limit": limit}
        if ma is None or mb is None:
            if op == "info" or info_if_missing:
                return  # optional comparison whose candidate did not run: no row
            missing = a if ma is None else b
            why = (
                "needs PEERS=1 (--peers)"
                if missing in PEER_KEYS and not peers
                else f"no result for {missing}"
            )
            row.update(status="SKIP", why=why)
            out.append(row)
            return
        va, vb = ma[metric], mb[metric]
        ratio = va / vb if vb else float("inf")
        ok = ratio >= limit if op == ">=" else ratio <= limit
        status = "INFO" if op == "info" else "PASS" if ok else "FAIL"
        if not (ma["valid"] and mb["valid"]):
            status = "INVALID"
        sa, sb = samples.get(scn, {}).get(a, []), samples.get(scn, {}).get(b, [])
        paired = [
            x[metric] / y[metric] if y[metric] else float("inf")
            for x, y in zip(sa, sb)
            if "error" not in x and "error" not in y
        ]
        row.update(status=status, ratio=ratio, a=va, b=vb, paired=paired)
        out.append(row)

    # Issue 9, "Done when": the gateway as shipped against the floor and Caddy (no access log).
    add(
        "cpu_vs_floor",
        "GET: gateway CPU-µs/req ÷ floor's",
        "get",
        "gateway",
        "floor",
        "cpu_us_per_req",
        "<=",
        2.0,
    )
    add(
        "cpu_vs_caddy",
        "GET: gateway CPU-µs/req ÷ Caddy's",
        "get",
        "gateway",
        "caddy",
        "cpu_us_per_req",
        "<=",
        0.6,
    )
    add("rps_vs_caddy", "GET: gateway req/s ÷ Caddy's", "get", "gateway", "caddy", "rps", ">=", 1.5)
    add(
        "p99_vs_caddy",
        "GET: gateway p99 ÷ Caddy's (same c)",
        "get",
        "gateway",
        "caddy",
        "p99_ms",
        "<=",
        1.0,
    )
    add(
        "post_rps_vs_caddy",
        "POST 64K: gateway req/s ÷ Caddy's",
        "post64k",
        "gateway",
        "caddy",
        "rps",
        ">=",
        1.5,
    )
    add(
        "rules10k_cpu",
        "10,000 rules: CPU-µs/req ÷ shipped-size policy's",
        "rules10k",
        "rules10k",
        "small",
        "cpu_us_per_req",
        "<=",
        1.10,
    )
    for src in flood_sources:
        key = f"gateway+flood@{src}"
        add(
            f"flood_p99@{src}",
            f"flood from {src}: legit p99 ÷ alone",
            "flood",
            key,
            "gateway",
            "p99_ms",
            "<=",
            1.5,
        )
        add(
            f"flood_rps@{src}",
            f"flood from {src}: legit req/s ÷ alone",
            "flood",
            key,
            "gateway",
            "rps",
            ">=",
            0.8,
        )
    # Issue 12: a unique-password flood through nginx in decision mode does not starve a cached user.
    add(
        "flood_p99_nginx_decide",
        f"flood from {flood_sources[0] if flood_sources else '?'}: nginx+decide legit p99 ÷ alone",
        "flood",
        "nginx-decide+flood",
        "nginx-decide",
        "p99_ms",
        "<=",
        1.5,
    )
    # For reading the above.
    add(
        "cpu_vs_caddy_log",
        "GET: gateway CPU-µs/req ÷ Caddy-with-access-log's",
        "get",
        "gateway",
        "caddy-log",
        "cpu_us_per_req",
        "info",
        0,
    )
    add(
        "rps_vs_caddy_log",
        "GET: gateway req/s ÷ Caddy-with-access-log's",
        "get",
        "gateway",
        "caddy-log",
        "rps",
        "info",
        0,
    )
    add(
        "cpu_vs_nginx",
        "GET: gateway CPU-µs/req ÷ nginx {PLAIN}'s",
        "get",
        "gateway",
        "nginx-plain",
        "cpu_us_per_req",
        "info",
        0,
    )
    add(
        "cpu_vs_haproxy",
        "GET: gateway CPU-µs/req ÷ HAProxy's",
        "get",
        "gateway",
        "haproxy",
        "cpu_us_per_req",
        "info",
        0,
    )
    add(
        "floor_vs_caddy",
        "GET: floor CPU-µs/req ÷ Caddy's",
        "get",
        "floor",
        "caddy",
        "cpu_us_per_req",
        "info",
        0,
    )
    add(
        "alt_cpu_vs_floor",
        "GET: gateway (other --workers) CPU-µs/req ÷ floor's",
        "get",
        "gateway-alt",
        "floor",
        "cpu_us_per_req",
        "info",
        0,
    )
    add(
        "alt_rps_vs_caddy",
        "GET: gateway (other --workers) req/s ÷ Caddy's",
        "get",
        "gateway-alt",
        "caddy",
        "rps",
        "info",
        0,
    )
    add(
        "alt_p99_vs_caddy",
        "GET: gateway (other --workers) p99 ÷ Caddy's",
        "get",
        "gateway-alt",
        "caddy",
        "p99_ms",
        "info",
        0,
    )
    add(
        "workers_rps",
        "GET: gateway (other --workers) req/s ÷ as run",
        "get",
        "gateway-alt",
        "gateway",
        "rps",
        "info",
        0,
    )
    add(
        "post_cpu_vs_caddy",
        "POST 64K: gateway CPU-µs/req ÷ Caddy's",
        "post64k",
        "gateway",
        "caddy",
        "cpu_us_per_req",
        "info",
        0,
    )
    add(
        "post_p99_vs_caddy",
        "POST 64K: gateway p99 ÷ Caddy's",
        "post64k",
        "gateway",
        "caddy",
        "p99_ms",
        "info",
        0,
    )
    add(
        "flood_p99_caddy",
        f"flood from {flood_sources[0] if flood_sources else '?'}: Caddy legit p99 ÷ alone",
        "flood",
        "caddy+flood",
        "caddy",
        "p99_ms",
        "info",
        0,
    )
    add(
        "rps_vs_nginx_bcrypt",
        "GET: gateway req/s ÷ nginx-bcrypt's",
        "get",
        "gateway",
        "nginx-bcrypt",
        "rps",
        "info",
        0,
    )
    add(
        "decide_vs_nginx_bcrypt",
        "GET: nginx+decision mode req/s ÷ nginx auth_basic bcrypt's",
        "get",
        "nginx-decide",
        "nginx-bcrypt",
        "rps",
        "info",
        0,
    )
    add(
        "rps_vs_flask",
        "GET: gateway req/s ÷ tutorial Flask's",
        "get",
        "gateway",
        "flask",
        "rps",
        "info",
        0,
    )
    add(
        "get_vs_direct",
        "GET: gateway req/s ÷ upstream direct",
        "get",
        "gateway",
        "direct",
        "rps",
        "info",
        0,
    )
    add(
        "full_rps",
        "full stack: gateway→backend req/s ÷ backend alone",
        "fullstack",
        "gateway",
        "direct",
        "rps",
        "info",
        0,
    )
    add(
        "full_rps_caddy",
        "full stack: Caddy→backend req/s ÷ backend alone",
        "fullstack",
        "caddy",
        "direct",
        "rps",
        "info",
        0,
    )
    add(
        "full_cpu",
        "full stack: gateway CPU-µs/req ÷ backend's own",
        "fullstack",
        "gateway",
        "direct",
        "cpu_us_per_req",
        "info",
        0,
    )
    full = med.get("fullstack", {})
    gw, direct = full.get("gateway"), full.get("direct")
    if gw and direct and gw.get("upstream_cpu_us_per_req") is not None:
        # The stack's cost per request: the gateway's CPU plus what the backend spent behind it.
        total = gw["cpu_us_per_req"] + gw["upstream_cpu_us_per_req"]
        out.append(
            {
                "id": "full_stack_cpu",
                "text": "full stack: (gateway + backend) CPU-µs/req ÷ backend alone",
                "op": "info",
                "limit": 0,
                "status": "INFO",
                "ratio": total / direct["cpu_us_per_req"],
                "a": total,
                "b": direct["cpu_us_per_req"],
            }
        )
    return out


# -- output ---------------------------------------------------------------------------------


def render(result: dict[str, Any], markdown: bool = False) -> str:
    lines: list[str] = []
    m = result["machine"]
    wall = f"; {result['wall_s'] / 60:.1f} min wall" if "wall_s" in result else ""
    head = (
        f"{m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB, {m['os']}, kernel {m['kernel']}, "
        f"Python {m['python']}; commit {result.get('commit', '?')}; load: {result['load_tool']}; loadavg {' '.join(m['loadavg_start'])} → "
        f"{' '.join(m['loadavg_end'])}; {result['config'].get('rounds')} rounds × "
        f"{result['config'].get('duration')} s{wall}"
    )
    cols = (
        "scenario",
        "candidate",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU-µs/req (range)",
        "cores",
        "host busy",
        "errors",
        "stalls",
    )
    left = {0, 1, 8, 9}
    rows: list[tuple[str, ...]] = []
    for skey, scn in result["scenarios"].items():
        for _ckey, cand in scn["candidates"].items():
            md = cand["median"]
            if md is None:
                rows.append((skey, cand["label"], "error", "", "", "", "", "", "", ""))
                continue
            err = str(md["errors"]) + ("" if md["valid"] else " INVALID")
            if "flood" in md:
                f = md["flood"]
                err += f"; flood {f['rps']:,.0f}/s " + ",".join(
                    f"{k}×{v}" for k, v in sorted(f["statuses"].items())
                )
            lo, hi = md.get("cpu_us_per_req_range", (md["cpu_us_per_req"],) * 2)
            cpu = (
                f"{md['cpu_us_per_req']:,.1f} ({lo:,.0f}–{hi:,.0f})"
                if md["rounds"] > 1
                else f"{md['cpu_us_per_req']:,.1f}"
            )
            st = cand.get("stalls")
            if st is None:
                st = stalls(cand["samples"])
            stall = ", ".join(
                f"r{x['round']} {x['p99_ms']:.1f} ms ({x['factor']:.1f}×)" for x in st
            )
            rows.append(
                (
                    skey,
                    cand["label"],
                    f"{md['rps']:,.0f}",
                    f"{md['p50_ms']:.2f}",
                    f"{md['p99_ms']:.2f}",
                    cpu,
                    f"{md['cpu_cores']:.2f}",
                    f"{md['machine_busy']:.0%}",
                    err,
                    stall,
                )
            )
        for ckey, why in scn["skipped"].items():
            rows.append((skey, ckey, "skipped", "", "", "", "", "", why[:70], ""))
    if markdown:
        lines.append(f"Machine: {head}\n")
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" if i in left else "--:" for i in range(len(cols))) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        lines.append(head)
        widths = [
            max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)
        ]
        widths[-1] = len(cols[-1])
        fmt = "  ".join(f"{{:{'<' if i in left else '>'}{w}}}" for i, w in enumerate(widths))
        lines += [fmt.format(*cols).rstrip()] + [fmt.format(*r).rstrip() for r in rows]
    lines.append("")
    lines += target_lines(result["targets"], markdown)
    notes = result["notes"] + [
        f"{k}: {v.splitlines()[0]}" for k, v in result["unavailable"].items()
    ]
    if notes:
        lines.append("")
        lines += [f"{'- ' if markdown else 'note: '}{n}" for n in notes]
    return "\n".join(lines)


def target_lines(rows: list[dict[str, Any]], markdown: bool) -> list[str]:
    out = []
    if markdown:
        out += [
            "| target | ratio of medians | limit | result | round by round |",
            "|---|--:|--:|---|---|",
        ]

    def fmt(x: float) -> str:
        return f"{x:.2f}×" if x < 1000 else f"{x:,.0f}×"

    for t in rows:
        limit = "—" if t["op"] == "info" else f"{t['op']} {t['limit']:g}"
        ratio = fmt(t["ratio"]) if "ratio" in t else t.get("why", "")
        paired = (
            " / ".join(f"{x:.2f}" for x in t.get("paired", ()))
            if len(t.get("paired", ())) > 1
            else ""
        )
        if markdown:
            out.append(f"| {t['text']} | {ratio} | {limit} | {t['status']} | {paired} |")
        else:
            out.append(
                f"  {t['status']:<7} {t['text']:<58} {ratio:>12}  (target {limit})"
                + (f"  rounds {paired}" if paired else "")
            )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    nproc = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    add = p.add_argument
    add(
        "--peers",
        action="store_true",
        help="also run nginx auth_basic {PLAIN}, HAProxy http_auth, Caddy without and with its access log, "
        "nginx auth_request + gateway --mode decide",
    )
    add(
        "--slow-peers",
        action="store_true",
        help="also run the peers that hash on every request (nginx auth_basic bcrypt, the tutorial Flask app)",
    )
    add("--duration", type=int, help="seconds per measured run (default 6 with --peers, else 4)")
    add(
        "--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)"
    )
    add(
        "--warmup",
        type=int,
        default=2,
        help="seconds of unrecorded load per candidate first, filling every worker's cache (default 2)",
    )
    add("--quick", action="store_true", help="smoke run: 1 round of 2 s, 1 s warm-up")
    add(
        "--only",
        help=f"comma-separated scenarios of {','.join(SCENARIOS)} "
        f"(default {','.join(DEFAULT_SCENARIOS)})",
    )
    add(
        "--workers",
        type=int,
        help="gateway --workers (default: none, i.e. as shipped; a second gateway with --workers "
        f"{nproc} runs too when the shipped default differs, else with --workers 1)",
    )
    add("--no-alt-workers", action="store_true", help="skip the second gateway worker count")
    add("--floor", type=Path, help="path of py_floor.py (default ../shared/bench/py_floor.py)")
    add("--connections", type=int, default=32, help="client connections (default 32)")
    add(
        "--threads",
        type=int,
        default=1,
        help="wrk threads (default 1, as in issue 9's measurement: wrk -t1 -c32)",
    )
    add(
        "--slow-connections",
        type=int,
        default=8,
        help="connections for the peers that hash on every request (nginx bcrypt, Flask; default 8)",
    )
    add("--timeout", type=int, default=10, help="per-request timeout, s (default 10)")
    add("--load-tool", choices=("auto", "wrk", "python"), default="auto")
    add(
        "--upstream-workers",
        type=int,
        default=1,
        help="nginx upstream worker processes (default 1)",
    )
    add(
        "--python-upstream",
        action="store_true",
        help="use the aiohttp upstream even when nginx exists",
    )
    add(
        "--legit-connections",
        type=int,
        default=8,
        help="flood scenario: legitimate client's connections",
    )
    add("--flood-connections", type=int, default=16)
    add(
        "--flood-rate",
        type=float,
        default=0.0,
        help="flood requests/s (default 0: unpaced, as fast as answered)",
    )
    add(
        "--flood-source",
        default="127.0.0.2,127.0.0.1",
        help="comma-separated flood client addresses, one flood run each (default 127.0.0.2,127.0.0.1: "
        "another client, then the legitimate client's own address)",
    )
    add(
        "--gateway-arg",
        action="append",
        default=[],
        help="extra argument for `gateway serve` (repeatable)",
    )
    add("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    add("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs, policies)")
    add("--render", type=Path, metavar="JSON", help="print the table of an earlier run and exit")
    add(
        "--markdown",
        action="store_true",
        help="with --render: as Markdown (for docs/PERFORMANCE.md)",
    )
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 6 if args.peers else 4
    if args.quick:
        args.duration, args.rounds, args.warmup = 2, 1, 1
    if args.only:
        bad = set(args.only.split(",")) - set(SCENARIOS)
        if bad:
            p.error(
                f"--only: unknown scenario(s) {', '.join(sorted(bad))}; choose from {','.join(SCENARIOS)}"
            )
    if args.workers is not None and args.workers < 1:
        p.error("--workers: must be at least 1")
    return args


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text()), markdown=args.markdown))
        return 0
    with _sigterm_as_interrupt():
        bench = Bench(args)
        for note in bench.notes:
            print(f"note: {note}")
        print(f"temp dir: {bench.tmp}", flush=True)
        try:
            result = bench.run()
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the servers this run started", file=sys.stderr)
            return 130
        finally:
            bench.stop_all()
            if not args.keep_tmp:
                _rmtree(bench.tmp)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out / f"{stamp}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    (args.out / f"{stamp}.md").write_text(render(result, markdown=True) + "\n")
    print("\n" + render(result))
    print(f"\nresults: {out} (+ .md)")
    return 0


def _git_describe() -> str:
    """The checkout measured: commit, plus "+dirty" when gateway/ has uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=root,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "gateway"],
            capture_output=True,
            text=True,
            cwd=root,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
