#!/usr/bin/env bash
# Drives every sample event in events/ through its real function binary under
# cargo-lambda's Lambda Runtime API emulator, against real PostgreSQL and
# Redis, and checks each response (scripts/events_test.py).
#
#   scripts/test-events.sh
#
# Uses DATABASE_URL / REDIS_URL, or finds or starts the services like
# scripts/test.sh (scripts/lib/services.sh); cargo-lambda comes from the
# venv of scripts/lib/pytools.sh. The run uses its own database, Redis key
# prefix and JWT secret, and removes them afterwards.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/services.sh
. "$ROOT/scripts/lib/services.sh"
# shellcheck source=scripts/lib/pytools.sh
. "$ROOT/scripts/lib/pytools.sh"

ensure_rust
ensure_services
ensure_pytools

# The same build `cargo lambda watch` runs (cargo run --bin <function> in the
# workspace), so the first invoke of each function does not compile.
echo "events: building the function binaries and chat-local" >&2
cargo build --workspace --bins -q

exec python3 "$ROOT/scripts/events_test.py"
