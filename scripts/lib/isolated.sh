# shellcheck shell=bash
# A private world for a script that tests processes end to end
# (scripts/test-multi-local.sh, scripts/test-lambda-local.sh): its own
# database, Redis key prefix and channel and JWT secret on the shared
# servers, dropped again at the end, free ports, and the failure report.
#
# Source it after scripts/lib/services.sh and ensure_services.

# isolated_env NAME: exports DATABASE_URL (a database chat_test_NAME_<suffix>
# that isolated_create_db creates), REDIS_KEY_PREFIX (NAME:<suffix>:),
# BROADCAST_CHANNEL and JWT_SECRET; sets ISOLATED_SUFFIX, ISOLATED_DB and
# ISOLATED_ADMIN_URL (the server's own URL).
isolated_env() {
    ISOLATED_SUFFIX="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
    ISOLATED_DB="chat_test_$1_$ISOLATED_SUFFIX"
    ISOLATED_ADMIN_URL="$DATABASE_URL"
    export DATABASE_URL="${ISOLATED_ADMIN_URL%/*}/$ISOLATED_DB"
    export REDIS_KEY_PREFIX="$1:$ISOLATED_SUFFIX:"
    export BROADCAST_CHANNEL="${REDIS_KEY_PREFIX}broadcast"
    export JWT_SECRET="$1-$ISOLATED_SUFFIX"
}

isolated_create_db() {
    psql "$ISOLATED_ADMIN_URL" -X -q -c "CREATE DATABASE $ISOLATED_DB" >/dev/null
}

# Drops the database and deletes the keys (for the EXIT trap).
isolated_drop() {
    psql "$ISOLATED_ADMIN_URL" -X -q -c "DROP DATABASE IF EXISTS $ISOLATED_DB WITH (FORCE)" >/dev/null 2>&1 || true
    redis-cli -u "$REDIS_URL" --scan --pattern "${REDIS_KEY_PREFIX}*" | xargs -r -n 500 redis-cli -u "$REDIS_URL" DEL >/dev/null
}

# isolated_fail PREFIX LINES MESSAGE FILES...: "PREFIX: FAILED: MESSAGE",
# the last LINES lines of each FILE that exists, exit 1.
isolated_fail() {
    local prefix="$1" lines="$2" message="$3" f
    shift 3
    echo "$prefix: FAILED: $message" >&2
    for f in "$@"; do
        [ -f "$f" ] || continue
        echo "--- $f (tail)" >&2
        tail -n "$lines" "$f" >&2
    done
    exit 1
}

# port_free PORT: true when nothing listens on 127.0.0.1:PORT.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# isolated_ports SPAN OFFSET...: prints a port BASE, picked at random from
# 20000 to 20000 + SPAN - 1, such that BASE + each OFFSET is free (50
# tries); fails when none was found.
isolated_ports() {
    local span="$1" candidate offset ok
    shift
    for _ in $(seq 1 50); do
        candidate=$((20000 + RANDOM % span))
        ok=1
        for offset in "$@"; do
            port_free $((candidate + offset)) || { ok=0; break; }
        done
        if [ "$ok" = 1 ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# isolated_interrupt PID NAME SECONDS PORT...: stops the script NAME (PID)
# as ctrl-c does, SIGINT to its process group, and checks that it exits
# within SECONDS, that nothing of its process group outlives it and that
# no PORT still answers; otherwise calls the sourcing script's `fail`.
isolated_interrupt() {
    local pid="$1" name="$2" seconds="$3" port
    shift 3
    kill -INT -- "-$pid"
    for _ in $(seq 1 $((seconds * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && fail "$name still running $seconds s after SIGINT"
    wait "$pid" 2>/dev/null || true
    for port in "$@"; do
        port_free "$port" || fail "port $port still answers after stopping"
    done
    if pgrep -g "$pid" >/dev/null; then
        fail "processes of $name outlived it: $(pgrep -a -g "$pid")"
    fi
}
