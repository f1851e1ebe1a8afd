#!/usr/bin/env bash
# Validates docs/asyncapi.json (the WebSocket API's AsyncAPI document, which
# local/tests/it/asyncapi.rs keeps equal to what the service serves) with the
# AsyncAPI project's own parser, @asyncapi/parser from npm, installed once
# into ~/.cache/chat-backend/asyncapi.
#
#   scripts/asyncapi-check.sh [FILE]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PARSER_VERSION=3.6.6
dir="${HOME:-/tmp}/.cache/chat-backend/asyncapi"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "asyncapi: installing nodejs and npm (Debian packages)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
    else
        echo "error: node and npm are needed to validate the AsyncAPI document; install Node.js 18 or newer" >&2
        exit 1
    fi
fi
installed="$(node -e "try{console.log(require('$dir/node_modules/@asyncapi/parser/package.json').version)}catch{}" 2>/dev/null || true)"
if [ "$installed" != "$PARSER_VERSION" ]; then
    echo "asyncapi: installing @asyncapi/parser@$PARSER_VERSION into $dir" >&2
    mkdir -p "$dir"
    [ -f "$dir/package.json" ] || echo '{"private":true}' >"$dir/package.json"
    (cd "$dir" && npm install --no-audit --no-fund --silent "@asyncapi/parser@$PARSER_VERSION" >&2) || {
        echo "error: npm install @asyncapi/parser failed" >&2
        exit 1
    }
fi
ASYNCAPI_PARSER_DIR="$dir" node "$ROOT/scripts/asyncapi/validate.mjs" "${1:-$ROOT/docs/asyncapi.json}"
