#!/usr/bin/env bash
# Benchmarks this stack against the Node.js original, side by side, and writes
# the results table into docs/BENCHMARKS.md.
#
#   scripts/bench.sh [--quick] [--runs N] [--only S1,S2,S3,S4,S5,S6,overload,pgbench,lambda] [--no-docs]
#
# What it does (each step prints what it is doing on stderr):
#   1. builds the release binaries (chat-local, chat-bench; the four functions
#      only when S5 runs);
#   2. starts a private PostgreSQL cluster and a private redis-server for the
#      session (.local/bench/, ports BENCH_PG_PORT=55442, BENCH_REDIS_PORT=56389),
#      so the shared servers are never touched; stock PostgreSQL settings;
#   3. for each run (3 by default; the table shows medians):
#        pgbench  the ceiling: the service's own insert statement, prepared, 8/16/32 clients
#        S1 idle        10,000 connections
#        S2 direct      2,000 users in DIRECT rooms, members on different instances, 2,000 msg/s, 60 s
#        S3 fan-out     1,000 users in GROUP rooms of 100, 100 msg/s (10,000 deliveries/s)
#        S4 saturation  DIRECT rate raised until a step is not held: any send
#                       refused, any loss, or p99 > 100 ms
#        overload       DIRECT at 3x the S4 rate of the same run
#        S6 storm       N clients connect (at most S6_CONCURRENCY=500 handshakes
#                       in flight) and each joins at once: half new DIRECT rooms
#                       by targetUserId, half rejoining with afterSequenceId and
#                       20 missed messages; for each N of S6_SIZES (2000,5000,10000)
#        S5             function cold starts and sizes, process start of each server
#        lambda         the deployed shape (scripts/lambda-local.sh): the five
#                       function binaries under `cargo lambda watch --release`
#                       behind `chat-local lambdas` and a relay; S2 and S3
#                       (scenarios LS2, LS3) through it and, with the same
#                       parameters, through the in-process stack, so the
#                       latency the Lambda hop adds shows side by side; each
#                       function's cold start through the Invoke API (first
#                       invocation of a fresh start, then a warm one); ws-message
#                       invocations/s. Not in the default set: --only lambda
#                       (or add it). Knobs: LAMBDA_S2_USERS (2000),
#                       LAMBDA_S2_RATE (2000), LAMBDA_S3_USERS (1000),
#                       LAMBDA_S3_GROUP (100), LAMBDA_S3_RATE (100), LAMBDA_SECS
#                       (S2's duration), BENCH_LAMBDA_CONCURRENCY (instances and
#                       reserved concurrency per function, 16), LAMBDA_CONNECT_RATE
#                       (connects per second in the set-up phase, 200); the
#                       set-up's handshakes, REST calls and joins in flight
#                       are held to BENCH_LAMBDA_CONCURRENCY in both shapes
#      each scenario against our stack (2 x `chat-local serve --no-relay` + 1 x
#      `chat-local relay`, release build) and against the baseline (2 Node.js
#      instances), each on a fresh start of its processes and emptied tables;
#   4. writes the JSON lines to .local/bench/<session>.jsonl and
#      docs/benchmarks/latest.jsonl, and the table to docs/BENCHMARKS.md
#      (with --no-docs: to .local/bench/<session>.md, docs/ untouched).
#
# --quick: one run, shorter scenarios and S6 at 2,000 only (a smoke test of
# the harness, ~15 min).
# --only (or SCENARIOS=...): the scenarios to run, comma-separated, in any
# case (`--only s4,s6`); S4 is needed for overload's rate.
# --no-docs: leave docs/ alone; the table goes to .local/bench/<session>.md
# (for probes and smoke tests, whose partial tables must not replace the
# session's).
# The baseline is bench/vendor/baseline (the original Node.js design, kept
# in the repository as it was), copied to .local/baseline and installed
# with `npm ci` when missing.
#
# The machine is shared: before each system's run the script waits (up to
# BENCH_QUIET_WAIT=120 s) for the load average to fall below
# BENCH_QUIET_LOAD=1.5, and records the load it started with in the JSON.
# Other knobs: BENCH_WORK (work directory), BENCH_BASELINE_DIR (installed
# baseline), BENCH_PG_POOL_MAX (24), BENCH_WORKER_THREADS (Tokio worker
# threads per server process of ours, 1), S4_OURS_RATES / S4_BASE_RATES (the
# sweeps), S6_SIZES (clients per storm, comma-separated), S6_CONCURRENCY
# (handshakes in flight, 500), S6_DEADLINE (seconds a client has to join, 60),
# S2_SECS / S3_SECS / S4_SECS / OVERLOAD_SECS (durations; 60/60/15/30),
# CARGO_TARGET_DIR.
# cluster (in --only, not in the default set): S2, S4 and S6 also run
# against our stack on a private 3-primary Redis Cluster
# (scripts/redis-cluster.sh, ports BENCH_CLUSTER_PORT=47101..+5; Redis needs a port under 55536 for the cluster bus at +10000, 3 replicas),
# labelled "cluster", in the same session, with each node's CPU watched.
# BENCH_BEFORE_DIR: a directory holding a `chat-local` built from an earlier
# commit (e.g. `git worktree add /tmp/before <commit>` and a release build
# there); S2 and S3 then also run against it, labelled "before", in the same
# session, and the page gets a table of this build beside it.
#
# Open files: the generator holds one socket per client and each server half
# of them, so the script raises its soft limit to the hard one and stops
# early when that is below the largest scenario's need.
#
# Not for CI: a full session takes about an hour and a half (S6 at 2,000,
# 5,000 and 10,000 adds about 8 minutes a run).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/services.sh
. "$ROOT/scripts/lib/services.sh"

