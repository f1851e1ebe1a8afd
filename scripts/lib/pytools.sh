# shellcheck shell=bash
#
# The Python tools of the deploy checks (cfn-lint, cargo-lambda), in one
# virtualenv reused across runs and clones. Source it, then call:
#
#   ensure_pytools   - creates or updates the venv when needed and puts its bin/ first on PATH
#
# The venv lives in $CHAT_VENV (default ~/.cache/chat-backend/venv). It is
# (re)built only when scripts/requirements-deploy.txt changed since the last
# install, so a warm run costs nothing. cargo-lambda from PyPI bundles zig and
# needs no `cargo install`; `cargo lambda ...` finds it on PATH.

_PYT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

_pyt_log() { printf '%s\n' "$*" >&2; }

ensure_pytools() {
    local venv="${CHAT_VENV:-${HOME:-/tmp}/.cache/chat-backend/venv}"
    local req="$_PYT_ROOT/scripts/requirements-deploy.txt"
    local want have
    if ! command -v python3 >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            _pyt_log "pytools: installing python3 and python3-venv"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >&2
        else
            _pyt_log "error: python3 is needed for the deploy checks; install python3 and python3-venv"
            exit 1
        fi
    fi
    want="$(cksum <"$req" | cut -d' ' -f1)"
    have="$(cat "$venv/.requirements-cksum" 2>/dev/null || true)"
    if [ ! -x "$venv/bin/python" ] || [ "$want" != "$have" ]; then
        _pyt_log "pytools: installing $(grep -v '^#' "$req" | xargs) into $venv"
        if [ ! -x "$venv/bin/python" ]; then
            python3 -m venv "$venv" >&2 || {
                _pyt_log "error: python3 -m venv failed (on Debian: apt-get install python3-venv)"
                exit 1
            }
        fi
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2 || {
            _pyt_log "error: pip install -r $req failed"
            exit 1
        }
        printf '%s\n' "$want" >"$venv/.requirements-cksum"
    else
        _pyt_log "pytools: $venv is up to date ($(grep -v '^#' "$req" | xargs))"
    fi
    export PATH="$venv/bin:$PATH"
}
