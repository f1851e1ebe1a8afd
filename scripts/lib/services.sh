# shellcheck shell=bash
#
# Shared helpers for scripts/dev.sh and scripts/test.sh. Source it, then call:
#
#   ensure_rust      - checks that cargo is available (exits 1 with install hints if not)
#   ensure_services  - finds or starts PostgreSQL and Redis, exports DATABASE_URL and REDIS_URL
#
# How ensure_services picks each service (independently for PostgreSQL and Redis):
#   1. DATABASE_URL / REDIS_URL already set: used as they are, and they must answer.
#   2. A server answering at 127.0.0.1:5432 / 127.0.0.1:6379 (the system services).
#   3. A private instance under <repo>/.local/pg and <repo>/.local/redis, on ports
#      55432 / 56379 (LOCAL_PG_PORT, LOCAL_REDIS_PORT), started once and reused.
#      Missing server binaries are installed with apt-get when running as root.
#
# Stop the private instances with:
#   runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D .local/pg/data stop
#       (without "runuser -u postgres --" when not root)
#   redis-cli -p 56379 shutdown
#
# Internal overrides (used to test the private-instance path):
#   SERVICES_DEFAULT_PG_ADDR     host:port probed in step 2 (default 127.0.0.1:5432)
#   SERVICES_DEFAULT_REDIS_ADDR  host:port probed in step 2 (default 127.0.0.1:6379)

_SVC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# A build directory outside the clone, so that fresh CI clones reuse earlier builds.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
    export CARGO_TARGET_DIR="${HOME:-/tmp}/.cache/chat-backend/target"
fi

# step TEXT: a heading on stderr. die TEXT: the error, after the script's
# name, and exit 1. For the scripts that source this file.
step() { printf '\n==> %s\n' "$*" >&2; }
die() {
    printf '%s: %s\n' "$(basename "$0" .sh)" "$*" >&2
    exit 1
}

_svc_log() { printf '%s\n' "$*" >&2; }
_svc_die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Hides the password of a URL: scheme://user:secret@host -> scheme://user:***@host
_svc_mask() { printf '%s' "$1" | sed -E 's#^([a-zA-Z0-9+.-]+://[^:/@]*):[^@/]*@#\1:***@#'; }

# Runs a command with a time limit when `timeout` exists (a black-holed host must not hang us).
_svc_timeout() {
    if command -v timeout >/dev/null 2>&1; then
        timeout "$@"
    else
        shift
        "$@"
    fi
}

_svc_is_root() { [ "$(id -u)" = 0 ]; }

# ---------------------------------------------------------------------------
# Rust

ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1 && [ -x "${HOME:-/nonexistent}/.cargo/bin/cargo" ]; then
        # rustup installed, but this shell has not picked up its PATH yet.
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        _svc_log "error: cargo was not found. Install the Rust toolchain with rustup:"
        _svc_log "    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y"
        _svc_log "    . \"\$HOME/.cargo/env\""
        _svc_log "(see https://rustup.rs), then run this script again."
        exit 1
    fi
}

# ---------------------------------------------------------------------------
# Installing what is missing

# Installs Debian packages when possible, else prints what to install and exits 1.
# Arguments: debian package names.
_svc_install() {
    local pkgs="$*"
    if _svc_is_root && command -v apt-get >/dev/null 2>&1; then
        _svc_log "services: installing missing packages: $pkgs"
        apt-get update -qq || _svc_die "apt-get update failed"
        # shellcheck disable=SC2086 # word splitting of the package list is intended
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >&2 ||
            _svc_die "apt-get install $pkgs failed"
        hash -r
        return 0
    fi
    _svc_log "error: missing required software. Install it, then run this script again:"
    if command -v apt-get >/dev/null 2>&1; then
        _svc_log "    sudo apt-get install $pkgs"
    elif command -v brew >/dev/null 2>&1 || [ "$(uname -s)" = Darwin ]; then
        local brew_pkgs=""
        case " $pkgs " in *" postgresql"*) brew_pkgs="$brew_pkgs postgresql@15" ;; esac
        case " $pkgs " in *" redis"*) brew_pkgs="$brew_pkgs redis" ;; esac
        _svc_log "    brew install${brew_pkgs}"
        case "$brew_pkgs" in *postgresql@15*) _svc_log "    export PATH=\"\$(brew --prefix postgresql@15)/bin:\$PATH\"" ;; esac
    else
        _svc_log "    the Debian packages: $pkgs"
        _svc_log "    (PostgreSQL 15 server and client, Redis server and redis-cli)"
    fi
    _svc_log "Or point DATABASE_URL / REDIS_URL at servers you already run."
    exit 1
}

