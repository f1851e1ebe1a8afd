#!/usr/bin/env bash
# The topology of docker-compose.local.yml as local processes, without Docker:
# PostgreSQL and Redis (found or started as scripts/dev.sh does), migrations,
# two gateways (REST + the API Gateway WebSocket emulator, no relay) on ports
# 3001 and 3002, a third on 3003 with --scale, and one relay for all of them.
# Logs go to .local/logs/; ctrl-c (or SIGTERM) stops everything.
#
#   scripts/multi-local.sh [--scale] [--cluster] [--secure]
#
# --cluster runs everything on a local Redis Cluster (3 primaries, 3
# replicas, scripts/redis-cluster.sh; started if needed, left running):
# REDIS_URL becomes its seed list and REDIS_CLUSTER=true.
# --secure runs it on a Redis (or with --cluster a cluster) that speaks TLS
# only and wants an AUTH token (scripts/redis-secure.sh), configured as the
# template configures ElastiCache: REDIS_HOST, REDIS_PORT, REDIS_TLS=true,
# REDIS_PASSWORD, and the private CA trusted through SSL_CERT_FILE.
#
# Environment: what scripts/dev.sh takes (DATABASE_URL, REDIS_URL, JWT_SECRET,
# RUST_LOG, ...), passed to every process, plus:
#   MULTI_BASE_PORT   first gateway port (default 3001; the others follow;
#                     the relay's /metrics is on this port + 99)
#   MULTI_LOG_DIR     where the logs go (default .local/logs)
#   RELEASE=1         optimised binaries
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/local.sh
. "$ROOT/scripts/lib/local.sh" # and scripts/lib/services.sh
LOCAL_NAME=multi

gateways=2
cluster=0
secure=0
for arg in "$@"; do
    case "$arg" in
    --scale) gateways=3 ;;
    --cluster) cluster=1 ;;
    --secure) secure=1 ;;
    -h | --help)
        sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: scripts/multi-local.sh [--scale] [--cluster] [--secure]" >&2
        exit 2
        ;;
    esac
done
base_port="${MULTI_BASE_PORT:-3001}"
LOCAL_LOG_DIR="${MULTI_LOG_DIR:-$ROOT/.local/logs}"

local_dev_env
if [ "$secure" = 1 ]; then
    secure_flags=()
    [ "$cluster" = 1 ] && secure_flags+=(--cluster)
    secure_env="$("$ROOT/scripts/redis-secure.sh" start "${secure_flags[@]}")"
    eval "$secure_env"
    echo "multi: on Redis with TLS and AUTH (REDIS_HOST=$REDIS_HOST REDIS_PORT=$REDIS_PORT REDIS_CLUSTER=$REDIS_CLUSTER)" >&2
elif [ "$cluster" = 1 ]; then
    REDIS_URL="$("$ROOT/scripts/redis-cluster.sh" start)"
    export REDIS_URL REDIS_CLUSTER=true
    echo "multi: on the local Redis Cluster ($REDIS_URL)" >&2
fi

profile=debug
build=(cargo build -q -p chat-local)
if [ "${RELEASE:-0}" = 1 ]; then
    profile=release
    build+=(--release)
fi
local_log "building chat-local ($profile)"
"${build[@]}"
bin="$CARGO_TARGET_DIR/$profile/chat-local"

local_log "applying migrations"
"$bin" migrate >/dev/null

mkdir -p "$LOCAL_LOG_DIR"
local_trap

ports=()
for i in $(seq 1 "$gateways"); do
    port=$((base_port + i - 1))
    ports+=("$port")
    local_start "gateway-$i" "$bin" serve --no-relay --no-migrate --listen "127.0.0.1:$port"
done
# Each gateway serves its Management API (SigV4) and /metrics on loopback,
# on its port + 100; the relay may post only there.
allowed=""
for port in "${ports[@]}"; do
    allowed="${allowed:+$allowed,}http://127.0.0.1:$((port + 100))/local"
done
# The relay's counters on the first gateway's port + 99: ready means it
# holds lease shards, which it takes only once its bus subscription is up
# (an event published before that reaches no relay).
relay_metrics="127.0.0.1:$((base_port + 99))"
RELAY_ALLOWED_ENDPOINTS="${RELAY_ALLOWED_ENDPOINTS:-$allowed}" local_start relay "$bin" relay --metrics-listen "$relay_metrics"

# wait_ok URL PATTERN: true once URL answers with a line matching PATTERN
# (extended regex), within 30 s.
wait_ok() {
    for _ in $(seq 1 300); do
        curl -fsS "$1" 2>/dev/null | grep -Eq "$2" && return 0
        sleep 0.1
    done
    return 1
}

# Ready when every gateway answers /health with everything ok...
for port in "${ports[@]}"; do
    wait_ok "http://127.0.0.1:$port/health" '"status":"ok"' ||
        local_fail "the gateway on port $port is not healthy after 30 s" "gateway-$((port - base_port + 1))"
done
# ... and the relay holds lease shards.
wait_ok "http://$relay_metrics/metrics" '^chat_relay_shards_owned [1-9]' ||
    local_fail "the relay holds no lease shard after 30 s (not subscribed to the bus?)" relay

{
    cat <<EOF
multi: ready: ${LOCAL_NAMES[*]}
  gateways   $(for p in "${ports[@]}"; do printf 'http://127.0.0.1:%s ' "$p"; done)
  WebSocket  ws://127.0.0.1:PORT/ws?token=...   (chat-local chat USER --url ws://127.0.0.1:$base_port/ws)
EOF
    local_logs_line
    echo "  ctrl-c stops everything"
} >&2

local_wait
