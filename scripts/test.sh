#!/usr/bin/env bash
# Runs the whole test suite: rustfmt check, clippy, cargo test.
#
#   scripts/test.sh [ARGS...]    # ARGS are passed to `cargo test --workspace`
#   SKIP_LINT=1 scripts/test.sh  # skip the fmt and clippy steps
#   SKIP_FUZZ=1 scripts/test.sh  # skip the fuzz smoke test (scripts/fuzz-smoke.sh)
#   SKIP_SCHEMATHESIS=1 scripts/test.sh  # skip schemathesis (scripts/schemathesis.sh)
#   SKIP_CONSOLE_TESTS=1 scripts/test.sh  # skip the browser tests of /console
#   SKIP_CLIENT_TESTS=1 scripts/test.sh  # skip the TypeScript client library's tests
#
# Tests get TEST_DATABASE_URL / TEST_REDIS_URL; they create their own
# chat_test_* databases on that server and use random Redis key prefixes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/services.sh
. "$ROOT/scripts/lib/services.sh"

ensure_rust
ensure_services

# CI builds each clone once: incremental caches only cost disk there.
if [ "${CI:-}" = true ]; then
    export CARGO_INCREMENTAL=0
fi

export TEST_DATABASE_URL="$DATABASE_URL"
export TEST_REDIS_URL="$REDIS_URL"

# shared/tests/it/pg_tls.rs starts a TLS-only PostgreSQL of its own, so it needs
# the server binaries even when the suite's server is remote or a system
# service (it fails, never skips, without them).
if ! PG_BINDIR="$(_svc_pg_bindir)"; then
    _svc_install postgresql
    PG_BINDIR="$(_svc_pg_bindir)" ||
        _svc_die "PostgreSQL server binaries (initdb, pg_ctl) still not found after installing postgresql"
fi
export PG_BINDIR

# Drop test databases left behind by earlier runs (killed or crashed tests).
# A database is only dropped when we own it, nobody is connected to it and, where the
# server lets us see it, it is older than 10 minutes: other test runs may be
# using the same server right now, and their databases must survive.
drop_leftover_databases() {
    local match="(d.datname LIKE 'chat\\_test\\_%' OR d.datname LIKE 'chat\\_template\\_%')"
    local idle="pg_has_role(d.datdba, 'MEMBER') AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datid = d.oid)"
    local old="(pg_stat_file('base/' || d.oid || '/PG_VERSION')).modification < now() - interval '10 minutes'"
    local dbs db
    # pg_stat_file needs superuser (or pg_read_server_files); without it, go by "idle" alone.
    dbs="$(psql "$DATABASE_URL" -X -w -A -t -q -v ON_ERROR_STOP=1 \
        -c "SELECT d.datname FROM pg_database d WHERE $match AND $idle AND $old" 2>/dev/null)" ||
        dbs="$(psql "$DATABASE_URL" -X -w -A -t -q -v ON_ERROR_STOP=1 \
            -c "SELECT d.datname FROM pg_database d WHERE $match AND $idle")"
    for db in $dbs; do
        echo "test: dropping leftover database $db" >&2
        # No WITH (FORCE): if someone connected meanwhile, the drop fails and the database stays.
        psql "$DATABASE_URL" -X -w -q -c "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 ||
            echo "test: could not drop $db (in use?); leaving it" >&2
    done
}
step "dropping leftover test databases"
drop_leftover_databases

if [ "${SKIP_LINT:-0}" = 1 ]; then
    step "SKIP_LINT=1: skipping cargo fmt and cargo clippy"
else
    step "cargo fmt --all -- --check"
    cargo fmt --all -- --check
    step "cargo clippy --workspace --all-targets -- -D warnings"
    cargo clippy --workspace --all-targets -- -D warnings
fi

# Each crate's integration tests are one binary (tests/it/), whose tests run
# as threads of one process: local's storm (500 clients) shares the open
# files limit with whatever runs beside it. The soft limit goes up to the
# hard one; the suites that measure the whole process (RSS, child processes)
# keep binaries of their own (local/tests/it/main.rs says which and why).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

step "cargo test --workspace${*:+ $*}"
cargo test --workspace "$@"

