#!/usr/bin/env bash
# Smoke test of a running deployment, end to end, from its outputs: health,
# two WebSocket clients, a message through the relay, history, presence
# (scripts/smoke.py says each step).
#
#   scripts/smoke.sh WS_URL REST_URL TOKEN [TOKEN2]
#
# After `sam deploy` (docs/DEPLOY.md, step 6):
#   scripts/smoke.sh "$(out WebSocketUrl)" "$(out HttpApiUrl)" "$TOKEN"
# Against the local stack (CI does this in scripts/test-multi-local.sh):
#   scripts/smoke.sh ws://127.0.0.1:3000/ws http://127.0.0.1:3000 "$(chat-local token alice)"
#
# Needs python3; the `websockets` package is installed into the venv of
# scripts/lib/pytools.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/pytools.sh
. "$ROOT/scripts/lib/pytools.sh"

if [ "$#" -lt 3 ] || [ "$#" -gt 4 ]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
ensure_pytools
exec python "$ROOT/scripts/smoke.py" --ws "$1" --rest "$2" --token "$3" ${4:+--token2 "$4"}
