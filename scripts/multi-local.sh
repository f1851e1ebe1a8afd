#!/usr/bin/env bash
# The topology of docker-compose.local.yml as local processes, without Docker:
# PostgreSQL and Redis (found or started as scripts/dev.sh does), migrations,
# two gateways (REST + the API Gateway WebSocket emulator, no relay) on ports
# 3001 and 3002, a third on 3003 with --scale, and one relay for all of them.
# Logs go to .local/logs/; ctrl-c (or SIGTERM) stops everything.
#
#   scripts/multi-local.sh [--scale] [--cluster]
#
# --cluster runs everything on a local Redis Cluster (3 primaries, 3
# replicas, scripts/redis-cluster.sh; started if needed, left running):
# REDIS_URL becomes its seed list and REDIS_CLUSTER=true.
#
# Environment: what scripts/dev.sh takes (DATABASE_URL, REDIS_URL, JWT_SECRET,
# RUST_LOG, ...), passed to every process, plus:
#   MULTI_BASE_PORT   first gateway port (default 3001; the others follow)
#   MULTI_LOG_DIR     where the logs go (default .local/logs)
#   RELEASE=1         optimised binaries
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/services.sh
. "$ROOT/scripts/lib/services.sh"

gateways=2
cluster=0
for arg in "$@"; do
    case "$arg" in
    --scale) gateways=3 ;;
    --cluster) cluster=1 ;;
    -h | --help)
        sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: scripts/multi-local.sh [--scale] [--cluster]" >&2
        exit 2
        ;;
    esac
done
base_port="${MULTI_BASE_PORT:-3001}"
log_dir="${MULTI_LOG_DIR:-$ROOT/.local/logs}"

ensure_rust
user_database_url="${DATABASE_URL:-}"
ensure_services
if [ "$cluster" = 1 ]; then
    REDIS_URL="$("$ROOT/scripts/redis-cluster.sh" start)"
    export REDIS_URL REDIS_CLUSTER=true
    echo "multi: on the local Redis Cluster ($REDIS_URL)" >&2
fi
if [ -z "$user_database_url" ]; then
    # As dev.sh: the stack's tables go into a database of their own.
    if ! psql "$DATABASE_URL" -tAc "SELECT 1 FROM pg_database WHERE datname = 'chat'" | grep -q 1; then
        psql "$DATABASE_URL" -qc 'CREATE DATABASE chat' >/dev/null
        echo "multi: created database 'chat'" >&2
    fi
    export DATABASE_URL="${DATABASE_URL%/*}/chat"
fi
if [ -z "${JWT_SECRET:-}" ]; then
    export JWT_SECRET=dev-secret-change-me
    echo "multi: JWT_SECRET was not set; using the development value 'dev-secret-change-me'" >&2
fi

profile=debug
build=(cargo build -q -p chat-local)
if [ "${RELEASE:-0}" = 1 ]; then
    profile=release
    build+=(--release)
fi
echo "multi: building chat-local ($profile)" >&2
"${build[@]}"
bin="$CARGO_TARGET_DIR/$profile/chat-local"

echo "multi: applying migrations" >&2
"$bin" migrate >/dev/null

mkdir -p "$log_dir"
pids=()
names=()
stopping=0

stop_all() {
    [ "$stopping" = 1 ] && return
    stopping=1
    trap - INT TERM
    echo "multi: stopping ${names[*]}" >&2
    local pid i
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # They drain in a few seconds; whatever is left after 15 s is killed.
    for i in $(seq 1 150); do
        local alive=0
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    echo "multi: stopped" >&2
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap 'stop_all' EXIT

start() {
    local name="$1"
    shift
    INSTANCE_ID="$name" "$@" >"$log_dir/$name.log" 2>&1 &
    pids+=("$!")
    names+=("$name")
}

ports=()
for i in $(seq 1 "$gateways"); do
    port=$((base_port + i - 1))
    ports+=("$port")
    start "gateway-$i" "$bin" serve --no-relay --no-migrate --listen "127.0.0.1:$port"
done
# Each gateway serves its Management API (SigV4) and /metrics on loopback,
# on its port + 100; the relay may post only there.
allowed=""
for port in "${ports[@]}"; do
    allowed="${allowed:+$allowed,}http://127.0.0.1:$((port + 100))/local"
done
RELAY_ALLOWED_ENDPOINTS="${RELAY_ALLOWED_ENDPOINTS:-$allowed}" start relay "$bin" relay

# Ready when every gateway answers /health with everything ok.
for port in "${ports[@]}"; do
    ok=0
    for _ in $(seq 1 300); do
        if curl -fsS "http://127.0.0.1:$port/health" 2>/dev/null | grep -q '"status":"ok"'; then
            ok=1
            break
        fi
        sleep 0.1
    done
    if [ "$ok" != 1 ]; then
        echo "error: the gateway on port $port is not healthy after 30 s; its log:" >&2
        tail -n 20 "$log_dir/gateway-$((port - base_port + 1)).log" >&2 || true
        exit 1
    fi
done

cat >&2 <<EOF
multi: ready: ${names[*]}
  gateways   $(for p in "${ports[@]}"; do printf 'http://127.0.0.1:%s ' "$p"; done)
  WebSocket  ws://127.0.0.1:PORT/ws?token=...   (chat-local chat USER --url ws://127.0.0.1:$base_port/ws)
  logs       $log_dir/{$(
    IFS=,
    echo "${names[*]}"
)}.log
  ctrl-c stops everything
EOF

# Runs until ctrl-c, or until one process dies (then the rest are stopped too).
set +e
wait -n "${pids[@]}"
status=$?
set -e
if [ "$stopping" = 0 ]; then
    for i in "${!pids[@]}"; do
        if ! kill -0 "${pids[$i]}" 2>/dev/null; then
            echo "error: ${names[$i]} exited (status $status); its log:" >&2
            tail -n 20 "$log_dir/${names[$i]}.log" >&2 || true
        fi
    done
    exit 1
fi
