#!/usr/bin/env bash
# The deployed shape on this machine, without Docker: what `sam local` would
# be for this WebSocket API (SAM's local tooling cannot run WebSocket APIs).
#
#   * the five function binaries (functions/rest, ws-connect, ws-message,
#     ws-disconnect, maintenance) under `cargo lambda watch`, which emulates
#     the Lambda Runtime API and serves the Lambda Invoke API;
#   * `chat-local lambdas` in front of them: the API Gateway WebSocket
#     emulator (its $connect/$default/$disconnect integrations invoke
#     ws-connect/ws-message/ws-disconnect) and an HTTP API emulator (payload
#     format 2.0: /health and /api/v1/* invoke rest), plus the console;
#   * the relay (`chat-local relay`), pushing to clients through the
#     emulator's Management API with the AWS SDK, as the ECS service does;
#   * the maintenance function, invoked every LAMBDA_MAINTENANCE_SECS, as the
#     EventBridge schedule does;
#   * PostgreSQL and Redis found or started as scripts/dev.sh does.
#
# Same URLs as scripts/dev.sh: REST and WebSocket on PORT (3000), the console
# at /console, the Management API and /metrics on PORT + 100. Logs go to
# LAMBDA_LOG_DIR, outside the repository (cargo lambda watch rebuilds on any
# change in it). ctrl-c (or SIGTERM) stops everything.
#
#   scripts/lambda-local.sh
#
# Environment: what scripts/dev.sh takes (DATABASE_URL, REDIS_URL,
# JWT_SECRET, PORT, RUST_LOG, DEV_TOKENS, RELEASE=1, ...), passed to every
# process, plus:
#   LAMBDA_INVOKE_PORT       the Invoke API's port (default PORT + 6000)
#   LAMBDA_CONCURRENCY       instances per function and reserved concurrency
#                            (default 4): more invocations at once are
#                            throttled ("Internal server error"), as in Lambda
#   LAMBDA_FUNCTION_TIMEOUT_SECS  a function's timeout (default 10, as deployed)
#   LAMBDA_MAINTENANCE_SECS  how often maintenance runs (default 60; 0: never)
#   LAMBDA_WATCH=1           rebuild and restart a function when its code
#                            changes (default: off, the binaries stay as built)
#   LAMBDA_FEATURES          cargo features for the function binaries (the
#                            tests use `test-panic`; never for real use)
#   LAMBDA_LOG_DIR           where the logs go (default
#                            ${TMPDIR:-/tmp}/chat-lambda-local-<port>)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/pytools.sh
. "$ROOT/scripts/lib/pytools.sh"
# shellcheck source=scripts/lib/local.sh
. "$ROOT/scripts/lib/local.sh" # and scripts/lib/services.sh
LOCAL_NAME=lambda-local

case "${1:-}" in
"") ;;
-h | --help)
    sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "usage: scripts/lambda-local.sh   (settings are environment variables; see --help)" >&2
    exit 2
    ;;
esac

