"""What a policy reload costs the requests in flight: wrk load with and without reloads.

    python -m bench.reload [--policy rules10k] [--seconds 8] [--reloads 4] [--workers N]

Starts the fixed upstream and the gateway as `make bench` does (audit log to a file, the
shipped `--workers` default unless given), warms the credential cache, then runs three windows
of wrk load, each `--seconds` long:

- ``steady``: no reload;
- ``unchanged``: ``--reloads`` SIGHUPs with the file as it is (an operator's reflex, a
  Kubernetes ConfigMap resync);
- ``edited``: ``--reloads`` real edits (a comment line changes the file's digest, so every
  worker parses, validates, compiles and swaps the whole policy; the file watcher picks the
  edit up, as shipped).

It prints req/s, p50, p99 and max latency and errors per window, the resident memory of the
gateway's processes after it (many reloads must not grow it), and the reload counters one
worker's ``/-/status`` gives for it; a window whose p99 is far above the steady one is a loop
stall.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench import policies, servers
from bench.load import Load, run_load, wrk_available
from bench.procs import BenchError, tree_rss_bytes


def _status(base_url: str, auth: str) -> dict[str, Any]:
    req = urllib.request.Request(base_url + "/-/status", headers={"Authorization": auth})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        result: dict[str, Any] = json.load(resp)
        return result


def _reloads(base_url: str, auth: str) -> dict[str, int]:
    # one worker's counters (whichever answers): every worker reloads on each trigger
    counts: dict[str, int] = _status(base_url, auth)["reloads"]
    return counts


def _reloader(
    stop: threading.Event, pid: int, policy: Path, mode: str, every: float, count: int
) -> None:
    original = policy.read_text()
    for n in range(1, count + 1):
        if stop.wait(every):
            return
        if mode == "edited":
            # a new digest each time: the watcher sees it within its interval and reloads
            policy.write_text(original + f"# bench.reload edit {n} at {time.time():.3f}\n")
        else:
            os.kill(pid, signal.SIGHUP)


def _window(
    tool: str, gw: servers.Server, load: Load, policy: Path, mode: str, args: argparse.Namespace
) -> dict[str, Any]:
    before = _reloads(gw.base_url, load.auth or "")
    stop = threading.Event()
    every = args.seconds / (args.reloads + 1)
    worker = threading.Thread(
        target=_reloader,
        args=(stop, gw.procs[0].pid, policy, mode, every, args.reloads if mode != "steady" else 0),
        daemon=True,
    )
    worker.start()
    try:
        result = run_load(tool, gw.base_url, load, args.seconds, 10)
    finally:
        stop.set()
        worker.join()
    after = _reloads(gw.base_url, load.auth or "")
    result["reloads"] = {k: after[k] - before.get(k, 0) for k in after}
    return result


def _row(name: str, r: dict[str, Any], rss: int) -> str:
    lat = r["latency_us"]
    dur = r["duration_us"] / 1e6
    errors = sum(r["errors"].values())
    counts = ", ".join(f"{k} {v}" for k, v in r["reloads"].items() if v)
    return (
        f"{name:<10} {r['requests'] / dur:>9,.0f} {lat['p50'] / 1000:>8.2f} "
        f"{lat['p99'] / 1000:>8.2f} {lat['max'] / 1000:>8.1f} {errors:>7} {rss / 2**20:>8.1f}"
        f"   {counts or '-'}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reload", description=__doc__.split("\n")[0])
    p.add_argument("--policy", choices=("small", "rules10k"), default="rules10k")
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--reloads", type=int, default=4)
    p.add_argument("--workers", type=int, default=None, help="default: what serve defaults to")
    p.add_argument("--connections", type=int, default=32)
    args = p.parse_args(argv)
    tool = "wrk" if wrk_available() else "python"
    try:
        with servers.scratch("rbac-reload-") as (tmp, creds, files, started):
            policy = files[args.policy]
            doc = yaml.safe_load(policy.read_text())
            doc["users"][creds.user]["roles"].append("ops")  # to read /-/status
            policy.write_text(yaml.safe_dump(doc, sort_keys=False, width=200))
            gw = servers.start_gateway_on_upstream(tmp, creds, policy, args.workers, started)
            load = Load(policies.BENCH_PATH, creds.header(), connections=args.connections)
            servers.prime(gw, load.path, load.auth)
            run_load(tool, gw.base_url, load, 2, 10)  # fill every worker's cache
            print(
                f"{args.policy}: {args.reloads} reloads in {args.seconds} s of {tool} load, "
                f"{args.connections} connections\n"
            )
            print(
                f"{'window':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
                f"{'errors':>7} {'RSS MiB':>8}   reloads (one worker)"
            )
            for mode in ("steady", "unchanged", "edited"):
                result = _window(tool, gw, load, policy, mode, args)
                print(_row(mode, result, tree_rss_bytes(gw.cpu_roots)), flush=True)
            return 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
