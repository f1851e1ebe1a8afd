#!/usr/bin/env bash
# schemathesis against the local stack: generates requests from the served
# OpenAPI description (GET /api/v1/openapi.json) for every operation, and
# fails on any 5xx or any response that does not conform to the description.
#
#   scripts/schemathesis.sh                         # ST_MAX_EXAMPLES (30) per operation
#   ST_MAX_EXAMPLES=200 scripts/schemathesis.sh     # a longer run
#   ST_SEED=123 scripts/schemathesis.sh             # replay a run
#
# What it sets up, all private to this run and removed at exit:
#   - a database chat_st_<random> on the PostgreSQL that scripts/lib/services.sh
#     finds (DATABASE_URL), migrated by `chat-local serve` at start-up;
#   - a Redis key prefix and bus channel st:<random>: on REDIS_URL;
#   - `chat-local serve` (debug build) on a free 127.0.0.1 port, with a random
#     JWT_SECRET; its log goes to a temp file, printed on failure;
#   - users st-alice (admin, the caller), st-bob and st-carol, and a GROUP
#     room of theirs, so that room routes are exercised with a real room
#     (about half the time) as well as generated room ids.
# schemathesis comes from PyPI into the venv of scripts/lib/pytools.sh
# (shared with other tools; created when missing). One worker: with two,
# hypothesis (4.32.5's) sometimes fails inside its own lambda-description
# cache, a tool error that says nothing about the service.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/services.sh
. "$ROOT/scripts/lib/services.sh"
# shellcheck source=scripts/lib/pytools.sh
. "$ROOT/scripts/lib/pytools.sh"

SCHEMATHESIS_VERSION="4.32.5"
MAX_EXAMPLES="${ST_MAX_EXAMPLES:-30}"

ensure_rust
ensure_services

# ---------------------------------------------------------------------------
# schemathesis, in the shared venv
step "schemathesis: schemathesis $SCHEMATHESIS_VERSION in $PYTOOLS_VENV"
ensure_pytool schemathesis "$SCHEMATHESIS_VERSION"

# ---------------------------------------------------------------------------
# the local stack
step "schemathesis: building chat-local (debug)"
cargo build --quiet -p chat-local
BIN="$CARGO_TARGET_DIR/debug/chat-local"

WORK="$(mktemp -d)"
RUN_ID="$(tr -dc 'a-z0-9' </dev/urandom | head -c 10 || true)"
DB="chat_st_$RUN_ID"
PREFIX="st:$RUN_ID:"
SERVER_PID=""

cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    psql "$DATABASE_URL" -X -w -q -c "DROP DATABASE IF EXISTS \"$DB\"" >/dev/null 2>&1 || true
    # Remove this run's Redis keys (never anyone else's: they all carry the prefix).
    redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}*" 2>/dev/null |
        xargs -r -n 100 redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

psql "$DATABASE_URL" -X -w -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$DB\"" >/dev/null
DB_URL="$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$DATABASE_URL" "$DB")"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:$PORT"

export DATABASE_URL="$DB_URL"
export REDIS_KEY_PREFIX="$PREFIX"
export BROADCAST_CHANNEL="${PREFIX}broadcast"
JWT_SECRET="$(tr -dc 'A-Za-z0-9' </dev/urandom | head -c 40 || true)"
export JWT_SECRET
export INSTANCE_ID="schemathesis"
# One caller sends every request: per-user rate limits would turn most of
# them into 429s (documented, so they would pass, but test nothing).
export RATE_LIMIT_PER_SEC=0 REST_RATE_LIMIT_PER_SEC=0
export RUST_LOG="${ST_RUST_LOG:-warn}"
export LOG_FORMAT=pretty

step "schemathesis: starting chat-local serve on $BASE (database $DB, Redis prefix $PREFIX)"
"$BIN" serve --listen "127.0.0.1:$PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
    if curl -fsS "$BASE/health" >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        cat "$WORK/server.log" >&2
        echo "schemathesis: chat-local serve exited" >&2
        exit 1
    fi
    sleep 0.2
done
curl -fsS "$BASE/health" >/dev/null

token() { "$BIN" token "$@" --ttl 3600; }
ALICE="$(token st-alice --admin --display-name "St Alice")"
api() {
    # api METHOD PATH TOKEN [BODY]
    curl -fsS -X "$1" -H "Authorization: Bearer $3" -H 'Content-Type: application/json' \
        ${4:+--data "$4"} "$BASE/api/v1/chat$2"
}
for user in st-bob st-carol; do
    api GET /rooms "$(token "$user")" >/dev/null
done
ROOM="$(api POST /rooms "$ALICE" '{"type":"GROUP","name":"schemathesis","memberIds":["st-bob","st-carol"]}' |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["room"]["id"])')"
api POST "/rooms/$ROOM/messages" "$ALICE" '{"content":"seed message"}' >/dev/null

cat >"$WORK/schemathesis.toml" <<EOF
# Real values beside generated ones, so that success paths are checked too.
[dictionaries.rooms]
values = ["$ROOM"]

[dictionaries.users]
values = ["st-bob", "st-carol", "st-alice"]

[parameters]
"path.roomId" = { dictionary = "rooms", probability = 0.5 }
"path.userId" = { dictionary = "users", probability = 0.5 }
"body.targetUserId" = { dictionary = "users", probability = 0.5 }
"body.memberIds[*]" = { dictionary = "users", probability = 0.5 }
"body.userIds[*]" = { dictionary = "users", probability = 0.5 }
EOF

step "schemathesis: run against $BASE/api/v1/openapi.json (checks not_a_server_error, response_schema_conformance; $MAX_EXAMPLES examples per operation)"
status=0
(
    cd "$WORK"
    "$PYTOOLS_VENV/bin/schemathesis" --config-file "$WORK/schemathesis.toml" --no-color run \
        "$BASE/api/v1/openapi.json" \
        --checks not_a_server_error,response_schema_conformance \
        --header "Authorization: Bearer $ALICE" \
        --max-examples "$MAX_EXAMPLES" \
        --workers 1 \
        --request-timeout 10 \
        --suppress-health-check all \
        ${ST_SEED:+--seed "$ST_SEED"}
) || status=$?

# A 5xx is also logged by the service ("internal error" / "dependency
# unavailable"): none may appear, whatever schemathesis made of it.
if grep -E "internal error|dependency unavailable|panicked" "$WORK/server.log" >&2; then
    echo "schemathesis: the service logged server errors (above)" >&2
    status=1
fi
if [ "$status" != 0 ]; then
    echo "--- chat-local serve log (last 80 lines) ---" >&2
    tail -n 80 "$WORK/server.log" >&2
    echo "schemathesis: FAILED" >&2
    exit "$status"
fi
echo "schemathesis: passed" >&2
