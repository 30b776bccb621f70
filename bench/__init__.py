"""Benchmark harness for rbac-gateway (issue 6): `make bench` / `python -m bench`.

The pieces, in the order a run uses them:

- `procs`     start/stop the servers we own (by pid), wait for health, CPU time from /proc
- `policies`  generate the bench policies (small, like the shipped one; 10,000 rules)
- `servers`   configure and start the candidates: fixed upstream, gateway, Caddy, nginx, Flask
- `load`      drive load with wrk (Lua scripts in `lua/`) or with `loadgen` (pure Python)
- `runner`    scenarios, interleaved rounds, medians, ratios, table and JSON
"""
