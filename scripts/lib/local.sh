# shellcheck shell=bash
# What the scripts that run the stack locally share (scripts/dev.sh,
# scripts/multi-local.sh, scripts/lambda-local.sh): the development
# environment, and a supervisor for the processes they start.
#
# It sources scripts/lib/services.sh. Set LOCAL_NAME (the log prefix) and,
# before local_start, LOCAL_LOG_DIR.

# shellcheck source=scripts/lib/services.sh
. "$(dirname "${BASH_SOURCE[0]}")/services.sh"

local_log() { printf '%s: %s\n' "${LOCAL_NAME:-local}" "$*" >&2; }

# Rust, PostgreSQL and Redis (scripts/lib/services.sh); unless DATABASE_URL
# was given, the stack's tables go into a database of their own, `chat`,
# not the server's default one; a development JWT_SECRET when none is set.
local_dev_env() {
    ensure_rust
    local user_database_url="${DATABASE_URL:-}"
    ensure_services
    if [ -z "$user_database_url" ]; then
        if ! psql "$DATABASE_URL" -tAc "SELECT 1 FROM pg_database WHERE datname = 'chat'" | grep -q 1; then
            psql "$DATABASE_URL" -qc 'CREATE DATABASE chat' >/dev/null
            local_log "created database 'chat'"
        fi
        export DATABASE_URL="${DATABASE_URL%/*}/chat"
    fi
    if [ -z "${JWT_SECRET:-}" ]; then
        export JWT_SECRET=dev-secret-change-me
        local_log "JWT_SECRET was not set; using the development value 'dev-secret-change-me'"
    fi
}

# The supervised processes, in start order.
LOCAL_PIDS=()
LOCAL_NAMES=()
LOCAL_STOPPING=0

# local_start NAME CMD...: starts CMD with INSTANCE_ID=NAME, its output in
# $LOCAL_LOG_DIR/NAME.log, as the leader of a process group of its own
# (setsid), so that stopping it stops what it started too (cargo lambda
# watch's function instances).
local_start() {
    local name="$1"
    shift
    INSTANCE_ID="$name" setsid "$@" >"$LOCAL_LOG_DIR/$name.log" 2>&1 </dev/null &
    LOCAL_PIDS+=("$!")
    LOCAL_NAMES+=("$name")
}

# _local_await_gone TENTHS TARGET...: waits up to TENTHS tenths of a second
# until no TARGET (a pid, or -PID for its whole process group) is left.
_local_await_gone() {
    local tenths="$1" target alive
    shift
    for _ in $(seq 1 "$tenths"); do
        alive=0
        for target in "$@"; do
            kill -0 -- "$target" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
}

# local_stop_all [FIRST]: SIGTERM to every process group (to FIRST alone
# first, given up to 5 s to finish, when named), up to 15 s to drain, then
# SIGKILL to what is left. Runs once.
local_stop_all() {
    [ "$LOCAL_STOPPING" = 1 ] && return
    LOCAL_STOPPING=1
    trap - INT TERM
    local_log "stopping ${LOCAL_NAMES[*]}"
    local pid i first=()
    if [ -n "${1:-}" ]; then
        for i in "${!LOCAL_NAMES[@]}"; do
            [ "${LOCAL_NAMES[$i]}" = "$1" ] && first+=("${LOCAL_PIDS[$i]}")
        done
        for pid in "${first[@]}"; do
            kill -TERM -- "-$pid" 2>/dev/null || true
        done
        _local_await_gone 50 "${first[@]}"
    fi
    for pid in "${LOCAL_PIDS[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    _local_await_gone 150 "${LOCAL_PIDS[@]/#/-}"
    for pid in "${LOCAL_PIDS[@]}"; do
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    local_log "stopped"
}

# local_trap [FIRST]: ctrl-c, SIGTERM and the script's end stop everything.
local_trap() {
    # shellcheck disable=SC2064 # FIRST is fixed now, on purpose.
    trap "local_stop_all ${1:-}; exit 130" INT
    # shellcheck disable=SC2064
    trap "local_stop_all ${1:-}; exit 143" TERM
    # shellcheck disable=SC2064
    trap "local_stop_all ${1:-}" EXIT
}

# local_fail WHAT NAME: the error WHAT, the end of NAME's log, exit 1.
local_fail() {
    local_log "error: $1; the end of $LOCAL_LOG_DIR/$2.log:"
    tail -n 30 "$LOCAL_LOG_DIR/$2.log" >&2 || true
    exit 1
}

# local_logs_line: the "logs" line of a ready banner.
local_logs_line() {
    local IFS=,
    printf '  logs       %s/{%s}.log\n' "$LOCAL_LOG_DIR" "${LOCAL_NAMES[*]}"
}

# Runs until ctrl-c, or until one process dies (then the rest are stopped
# too, by the EXIT trap, and its log is shown).
local_wait() {
    local status i
    set +e
    wait -n "${LOCAL_PIDS[@]}"
    status=$?
    set -e
    if [ "$LOCAL_STOPPING" = 0 ]; then
        for i in "${!LOCAL_PIDS[@]}"; do
            if ! kill -0 "${LOCAL_PIDS[$i]}" 2>/dev/null; then
                local_log "error: ${LOCAL_NAMES[$i]} exited (status $status); its log:"
                tail -n 20 "$LOCAL_LOG_DIR/${LOCAL_NAMES[$i]}.log" >&2 || true
            fi
        done
        exit 1
    fi
}