RUNS=3
QUICK=0
DOCS=1
ONLY="${SCENARIOS:-pgbench,S1,S2,S3,S4,overload,S6,S5}"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; RUNS=1 ;;
        --runs) RUNS="$2"; shift ;;
        --only) ONLY="$2"; shift ;;
        --no-docs) DOCS=0 ;;
        -h|--help) sed -n '2,80p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
ONLY="$(printf '%s' "$ONLY" | tr '[:lower:]' '[:upper:]' | tr -d ' ')"
for s in ${ONLY//,/ }; do
    case "$s" in
        PGBENCH|S1|S2|S3|S4|OVERLOAD|S5|S6|LAMBDA|CLUSTER) ;;
        *) echo "--only: unknown scenario $s (pgbench, S1-S6, overload, lambda, cluster)" >&2; exit 2 ;;
    esac
done
wants() {
    local want
    want="$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')"
    case ",$ONLY," in *",$want,"*) return 0 ;; *) return 1 ;; esac
}

log() { printf '\033[1m[bench %s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

WORK="${BENCH_WORK:-$ROOT/.local/bench}"
mkdir -p "$WORK"
SESSION="$(date -u +%Y%m%dT%H%M%SZ)"
RESULTS="$WORK/$SESSION.jsonl"
: >"$RESULTS"
PG_PORT="${BENCH_PG_PORT:-55442}"
REDIS_PORT="${BENCH_REDIS_PORT:-56389}"
SECRET="bench-secret-$SESSION"
export JWT_SECRET="$SECRET"
BIN="$CARGO_TARGET_DIR/release"
BASELINE_DIR="${BENCH_BASELINE_DIR:-$ROOT/.local/baseline}"

# Durations (seconds) and rates.
if [ "$QUICK" = 1 ]; then
    S2_SECS=15; S3_SECS=15; S4_SECS=8; OVERLOAD_SECS=10; IDLE_HOLD=3; PGBENCH_SECS=5
    S6_SIZES="${S6_SIZES:-2000}"
else
    S2_SECS="${S2_SECS:-60}"; S3_SECS="${S3_SECS:-60}"; S4_SECS="${S4_SECS:-15}"
    OVERLOAD_SECS="${OVERLOAD_SECS:-30}"; IDLE_HOLD=10; PGBENCH_SECS=15
    S6_SIZES="${S6_SIZES:-2000,5000,10000}"
fi
S4_OURS_RATES="${S4_OURS_RATES:-1000,1500,2000,2500,3000,4000,5000,6000,6500,7000,7500,8000,8500,9000,10000}"
S4_BASE_RATES="${S4_BASE_RATES:-400,600,800,1000,1500,2000,2500,3000,3500,4000,5000}"
S6_CONCURRENCY="${S6_CONCURRENCY:-500}"
S6_DEADLINE="${S6_DEADLINE:-60}"
for n in ${S6_SIZES//,/ }; do
    case "$n" in
        *[!0-9]*|'') _svc_die "S6_SIZES: $n is not a number" ;;
    esac
    [ $((n % 4)) = 0 ] && [ "$n" -ge 4 ] || _svc_die "S6_SIZES: $n is not a multiple of 4 (direct and recovery pairs)"
done

# Every client is a socket in the generator (S1: 10,000; S6: the largest
# size), each server holds its share, and the limit is inherited by all of
# them from here. The soft limit goes up to the hard one; the hard one is
# the system's to raise (limits.conf, LimitNOFILE, the container runtime).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
need_files=0
wants S1 && need_files=10000
if wants S6; then
    for n in ${S6_SIZES//,/ }; do [ "$n" -gt "$need_files" ] && need_files="$n"; done
fi
need_files=$((need_files + 1024))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need_files" ]; then
    _svc_die "open files: the limit is $(ulimit -n) (hard $(ulimit -Hn)), the scenarios need about $need_files; raise the hard limit or run smaller S6_SIZES"
fi

# What the session needs besides cargo; each missing tool is named with where
# it comes from, before anything is built.
missing=()
for tool in psql pgbench redis-server redis-cli node npm jq curl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    _svc_die "scripts/bench.sh needs: ${missing[*]} (Debian: apt-get install postgresql postgresql-contrib redis-server nodejs npm jq curl)"
fi
[ -d "$ROOT/bench/vendor/baseline" ] || [ -d "$BASELINE_DIR/node_modules" ] ||
    _svc_die "the baseline is missing: expected bench/vendor/baseline (or BENCH_BASELINE_DIR)"

# ---------------------------------------------------------------------------
# Build

# The four function binaries are only for S5's cold starts.
BINARIES=(chat-local chat-bench)
wants S5 && BINARIES+=(rest ws-connect ws-message ws-disconnect)
if wants LAMBDA; then
    # cargo-lambda comes from PyPI (scripts/lib/pytools.sh); each function
    # is built alone, as `cargo lambda watch --release` runs it, so that no
    # invocation compiles.
    # shellcheck source=scripts/lib/pytools.sh
    . "$ROOT/scripts/lib/pytools.sh"
    ensure_pytools
    log "building the function binaries for the lambda scenario (release, one by one)"
    for f in rest ws-connect ws-message ws-disconnect maintenance; do
        cargo build --release -q --bin "$f"
    done
fi
log "building release binaries: ${BINARIES[*]} (a clean build takes ~9 min on 2 cores)"
PACKAGES=()
for b in "${BINARIES[@]}"; do PACKAGES+=(-p "$b"); done
cargo build --release -q "${PACKAGES[@]}"
# A copy: others may rebuild the shared target directory during the session.
mkdir -p "$WORK/bin"
for b in "${BINARIES[@]}"; do
    cp "$BIN/$b" "$WORK/bin/$b"
done
BIN="$WORK/bin"
BENCH="$BIN/chat-bench"
BEFORE_BIN=""
if [ -n "${BENCH_BEFORE_DIR:-}" ]; then
    [ -x "$BENCH_BEFORE_DIR/chat-local" ] ||
        _svc_die "BENCH_BEFORE_DIR=$BENCH_BEFORE_DIR holds no executable chat-local"
    BEFORE_BIN="$WORK/bin-before"
    mkdir -p "$BEFORE_BIN"
    cp "$BENCH_BEFORE_DIR/chat-local" "$BEFORE_BIN/chat-local"
fi

# The lambda scenario alone needs no baseline.
NEEDS_BASELINE=0
for s in ${ONLY//,/ }; do [ "$s" = LAMBDA ] || NEEDS_BASELINE=1; done
if [ "$NEEDS_BASELINE" = 1 ] && [ ! -d "$BASELINE_DIR/node_modules" ]; then
    log "installing the baseline into .local/baseline"
    rm -rf "$BASELINE_DIR"
    cp -r "$ROOT/bench/vendor/baseline" "$BASELINE_DIR"
    chmod -R u+w "$BASELINE_DIR"
    (cd "$BASELINE_DIR" && npm ci --silent)
fi

# ---------------------------------------------------------------------------
# Private PostgreSQL and Redis

PIDS_TO_STOP=()
LOAD_AT_START=""
CLUSTER_STARTED=0
CLUSTER_PORT="${BENCH_CLUSTER_PORT:-47101}"
cluster_ctl() {
    REDIS_CLUSTER_BASE_PORT="$CLUSTER_PORT" REDIS_CLUSTER_DIR="$WORK/redis-cluster" \
        "$ROOT/scripts/redis-cluster.sh" "$@"
}
cleanup() {
    local pid
    for pid in "${PIDS_TO_STOP[@]}"; do kill "$pid" 2>/dev/null || true; done
    stop_pg
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    if [ "$CLUSTER_STARTED" = 1 ]; then
        cluster_ctl stop >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

PG_BINDIR="$(_svc_pg_bindir)" || _svc_die "PostgreSQL server binaries not found (apt-get install postgresql)"
PG_DATA="$WORK/pg"
as_pg() { if _svc_is_root; then runuser -u postgres -- "$@"; else "$@"; fi; }
stop_pg() { as_pg "$PG_BINDIR/pg_ctl" -D "$PG_DATA" -m fast stop >/dev/null 2>&1 || true; }

start_services() {
    if [ ! -f "$PG_DATA/PG_VERSION" ]; then
        log "initdb $PG_DATA (stock settings)"
        mkdir -p "$PG_DATA"
        _svc_is_root && chown postgres:postgres "$PG_DATA"
        as_pg "$PG_BINDIR/initdb" -D "$PG_DATA" -U postgres -A trust >/dev/null
    fi
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT and redis-server on 127.0.0.1:$REDIS_PORT"
    as_pg "$PG_BINDIR/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w \
        -o "-p $PG_PORT -k /tmp -c listen_addresses=127.0.0.1" start >/dev/null
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize yes --dir "$WORK" --logfile "$WORK/redis.log"
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
}
PGURL="postgres://postgres@127.0.0.1:$PG_PORT"
psql_q() { psql "$PGURL/$1" -qAtX -v ON_ERROR_STOP=1 -c "$2"; }
fresh_db() {
    psql_q postgres "DROP DATABASE IF EXISTS $1" >/dev/null
    psql_q postgres "CREATE DATABASE $1" >/dev/null
}
start_services
fresh_db chat_bench
fresh_db peer_bench
fresh_db ceiling_bench

# ---------------------------------------------------------------------------
# The two systems

OURS_ENV=(
    DATABASE_URL="$PGURL/chat_bench"
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
    REDIS_KEY_PREFIX="bench:"
    BROADCAST_CHANNEL="bench:ours"
    JWT_SECRET="$SECRET"
    RUST_LOG=warn
    LOG_FORMAT=json
    PG_POOL_MAX="${BENCH_PG_POOL_MAX:-24}"
    # One runtime thread per process, as each baseline instance runs on one
    # JavaScript thread and as a container with one vCPU would pick: five
    # server processes share two cores here, and more threads per process
    # spent the CPU on cross-thread wakeups (docs/BENCHMARKS.md, "S4").
    TOKIO_WORKER_THREADS="${BENCH_WORKER_THREADS:-1}"
)
BASE_ENV=(
    DATABASE_URL="$PGURL/peer_bench"
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT/1"
    BROADCAST_CHANNEL="bench:peer"
    JWT_SECRET="$SECRET"
)
env "${OURS_ENV[@]}" "$BIN/chat-local" migrate >/dev/null 2>&1
env "${OURS_ENV[@]}" DATABASE_URL="$PGURL/ceiling_bench" "$BIN/chat-local" migrate >/dev/null 2>&1
OURS_URLS="http://127.0.0.1:4101,http://127.0.0.1:4102"
BASE_URLS="http://127.0.0.1:4201,http://127.0.0.1:4202"
SYSTEM_PIDS=()

wait_healthy() {
    local url
    for url in "$@"; do
        for _ in $(seq 300); do
            curl -fsS "$url/health" >/dev/null 2>&1 && continue 2
            sleep 0.1
        done
        _svc_die "$url/health never answered"
    done
}

# Empties a system's tables and checkpoints, so every run starts alike (the
# first write to each page after a checkpoint costs a full-page image).
empty_tables() {
    psql_q "$1" "TRUNCATE messages, room_members, rooms, users CASCADE" >/dev/null
    psql_q "$1" "CHECKPOINT" >/dev/null
}

# What else shares the cost of a message: PostgreSQL (the postmaster and its
# backends) and Redis, watched the same way for both systems.
shared_pids() {
    local pg redis
    pg="$(head -1 "$PG_DATA/postmaster.pid")"
    redis="$(redis-cli -p "$REDIS_PORT" info server | sed -nE 's/^process_id:([0-9]+).*/\1/p')"
    printf '%s\n' --pid-tree "postgres=$pg" --pid "redis=$redis"
}

# The box is shared: wait (up to BENCH_QUIET_WAIT seconds, 120 by default)
# for the 1-minute load average to drop below BENCH_QUIET_LOAD (1.5), and
# record the load each run started with.
wait_quiet() {
    local limit="${BENCH_QUIET_WAIT:-120}" waited=0 load
    while :; do
        load="$(cut -d' ' -f1 /proc/loadavg)"
        if awk -v l="$load" -v m="${BENCH_QUIET_LOAD:-1.5}" 'BEGIN { exit !(l < m) }' || [ "$waited" -ge "$limit" ]; then
            break
        fi
        [ "$waited" = 0 ] && log "waiting for a quieter machine (load $load)"
        sleep 5
        waited=$((waited + 5))
    done
    LOAD_AT_START="$load"
}

start_ours() {
    empty_tables chat_bench
    redis-cli -p "$REDIS_PORT" -n 0 flushdb >/dev/null
    env "${OURS_ENV[@]}" INSTANCE_ID=gw1 "$BIN/chat-local" serve --no-relay --no-migrate \
        --listen 127.0.0.1:4101 --management-listen 127.0.0.1:4111 >>"$WORK/ours-gw1.log" 2>&1 &
    SYSTEM_PIDS=($!)
    env "${OURS_ENV[@]}" INSTANCE_ID=gw2 "$BIN/chat-local" serve --no-relay --no-migrate \
        --listen 127.0.0.1:4102 --management-listen 127.0.0.1:4112 >>"$WORK/ours-gw2.log" 2>&1 &
    SYSTEM_PIDS+=($!)
    env "${OURS_ENV[@]}" INSTANCE_ID=relay \
        RELAY_ALLOWED_ENDPOINTS=http://127.0.0.1:4111/local,http://127.0.0.1:4112/local \
        "$BIN/chat-local" relay >>"$WORK/ours-relay.log" 2>&1 &
    SYSTEM_PIDS+=($!)
    PIDS_TO_STOP=("${SYSTEM_PIDS[@]}")
    wait_healthy http://127.0.0.1:4101 http://127.0.0.1:4102
    sleep 1
    mapfile -t extra < <(shared_pids)
    SYSTEM_ARGS=(--label ours --url "$OURS_URLS" --gateway-pid "${SYSTEM_PIDS[0]},${SYSTEM_PIDS[1]}"
        --pid "relay=${SYSTEM_PIDS[2]}" "${extra[@]}"
        --metrics-url http://127.0.0.1:4111/metrics --metrics-url http://127.0.0.1:4112/metrics)
}

# Ours on the private Redis Cluster (issue 18): the same processes and
# settings, REDIS_URL its seed list and REDIS_CLUSTER=true; every node (3
# primaries, 3 replicas) is watched on its own, so the report can give each
# node's share of the Redis CPU.
start_cluster() {
    local urls port pid node_args=()
    urls="$(cluster_ctl start)"
    CLUSTER_STARTED=1
    for port in $(seq "$CLUSTER_PORT" $((CLUSTER_PORT + 5))); do
        # Replicas refuse writes; their primaries' flush reaches them.
        redis-cli -p "$port" flushall >/dev/null 2>&1 || true
        pid="$(redis-cli -p "$port" info server | sed -nE 's/^process_id:([0-9]+).*/\1/p')"
        node_args+=(--pid "redis-$port=$pid")
    done
    local saved=("${OURS_ENV[@]}")
    OURS_ENV+=(REDIS_URL="$urls" REDIS_CLUSTER=true)
    start_ours
    OURS_ENV=("${saved[@]}")
    local pg
    pg="$(head -1 "$PG_DATA/postmaster.pid")"
    SYSTEM_ARGS=(--label cluster --url "$OURS_URLS" --gateway-pid "${SYSTEM_PIDS[0]},${SYSTEM_PIDS[1]}"
        --pid "relay=${SYSTEM_PIDS[2]}" --pid-tree "postgres=$pg" "${node_args[@]}"
        --metrics-url http://127.0.0.1:4111/metrics --metrics-url http://127.0.0.1:4112/metrics)
}

# An earlier build of our stack (BENCH_BEFORE_DIR), started exactly as ours.
start_before() {
    local saved="$BIN"
    BIN="$BEFORE_BIN"
    start_ours
    BIN="$saved"
    SYSTEM_ARGS[1]=before
}

start_baseline() {
    empty_tables peer_bench 2>/dev/null || true
    redis-cli -p "$REDIS_PORT" -n 1 flushdb >/dev/null
    (cd "$BASELINE_DIR" && env "${BASE_ENV[@]}" PORT=4201 INSTANCE_ID=peer-a node server.js \
        >>"$WORK/baseline-a.log" 2>&1) &
    SYSTEM_PIDS=($!)
    wait_healthy http://127.0.0.1:4201 # the first one applies the schema
    (cd "$BASELINE_DIR" && env "${BASE_ENV[@]}" PORT=4202 INSTANCE_ID=peer-b node server.js \
        >>"$WORK/baseline-b.log" 2>&1) &
    SYSTEM_PIDS+=($!)
    PIDS_TO_STOP=("${SYSTEM_PIDS[@]}")
    wait_healthy http://127.0.0.1:4202
    sleep 1
    # The subshells' children are the node processes.
    local a b
    a="$(pgrep -P "${SYSTEM_PIDS[0]}" node || echo "${SYSTEM_PIDS[0]}")"
    b="$(pgrep -P "${SYSTEM_PIDS[1]}" node || echo "${SYSTEM_PIDS[1]}")"
    SYSTEM_PIDS=("$a" "$b")
    PIDS_TO_STOP=("${SYSTEM_PIDS[@]}")
    mapfile -t extra < <(shared_pids)
    SYSTEM_ARGS=(--label baseline --url "$BASE_URLS" --gateway-pid "$a,$b" "${extra[@]}")
}

# The deployed shape: `cargo lambda watch` with the five functions, the
# emulators invoking them, a relay. Each start measures the cold starts
# through the Invoke API first, while no function has run yet.
LAMBDA_CONCURRENCY="${BENCH_LAMBDA_CONCURRENCY:-16}"
# The set-up phase's connects per second, for both shapes alike: at S2's
# 1,000/s the burst of $connect calls exceeds 16 instances and most are
# throttled (500), as Lambda would; the measured phase is the sends.
LAMBDA_CONNECT_RATE="${LAMBDA_CONNECT_RATE:-200}"
LAMBDA_WATCH_PID=""
start_lambda() {
    empty_tables chat_bench
    redis-cli -p "$REDIS_PORT" -n 0 flushdb >/dev/null
    # Its own process group: stopping it takes the function instances along.
    # (The script runs in $ROOT, the workspace cargo lambda watch needs.)
    env "${OURS_ENV[@]}" PG_POOL_MAX=2 BENCH_LAMBDA_SESSION="$SESSION" \
        RELAY_ALLOWED_ENDPOINTS=http://127.0.0.1:4311/local \
        setsid cargo lambda watch --release --ignore-changes --invoke-address 127.0.0.1 \
        --invoke-port 4399 --concurrency "$LAMBDA_CONCURRENCY" >>"$WORK/lambda-watch.log" 2>&1 &
    LAMBDA_WATCH_PID=$!
    for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/4399) 2>/dev/null && break; sleep 0.1; done
    log "lambda: cold starts through the Invoke API"
    env "${OURS_ENV[@]}" "$BENCH" lambda-cold-start --invoke-url http://127.0.0.1:4399 --out "$RESULTS" \
        --tag "session=$SESSION" --tag "run=$run" >/dev/null ||
        log "lambda: the cold-start measurement failed (see $WORK/lambda-watch.log)"
    env "${OURS_ENV[@]}" INSTANCE_ID=lambda "$BIN/chat-local" lambdas --listen 127.0.0.1:4301 \
        --management-listen 127.0.0.1:4311 --invoke-url http://127.0.0.1:4399 \
        --reserved-concurrency "$LAMBDA_CONCURRENCY" >>"$WORK/lambda-emulators.log" 2>&1 &
    SYSTEM_PIDS=($!)
    env "${OURS_ENV[@]}" INSTANCE_ID=relay RELAY_ALLOWED_ENDPOINTS=http://127.0.0.1:4311/local \
        "$BIN/chat-local" relay >>"$WORK/lambda-relay.log" 2>&1 &
    SYSTEM_PIDS+=($!)
    PIDS_TO_STOP=("${SYSTEM_PIDS[@]}" "$LAMBDA_WATCH_PID")
    wait_healthy http://127.0.0.1:4301
    sleep 1
    mapfile -t extra < <(shared_pids)
    SYSTEM_ARGS=(--label lambda --url http://127.0.0.1:4301 --gateway-pid "${SYSTEM_PIDS[0]}"
        --pid "relay=${SYSTEM_PIDS[1]}" --pid-tree "functions=$LAMBDA_WATCH_PID" "${extra[@]}"
        --metrics-url http://127.0.0.1:4311/metrics)
}

# Stops cargo lambda watch (and with it every function instance); any
# instance still left after 30 s is killed, found by the session mark in
# its environment.
stop_lambda_watch() {
    [ -n "$LAMBDA_WATCH_PID" ] || return 0
    local pgid dir
    pgid="$(ps -o pgid= -p "$LAMBDA_WATCH_PID" 2>/dev/null | tr -d ' ')"
    # Only its own group (setsid), never this script's.
    if [ "$pgid" = "$LAMBDA_WATCH_PID" ]; then
        kill -TERM -- "-$pgid" 2>/dev/null || true
    else
        kill -TERM "$LAMBDA_WATCH_PID" 2>/dev/null || true
    fi
    for _ in $(seq 300); do kill -0 "$LAMBDA_WATCH_PID" 2>/dev/null || break; sleep 0.1; done
    for dir in /proc/[0-9]*; do
        if { tr '\0' '\n' <"$dir/environ"; } 2>/dev/null | grep -qx "BENCH_LAMBDA_SESSION=$SESSION"; then
            kill -KILL "${dir#/proc/}" 2>/dev/null || true
        fi
    done
    LAMBDA_WATCH_PID=""
}

stop_system() {
    local pid
    for pid in "${SYSTEM_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${SYSTEM_PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    SYSTEM_PIDS=()
    PIDS_TO_STOP=()
    stop_lambda_watch
    # Let TIME_WAIT sockets and the page cache settle between systems.
    sleep 2
}

# Runs the generator against the running system; extra args follow.
bench_run() {
    local run="$1"
    shift
    "$BENCH" run "${SYSTEM_ARGS[@]}" --out "$RESULTS" --tag "session=$SESSION" --tag "run=$run" \
        --tag "load=$LOAD_AT_START" "$@" >/dev/null
}

# Runs scenario $2 against both systems, the order alternating between runs:
# `$2 RUN SYSTEM [the rest of the arguments]`.
both() {
    local run="$1" scenario="$2" system
    shift 2
    local order=(ours)
    # S2 and S3 also run against an earlier build, when there is one.
    if [ -n "$BEFORE_BIN" ] && { [ "$scenario" = s2 ] || [ "$scenario" = s3 ]; }; then
        order+=(before)
    fi
    # S2, S4 and S6 also run on the Redis Cluster, when asked for.
    if wants CLUSTER && { [ "$scenario" = s2 ] || [ "$scenario" = s4 ] || [ "$scenario" = s6 ]; }; then
        order+=(cluster)
    fi
    order+=(baseline)
    # The order alternates between runs.
    if [ $((run % 2)) = 0 ]; then
        local reversed=() i
        for ((i = ${#order[@]} - 1; i >= 0; i--)); do reversed+=("${order[i]}"); done
        order=("${reversed[@]}")
    fi
    for system in "${order[@]}"; do
        wait_quiet
        "start_$system"
        log "run $run: $scenario${*:+ $*} ($system)"
        "$scenario" "$run" "$system" "$@" || log "run $run: $scenario${*:+ $*} ($system) failed; continuing"
        stop_system
    done
}

# ---------------------------------------------------------------------------
# Scenarios (each takes the run number and the system name)

s1() { bench_run "$1" --scenario S1 --users 10000 --connect-rate 1000 --rooms none --idle-hold "$IDLE_HOLD"; }
s2() { bench_run "$1" --scenario S2 --users 2000 --rooms direct --rate 2000 --duration "$S2_SECS"; }
s3() { bench_run "$1" --scenario S3 --users 1000 --rooms group --group-size 100 --rate 100 --duration "$S3_SECS"; }
s4() {
    local rates="$S4_OURS_RATES"
    [ "$2" = baseline ] && rates="$S4_BASE_RATES"
    bench_run "$1" --scenario S4 --users 2000 --rooms direct --rate "$rates" --stop-p99-ms 100 \
        --duration "$S4_SECS" --warmup 2 --drain 5
}
overload() {
    local held
    held="$(jq -r --arg l "$2" --arg r "$1" \
        'select(.kind == "sweep" and .label == $l and (.run|tostring) == $r) | .highest_held' "$RESULTS" | tail -1)"
    if [ -z "$held" ] || [ "$held" = 0 ] || [ "$held" = null ]; then
        log "overload: no S4 result for $2 in run $1; skipped"
        return 0
    fi
    local rate=$((${held%.*} * 3))
    log "overload: $2 at 3 x $held = $rate msg/s"
    # The drain covers what an accepted message may wait: up to the
    # admission queue's bound (WS_MAX_QUEUE_WAIT_MS, 10 s) plus the fan-out
    # behind it (sends are refused once that is 5 s late).
    bench_run "$1" --scenario overload --users 2000 --rooms direct --rate "$rate" \
        --duration "$OVERLOAD_SECS" --drain 20
}

# S6: a reconnect storm of $3 clients (a fresh start of the system per size,
# so each size's peak memory is its own).
s6() {
    local run="$1" users="$3"
    "$BENCH" storm "${SYSTEM_ARGS[@]}" --out "$RESULTS" --tag "session=$SESSION" --tag "run=$run" \
        --tag "load=$LOAD_AT_START" --users "$users" --connect-concurrency "$S6_CONCURRENCY" \
        --deadline "$S6_DEADLINE" >/dev/null
}

# The lambda scenario: LS2 and LS3 against the Lambda shape and, with the
# same parameters, the in-process stack (label ours), each on a fresh start.
# The set-up's handshakes, REST calls and joins in flight stay within the
# reserved concurrency (--connect-concurrency, --setup-concurrency): a burst
# over it is throttled, a throttled $connect is refused with 500 and a
# throttled join gets API Gateway's "Internal server error" (issue 20: 128
# joins at once against 16 instances left 112 members out).
LAMBDA_SECS="${LAMBDA_SECS:-$S2_SECS}"
ls2() {
    bench_run "$1" --scenario LS2 --users "${LAMBDA_S2_USERS:-2000}" --rooms direct \
        --connect-rate "$LAMBDA_CONNECT_RATE" --connect-concurrency "$LAMBDA_CONCURRENCY" \
        --setup-concurrency "$LAMBDA_CONCURRENCY" \
        --rate "${LAMBDA_S2_RATE:-2000}" --duration "$LAMBDA_SECS"
}
ls3() {
    bench_run "$1" --scenario LS3 --users "${LAMBDA_S3_USERS:-1000}" --rooms group \
        --connect-rate "$LAMBDA_CONNECT_RATE" --connect-concurrency "$LAMBDA_CONCURRENCY" \
        --setup-concurrency "$LAMBDA_CONCURRENCY" \
        --group-size "${LAMBDA_S3_GROUP:-100}" --rate "${LAMBDA_S3_RATE:-100}" --duration "$LAMBDA_SECS"
}
lambda_pair() {
    local run="$1" scenario system
    for scenario in ls2 ls3; do
        for system in lambda ours; do
            wait_quiet
            "start_$system"
            log "run $run: $scenario ($system)"
            "$scenario" "$run" "$system" || log "run $run: $scenario ($system) failed; continuing"
            stop_system
        done
    done
}

pgbench_ceiling() {
    local run="$1" clients tps
    log "run $run: pgbench ceiling (the service's insert statement, prepared)"
    psql_q ceiling_bench "TRUNCATE messages, room_members, rooms, users CASCADE;
        INSERT INTO users (id, username) SELECT 'ceil-u' || g, 'ceil-u' || g FROM generate_series(0, 1999) g;
        INSERT INTO rooms (id, type, user1_id, user2_id)
            SELECT 'ceil-r' || g, 'DIRECT', 'ceil-u' || (2 * g), 'ceil-u' || (2 * g + 1)
              FROM generate_series(0, 999) g;
        INSERT INTO room_members (room_id, user_id)
            SELECT 'ceil-r' || g, 'ceil-u' || (2 * g + s) FROM generate_series(0, 999) g, generate_series(0, 1) s" >/dev/null
    psql_q ceiling_bench "VACUUM ANALYZE" >/dev/null
    # The service's own statement for a send stored alone (SINGLE_SQL), not a copy.
    "$BENCH" pgbench-script >"$WORK/store_message.sql"
    for clients in 8 16 32; do
        tps="$(pgbench -n -M prepared -c "$clients" -j 2 -T "$PGBENCH_SECS" -f "$WORK/store_message.sql" \
            "$PGURL/ceiling_bench" 2>/dev/null | sed -nE 's/^tps = ([0-9.]+).*/\1/p' | head -1)"
        log "  pgbench $clients clients: ${tps:-?} tx/s"
        [ -n "$tps" ] && printf '{"kind":"pgbench","session":"%s","run":%s,"clients":%s,"tps":%s}\n' \
            "$SESSION" "$run" "$clients" "$tps" >>"$RESULTS"
    done
}

s5() {
    local run="$1"
    log "run $run: S5 cold starts under the Lambda Runtime API emulator"
    env "${OURS_ENV[@]}" "$BENCH" cold-start --dir "$BIN" --runs 5 --secret "$SECRET" >>"$RESULTS"
    log "run $run: S5 process start to first /health (both servers)"
    empty_tables chat_bench
    env "${OURS_ENV[@]}" "$BENCH" process-start --label ours --runs 3 --url http://127.0.0.1:4101/health -- \
        "$BIN/chat-local" serve --no-relay --listen 127.0.0.1:4101 --management-listen 127.0.0.1:4111 >>"$RESULTS"
    (cd "$BASELINE_DIR" && env "${BASE_ENV[@]}" PORT=4201 "$BENCH" process-start --label baseline --runs 3 \
        --url http://127.0.0.1:4201/health -- node server.js) >>"$RESULTS"
}

# ---------------------------------------------------------------------------
# The session

log "session $SESSION: $RUNS run(s); results in $RESULTS"
for run in $(seq "$RUNS"); do
    if wants pgbench; then pgbench_ceiling "$run"; fi
    if wants S1; then both "$run" s1; fi
    if wants S2; then both "$run" s2; fi
    if wants S3; then both "$run" s3; fi
    if wants S4; then both "$run" s4; fi
    if wants overload; then both "$run" overload; fi
    if wants S6; then
        for n in ${S6_SIZES//,/ }; do both "$run" s6 "$n"; done
    fi
    if wants S5; then s5 "$run"; fi
    if wants LAMBDA; then lambda_pair "$run"; fi
done

{
    echo "Session \`$SESSION\` ($RUNS run(s)$([ "$QUICK" = 1 ] && echo ', --quick')), commit \`$(git rev-parse --short HEAD)\`,"
    echo "$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r), PostgreSQL $(psql_q postgres 'SHOW server_version'),"
    echo "Redis $(redis-server --version | sed -nE 's/.*v=([0-9.]+).*/\1/p'), Node.js $(node --version 2>/dev/null || echo 'not installed'). Medians of the runs;"
    if [ "$DOCS" = 1 ]; then
        echo "raw JSON lines in [\`docs/benchmarks/latest.jsonl\`](benchmarks/latest.jsonl)."
    else
        echo "raw JSON lines in \`$RESULTS\`."
    fi
} >"$WORK/preamble.md"
if [ "$DOCS" = 1 ]; then
    mkdir -p "$ROOT/docs/benchmarks"
    cp "$RESULTS" "$ROOT/docs/benchmarks/latest.jsonl"
    "$BENCH" report --input "$RESULTS" --output "$ROOT/docs/BENCHMARKS.md" --preamble "$WORK/preamble.md"
    log "done: docs/BENCHMARKS.md"
else
    "$BENCH" report --input "$RESULTS" --output "$WORK/$SESSION.md" --preamble "$WORK/preamble.md"
    log "done: $WORK/$SESSION.md and $RESULTS (docs/ left alone: --no-docs)"
fi
