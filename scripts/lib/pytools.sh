# shellcheck shell=bash
#
# The Python tools from PyPI (cfn-lint, cargo-lambda, websockets for the
# smoke test, schemathesis), in one virtualenv reused across runs and clones.
# Source it, then call:
#
#   ensure_pytools               - the deploy checks' tools (scripts/requirements-deploy.txt);
#                                  puts the venv's bin/ first on PATH
#   ensure_pytool PACKAGE VERSION - one more package, pinned, for a script that alone needs it
#
# The venv is $PYTOOLS_VENV: $CHAT_VENV, default ~/.cache/chat-backend/venv.
# ensure_pytools (re)installs only when scripts/requirements-deploy.txt
# changed since the last install, ensure_pytool only when the installed
# version differs, so a warm run costs nothing. cargo-lambda from PyPI
# bundles zig and needs no `cargo install`; `cargo lambda ...` finds it on
# PATH.

_PYT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTOOLS_VENV="${CHAT_VENV:-${HOME:-/tmp}/.cache/chat-backend/venv}"

_pyt_log() { printf '%s\n' "$*" >&2; }

# python3 (installed with apt-get when root), and the venv, created when missing.
_pyt_venv() {
    if ! command -v python3 >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            _pyt_log "pytools: installing python3 and python3-venv"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >&2
        else
            _pyt_log "error: python3 is needed for the Python tools; install python3 and python3-venv"
            exit 1
        fi
    fi
    if [ ! -x "$PYTOOLS_VENV/bin/python" ]; then
        _pyt_log "pytools: creating the venv $PYTOOLS_VENV"
        python3 -m venv "$PYTOOLS_VENV" >&2 || {
            _pyt_log "error: python3 -m venv failed (on Debian: apt-get install python3-venv)"
            exit 1
        }
    fi
}

ensure_pytools() {
    local req="$_PYT_ROOT/scripts/requirements-deploy.txt"
    local want have
    _pyt_venv
    want="$(cksum <"$req" | cut -d' ' -f1)"
    have="$(cat "$PYTOOLS_VENV/.requirements-cksum" 2>/dev/null || true)"
    if [ "$want" != "$have" ]; then
        _pyt_log "pytools: installing $(grep -v '^#' "$req" | xargs) into $PYTOOLS_VENV"
        "$PYTOOLS_VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2 || {
            _pyt_log "error: pip install -r $req failed"
            exit 1
        }
        printf '%s\n' "$want" >"$PYTOOLS_VENV/.requirements-cksum"
    else
        _pyt_log "pytools: $PYTOOLS_VENV is up to date ($(grep -v '^#' "$req" | xargs))"
    fi
    export PATH="$PYTOOLS_VENV/bin:$PATH"
}

ensure_pytool() {
    local package="$1" version="$2" have
    _pyt_venv
    have="$("$PYTOOLS_VENV/bin/python" -c \
        'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$package" 2>/dev/null || true)"
    if [ "$have" != "$version" ]; then
        _pyt_log "pytools: installing $package==$version into $PYTOOLS_VENV"
        "$PYTOOLS_VENV/bin/python" -m pip install -q --disable-pip-version-check "$package==$version" >&2 || {
            _pyt_log "error: pip install $package==$version failed"
            exit 1
        }
    fi
}
