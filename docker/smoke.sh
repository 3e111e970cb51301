#!/usr/bin/env bash
# `make docker-smoke`: the docker/ stack built and run end to end on this machine, then removed.
#  1. a Docker engine (as root: Debian's docker.io, docker-compose and debootstrap, installed when missing,
#     and dockerd started when none answers);
#  2. a local base image from Debian's packages (debootstrap), made once and kept: Docker Hub may be
#     out of reach;
#  3. the CPU image, torch from the CPU wheel pip finds on the host, pip trusting the host's CA bundle
#     through a build secret;
#  4. the compose stack up, every health check passed, then `prefect deployment run 'dtr/compose'` with
#     the quick experiment and the checks of tools/docker_smoke.py;
#  5. the stack and its volumes removed (images and the engine stay, so a second run reuses them).
# Exits non-zero at the first failure; prints each step's time and a summary.
#
# Settings (environment):
#   DTR_BASE_IMAGE=python:3.11-slim   use that base instead of building dtr-base:bookworm
#   DTR_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   torch from that index, not a local wheel
#   DTR_PIP_CA=/path/ca.pem           the CA bundle pip trusts in the build (default: pip's own `cert`)
#   DTR_DEBIAN_MIRROR=http://...      debootstrap's mirror (default http://deb.debian.org/debian)
#   DTR_PREFECT_PORT / DTR_MLFLOW_PORT  host ports on 127.0.0.1 (default 4200 / 5000)
#   DTR_SMOKE_TIMEOUT=1200            seconds the flow run may take
#   DTR_SMOKE_KEEP=1                  leave the stack up afterwards (remove it: see docker/README.md)
# The stack runs as the compose project dtr-smoke, so a `dtr` stack of yours and its volumes are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=.docker-cache/smoke            # logs and the copied export (git-ignored)
PY=.venv/bin/python
IMAGE=dtr:cpu
PROJECT=dtr-smoke
LOCAL_BASE=dtr-base:bookworm
BASE_IMAGE=${DTR_BASE_IMAGE:-$LOCAL_BASE}
TORCH_PIN=$(sed -n 's/^TORCH_CPU := //p' Makefile)   # torch==2.13.0, as the Makefile and Dockerfiles pin it
export DTR_PREFECT_PORT=${DTR_PREFECT_PORT:-4200} DTR_MLFLOW_PORT=${DTR_MLFLOW_PORT:-5000}
STARTED=$SECONDS
declare -a TIMES=()

say() { printf '\n== %s\n' "$*"; }
die() { printf 'docker-smoke: error: %s\n' "$*" >&2; exit 1; }
timed() {  # timed LABEL COMMAND...: run it and record its seconds for the summary
    local label=$1 start=$SECONDS
    shift
    "$@"
    TIMES+=("$(printf '%-28s %4ds' "$label" $((SECONDS - start)))")
    printf -- '-- %s: %ds\n' "$label" $((SECONDS - start))
}
logged() {  # logged LOG COMMAND...: output to LOG; on failure its end is shown
    local log=$1
    shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "'$*' failed; the whole output is in $log"
    fi
}

need_root() {
    [ "$(id -u)" = 0 ] || die "$1 needs root (or do it yourself: $2)"
}

