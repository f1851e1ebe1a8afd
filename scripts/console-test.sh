#!/usr/bin/env bash
# Browser tests of the developer console (/console, /console/ops): Debian's
# chromium driven by playwright-core (console-tests/), against a local stack
# this script starts and stops.
#
#   scripts/console-test.sh             # what scripts/test.sh (and so CI) runs
#   ARTIFACTS_DIR=/tmp/shots scripts/console-test.sh
#
# It installs what is missing (chromium with apt-get when root, else prints
# what to install; the npm packages with `npm ci`, cached in
# ~/.cache/chat-backend/npm), checks that the console's copy of the client
# library (local/console/vendor/chat-client) is a fresh build of
# clients/typescript (scripts/build-console-lib.sh --check), builds
# chat-local (debug, the shared target dir), starts
# `chat-local serve --dev-tokens` on a free port with a private database
# (chat_test_console_*), a private Redis key prefix and channel and
# MESSAGE_RETENTION=60 and the rate limits off (a test sends 70 messages
# at once to simulate a long outage), runs the tests, and cleans all of that up. The
# screenshots, and the stack's log, land in ARTIFACTS_DIR (default
# .local/console-artifacts, ignored by git).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/services.sh
. "$ROOT/scripts/lib/services.sh"

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
ARTIFACTS_DIR="${ARTIFACTS_DIR:-$ROOT/.local/console-artifacts}"
mkdir -p "$ARTIFACTS_DIR"
ARTIFACTS_DIR="$(cd "$ARTIFACTS_DIR" && pwd)"
NPM_CACHE="${NPM_CACHE:-${HOME:-/tmp}/.cache/chat-backend/npm}"
RETENTION=60

ensure_chromium() {
    [ -x "$CHROMIUM" ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "console-test: installing Debian's chromium (once)" >&2
        apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2 || die "apt-get install chromium failed"
        [ -x "$CHROMIUM" ] || die "chromium installed, but $CHROMIUM is missing"
        return 0
    fi
    die "chromium is missing. Install Debian's package (sudo apt-get install chromium), or set CHROMIUM to a Chromium binary. Tests never download a browser."
}

ensure_node() {
    local major
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        die "node and npm are missing. Install Node.js 20 or newer with npm (e.g. the nodejs package from NodeSource), then run this again."
    fi
    major="$(node -p 'process.versions.node.split(".")[0]')"
    [ "$major" -ge 20 ] || die "Node.js $(node --version) is too old; playwright-core needs 20 or newer."
}

step "checking chromium, node and the services"
ensure_rust
ensure_chromium
ensure_node
ensure_services
echo "console-test: $("$CHROMIUM" --version 2>/dev/null | head -1), node $(node --version)" >&2

step "the console's copy of the client library (local/console/vendor/chat-client) matches clients/typescript"
"$ROOT/scripts/build-console-lib.sh" --check ||
    die "local/console/vendor/chat-client is stale: run scripts/build-console-lib.sh and commit local/console/vendor/chat-client"

step "npm ci (console-tests: playwright-core, no browser download)"
(cd console-tests && npm ci --cache "$NPM_CACHE" --prefer-offline --no-audit --no-fund --loglevel=error)

step "cargo build -p chat-local"
cargo build -p chat-local
BIN="$CARGO_TARGET_DIR/debug/chat-local"

# A private database, key prefix and channel, so the run shares nothing
# with other runs or with a dev stack on the same servers.
SUFFIX="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
DB="chat_test_console_$SUFFIX"
PREFIX="console-test:$SUFFIX:"
STACK_PID=""

cleanup() {
    local status=$?
    if [ -n "$STACK_PID" ] && kill -0 "$STACK_PID" 2>/dev/null; then
        kill -TERM "$STACK_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$STACK_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$STACK_PID" 2>/dev/null || true
        wait "$STACK_PID" 2>/dev/null || true
    fi
    psql "$DATABASE_URL" -X -w -q -c "DROP DATABASE IF EXISTS \"$DB\"" >/dev/null 2>&1 ||
        echo "console-test: could not drop $DB" >&2
    # Only our own keys: the prefix is this run's.
    redis-cli -u "$REDIS_URL" --no-auth-warning --scan --pattern "${PREFIX}*" 2>/dev/null |
        xargs -r -n 500 redis-cli -u "$REDIS_URL" --no-auth-warning del >/dev/null 2>&1 || true
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

psql "$DATABASE_URL" -X -w -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$DB\"" >/dev/null

PORT="$(node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); })')"
BASE_URL="http://127.0.0.1:$PORT"
rm -f "$ARTIFACTS_DIR"/*.png
LOG="$ARTIFACTS_DIR/stack.log"

step "starting chat-local serve --dev-tokens on $BASE_URL (log: $LOG)"
DATABASE_URL="${DATABASE_URL%/*}/$DB" \
    REDIS_KEY_PREFIX="$PREFIX" \
    BROADCAST_CHANNEL="${PREFIX}broadcast" \
    JWT_SECRET="console-test-secret-$SUFFIX" \
    MESSAGE_RETENTION="$RETENTION" \
    RATE_LIMIT_PER_SEC=0 \
    REST_RATE_LIMIT_PER_SEC=0 \
    INSTANCE_ID="console-test" \
    LOG_FORMAT=pretty \
    RUST_LOG="${RUST_LOG:-info}" \
    "$BIN" serve --listen "127.0.0.1:$PORT" --dev-tokens >"$LOG" 2>&1 &
STACK_PID=$!

# Node's fetch, not curl: node is needed anyway, curl may be missing.
healthy() { node -e 'fetch(process.argv[1]).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))' "$BASE_URL/health"; }
for i in $(seq 1 120); do
    if healthy; then break; fi
    kill -0 "$STACK_PID" 2>/dev/null || { tail -20 "$LOG" >&2; die "the stack exited at start-up"; }
    [ "$i" = 120 ] && { tail -20 "$LOG" >&2; die "the stack did not answer /health within 30 s"; }
    sleep 0.2
done

step "browser tests (node --test console-tests/tests)"
start=$SECONDS
(
    cd console-tests
    BASE_URL="$BASE_URL" ARTIFACTS_DIR="$ARTIFACTS_DIR" MESSAGE_RETENTION="$RETENTION" CHROMIUM="$CHROMIUM" \
        node --test tests/
) || {
    echo "console-test: FAILED; screenshots and the stack's log are in $ARTIFACTS_DIR" >&2
    exit 1
}
echo "console-test: passed in $((SECONDS - start)) s; screenshots in $ARTIFACTS_DIR" >&2