# Directory holding the PostgreSQL server binaries (initdb, pg_ctl), or nothing.
_svc_pg_bindir() {
    local d
    if [ -n "${PG_BINDIR:-}" ] && [ -x "$PG_BINDIR/pg_ctl" ]; then
        printf '%s\n' "$PG_BINDIR"
        return 0
    fi
    # shellcheck disable=SC2012 # plain directory names, ls is fine here
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
    if [ -n "$d" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ]; then
        printf '%s\n' "$d"
        return 0
    fi
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null || true)"
        if [ -n "$d" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ]; then
            printf '%s\n' "$d"
            return 0
        fi
    fi
    if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v pg_ctl)"
        return 0
    fi
    return 1
}

# Succeeds when something accepts TCP connections on host:port (needs no client tools).
_svc_port_open() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    _svc_timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# Makes psql, pg_isready and redis-cli available (installing them if we can).
# When a server will clearly be needed too (no URL given, nothing listening on the
# default address, no server binaries), it is installed in the same go.
_svc_ensure_clients() {
    local missing="" bindir host port
    if ! command -v psql >/dev/null 2>&1 || ! command -v pg_isready >/dev/null 2>&1; then
        # The server package ships the clients in its bin directory too.
        if bindir="$(_svc_pg_bindir)" && [ -x "$bindir/psql" ] && [ -x "$bindir/pg_isready" ]; then
            export PATH="$PATH:$bindir"
        else
            missing="$missing postgresql-client"
            _svc_split_addr "${SERVICES_DEFAULT_PG_ADDR:-127.0.0.1:5432}" host port
            if [ -z "${DATABASE_URL:-}" ] && ! _svc_pg_bindir >/dev/null && ! _svc_port_open "$host" "$port"; then
                missing="$missing postgresql"
            fi
        fi
    fi
    if ! command -v redis-cli >/dev/null 2>&1; then
        missing="$missing redis-tools"
        _svc_split_addr "${SERVICES_DEFAULT_REDIS_ADDR:-127.0.0.1:6379}" host port
        if [ -z "${REDIS_URL:-}" ] && ! command -v redis-server >/dev/null 2>&1 && ! _svc_port_open "$host" "$port"; then
            missing="$missing redis-server"
        fi
    fi
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086
        _svc_install $missing
    fi
}

# ---------------------------------------------------------------------------
# Probes

# psql against a URL or connection options; succeeds when `select 1` works.
# On failure, _SVC_PG_ERR holds the first line of psql's error.
_SVC_PG_ERR=""
_svc_pg_can_connect() {
    local err
    if err="$(PGCONNECT_TIMEOUT="${PGCONNECT_TIMEOUT:-5}" _svc_timeout 15 \
        psql -X -w -A -t -q "$@" -c 'select 1' 2>&1 >/dev/null)"; then
        return 0
    fi
    _SVC_PG_ERR="$(printf '%s\n' "$err" | sed -n '1{s/^psql: //;s/^error: //;p;}')"
    return 1
}

_svc_redis_ping() {
    local out
    out="$(_svc_timeout 5 redis-cli --no-auth-warning "$@" ping 2>/dev/null)" || return 1
    [ "$out" = PONG ]
}

# Splits "host:port" into the variables named by $2 and $3.
_svc_split_addr() {
    local addr="$1"
    printf -v "$2" '%s' "${addr%:*}"
    printf -v "$3" '%s' "${addr##*:}"
}

# ---------------------------------------------------------------------------
# PostgreSQL

# Runs a command as the postgres user when we are root (initdb and pg_ctl refuse root).
_svc_as_pg() {
    if _svc_is_root; then
        if command -v runuser >/dev/null 2>&1; then
            runuser -u postgres -- "$@"
        else
            # shellcheck disable=SC2016 # expanded by the inner shell
            su postgres -s /bin/sh -c '"$0" "$@"' -- "$@"
        fi
    else
        "$@"
    fi
}

