#!/usr/bin/env bash
# Writes ready-to-send copies of the sample events in events/, with fresh
# tokens in place of their placeholders.
#
#   scripts/mint-events.sh [OUT_DIR]        # default: .local/events
#
# Placeholders, and what replaces them:
#   __ALICE_TOKEN__   a token for user alice ("Alice")
#   __BOB_TOKEN__     a token for user bob ("Bob")
#   __ADMIN_TOKEN__   a token for user ops with role admin
#   __ROOM_ID__       $ROOM_ID when set (the DIRECT room of alice and bob)
#   __GROUP_ID__      $GROUP_ID when set (a GROUP room alice created)
# Room placeholders are left as they are when the variable is unset: get the
# ids from the responses to ws-message/join-room.json (or rest/direct.json)
# and rest/create-room.json, then run this again with ROOM_ID / GROUP_ID.
#
# Environment:
#   JWT_SECRET      required: the secret the functions verify tokens with
#   JWT_ISSUER, JWT_AUDIENCE   put into the tokens when set
#   TOKEN_TTL       token lifetime in seconds (default 86400)
#   CHAT_LOCAL      the chat-local binary that mints (default: built with cargo)
#
# Then, for example:
#   sam local invoke -e .local/events/ws-connect/connect.json WsConnectFunction
#   cargo lambda invoke --data-file .local/events/rest/health.json rest
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/.local/events}"

if [ -z "${JWT_SECRET:-}" ]; then
    echo "error: set JWT_SECRET to the secret the functions verify tokens with" >&2
    exit 1
fi

if [ -z "${CHAT_LOCAL:-}" ]; then
    # shellcheck source=scripts/lib/services.sh
    . "$ROOT/scripts/lib/services.sh" # for ensure_rust and the shared CARGO_TARGET_DIR
    ensure_rust
    (cd "$ROOT" && cargo build -q -p chat-local)
    CHAT_LOCAL="$CARGO_TARGET_DIR/debug/chat-local"
fi

ttl="${TOKEN_TTL:-86400}"
alice="$("$CHAT_LOCAL" token alice --display-name Alice --ttl "$ttl")"
bob="$("$CHAT_LOCAL" token bob --display-name Bob --ttl "$ttl")"
admin="$("$CHAT_LOCAL" token ops --username ops --admin --ttl "$ttl")"

# Tokens are base64url and dots, ids letters, digits and underscores: safe in sed.
substitutions=(
    -e "s|__ALICE_TOKEN__|$alice|g"
    -e "s|__BOB_TOKEN__|$bob|g"
    -e "s|__ADMIN_TOKEN__|$admin|g"
)
[ -n "${ROOM_ID:-}" ] && substitutions+=(-e "s|__ROOM_ID__|$ROOM_ID|g")
[ -n "${GROUP_ID:-}" ] && substitutions+=(-e "s|__GROUP_ID__|$GROUP_ID|g")

count=0
while IFS= read -r -d '' file; do
    rel="${file#"$ROOT/events/"}"
    mkdir -p "$OUT/$(dirname "$rel")"
    sed "${substitutions[@]}" "$file" >"$OUT/$rel"
    count=$((count + 1))
done < <(find "$ROOT/events" -name '*.json' -print0 | sort -z)

left="$(grep -rlE '__(ROOM|GROUP)_ID__' "$OUT" 2>/dev/null | wc -l)"
echo "mint-events: wrote $count events to $OUT (tokens for alice, bob and admin ops; ${left} still need ROOM_ID/GROUP_ID)" >&2
