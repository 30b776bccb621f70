# Benchmark (issue 6): the gateway against a fixed nginx upstream, optionally beside its peers.
#   make bench                     gateway vs upstream alone; ~5 min
#   make bench PEERS=1             + Caddy, nginx auth_basic+bcrypt, the tutorial Flask app; ~9 min
#   make bench BENCH_ARGS='--quick --only get'
# Needs wrk, nginx and caddy from Debian (apt-get install wrk caddy nginx-light); without them
# it says so and falls back (Python load generator, Python upstream) or skips the peer.
PEERS ?=
BENCH_ARGS ?=

.PHONY: bench

bench: $(STAMP)  ## benchmark the gateway (PEERS=1: side by side with Caddy/nginx/Flask; BENCH_ARGS=...)
	$(PY) -m bench $(if $(filter 1 yes true,$(PEERS)),--peers) $(BENCH_ARGS)
