#!/usr/bin/env bash
# Tests scripts/multi-local.sh for real: starts it with --scale (three
# gateways and a relay) on free ports, with its own database and Redis key
# prefix; checks /health on every gateway; has alice on gateway 2 send to a
# group whose other members are connected to gateways 1 and 3 (with
# `chat-local chat`), so the message can only arrive through the bus and
# the relay's PostToConnection to each connection's own gateway; then stops
# the script as ctrl-c would and checks that every process is gone.
#
#   scripts/test-multi-local.sh            # on the local Redis
#   scripts/test-multi-local.sh --cluster  # on the local Redis Cluster (multi-local.sh --cluster)
#   scripts/test-multi-local.sh --secure   # on Redis with TLS and AUTH (multi-local.sh --secure);
#                                          # with --cluster too, on such a cluster
set -euo pipefail

flags=(--scale)
for arg in "$@"; do
    case "$arg" in
        --cluster | --secure) flags+=("$arg") ;;
        *) echo "usage: scripts/test-multi-local.sh [--cluster] [--secure]" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/services.sh
. "$ROOT/scripts/lib/services.sh"
# shellcheck source=scripts/lib/isolated.sh
. "$ROOT/scripts/lib/isolated.sh"

ensure_rust
ensure_services
cargo build -q -p chat-local
bin="$CARGO_TARGET_DIR/debug/chat-local"

tmp="$(mktemp -d /tmp/chat-multi-XXXXXX)"
isolated_env multi
export MULTI_LOG_DIR="$tmp/logs"
export RUST_LOG="${RUST_LOG:-warn}"
# A process that stops with an error prints the error, not a backtrace that
# pushes it out of the failure report's tail.
export RUST_LIB_BACKTRACE=0

# Three consecutive free ports, and the ones + 99 .. + 102 (the relay's
# metrics, the gateways' Management APIs), all from 20000 to 32101: below
# Linux's ephemeral range (32768 and up), where a client socket of another
# test could take a port between this check and the bind.
base="$(isolated_ports 12000 0 1 2 99 100 101 102)" || { echo "error: no three free ports found" >&2; exit 1; }
export MULTI_BASE_PORT="$base"
g1="$base" g2=$((base + 1)) g3=$((base + 2))

multi_pid=""
client_pids=()
cleanup() {
    local pid
    for pid in "${client_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [ -n "$multi_pid" ] && kill -0 "$multi_pid" 2>/dev/null; then
        kill -TERM -- "-$multi_pid" 2>/dev/null || true
        wait "$multi_pid" 2>/dev/null || true
    fi
    isolated_drop
    if [ "${MULTI_TEST_KEEP:-0}" = 1 ]; then echo "multi-test: kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

fail() { isolated_fail multi-test 40 "$*" "$tmp"/logs/*.log "$tmp"/*.out "$tmp/multi.log"; }

# Waits up to $3 s (20) for a line matching $2 in file $1.
wait_for() {
    local i
    for i in $(seq 1 $((${3:-20} * 10))); do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    fail "no line matching '$2' in $1"
}

isolated_create_db

echo "multi-test: starting scripts/multi-local.sh ${flags[*]} on ports $g1-$g3" >&2
# With job control on, the script gets a process group of its own and keeps
# SIGINT (a background job of a non-interactive shell starts with it
# ignored), so it can be stopped the way ctrl-c stops it: SIGINT to the group.
set -m
scripts/multi-local.sh "${flags[@]}" >"$tmp/multi.log" 2>&1 &
multi_pid=$!
set +m
# multi-local.sh itself gives the gateways and then the relay 30 s each.
wait_for "$tmp/multi.log" "multi: ready" 70

for port in "$g1" "$g2" "$g3"; do
    health="$(curl -fsS "http://127.0.0.1:$port/health")" || fail "GET /health on $port"
    [ "$health" = '{"postgres":"ok","redis":"ok","status":"ok"}' ] ||
        [ "$(printf '%s' "$health" | tr -d ' ')" = '{"status":"ok","postgres":"ok","redis":"ok"}' ] ||
        fail "/health on $port answered $health"
    echo "multi-test: gateway on $port healthy: $health" >&2
done

api() { # api PORT USER METHOD PATH [BODY]
    local token
    token="$("$bin" token "$2")"
    curl -fsS -X "$3" -H "Authorization: Bearer $token" -H 'content-type: application/json' \
        "http://127.0.0.1:$1/api/v1/chat$4" ${5:+-d "$5"}
}
# Users become known on their first call; each through another gateway.
api "$g1" bob GET /rooms >/dev/null || fail "bob GET /rooms"
api "$g3" carol GET /rooms >/dev/null || fail "carol GET /rooms"
room="$(api "$g2" alice POST /rooms '{"type":"GROUP","name":"multi","memberIds":["bob","carol"]}' |
    grep -o '"id":"room_[A-Za-z0-9]*"' | head -1 | cut -d'"' -f4)"
[ -n "$room" ] || fail "alice could not create the group"

# A chat client per user, each on its own gateway, fed through a FIFO.
client() { # client NAME PORT
    mkfifo "$tmp/$1.in"
    "$bin" chat "$1" --url "ws://127.0.0.1:$2/ws" <"$tmp/$1.in" >"$tmp/$1.out" 2>"$tmp/$1.err" &
    client_pids+=("$!")
}
client bob "$g1"
exec 5>"$tmp/bob.in"
client carol "$g3"
exec 6>"$tmp/carol.in"
client alice "$g2"
exec 7>"$tmp/alice.in"

# `connected` comes through the relay: each gateway's callback URL works.
for who in bob carol alice; do wait_for "$tmp/$who.out" "connected"; done
echo "/join $room" >&5
echo "/join $room" >&6
echo "/join $room" >&7
for who in bob carol alice; do wait_for "$tmp/$who.out" "roomJoined"; done

echo "hello across gateways" >&7
for who in bob carol alice; do
    wait_for "$tmp/$who.out" '"content":"hello across gateways"'
done
echo "multi-test: alice (gateway 2) -> bob (gateway 1) and carol (gateway 3): delivered by the relay" >&2
grep -q '"status":"ok"' <(curl -fsS "http://127.0.0.1:$g1/health") || fail "gateway 1 unhealthy after the exchange"

# The deployment smoke test, as a user runs it after `sam deploy`: WebSocket
# through gateway 1, REST through gateway 3, two users.
scripts/smoke.sh "ws://127.0.0.1:$g1/ws" "http://127.0.0.1:$g3" "$("$bin" token dora)" "$("$bin" token eve)" \
    >"$tmp/smoke.out" 2>&1 || fail "scripts/smoke.sh: $(cat "$tmp/smoke.out")"
sed 's/^/multi-test: /' "$tmp/smoke.out" >&2

echo /quit >&5
echo /quit >&6
echo /quit >&7
exec 5>&- 6>&- 7>&-
for pid in "${client_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
client_pids=()

# Stop it as ctrl-c does (SIGINT to the foreground process group); every
# process must be gone.
isolated_interrupt "$multi_pid" multi-local.sh 20 "$g1" "$g2" "$g3"
multi_pid=""
grep -q "multi: stopped" "$tmp/multi.log" || fail "multi-local.sh did not report stopping"
echo "multi-test: all gateways and the relay stopped on SIGINT" >&2
echo "multi-test: passed" >&2