# -- 1. engine -----------------------------------------------------------------------------------------
install_missing() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || [ "$BASE_IMAGE" != "$LOCAL_BASE" ] || missing+=(debootstrap)
    pick_docker || true   # a client with the compose plugin needs no docker-compose
    pick_compose || missing+=(docker-compose)
    [ ${#missing[@]} = 0 ] && return
    need_root "installing ${missing[*]}" "apt-get install ${missing[*]}"
    logged "$WORK/apt-update.log" apt-get update
    logged "$WORK/apt-install.log" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    echo "installed ${missing[*]}"
}

# A client whose `build` runs BuildKit (needed for RUN --mount secrets): one with the buildx plugin, or
# Debian's docker.io 20.10, whose client has it built in. A newer client without buildx has only the
# legacy builder, so PATH's first docker is not always the one.
pick_docker() {
    local candidate
    for candidate in $(type -ap docker); do
        if DOCKER_BUILDKIT=1 "$candidate" build --help 2>/dev/null | grep -q -- '--secret'; then
            DOCKER=$candidate
            return 0
        fi
    done
    return 1
}

# Compose v2 when the client has it, else docker-compose 1.29 (what Debian 12 packages).
pick_compose() {
    if [ -n "${DOCKER:-}" ] && "$DOCKER" compose version >/dev/null 2>&1; then
        COMPOSE=("$DOCKER" compose -p "$PROJECT" -f docker/compose.yaml)
    elif command -v docker-compose >/dev/null; then
        COMPOSE=(docker-compose -p "$PROJECT" -f docker/compose.yaml)
    else
        return 1
    fi
}

start_engine() {
    "$DOCKER" info >/dev/null 2>&1 && return
    need_root "starting the Docker engine" "dockerd &"
    if [ -d /run/systemd/system ]; then
        systemctl start docker
    else  # no init system (containers, sandboxes): the engine runs on in the background
        setsid dockerd >.docker-cache/dockerd.log 2>&1 < /dev/null &
        echo "started dockerd (pid $!, log .docker-cache/dockerd.log); it keeps running after the smoke test"
    fi
    local waited=0
    until "$DOCKER" info >/dev/null 2>&1; do
        [ $waited -lt 60 ] || die "the Docker engine did not answer within 60 s (see .docker-cache/dockerd.log)"
        sleep 1
        waited=$((waited + 1))
    done
}

engine() {
    install_missing
    pick_docker || die "no docker client here can build with BuildKit: install docker-buildx, or Debian's docker.io"
    pick_compose || die "no docker compose: install docker-compose (Debian) or the compose plugin"
    start_engine
    echo "engine $("$DOCKER" version --format '{{.Server.Version}}'), client $DOCKER, compose: ${COMPOSE[*]}"
}

# -- 2. base image -------------------------------------------------------------------------------------
base_image() {
    if [ "$BASE_IMAGE" != "$LOCAL_BASE" ]; then
        echo "base image $BASE_IMAGE (pulled by the build)"
        return
    fi
    if "$DOCKER" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        echo "base image $LOCAL_BASE: cached"
        return
    fi
    need_root "building the base image" "debootstrap"
    # Debian 12's Python 3.11 with venv (for the image's /opt/venv), CA certificates and useradd.
    local rootfs=.docker-cache/base-rootfs
    rm -rf "$rootfs"
    logged "$WORK/debootstrap.log" debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
        bookworm "$rootfs" "${DTR_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$DOCKER" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null
    rm -rf "$rootfs"
    echo "base image $LOCAL_BASE: built"
}

# -- 3. image ------------------------------------------------------------------------------------------
# TORCH_WHEEL: the torch wheel pip finds on the host, for Python 3.11 (the base's), put in the build context.
torch_wheel() {
    TORCH_WHEEL=$(find docker/wheels -name "torch-${TORCH_PIN#torch==}+cpu-cp311-*.whl" -printf '%f\n' | head -n 1)
    [ -z "$TORCH_WHEEL" ] || return 0
    rm -rf "$WORK/wheel"
    logged "$WORK/pip-download.log" "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.11 \
        -d "$WORK/wheel" "$TORCH_PIN"
    TORCH_WHEEL=$(find "$WORK/wheel" -name 'torch-*.whl' -printf '%f\n' | head -n 1)
    case $TORCH_WHEEL in
        *+cpu-*) mv "$WORK/wheel/$TORCH_WHEEL" docker/wheels/ ;;
        *) die "pip found '$TORCH_WHEEL', not a CPU build of $TORCH_PIN; set DTR_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" ;;
    esac
}

build_image() {
    local args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    if [ -n "${DTR_TORCH_INDEX_URL:-}" ]; then
        args+=(--build-arg "TORCH_INDEX_URL=$DTR_TORCH_INDEX_URL")
    else
        torch_wheel
        args+=(--build-arg "TORCH_WHEEL=$TORCH_WHEEL")
    fi
    # The CA bundle pip trusts on the host (a proxy may re-sign TLS): a build secret, in no layer.
    local ca=${DTR_PIP_CA:-${PIP_CERT:-$("$PY" -m pip config get global.cert 2>/dev/null || true)}}
    if [ -n "$ca" ]; then
        [ -f "$ca" ] || die "the CA bundle $ca (DTR_PIP_CA, PIP_CERT or pip's cert) is not a file"
        args+=(--secret "id=pip_ca,src=$ca")
    fi
    echo "building $IMAGE: ${args[*]}"
    logged "$WORK/build.log" env DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain -f docker/Dockerfile.cpu -t "$IMAGE" "${args[@]}" .
    echo "$(grep -c ' CACHED$' "$WORK/build.log") build steps reused from the cache; log: $WORK/build.log"
}

