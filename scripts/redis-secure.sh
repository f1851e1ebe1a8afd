#!/usr/bin/env bash
# Redis as the template's ElastiCache runs it: in-transit encryption (TLS
# only, no plain port) and an AUTH token, from the installed redis-server.
# The token holds characters an ElastiCache token may hold and a URL may not
# (# ? % : !), and the certificate comes from a private CA that only
# SSL_CERT_FILE makes trusted, so a test on it proves the service builds its
# URL, speaks TLS and verifies the server the way it must on AWS.
#
#   scripts/redis-secure.sh start            # a single Redis on REDIS_SECURE_PORT (7301)
#   scripts/redis-secure.sh start --cluster  # a cluster (3 + 3 nodes) on 7311..7316
#   scripts/redis-secure.sh stop             # both, with their files
#
# `start` prints the service's configuration as `export` lines, in the
# template's shape (REDIS_HOST, REDIS_PORT, REDIS_TLS, REDIS_PASSWORD,
# REDIS_CLUSTER) plus SSL_CERT_FILE: eval "$(scripts/redis-secure.sh start)".
# Files (CA, certificate, token, data, logs) under <repo>/.local/redis-secure/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$ROOT/.local/redis-secure"
single_port="${REDIS_SECURE_PORT:-7301}"
cluster_base="${REDIS_SECURE_CLUSTER_BASE_PORT:-7311}"

die() {
    echo "redis-secure: $*" >&2
    exit 1
}

# The CA, the server's certificate (for 127.0.0.1 and localhost) and the
# token, made once and reused.
material() {
    command -v openssl >/dev/null 2>&1 || die "openssl not found (apt-get install openssl)"
    mkdir -p "$dir/tls"
    local t="$dir/tls"
    if [ ! -s "$t/redis.crt" ]; then
        openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=chat-local test CA" \
            -keyout "$t/ca.key" -out "$t/ca.crt" >/dev/null 2>&1 || die "openssl could not make the CA"
        openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
            -keyout "$t/redis.key" -out "$t/redis.csr" >/dev/null 2>&1 || die "openssl could not make a key"
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$t/san.ext"
        openssl x509 -req -in "$t/redis.csr" -CA "$t/ca.crt" -CAkey "$t/ca.key" -CAcreateserial \
            -days 30 -extfile "$t/san.ext" -out "$t/redis.crt" >/dev/null 2>&1 ||
            die "openssl could not sign the certificate"
        chmod 600 "$t"/*.key
    fi
    if [ ! -s "$dir/password" ]; then
        printf 'tok#%s?%%:!x' "$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')" >"$dir/password"
        chmod 600 "$dir/password"
    fi
}

# redis-cli speaking TLS to a server that does not would wait forever for
# its handshake: every call has a deadline.
cli_single() {
    timeout 5 redis-cli --tls --cacert "$dir/tls/ca.crt" -a "$(cat "$dir/password")" --no-auth-warning \
        -h 127.0.0.1 -p "$single_port" "$@"
}

cluster_env() {
    REDIS_CLUSTER_BASE_PORT="$cluster_base" REDIS_CLUSTER_DIR="$dir/cluster" \
        REDIS_CLUSTER_TLS_DIR="$dir/tls" REDIS_CLUSTER_PASSWORD="$(cat "$dir/password")" "$@"
}

# The configuration lines: the template's variables for HOST:PORT.
config() { # config PORT CLUSTER
    printf 'export REDIS_HOST=127.0.0.1 REDIS_PORT=%s REDIS_TLS=true REDIS_CLUSTER=%s\n' "$1" "$2"
    printf 'export REDIS_PASSWORD=%q\n' "$(cat "$dir/password")"
    printf 'export SSL_CERT_FILE=%q\n' "$dir/tls/ca.crt"
    echo "unset REDIS_URL"
}

# True when something listens on 127.0.0.1:$1.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_single() {
    if cli_single ping 2>/dev/null | grep -q PONG; then
        echo "redis-secure: already running on $single_port" >&2
        return 0
    fi
    # Another server (another checkout's, with its own CA and token) would
    # keep ours from binding and answer nothing we can check.
    port_taken "$single_port" &&
        die "port $single_port is taken by a server that does not answer with this checkout's CA and token; stop it (scripts/redis-secure.sh stop in its checkout) or set REDIS_SECURE_PORT"
    mkdir -p "$dir/single"
    redis-server --port 0 --tls-port "$single_port" --bind 127.0.0.1 \
        --tls-cert-file "$dir/tls/redis.crt" --tls-key-file "$dir/tls/redis.key" \
        --tls-ca-cert-file "$dir/tls/ca.crt" --tls-auth-clients no \
        --requirepass "$(cat "$dir/password")" \
        --save '' --appendonly no --daemonize yes --dir "$dir/single" \
        --logfile "$dir/single/redis.log" --pidfile "$dir/single/redis.pid" >/dev/null ||
        die "redis-server failed to start (built without TLS?); see $dir/single/redis.log"
    local i
    for i in $(seq 1 100); do
        cli_single ping 2>/dev/null | grep -q PONG && break
        sleep 0.05
    done
    cli_single ping 2>/dev/null | grep -q PONG || die "no TLS answer on $single_port; see $dir/single/redis.log"
    # A client without the token is refused: AUTH is on.
    timeout 5 redis-cli --tls --cacert "$dir/tls/ca.crt" -h 127.0.0.1 -p "$single_port" ping 2>&1 | grep -q NOAUTH ||
        die "Redis on $single_port answers without the token"
    echo "redis-secure: TLS + AUTH Redis on $single_port" >&2
}

start() {
    command -v redis-server >/dev/null 2>&1 || die "redis-server not found (apt-get install redis-server)"
    material
    case "${1:-}" in
    "")
        start_single
        config "$single_port" false
        ;;
    --cluster)
        cluster_env "$ROOT/scripts/redis-cluster.sh" start >/dev/null
        # One seed, as the template passes the configuration endpoint.
        config "$cluster_base" true
        ;;
    *) die "usage: scripts/redis-secure.sh start [--cluster]" ;;
    esac
}

stop() {
    if [ -s "$dir/password" ]; then
        cli_single shutdown nosave >/dev/null 2>&1 || true
        cluster_env "$ROOT/scripts/redis-cluster.sh" stop 2>/dev/null || true
    fi
    rm -rf "$dir"
    echo "redis-secure: stopped" >&2
}

case "${1:-}" in
start) start "${2:-}" ;;
stop) stop ;;
*)
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
