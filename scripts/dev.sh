#!/usr/bin/env bash
# Runs the local stack (chat-local) against PostgreSQL and Redis.
#
#   scripts/dev.sh [ARGS...]     # ARGS are passed to `chat-local serve`
#   DEV_TOKENS=0 scripts/dev.sh  # without the console's dev-token endpoint
#
# Uses DATABASE_URL / REDIS_URL when set, else the local services, else starts
# private instances under .local/ (see scripts/lib/services.sh).
# The server applies migrations at start-up and listens on PORT (default 3000).
# The developer console is at http://127.0.0.1:PORT/console; this script starts
# the stack with --dev-tokens so the console can sign anyone in (local only).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/local.sh
. "$ROOT/scripts/lib/local.sh" # and scripts/lib/services.sh
LOCAL_NAME=dev

local_dev_env

# A debug build shares its artifacts with the test suite, so the first start
# is quicker; RELEASE=1 builds optimised binaries (for benchmarks).
profile=()
[ "${RELEASE:-0}" = 1 ] && profile=(--release)
dev_tokens=()
if [ "${DEV_TOKENS:-1}" != 0 ]; then
    dev_tokens=(--dev-tokens)
    echo "dev: console at http://127.0.0.1:${PORT:-3000}/console (ops view: /console/ops)" >&2
    echo "dev: dev tokens are ON: anyone who reaches this port can sign in as any user, admin included (DEV_TOKENS=0 turns them off)" >&2
fi
exec cargo run "${profile[@]}" -p chat-local -- serve "${dev_tokens[@]}" "$@"
