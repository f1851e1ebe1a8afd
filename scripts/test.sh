#!/usr/bin/env bash
# Runs the whole test suite: rustfmt check, clippy, cargo test.
#
#   scripts/test.sh [ARGS...]    # ARGS are passed to `cargo test --workspace`
#   SKIP_LINT=1 scripts/test.sh  # skip the fmt and clippy steps
#   SKIP_FUZZ=1 scripts/test.sh  # skip the fuzz smoke test (scripts/fuzz-smoke.sh)
#   SKIP_SCHEMATHESIS=1 scripts/test.sh  # skip schemathesis (scripts/schemathesis.sh)
#   SKIP_CONSOLE_TESTS=1 scripts/test.sh  # skip the browser tests of /console
#   SKIP_CLIENT_TESTS=1 scripts/test.sh  # skip the TypeScript client library's tests
#   SKIP_DEPLOY_CHECKS=1 scripts/test.sh  # skip the deployment checks (check-deploy.sh, test-events.sh,
#                                         # test-multi-local.sh plain and on TLS + AUTH Redis,
#                                         # test-lambda-local.sh)
#   SKIP_CLUSTER=1 scripts/test.sh  # skip the Redis Cluster step (suites again, failover, resharding)
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

# The Redis Cluster step and the relay's fault tests start redis-server
# processes of their own, so they need the binary even when the suite's
# Redis is remote (they fail, never skip, without it).
command -v redis-server >/dev/null 2>&1 || _svc_install redis-server redis-tools
command -v redis-server >/dev/null 2>&1 ||
    _svc_die "redis-server still not found after installing redis-server"

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

# After cargo test, the suites of other tools, each a script of scripts/. A
# filtered run (ARGS given) is about Rust tests and leaves them all out; a
# suite's SKIP_ variable set to 1 leaves out that one.
FILTERED=$#
# suite SKIP_VAR "what it tests" script.sh (SKIP_VAR "-": the suite has none)
suite() {
    if [ "$FILTERED" -gt 0 ] || { [ "$1" != - ] && [ "${!1:-0}" = 1 ]; }; then
        step "skipping $2 (run scripts/$3)"
        return 0
    fi
    step "$2 (scripts/$3)"
    "$ROOT/scripts/$3"
}
# Redis Cluster (docs/ARCHITECTURE.md, "Redis Cluster"): the end-to-end
# suites (chat-local's tests/it: realtime, presence, recovery, relay paths,
# multi-instance, sessions, faults...; chat-relay's) once more against a
# local cluster (3 primaries, 3 replicas from the installed
# redis-server, scripts/redis-cluster.sh, REDIS_CLUSTER_BASE_PORT 7101..7106)
# with REDIS_CLUSTER=true, and scripts/multi-local.sh --cluster as
# test-multi-local.sh drives it; then the fault test on a private cluster of its
# own: a primary SIGKILLed under load and every slot of a primary moved
# (redis-cli --cluster reshard) under load (local/tests/cluster_failover.rs,
# which prints the measured times), and the Redis round trips per send,
# join and frame on a cluster and a single Redis. Left out
# of a filtered run (ARGS given) and with SKIP_CLUSTER=1.
if [ "${SKIP_CLUSTER:-0}" = 1 ] || [ "$#" -gt 0 ]; then
    step "skipping the Redis Cluster step (run it without ARGS)"
else
    if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
        _svc_install redis-server redis-tools
    fi
    step "a local Redis Cluster (scripts/redis-cluster.sh start)"
    cluster_urls="$("$ROOT/scripts/redis-cluster.sh" start)"
    trap '"$ROOT/scripts/redis-cluster.sh" stop' EXIT
    step "end-to-end suites on the Redis Cluster (REDIS_CLUSTER=true)"
    TEST_REDIS_URL="$cluster_urls" TEST_REDIS_CLUSTER=true cargo test -p chat-local --test it
    TEST_REDIS_URL="$cluster_urls" TEST_REDIS_CLUSTER=true cargo test -p chat-relay --test it
    step "the multi-instance topology on the Redis Cluster (scripts/test-multi-local.sh --cluster)"
    "$ROOT/scripts/test-multi-local.sh" --cluster
    "$ROOT/scripts/redis-cluster.sh" stop
    trap - EXIT
    step "Redis Cluster failover and resharding under load, round trips (tests/cluster_failover.rs)"
    cargo test -p chat-local --features cluster-faults --test cluster_failover -- \
        --nocapture --test-threads=1
