#!/usr/bin/env bash
# Tests of the TypeScript client library (clients/typescript) against the
# real local stack: builds chat-local (debug, the shared target dir), runs
# `npm ci` (the lock file is committed; cached in ~/.cache/chat-backend/npm)
# and `npm test`, which compiles the library with tsc and runs `node --test`.
# The tests start and stop their own `chat-local serve` / `relay` processes
# on free ports, each with a fresh database (chat_test_client_*), Redis key
# prefix and bus channel, and drop them afterwards.
#
#   scripts/client-test.sh
#   CLIENT_TEST_CLIENTS=100 scripts/client-test.sh   # fewer clients in the scale test
#
# Nothing missing is skipped: no node, no PostgreSQL or Redis, no chat-local
# all fail the run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/services.sh
. "$ROOT/scripts/lib/services.sh"

NPM_CACHE="${NPM_CACHE:-${HOME:-/tmp}/.cache/chat-backend/npm}"

step "checking node and the services"
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 ||
    die "node and npm are missing. Install Node.js 18 or newer with npm, then run this again."
major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$major" -ge 18 ] || die "Node.js $(node --version) is too old; the library needs 18 or newer."
ensure_rust
ensure_services
for tool in psql redis-cli; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (the tests create a database and clean Redis keys with it)"
done

step "cargo build -p chat-local --bin chat-local"
cargo build -p chat-local --bin chat-local
export CHAT_LOCAL_BIN="$CARGO_TARGET_DIR/debug/chat-local"
[ -x "$CHAT_LOCAL_BIN" ] || die "no $CHAT_LOCAL_BIN after the build"

step "npm ci (clients/typescript)"
(cd clients/typescript && npm ci --cache "$NPM_CACHE" --prefer-offline --no-audit --no-fund --loglevel=error)

step "npm test (clients/typescript: tsc, then node --test against the local stack)"
start=$SECONDS
(cd clients/typescript && DATABASE_URL="$DATABASE_URL" REDIS_URL="$REDIS_URL" npm test) ||
    die "FAILED"
echo "client-test: passed in $((SECONDS - start)) s" >&2
