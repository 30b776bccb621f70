"""Where the gateway spends its CPU on the cached-GET path: py-spy under wrk load.

    python -m bench.profile [--seconds 10] [--workers 1] [--py-spy PATH] [--path /api/inventory]

Starts the fixed upstream and the gateway exactly as `make bench` does (shipped-size policy,
audit log to a file), warms the credential cache, samples the gateway with py-spy while wrk
(or the Python load generator) keeps it busy, and prints self and inclusive time per function
and per gateway module. The collapsed stacks are kept in bench/results/ for a flame graph.

py-spy is not a project dependency; put it in a throwaway venv:
    python3 -m venv /tmp/pyspy && /tmp/pyspy/bin/pip install py-spy
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

from bench import policies, servers
from bench.load import Load, run_load, wrk_available
from bench.procs import BenchError
from bench.runner import RESULTS

# The event loop's entry frames: whatever sits outside them (runpy, cli, the serve function)
# is the process's base stack, carried by every sample resumed from it, not per-request work.
LOOP_FILES = ("uvloop/__init__.py", "asyncio/runners.py", "asyncio/base_events.py")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def find_py_spy(explicit: str | None) -> str | None:
    for cand in (explicit, shutil.which("py-spy"), "/tmp/pyspy/bin/py-spy"):
        if cand and Path(cand).exists():
            return cand
    return None


def short_file(path: str) -> str:
    for marker in ("/site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" and "/" in tail else tail
    return path


def summarize(raw: Path, top: int) -> str:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    stage: Counter[str] = Counter()
    stage_mod: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_s)
        total += count
        frames = []
        for f in stack.split(";"):
            if f.startswith("process "):  # --subprocesses prefixes each stack with its process
                continue
            m = FRAME.match(f)
            frames.append((m.group("func"), short_file(m.group("file"))) if m else (f, ""))
        if not frames:
            continue
        func, file = frames[-1]
        self_t[f"{func} ({file})"] += count
        # A partition of all samples: the innermost gateway frame owns the sample (with what
        # it called); samples with no gateway frame go to the leaf (the HTTP parsers in C,
        # request parsing, the event loop).
        base = max((i for i, (_, fl) in enumerate(frames) if fl.endswith(LOOP_FILES)), default=-1)
        owner = next(
            (
                f"{fn} ({fl})"
                for fn, fl in reversed(frames[base + 1 :])
                if fl.startswith("gateway/")
            ),
            None,
        )
        if owner is None:
            owner = f"[event loop / C parsers, no gateway frame] {func} ({file})"
        stage[owner] += count
        stage_mod[
            owner.split("(", 1)[1].rstrip(")")
            if not owner.startswith("[")
            else "event loop + C parsers (no gateway frame)"
        ] += count
        seen_f: set[str] = set()
        seen_m: set[str] = set()
        for func, file in frames:
            key = f"{func} ({file})"
            if key not in seen_f:
                incl[key] += count
                seen_f.add(key)
            mod = file if file.startswith(("gateway/", "bench/")) else file.split("/", 1)[0]
            if mod and mod not in seen_m:
                modules[mod] += count
                seen_m.add(mod)
    if not total:
        return "no samples (is ptrace allowed? is the gateway busy?)"

    def table(title: str, c: Counter[str]) -> list[str]:
        rows = [f"{title} (of {total} samples)"]
        rows += [f"  {n / total:6.1%}  {k}" for k, n in c.most_common(top)]
        return rows

    # Coroutine steps resumed by uvloop's C loop have no frames below them, so the runpy/cli
    # frames cover only part of the samples: read the inclusive tables from the handler down.
    out = table("by innermost gateway module (sums to 100%)", stage_mod)
    out += [""] + table("by innermost gateway function (sums to 100%)", stage)
    out += (
        [""]
        + table("self time by function", self_t)
        + [""]
        + table("inclusive time by function", incl)
    )
    out += [""] + table("inclusive time by module/package", modules)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples/s")
    p.add_argument("--py-spy", help="path to py-spy (default: PATH, then /tmp/pyspy/bin/py-spy)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument(
        "--post-bytes", type=int, default=0, help="profile POSTs with a body of this size"
    )
    p.add_argument("--policy", choices=("small", "rules10k"), default="small")
    args = p.parse_args(argv)
    spy = find_py_spy(args.py_spy)
    if spy is None:
        print(
            "py-spy not found; install it into a throwaway venv:\n"
            "  python3 -m venv /tmp/pyspy && /tmp/pyspy/bin/pip install py-spy",
            file=sys.stderr,
        )
        return 2
    tool = "wrk" if wrk_available() else "python"
    try:
        with servers.scratch("rbac-profile-") as (tmp, creds, files, started):
            gw = servers.start_gateway_on_upstream(
                tmp, creds, files[args.policy], args.workers, started
            )
            load = Load(
                policies.BENCH_PATH,
                creds.header(),
                method="POST" if args.post_bytes else "GET",
                body_bytes=args.post_bytes,
                connections=args.connections,
            )
            servers.prime(gw, load.path, load.auth)
            run_load(tool, gw.base_url, load, 2, 10)  # fill every worker's cache
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            RESULTS.mkdir(parents=True, exist_ok=True)
            raw = RESULTS / f"profile-{stamp}.txt"
            spy_cmd = [
                spy,
                "record",
                "--format",
                "raw",
                "--rate",
                str(args.rate),
                "--duration",
                str(args.seconds),
                "--subprocesses",
                "--pid",
                str(gw.procs[0].pid),
                "--output",
                str(raw),
                "--nonblocking",
            ]
            spy_proc = subprocess.Popen(
                spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            try:
                result = run_load(tool, gw.base_url, load, args.seconds + 2, 10)
            finally:
                _, err = spy_proc.communicate(timeout=args.seconds + 60)
            if spy_proc.returncode != 0 or not raw.exists():
                print(
                    f"py-spy failed ({spy_proc.returncode}): {err.strip()[-500:]}", file=sys.stderr
                )
                return 1
            dur = result["duration_us"] / 1e6
            print(
                f"load: {tool}, {result['requests'] / dur:,.0f} req/s, p99 {result['latency_us']['p99'] / 1000:.2f} ms "
                f"(while sampled; py-spy costs some)\n"
            )
            print(summarize(raw, args.top))
            print(f"\ncollapsed stacks: {raw} (flamegraph.pl or speedscope.app read them)")
            return 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