port="${PORT:-3000}"
management_port=$((port + 100))
invoke_port="${LAMBDA_INVOKE_PORT:-$((port + 6000))}"
concurrency="${LAMBDA_CONCURRENCY:-4}"
function_timeout="${LAMBDA_FUNCTION_TIMEOUT_SECS:-10}"
maintenance_secs="${LAMBDA_MAINTENANCE_SECS:-60}"
LOCAL_LOG_DIR="${LAMBDA_LOG_DIR:-${TMPDIR:-/tmp}/chat-lambda-local-$port}"
case "$LOCAL_LOG_DIR" in
"$ROOT" | "$ROOT"/*)
    local_log "error: LAMBDA_LOG_DIR=$LOCAL_LOG_DIR is inside the repository, which cargo lambda watch watches; pick a directory outside it"
    exit 2
    ;;
esac
functions=(rest ws-connect ws-message ws-disconnect maintenance)

local_dev_env
# cargo-lambda comes from PyPI, into the venv of scripts/lib/pytools.sh.
ensure_pytools
command -v cargo-lambda >/dev/null 2>&1 ||
    { local_log "error: cargo-lambda is not on PATH after installing it (see scripts/requirements-deploy.txt)"; exit 1; }

profile=debug
cargo_profile=()
if [ "${RELEASE:-0}" = 1 ]; then
    profile=release
    cargo_profile=(--release)
fi
features=()
[ -n "${LAMBDA_FEATURES:-}" ] && features=(--features "$LAMBDA_FEATURES")
# Each binary is built alone, as `cargo lambda watch` runs it (`cargo run
# --bin NAME`), so that its first invocation does not compile anything.
local_log "building chat-local and the function binaries ($profile${LAMBDA_FEATURES:+, features $LAMBDA_FEATURES})"
cargo build -q "${cargo_profile[@]}" -p chat-local
for f in "${functions[@]}"; do
    cargo build -q "${cargo_profile[@]}" --bin "$f" "${features[@]}"
done
bin="$CARGO_TARGET_DIR/$profile/chat-local"

local_log "applying migrations"
"$bin" migrate >/dev/null

mkdir -p "$LOCAL_LOG_DIR"
# The emulators stop first: each socket closes with 1001 and its
# $disconnect is invoked while the functions still run.
local_trap emulators

# The functions: what template.yaml gives them, plus where the maintenance
# function may close connections (the emulator's Management API).
allowed="http://127.0.0.1:$management_port/${GATEWAY_STAGE:-local}"
watch=(cargo lambda watch --invoke-address 127.0.0.1 --invoke-port "$invoke_port"
    --concurrency "$concurrency" "${cargo_profile[@]}" "${features[@]}")
[ "${LAMBDA_WATCH:-0}" = 1 ] || watch+=(--ignore-changes)
PG_POOL_MAX="${PG_POOL_MAX:-2}" RELAY_ALLOWED_ENDPOINTS="${RELAY_ALLOWED_ENDPOINTS:-$allowed}" \
    local_start lambdas "${watch[@]}"
for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$invoke_port") 2>/dev/null && break
    kill -0 "${LOCAL_PIDS[0]}" 2>/dev/null || local_fail "cargo lambda watch exited" lambdas
    sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$invoke_port") 2>/dev/null ||
    local_fail "cargo lambda watch does not listen on $invoke_port after 30 s" lambdas

dev_tokens=()
if [ "${DEV_TOKENS:-1}" != 0 ]; then
    dev_tokens=(--dev-tokens)
fi
local_start emulators "$bin" lambdas --listen "127.0.0.1:$port" --management-listen "127.0.0.1:$management_port" \
    --invoke-url "http://127.0.0.1:$invoke_port" --reserved-concurrency "$concurrency" \
    --function-timeout "$function_timeout" "${dev_tokens[@]}"
RELAY_ALLOWED_ENDPOINTS="${RELAY_ALLOWED_ENDPOINTS:-$allowed}" local_start relay "$bin" relay

invoke() { # invoke FUNCTION JSON: one synchronous invocation through the Invoke API
    curl -sS --max-time 120 -X POST -H 'content-type: application/json' --data "$2" \
        "http://127.0.0.1:$invoke_port/2015-03-31/functions/$1/invocations"
}

# Ready when /health answers ok through the HTTP API emulator: rest has
# started (its cold start) and reaches PostgreSQL and Redis.
ok=0
for _ in $(seq 1 600); do
    if curl -fsS "http://127.0.0.1:$port/health" 2>/dev/null | grep -q '"status":"ok"'; then
        ok=1
        break
    fi
    for i in "${!LOCAL_NAMES[@]}"; do
        kill -0 "${LOCAL_PIDS[$i]}" 2>/dev/null || local_fail "${LOCAL_NAMES[$i]} exited" "${LOCAL_NAMES[$i]}"
    done
    sleep 0.1
done
[ "$ok" = 1 ] || local_fail "GET /health through the HTTP API emulator is not ok after 60 s" lambdas

# Start the other functions now (each one's cold start), rather than on a
# user's first message: a handshake without a token (ws-connect refuses
# it), a message and a disconnect of a connection that does not exist (no
# domainName: nothing is published), and one maintenance run.
code="$(curl -s -o /dev/null -w '%{http_code}' -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
    -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: bGFtYmRhLWxvY2FsLXdhcm0=' \
    "http://127.0.0.1:$port/ws")"
[ "$code" = 401 ] || local_fail "a handshake without a token got $code through ws-connect, not 401" lambdas
context='"stage":"local","connectionId":"warmup-00000000=","requestId":"warmup","apiId":"local","connectedAt":0,"requestTimeEpoch":0,"identity":{"sourceIp":"127.0.0.1"}'
warm() { # warm FUNCTION EVENT PATTERN: one invocation whose answer must match PATTERN
    local answer
    answer="$(invoke "$1" "$2" 2>&1)" || local_fail "$1 did not answer its warm-up invocation: $answer" lambdas
    grep -q -- "$3" <<<"$answer" || local_fail "$1 answered its warm-up invocation with $answer" lambdas
}
warm ws-message "{\"requestContext\":{\"routeKey\":\"\$default\",\"eventType\":\"MESSAGE\",\"messageId\":\"warmup\",$context},\"body\":\"{\\\"type\\\":\\\"ping\\\",\\\"payload\\\":{}}\",\"isBase64Encoded\":false}" '"statusCode":200'
warm ws-disconnect "{\"headers\":{},\"requestContext\":{\"routeKey\":\"\$disconnect\",\"eventType\":\"DISCONNECT\",\"disconnectStatusCode\":1000,\"disconnectReason\":\"warm-up\",$context},\"isBase64Encoded\":false}" '"statusCode":200'
warm maintenance '{}' '"sweptConnections"'

# The EventBridge schedule of template.yaml (rate(1 minute)).
if [ "$maintenance_secs" != 0 ]; then
    local_start maintenance bash -c '
        while sleep "$1"; do
            printf "%s " "$(date -u +%FT%TZ)"
            curl -sS --max-time 120 -X POST -H "content-type: application/json" --data "{}" "$2" || true
            echo
        done' maintenance-schedule "$maintenance_secs" \
        "http://127.0.0.1:$invoke_port/2015-03-31/functions/maintenance/invocations"
fi

console=""
if [ "${DEV_TOKENS:-1}" != 0 ]; then
    console="
  dev tokens are ON: anyone who reaches port $port can sign in as any user, admin included (DEV_TOKENS=0 turns them off)"
fi
{
    cat <<EOF
lambda-local: ready: API Gateway emulators -> Lambda Invoke API (cargo lambda watch) -> ${functions[*]}
  REST       http://127.0.0.1:$port/api/v1/chat   (HTTP API, payload 2.0 -> rest)
  health     http://127.0.0.1:$port/health
  WebSocket  ws://127.0.0.1:$port/ws?token=...   (chat-local chat USER; \$connect/\$default/\$disconnect -> ws-connect/ws-message/ws-disconnect)
  console    http://127.0.0.1:$port/console (ops view: /console/ops)$console
  internal   http://127.0.0.1:$management_port   (Management API with SigV4, the relay's target; /metrics with chat_lambda_* per function)
  Invoke API http://127.0.0.1:$invoke_port/2015-03-31/functions/NAME/invocations   ($concurrency instances and reserved concurrency per function)
EOF
    local_logs_line
    echo "  ctrl-c stops everything"
} >&2

local_wait