# Prints a postgres:// URL for a server at host:port that we can use, if any.
_svc_pg_probe() {
    local host="$1" port="$2" user
    PGCONNECT_TIMEOUT=3 _svc_timeout 10 pg_isready -q -h "$host" -p "$port" >/dev/null 2>&1 || return 1
    for user in postgres root "${USER:-$(id -un)}"; do
        if _svc_pg_can_connect -h "$host" -p "$port" -U "$user" -d postgres; then
            printf 'postgres://%s@%s:%s/postgres\n' "$user" "$host" "$port"
            return 0
        fi
    done
    _svc_log "services: PostgreSQL answers at $host:$port, but none of the users postgres, root, ${USER:-$(id -un)} can connect without a password; not using it"
    return 1
}

# Arguments: bindir datadir logdir port.
_svc_pg_ctl_start() {
    _svc_as_pg "$1/pg_ctl" -D "$2" -l "$3/postgres.log" \
        -o "-p $4 -k /tmp -c listen_addresses=127.0.0.1" -w start >"$3/pg_ctl.log" 2>&1
}

# Starts (or reuses) the private instance; prints its URL and what was done.
_svc_pg_private() {
    local port="${LOCAL_PG_PORT:-55432}" bindir base datadir major have note="started"
    if _svc_pg_can_connect -h 127.0.0.1 -p "$port" -U postgres -d postgres; then
        printf 'postgres://postgres@127.0.0.1:%s/postgres already running\n' "$port"
        return 0
    fi
    if PGCONNECT_TIMEOUT=3 pg_isready -q -h 127.0.0.1 -p "$port" >/dev/null 2>&1; then
        _svc_die "something else answers on 127.0.0.1:$port and user postgres cannot connect; set LOCAL_PG_PORT to a free port"
    fi

    bindir="$(_svc_pg_bindir)" || _svc_die "PostgreSQL server binaries (initdb, pg_ctl) not found"
    if _svc_is_root && ! id postgres >/dev/null 2>&1; then
        _svc_die "running as root, but there is no 'postgres' user to run the server as (initdb refuses root)"
    fi

    base="$_SVC_ROOT/.local/pg"
    mkdir -p "$base"
    if _svc_is_root; then
        chown postgres: "$base"
        if ! _svc_as_pg test -w "$base"; then
            # e.g. a clone under /root (mode 700): the postgres user cannot reach it.
            base="/var/tmp/chat-backend-$(printf '%s' "$_SVC_ROOT" | cksum | cut -d' ' -f1)/pg"
            _svc_log "services: the postgres user cannot access $_SVC_ROOT/.local/pg; using $base instead"
            mkdir -p "$base"
            chmod 755 "$(dirname "$base")"
            chown postgres: "$base"
        fi
    fi
    datadir="$base/data"
    if _svc_is_root && [ -d "$datadir" ] && [ "$(stat -c %U "$datadir" 2>/dev/null)" != postgres ]; then
        chown -R postgres: "$base"
    fi

    # Already running from this data directory, but on another port (LOCAL_PG_PORT changed)?
    have="$(sed -n 4p "$datadir/postmaster.pid" 2>/dev/null || true)"
    if [ -n "$have" ] && [ "$have" != "$port" ] &&
        _svc_as_pg "$bindir/pg_ctl" -D "$datadir" status >/dev/null 2>&1; then
        _svc_die "the private PostgreSQL in $datadir is already running on port $have, not $port; stop it first ($(_svc_is_root && printf 'runuser -u postgres -- ')$bindir/pg_ctl -D $datadir stop), or set LOCAL_PG_PORT=$have"
    fi

    major="$("$bindir/postgres" --version 2>/dev/null | sed -E 's/^[^0-9]*([0-9]+).*/\1/')"
    if [ -f "$datadir/PG_VERSION" ]; then
        have="$(cat "$datadir/PG_VERSION")"
        if [ -n "$major" ] && [ "$have" != "$major" ]; then
            _svc_die "$datadir was created by PostgreSQL $have but the binaries are $major; remove $base and run again"
        fi
    else
        note="initialised and started"
        rm -rf "$datadir"
        _svc_as_pg "$bindir/initdb" -D "$datadir" -U postgres -A trust -E UTF8 >"$base/initdb.log" 2>&1 ||
            _svc_die "initdb failed; see $base/initdb.log"
    fi

    # Two tries: right after a crash, the old server's processes may still hold its shared memory.
    if ! _svc_pg_ctl_start "$bindir" "$datadir" "$base" "$port"; then
        sleep 2
        _svc_pg_ctl_start "$bindir" "$datadir" "$base" "$port" ||
            _svc_die "pg_ctl start failed; see $base/pg_ctl.log and $base/postgres.log"
    fi
    _svc_pg_can_connect -h 127.0.0.1 -p "$port" -U postgres -d postgres ||
        _svc_die "the private PostgreSQL started but does not accept connections; see $base/postgres.log"
    printf 'postgres://postgres@127.0.0.1:%s/postgres %s\n' "$port" "$note"
}

