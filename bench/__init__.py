"""Benchmark harness for rbac-gateway (issues 6 and 9): `make bench` / `python -m bench`.

How to run it and what each column means: bench/README.md. The pieces, in the order a run
uses them:

- `procs`     start/stop the servers we own (by pid), wait for health, CPU time from /proc
- `policies`  generate the bench policies (small, like the shipped one; 10,000 rules)
- `servers`   configure and start the candidates: fixed upstream, gateway, the Python floor
              (../shared/bench/py_floor.py, run in place), nginx, HAProxy, Caddy, Flask
- `load`      drive load with wrk (Lua scripts in `lua/`) or with `loadgen` (pure Python; also
              the flood client, which can bind 127.0.0.2 or 127.0.0.1)
- `runner`    scenarios, interleaved rounds, medians, stalls, ratios, table and JSON
- `profile`   py-spy on a gateway under wrk load (py-spy in a throwaway venv)
"""
