# Docker compose targets (included by the root Makefile). See docs/DOCKER.md.
#
#   make compose-up                   build and start the stack on 127.0.0.1:8080
#   make compose-down                 stop it (the inventory volume is kept)
#   make compose-test                 fresh stack, tests/integration against it, down -v
#   BASE_IMAGE=local/python:3.11-bookworm make compose-test     (no registry: scripts/ci_docker.sh)

# `docker compose` (v2) when it works, else `docker-compose` (v1.29); looked up once, and only
# when a compose target actually runs.
COMPOSE ?= $(eval COMPOSE := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose))$(COMPOSE)
COMPOSE_PROJECT ?= rbac-gateway
COMPOSE_READY_TIMEOUT ?= 180

.PHONY: compose-up compose-down compose-logs compose-test

compose-up:  ## build and start the compose stack (gateway on 127.0.0.1:8080, backend unpublished)
	$(COMPOSE) -p $(COMPOSE_PROJECT) up -d --build
	@deadline=$$(( $$(date +%s) + $(COMPOSE_READY_TIMEOUT) )); \
	url="http://$${GATEWAY_PUBLISH:-127.0.0.1:8080}"; \
	until python3 scripts/healthcheck.py "$$url/-/ready" 2>/dev/null; do \
	    if [ $$(date +%s) -ge $$deadline ]; then \
	        echo "compose-up: $$url/-/ready not ready after $(COMPOSE_READY_TIMEOUT)s" >&2; \
	        $(COMPOSE) -p $(COMPOSE_PROJECT) logs --tail=50 >&2; exit 1; \
	    fi; \
	    sleep 1; \
	done; \
	echo "compose-up: ready at $$url (try: curl -u sales:imsales $$url/api/inventory)"

compose-down:  ## stop and remove the stack's containers and networks (keeps the data volume)
	$(COMPOSE) -p $(COMPOSE_PROJECT) down --remove-orphans

compose-logs:  ## follow the stack's logs
	$(COMPOSE) -p $(COMPOSE_PROJECT) logs -f --tail=100

compose-test: $(STAMP)  ## build a fresh stack, run tests/integration against it, always down -v
	PY=$(PY) COMPOSE="$(COMPOSE)" COMPOSE_PROJECT_NAME=$(COMPOSE_PROJECT)-test \
	    COMPOSE_READY_TIMEOUT=$(COMPOSE_READY_TIMEOUT) \
	    bash scripts/compose_test.sh $(PYTEST_ARGS)