_svc_resolve_pg() {
    local host port url out
    if [ -n "${DATABASE_URL:-}" ]; then
        if ! _svc_pg_can_connect "$DATABASE_URL"; then
            _svc_die "DATABASE_URL is set to $(_svc_mask "$DATABASE_URL"), but connecting to it fails: ${_SVC_PG_ERR:-psql 'select 1' failed}. Fix or unset DATABASE_URL."
        fi
        _svc_log "services: postgres: $(_svc_mask "$DATABASE_URL") (from DATABASE_URL)"
        return 0
    fi
    _svc_split_addr "${SERVICES_DEFAULT_PG_ADDR:-127.0.0.1:5432}" host port
    if url="$(_svc_pg_probe "$host" "$port")"; then
        export DATABASE_URL="$url"
        _svc_log "services: postgres: $DATABASE_URL (running server)"
        return 0
    fi
    if ! _svc_pg_bindir >/dev/null; then
        _svc_install postgresql postgresql-client
        # The Debian package may have started its own cluster.
        if url="$(_svc_pg_probe "$host" "$port")"; then
            export DATABASE_URL="$url"
            _svc_log "services: postgres: $DATABASE_URL (newly installed server)"
            return 0
        fi
    fi
    out="$(_svc_pg_private)" || exit 1
    export DATABASE_URL="${out%% *}"
    _svc_log "services: postgres: $DATABASE_URL (private instance, ${out#* })"
}

# ---------------------------------------------------------------------------
# Redis

_svc_redis_private() {
    local port="${LOCAL_REDIS_PORT:-56379}" dir="$_SVC_ROOT/.local/redis" i
    if _svc_redis_ping -h 127.0.0.1 -p "$port"; then
        printf 'redis://127.0.0.1:%s already running\n' "$port"
        return 0
    fi
    command -v redis-server >/dev/null 2>&1 || _svc_die "redis-server not found"
    mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize yes --dir "$dir" --logfile "$dir/redis.log" --pidfile "$dir/redis.pid" >/dev/null ||
        _svc_die "redis-server failed to start; see $dir/redis.log"
    for i in $(seq 1 50); do
        if _svc_redis_ping -h 127.0.0.1 -p "$port"; then
            printf 'redis://127.0.0.1:%s started\n' "$port"
            return 0
        fi
        [ "$i" = 50 ] || sleep 0.1
    done
    _svc_die "the private Redis did not answer on 127.0.0.1:$port; see $dir/redis.log"
}

_svc_resolve_redis() {
    local host port out
    if [ -n "${REDIS_URL:-}" ]; then
        if ! _svc_redis_ping -u "$REDIS_URL"; then
            _svc_die "REDIS_URL is set to $(_svc_mask "$REDIS_URL"), but Redis does not answer PING there. Fix or unset REDIS_URL."
        fi
        _svc_log "services: redis: $(_svc_mask "$REDIS_URL") (from REDIS_URL)"
        return 0
    fi
    _svc_split_addr "${SERVICES_DEFAULT_REDIS_ADDR:-127.0.0.1:6379}" host port
    if _svc_redis_ping -h "$host" -p "$port"; then
        export REDIS_URL="redis://$host:$port"
        _svc_log "services: redis: $REDIS_URL (running server)"
        return 0
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        _svc_install redis-server redis-tools
        if _svc_redis_ping -h "$host" -p "$port"; then
            export REDIS_URL="redis://$host:$port"
            _svc_log "services: redis: $REDIS_URL (newly installed server)"
            return 0
        fi
    fi
    out="$(_svc_redis_private)" || exit 1
    export REDIS_URL="${out%% *}"
    _svc_log "services: redis: $REDIS_URL (private instance, ${out#* })"
}

# ---------------------------------------------------------------------------

ensure_services() {
    _svc_ensure_clients
    _svc_resolve_pg
    _svc_resolve_redis
}