fi

# The browser tests of /console (Debian's chromium + playwright-core); the
# script installs what they need.
suite SKIP_CONSOLE_TESTS "the console browser tests" console-test.sh

# The TypeScript client library (clients/typescript) against the real local
# stack: npm ci, tsc, node --test.
suite SKIP_CLIENT_TESTS "the client library tests" client-test.sh

# The REST API against its own OpenAPI description: schemathesis (PyPI) on
# the local stack, failing on any 5xx or schema violation.
suite SKIP_SCHEMATHESIS "schemathesis against the OpenAPI description" schemathesis.sh

# The WebSocket API's AsyncAPI document (docs/asyncapi.json, which
# local/tests/it/asyncapi.rs keeps equal to what the service serves) through the
# AsyncAPI project's own parser.
suite - "the AsyncAPI document through @asyncapi/parser" asyncapi-check.sh

# Bad input, attacked: each cargo-fuzz target of fuzz/ for FUZZ_SECONDS (30)
# from its committed corpus.
suite SKIP_FUZZ "the fuzz smoke test" fuzz-smoke.sh

# The deployment (docs/DEPLOY.md), all four left out with SKIP_DEPLOY_CHECKS=1:
# cfn-lint on template.yaml and the compose file checked; every events/ file
# through its real function binary under cargo-lambda's Lambda runtime
# emulator; several gateways and a relay as local processes; the deployed
# shape, the function binaries under cargo lambda watch behind the WebSocket
# and HTTP API emulators, with the smoke test and the Lambda cases run against
# it.
suite SKIP_DEPLOY_CHECKS "deployment files: cfn-lint, compose" check-deploy.sh
suite SKIP_DEPLOY_CHECKS "events/ through the function binaries" test-events.sh
suite SKIP_DEPLOY_CHECKS "gateways and a relay as local processes" test-multi-local.sh
# The same on Redis as the template's ElastiCache runs: TLS only with an AUTH
# token that must be escaped in a URL, configured through REDIS_HOST /
# REDIS_PORT / REDIS_TLS / REDIS_PASSWORD, a single Redis and a cluster
# (scripts/redis-secure.sh, ports 7301 and 7311..7316).
if [ "$FILTERED" -gt 0 ] || [ "${SKIP_DEPLOY_CHECKS:-0}" = 1 ]; then
    step "skipping the TLS + AUTH Redis runs (run scripts/test-multi-local.sh --secure [--cluster])"
else
    command -v openssl >/dev/null 2>&1 || _svc_install openssl
    trap '"$ROOT/scripts/redis-secure.sh" stop' EXIT
    step "gateways and a relay on Redis with TLS and AUTH (scripts/test-multi-local.sh --secure)"
    "$ROOT/scripts/test-multi-local.sh" --secure
    step "the same on a Redis Cluster with TLS and AUTH (scripts/test-multi-local.sh --secure --cluster)"
    "$ROOT/scripts/test-multi-local.sh" --secure --cluster
    "$ROOT/scripts/redis-secure.sh" stop
    trap - EXIT
fi
suite SKIP_DEPLOY_CHECKS "the function binaries behind the emulators, through the Lambda Invoke API" \
    test-lambda-local.sh ||
    _svc_die "the Lambda shape failed (scripts/test-lambda-local.sh; LAMBDA_TEST_KEEP=1 keeps its logs)"

step "all tests passed"
