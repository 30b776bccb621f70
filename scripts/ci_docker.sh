#!/usr/bin/env bash
# Make a Docker engine and a local Python base image available on a bare Debian machine.
#
# Idempotent: every step is skipped when its result is already there, so CI and developers
# can call it before `make compose-test` without thinking. See /work/shared/DOCKER-CI.md and
# docs/DOCKER.md for why the base image is built locally (no registry is reachable here).
#
#   scripts/ci_docker.sh                  # engine + local/python:3.11-bookworm
#   BASE_IMAGE=... scripts/ci_docker.sh   # other tag for the local base image
#
# Environment:
#   BASE_IMAGE        tag of the local base image   (default local/python:3.11-bookworm)
#   DOCKERD_LOG       where dockerd writes its log   (default /tmp/dockerd.log)
#   DOCKERD_TIMEOUT   seconds to wait for the engine (default 120)
#   DEBIAN_SUITE      suite debootstrap installs     (default bookworm)
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-local/python:3.11-bookworm}"
DOCKERD_LOG="${DOCKERD_LOG:-/tmp/dockerd.log}"
DOCKERD_TIMEOUT="${DOCKERD_TIMEOUT:-120}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"

say() { printf 'ci_docker: %s\n' "$*" >&2; }
elapsed() { printf '%ss' "$((SECONDS - $1))"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

have_compose() {
    docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1
}

install_missing_packages() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    have_compose || missing+=(docker-compose)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    if [ "${#missing[@]}" -eq 0 ]; then
        say "packages: dockerd, compose and debootstrap already installed"
        return
    fi
    local t0=$SECONDS
    say "packages: installing ${missing[*]} (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    say "packages: installed in $(elapsed "$t0")"
}

start_engine() {
    if docker info >/dev/null 2>&1; then
        say "engine: already answering"
        return
    fi
    install_missing_packages
    local t0=$SECONDS
    if pgrep -x dockerd >/dev/null 2>&1; then
        say "engine: dockerd is running but not answering yet; waiting"
    else
        say "engine: starting dockerd in the background (log: $DOCKERD_LOG)"
        # setsid + nohup: the daemon must outlive this script (CI calls make afterwards).
        as_root setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    fi
    local deadline=$((SECONDS + DOCKERD_TIMEOUT))
    until docker info >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "engine: no answer after ${DOCKERD_TIMEOUT}s; last lines of $DOCKERD_LOG:"
            tail -n 30 "$DOCKERD_LOG" >&2 || true
            exit 1
        fi
        sleep 1  # polling an external daemon with a deadline: nothing to await instead
    done
    say "engine: ready in $(elapsed "$t0") ($(docker info --format '{{.ServerVersion}} {{.Driver}}'))"
}

build_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base image: $BASE_IMAGE already present"
        return
    fi
    command -v debootstrap >/dev/null 2>&1 || install_missing_packages
    local t0=$SECONDS rootfs
    rootfs="$(mktemp -d /tmp/rootfs.XXXXXX)"
    # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
    trap "as_root rm -rf '$rootfs'" EXIT
    say "base image: debootstrap $DEBIAN_SUITE into $rootfs (about a minute)"
    as_root debootstrap --variant=minbase \
        --include=python3,python3-pip,python3-venv,ca-certificates \
        "$DEBIAN_SUITE" "$rootfs" >/tmp/debootstrap.log 2>&1 || {
        say "base image: debootstrap failed; see /tmp/debootstrap.log"
        tail -n 30 /tmp/debootstrap.log >&2
        exit 1
    }
    # The machine's CA bundle is what lets pip inside `docker build` reach the index here.
    as_root cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    as_root rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    as_root ln -sf python3 "$rootfs/usr/bin/python"
    say "base image: importing as $BASE_IMAGE"
    as_root tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
    as_root rm -rf "$rootfs"
    trap - EXIT
    say "base image: $BASE_IMAGE built in $(elapsed "$t0")"
}

main() {
    local t0=$SECONDS
    start_engine
    have_compose || install_missing_packages
    build_base_image
    if docker compose version >/dev/null 2>&1; then
        say "compose: $(docker compose version --short 2>/dev/null || echo v2)"
    else
        say "compose: $(docker-compose version --short 2>/dev/null || echo v1)"
    fi
    say "done in $(elapsed "$t0")"
}

main "$@"
