#!/usr/bin/env bash
# Build and start the compose stack, run tests/integration against it, always tear it down.
#
#   scripts/compose_test.sh [pytest args...]      (normally via `make compose-test`)
#
# The stack runs as its own compose project (COMPOSE_PROJECT_NAME, default rbac-gateway-test)
# so `down -v` here never touches a developer's `make compose-up` stack or its volume. The
# gateway reads a COPY of rbac.yaml from a temporary directory: the tests edit that copy with
# `sed -i` and must never modify the repository's file.
#
# Environment:
#   PY                     python with pytest          (default .venv/bin/python)
#   COMPOSE                compose command             (default: `docker compose` if it works,
#                                                        else `docker-compose`)
#   COMPOSE_PROJECT_NAME   compose project              (default rbac-gateway-test)
#   GATEWAY_PUBLISH        host address:port            (default 127.0.0.1:8080)
#   COMPOSE_READY_TIMEOUT  seconds to wait for /-/ready (default 180)
#   BASE_IMAGE             passed to the build          (default python:3.12-slim)
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
root="$PWD"
PY="${PY:-.venv/bin/python}"
if [ -z "${COMPOSE:-}" ]; then
    if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE="docker-compose"; fi
fi
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-rbac-gateway-test}"
export GATEWAY_PUBLISH="${GATEWAY_PUBLISH:-127.0.0.1:8080}"
timeout="${COMPOSE_READY_TIMEOUT:-180}"

say() { printf 'compose-test: %s\n' "$*" >&2; }
# Word splitting of $COMPOSE is intended ("docker compose").
# shellcheck disable=SC2086
compose() { $COMPOSE -f "$root/docker-compose.yml" "$@"; }

policy_dir="$(mktemp -d "${TMPDIR:-/tmp}/rbac-policy.XXXXXX")"
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    say "tearing down (down -v)"
    compose down -v --remove-orphans >&2 || say "WARNING: down -v failed"
    rm -rf "$policy_dir"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cp rbac.yaml "$policy_dir/rbac.yaml" || exit 1
# The container runs as uid 10001: it must be able to enter the directory and read the file.
chmod 0755 "$policy_dir"
chmod 0644 "$policy_dir/rbac.yaml"
export GATEWAY_POLICY_DIR="$policy_dir"

t0=$SECONDS
say "building and starting $COMPOSE_PROJECT_NAME with $COMPOSE (BASE_IMAGE=${BASE_IMAGE:-python:3.12-slim})"
if ! compose up -d --build; then
    say "up failed; logs follow"
    compose logs --no-color --tail=200 >&2
    exit 1
fi
say "up in $((SECONDS - t0))s"

url="http://$GATEWAY_PUBLISH"
ready="$url/-/ready"
t1=$SECONDS
deadline=$((SECONDS + timeout))
until python3 scripts/healthcheck.py "$ready" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        say "$ready not ready after ${timeout}s; state and logs follow"
        compose ps >&2
        compose logs --no-color --tail=200 >&2
        exit 1
    fi
    sleep 1  # polling a published port with a deadline; there is no event to await
done
say "ready in $((SECONDS - t1))s at $url"

status=0
GATEWAY_URL="$url" \
COMPOSE_PROJECT_DIR="$root" \
COMPOSE="$COMPOSE" \
    "$PY" -m pytest -q tests/integration "$@" || status=$?
if [ "$status" -ne 0 ]; then
    say "tests failed ($status); last gateway and backend logs follow"
    compose logs --no-color --tail=100 >&2
fi
say "total $((SECONDS - t0))s"
exit "$status"