# -- 4. stack ------------------------------------------------------------------------------------------
teardown() {
    local status=$?
    if [ "$STACK_UP" = 1 ]; then
        "${COMPOSE[@]}" logs --no-color >"$WORK/compose.log" 2>&1 || true
        if [ "${DTR_SMOKE_KEEP:-}" = 1 ]; then
            echo "DTR_SMOKE_KEEP=1: the stack stays up; '${COMPOSE[*]} down -v' removes it"
        else
            local start=$SECONDS
            "${COMPOSE[@]}" down -v --remove-orphans >"$WORK/down.log" 2>&1 || echo "compose down failed: see $WORK/down.log" >&2
            TIMES+=("$(printf '%-28s %4ds' "teardown (volumes too)" $((SECONDS - start)))")
        fi
    fi
    echo
    echo "docker-smoke: times"
    printf '  %s\n' "${TIMES[@]}"
    printf '  %-28s %4ds\n' "total" $((SECONDS - STARTED))
    if [ $status = 0 ]; then
        echo "docker-smoke: PASSED"
    else
        echo "docker-smoke: FAILED (logs in $WORK$([ "$STACK_UP" = 1 ] && echo ": compose.log has every service's output"))" >&2
    fi
    exit $status
}

stack_up() {
    STACK_UP=1
    "${COMPOSE[@]}" down -v --remove-orphans >"$WORK/down.log" 2>&1 || true   # what a killed run left
    local port
    for port in "$DTR_PREFECT_PORT" "$DTR_MLFLOW_PORT"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            die "127.0.0.1:$port is taken; free it or choose DTR_PREFECT_PORT / DTR_MLFLOW_PORT"
        fi
    done
    logged "$WORK/up.log" "${COMPOSE[@]}" up -d --no-build
    wait_healthy 300
}

# Every container of the stack running and, where it has a health check, healthy.
wait_healthy() {
    local limit=$1 start=$SECONDS ids states
    while true; do
        mapfile -t ids < <("${COMPOSE[@]}" ps -a -q)
        [ ${#ids[@]} -gt 0 ] || die "the compose stack has no containers (see $WORK/up.log)"
        states=$("$DOCKER" inspect --format '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "${ids[@]}")
        if grep -qvE ' running (healthy|none)$' <<<"$states"; then
            if grep -qE ' (exited|dead) | unhealthy$' <<<"$states"; then
                "${COMPOSE[@]}" logs --no-color --tail 30 >&2 || true
                die "a service stopped or failed its health check:"$'\n'"$states"
            fi
            [ $((SECONDS - start)) -lt "$limit" ] || die "not every service healthy after ${limit}s:"$'\n'"$states"
            sleep 3
        else
            echo "${#ids[@]} containers running, health checks passed:"
            sed 's/^/  /' <<<"$states"
            return
        fi
    done
}

run_checks() {
    "$PY" tools/docker_smoke.py --docker "$DOCKER" --project "$PROJECT" --workdir "$WORK" --timeout "${DTR_SMOKE_TIMEOUT:-1200}" \
        --prefect-api "http://127.0.0.1:$DTR_PREFECT_PORT/api" --mlflow "http://127.0.0.1:$DTR_MLFLOW_PORT"
}

main() {
    [ -x "$PY" ] || die "$PY is missing: run 'make install' first (make docker-smoke does)"
    mkdir -p "$WORK"
    COMPOSE=() STACK_UP=0
    trap teardown EXIT
    say "engine";       timed "engine" engine
    say "base image";   timed "base image" base_image
    say "CPU image";    timed "image build" build_image
    say "stack";        timed "start-up (healthy)" stack_up
    say "flow run and checks"; timed "flow run + checks" run_checks
}

main "$@"
