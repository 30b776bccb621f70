# Benchmark (issues 6 and 9): the gateway as shipped against the Python floor and its peers,
# one interleaved run, medians of rounds, the issue's ratios with PASS/FAIL. See bench/README.md.
#   make bench                     gateway + floor (+ the other --workers count); ~3 min
#   make bench PEERS=1             + nginx auth_basic {PLAIN}, HAProxy http_auth, Caddy with and
#                                  without its access log, nginx auth_request + gateway --mode
#                                  decide; ~8 min on 2 cores
#   make bench BENCH_ARGS='--quick --only get'
# Needs wrk, nginx, haproxy and caddy from Debian (apt-get install wrk nginx-light haproxy caddy);
# it never installs them: without wrk it uses its Python load generator, a missing peer is skipped
# with a message.
PEERS ?=
BENCH_ARGS ?=

.PHONY: bench

bench: $(STAMP)  ## benchmark the gateway (PEERS=1: beside the floor, nginx, HAProxy, Caddy, nginx+decide; BENCH_ARGS=...)
	$(PY) -m bench $(if $(filter 1 yes true,$(PEERS)),--peers) $(BENCH_ARGS)
