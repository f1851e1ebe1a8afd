#!/usr/bin/env bash
# A local Redis Cluster from the installed redis-server: 3 primaries and 3
# replicas (synced, promoted 2-4 s after their primary fails) on 127.0.0.1, ports REDIS_CLUSTER_BASE_PORT (7101) .. +5, data
# and logs under <repo>/.local/redis-cluster/. Used by scripts/test.sh (the
# cluster suites) and scripts/multi-local.sh --cluster.
#
#   scripts/redis-cluster.sh start    # start (or reuse) it; prints the seed URL list
#   scripts/redis-cluster.sh stop     # shut every node down, remove its files
#   scripts/redis-cluster.sh status   # CLUSTER INFO of the first node
#   scripts/redis-cluster.sh urls     # the seed URL list (for REDIS_URL / TEST_REDIS_URL)
#
# Environment: REDIS_CLUSTER_BASE_PORT (7101), REDIS_CLUSTER_DIR, and for a
# cluster as ElastiCache runs it in transit-encryption mode (what
# scripts/redis-secure.sh starts): REDIS_CLUSTER_TLS_DIR (ca.crt, redis.crt,
# redis.key: every node speaks TLS only, to clients, to each other and to
# its replicas) and REDIS_CLUSTER_PASSWORD (requirepass and masterauth).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base="${REDIS_CLUSTER_BASE_PORT:-7101}"
dir="${REDIS_CLUSTER_DIR:-$ROOT/.local/redis-cluster}"
ports=("$base" $((base + 1)) $((base + 2)) $((base + 3)) $((base + 4)) $((base + 5)))
tls="${REDIS_CLUSTER_TLS_DIR:-}"
password="${REDIS_CLUSTER_PASSWORD:-}"

# The redis-cli options that reach a node (TLS, AUTH).
cli_opts=()
[ -n "$tls" ] && cli_opts+=(--tls --cacert "$tls/ca.crt")
[ -n "$password" ] && cli_opts+=(-a "$password" --no-auth-warning)
# With a deadline: redis-cli speaking TLS to a server that does not would
# wait forever for its handshake. (`--cluster create` gets longer.)
cli() { timeout "${CLI_TIMEOUT:-5}" redis-cli "${cli_opts[@]}" "$@"; }

# What a node listens on and how it authenticates.
node_opts() { # node_opts PORT
    if [ -n "$tls" ]; then
        printf '%s\n' --port 0 --tls-port "$1" --tls-cluster yes --tls-replication yes \
            --tls-cert-file "$tls/redis.crt" --tls-key-file "$tls/redis.key" \
            --tls-ca-cert-file "$tls/ca.crt" --tls-auth-clients no
    else
        printf '%s\n' --port "$1"
    fi
    if [ -n "$password" ]; then printf '%s\n' --requirepass "$password" --masterauth "$password"; fi
}

# Percent-encodes $1 for a URL's user info.
urlencode() {
    local s="$1" out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c="${s:i:1}"
        case "$c" in
        [A-Za-z0-9._~-]) out+="$c" ;;
        *) out+="$(printf '%%%02X' "'$c")" ;;
        esac
    done
    printf '%s' "$out"
}

die() {
    echo "redis-cluster: $*" >&2
    exit 1
}

urls() {
    local out="" p scheme=redis auth=""
    [ -n "$tls" ] && scheme=rediss
    [ -n "$password" ] && auth=":$(urlencode "$password")@"
    for p in "${ports[@]}"; do out="${out:+$out,}$scheme://${auth}127.0.0.1:$p"; done
    printf '%s\n' "$out"
}

ping() { cli -h 127.0.0.1 -p "$1" ping 2>/dev/null | grep -q PONG; }

state_ok() {
    cli -h 127.0.0.1 -p "$1" cluster info 2>/dev/null | tr -d '\r' | grep -q '^cluster_state:ok$'
}

# Waits until every node reports cluster_state:ok and knows 6 nodes, and
# every replica has synced with its primary (a replica that never synced
# cannot be promoted).
wait_ok() {
    local i p all role
    for i in $(seq 1 300); do
        all=1
        for p in "${ports[@]}"; do
            if ! state_ok "$p"; then
                all=0
                break
            fi
            if [ "$(cli -h 127.0.0.1 -p "$p" cluster nodes 2>/dev/null | grep -c .)" != 6 ]; then
                all=0
                break
            fi
            role="$(cli -h 127.0.0.1 -p "$p" info replication 2>/dev/null | tr -d '\r')"
            if printf '%s\n' "$role" | grep -q '^role:slave$' &&
                ! printf '%s\n' "$role" | grep -q '^master_link_status:up$'; then
                all=0
                break
            fi
        done
        [ "$all" = 1 ] && return 0
        sleep 0.1
    done
    return 1
}

start() {
    command -v redis-server >/dev/null 2>&1 || die "redis-server not found (apt-get install redis-server)"
    command -v redis-cli >/dev/null 2>&1 || die "redis-cli not found (apt-get install redis-tools)"
    if ping "$base" && state_ok "$base"; then
        echo "redis-cluster: already running on ${ports[0]}..${ports[5]}" >&2
        urls
        return 0
    fi
    local p
    for p in "${ports[@]}"; do
        if ping "$p"; then
            die "port $p answers but is not a healthy cluster; run '$0 stop' (or pick REDIS_CLUSTER_BASE_PORT)"
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            die "port $p is taken by a server that does not answer as this cluster's nodes would (another checkout's cluster, other TLS or password?); stop it or pick REDIS_CLUSTER_BASE_PORT"
        fi
    done
    rm -rf "$dir"
    for p in "${ports[@]}"; do
        mkdir -p "$dir/$p"
        mapfile -t listen < <(node_opts "$p")
        redis-server "${listen[@]}" --bind 127.0.0.1 --cluster-enabled yes \
            --cluster-config-file "$dir/$p/nodes.conf" --cluster-node-timeout 2000 \
            --cluster-replica-validity-factor 0 --repl-diskless-sync-delay 0 \
            --save '' --appendonly no --daemonize yes --dir "$dir/$p" \
            --logfile "$dir/$p/redis.log" --pidfile "$dir/$p/redis.pid" >/dev/null ||
            die "redis-server on $p failed to start; see $dir/$p/redis.log"
    done
    for p in "${ports[@]}"; do
        local i
        for i in $(seq 1 100); do
            ping "$p" && break
            sleep 0.05
        done
        ping "$p" || die "node $p did not answer; see $dir/$p/redis.log"
    done
    local hosts=()
    for p in "${ports[@]}"; do hosts+=("127.0.0.1:$p"); done
    CLI_TIMEOUT=120 cli --cluster create "${hosts[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 ||
        die "redis-cli --cluster create failed; see $dir/create.log"
    wait_ok || die "the cluster did not reach cluster_state:ok; see $dir/*/redis.log"
    echo "redis-cluster: 3 primaries + 3 replicas on ${ports[0]}..${ports[5]}, cluster_state:ok" >&2
    urls
}

stop() {
    local p pid
    for p in "${ports[@]}"; do
        if ping "$p"; then
            cli -h 127.0.0.1 -p "$p" shutdown nosave >/dev/null 2>&1 || true
        elif [ -f "$dir/$p/redis.pid" ]; then
            pid="$(cat "$dir/$p/redis.pid")"
            kill "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$dir"
    echo "redis-cluster: stopped" >&2
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) cli -h 127.0.0.1 -p "$base" cluster info ;;
urls) urls ;;
*)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