# The browser tests of /console (Debian's chromium + playwright-core); the
# script installs what they need. A filtered run (ARGS given) is about Rust
# tests, so it leaves them out; SKIP_CONSOLE_TESTS=1 does too.
if [ "${SKIP_CONSOLE_TESTS:-0}" = 1 ] || [ "$#" -gt 0 ]; then
    step "skipping the console browser tests (run scripts/console-test.sh)"
else
    step "console browser tests (scripts/console-test.sh)"
    "$ROOT/scripts/console-test.sh"
fi

# The TypeScript client library (clients/typescript) against the real local
# stack: npm ci, tsc, node --test (scripts/client-test.sh). Like the console
# tests, left out of a filtered run (ARGS given) and with SKIP_CLIENT_TESTS=1.
if [ "${SKIP_CLIENT_TESTS:-0}" = 1 ] || [ "$#" -gt 0 ]; then
    step "skipping the client library tests (run scripts/client-test.sh)"
else
    step "client library tests (scripts/client-test.sh)"
    "$ROOT/scripts/client-test.sh"
fi

# The REST API against its own OpenAPI description: schemathesis (PyPI) on
# the local stack, failing on any 5xx or schema violation. Left out of a
# filtered run (ARGS given) and with SKIP_SCHEMATHESIS=1.
if [ "${SKIP_SCHEMATHESIS:-0}" = 1 ] || [ "$#" -gt 0 ]; then
    step "skipping schemathesis (run scripts/schemathesis.sh)"
else
    step "schemathesis against the OpenAPI description (scripts/schemathesis.sh)"
    "$ROOT/scripts/schemathesis.sh"
fi

# The WebSocket API's AsyncAPI document (docs/asyncapi.json, which
# local/tests/it/asyncapi.rs keeps equal to what the service serves) through the
# AsyncAPI project's own parser. Left out of a filtered run (ARGS given).
if [ "$#" -gt 0 ]; then
    step "skipping the AsyncAPI parser check (run scripts/asyncapi-check.sh)"
else
    step "AsyncAPI document through @asyncapi/parser (scripts/asyncapi-check.sh)"
    "$ROOT/scripts/asyncapi-check.sh"
fi

# Bad input, attacked: each cargo-fuzz target of fuzz/ for FUZZ_SECONDS (30)
# from its committed corpus. A filtered run (ARGS given) leaves it out, and
# so does SKIP_FUZZ=1.
if [ "${SKIP_FUZZ:-0}" = 1 ] || [ "$#" -gt 0 ]; then
    step "skipping the fuzz smoke test (run scripts/fuzz-smoke.sh)"
else
    step "fuzz smoke test (scripts/fuzz-smoke.sh)"
    "$ROOT/scripts/fuzz-smoke.sh"
fi

# The deployment (docs/DEPLOY.md): cfn-lint on template.yaml and the compose
# file checked (scripts/check-deploy.sh); every events/ file through its real
# function binary under cargo-lambda's Lambda runtime emulator
# (scripts/test-events.sh); several gateways and a relay as local processes
# (scripts/test-multi-local.sh); the deployed shape, the function binaries
# under cargo lambda watch behind the WebSocket and HTTP API emulators, with
# the smoke test and the Lambda cases run against it
# (scripts/test-lambda-local.sh). A filtered run (ARGS given) leaves them
# out, and so does SKIP_DEPLOY_CHECKS=1.
if [ "${SKIP_DEPLOY_CHECKS:-0}" = 1 ] || [ "$#" -gt 0 ]; then
    step "skipping the deployment checks (run scripts/check-deploy.sh, scripts/test-events.sh, scripts/test-multi-local.sh, scripts/test-lambda-local.sh)"
else
    step "deployment files: cfn-lint, compose (scripts/check-deploy.sh)"
    "$ROOT/scripts/check-deploy.sh"
    step "events/ through the function binaries (scripts/test-events.sh)"
    "$ROOT/scripts/test-events.sh"
    step "gateways and a relay as local processes (scripts/test-multi-local.sh)"
    "$ROOT/scripts/test-multi-local.sh"
    step "the function binaries behind the emulators, through the Lambda Invoke API (scripts/test-lambda-local.sh)"
    "$ROOT/scripts/test-lambda-local.sh" ||
        _svc_die "the Lambda shape failed (scripts/test-lambda-local.sh; LAMBDA_TEST_KEEP=1 keeps its logs)"
fi

step "all tests passed"
