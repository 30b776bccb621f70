"""The bench's own arithmetic (no servers): `.venv/bin/python -m pytest -q bench/test_bench.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import servers
from bench.procs import BenchError
from bench.runner import median, render, stalls, targets
from bench.servers import _workers_default


def sample(p99: float, cpu: float = 100.0, rps: float = 1000.0) -> dict[str, Any]:
    return {
        "requests": 1000,
        "rps": rps,
        "p50_ms": 1.0,
        "p99_ms": p99,
        "p999_ms": p99,
        "max_ms": p99,
        "cpu_s": 0.1,
        "cpu_us_per_req": cpu,
        "cpu_cores": 1.0,
        "machine_busy": 0.5,
        "errors": 0,
        "error_detail": {},
        "valid": True,
        "quiet_wait_s": 0.0,
    }


def test_a_round_above_three_times_the_others_median_is_a_stall() -> None:
    found = stalls([sample(5.0), sample(6.0), sample(19.0)])
    assert [s["round"] for s in found] == [3]
    assert round(found[0]["factor"], 2) == round(19.0 / 5.5, 2)
    assert stalls([sample(5.0), sample(6.0), sample(16.0)]) == []  # 2.9×: not a stall
    assert stalls([sample(5.0)]) == []  # nothing to compare with
    assert stalls([sample(5.0), {"error": "x"}, sample(50.0)])[0]["round"] == 3


def test_workers_default_is_read_from_serve_help() -> None:
    usage = "usage: serve [--workers WORKERS] [--watch]\n\noptions:\n"
    assert (
        _workers_default(
            usage + "  --workers WORKERS  worker processes (GATEWAY_WORKERS, default 1)\n"
            "  --watch  reload (default; GATEWAY_WATCH=false)\n"
        )
        == 1
    )
    assert (
        _workers_default(usage + "  --workers N  processes (default: number of CPUs)\n") is not None
    )
    assert _workers_default(usage + "  --workers N  processes\n  --watch  (default 3)\n") is None


def test_targets_are_ratios_of_medians_with_round_by_round_ratios() -> None:
    samples = {
        "get": {
            "gateway": [sample(5, cpu=60), sample(5, cpu=50), sample(5, cpu=40)],
            "floor": [sample(5, cpu=30), sample(5, cpu=25), sample(5, cpu=20)],
        }
    }
    med = {scn: {k: median(v) for k, v in cands.items()} for scn, cands in samples.items()}
    rows = {r["id"]: r for r in targets(med, samples, ["127.0.0.2"], peers=False)}
    assert rows["cpu_vs_floor"]["status"] == "PASS" and rows["cpu_vs_floor"]["ratio"] == 2.0
    assert rows["cpu_vs_floor"]["paired"] == [2.0, 2.0, 2.0]
    assert rows["cpu_vs_caddy"]["status"] == "SKIP" and "PEERS=1" in rows["cpu_vs_caddy"]["why"]
    assert rows["flood_p99@127.0.0.2"]["status"] == "SKIP"
    assert "cpu_vs_haproxy" not in rows  # INFO rows only when both sides ran
    assert med["get"]["gateway"]["cpu_us_per_req_range"] == [40, 60]


def test_render_reads_a_result_without_the_newer_fields() -> None:
    result = {
        "machine": {
            "nproc": 2,
            "cpu_model": "x",
            "mem_gib": 1,
            "os": "y",
            "kernel": "z",
            "python": "3",
            "loadavg_start": ["0"],
            "loadavg_end": ["0"],
        },
        "load_tool": "wrk",
        "config": {"rounds": 1, "duration": 2},
        "notes": [],
        "unavailable": {},
        "scenarios": {
            "get": {
                "candidates": {
                    "gateway": {
                        "label": "gateway",
                        "samples": [sample(5)],
                        "median": median([sample(5)]),
                    }
                },
                "skipped": {"caddy": "caddy not installed"},
            }
        },
        "targets": [
            {"id": "x", "text": "t", "op": "<=", "limit": 2, "status": "PASS", "ratio": 1.0}
        ],
    }
    out = render(result)
    assert "gateway" in out and "caddy not installed" in out and "PASS" in out
    assert "| gateway |" in render(result, markdown=True)


def test_nginx_decision_mode_targets() -> None:
    # Without --peers the flood target is listed as skipped, the INFO ratio not at all.
    rows = {r["id"]: r for r in targets({}, {}, ["127.0.0.2"], peers=False)}
    assert rows["flood_p99_nginx_decide"]["status"] == "SKIP"
    assert "PEERS=1" in rows["flood_p99_nginx_decide"]["why"]
    assert "decide_vs_nginx_bcrypt" not in rows
    samples = {
        "get": {"nginx-decide": [sample(5, rps=4000)], "nginx-bcrypt": [sample(5, rps=400)]},
        "flood": {"nginx-decide": [sample(4.0)], "nginx-decide+flood": [sample(7.0)]},
    }
    med = {scn: {k: median(v) for k, v in cands.items()} for scn, cands in samples.items()}
    rows = {r["id"]: r for r in targets(med, samples, ["127.0.0.2"], peers=True)}
    assert (
        rows["decide_vs_nginx_bcrypt"]["status"] == "INFO"
        and rows["decide_vs_nginx_bcrypt"]["ratio"] == 10.0
    )
    assert (
        rows["flood_p99_nginx_decide"]["status"] == "FAIL"
        and rows["flood_p99_nginx_decide"]["ratio"] == 1.75
    )
    assert "127.0.0.2" in rows["flood_p99_nginx_decide"]["text"]
    samples["flood"]["nginx-decide+flood"] = [sample(5.0)]
    med["flood"]["nginx-decide+flood"] = median(samples["flood"]["nginx-decide+flood"])
    rows = {r["id"]: r for r in targets(med, samples, ["127.0.0.2"], peers=True)}
    assert rows["flood_p99_nginx_decide"]["status"] == "PASS"
    # nginx missing under --peers: a SKIP naming the candidate that has no result.
    rows = {r["id"]: r for r in targets({}, {}, ["127.0.0.2"], peers=True)}
    assert rows["flood_p99_nginx_decide"]["why"] == "no result for nginx-decide+flood"


def test_nginx_decide_without_nginx_is_skipped_with_the_apt_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(servers, "nginx_binary", lambda: None)
    gw = servers.Server("gateway-decide", "gateway --mode decide", "http://127.0.0.1:1", [])
    with pytest.raises(BenchError, match="nginx not installed.*apt-get install"):
        servers.start_nginx_decide(tmp_path, "http://127.0.0.1:2", gw)
