#!/usr/bin/env bash
# Checks the deployment files, without AWS and without a Docker engine:
#
#   1. template.yaml with cfn-lint: errors fail the check, warnings are shown.
#   2. docker-compose.local.yml with the compose CLI (`docker compose`, else
#      `docker-compose`; installed with apt-get when running as root and
#      missing), which validates it without an engine; then, always, the
#      structural check of the topology (scripts/check_compose.py). Where no
#      compose CLI can run, the structural check alone decides.
#
#   scripts/check-deploy.sh
#
# cfn-lint comes from PyPI, into the venv of scripts/lib/pytools.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/pytools.sh
. "$ROOT/scripts/lib/pytools.sh"

step() { printf '\n==> %s\n' "$*" >&2; }

ensure_pytools

step "cfn-lint template.yaml ($(cfn-lint --version))"
rc=0
cfn-lint template.yaml || rc=$?
# cfn-lint's exit code is a bit mask: 1 fatal, 2 error, 4 warning, 8 informational.
if [ $((rc & 3)) -ne 0 ]; then
    echo "check-deploy: cfn-lint found errors in template.yaml" >&2
    exit 1
elif [ "$rc" -ne 0 ]; then
    echo "check-deploy: cfn-lint: warnings only (exit code $rc); not failing" >&2
else
    echo "check-deploy: cfn-lint: template.yaml is clean" >&2
fi

step "docker-compose.local.yml"
compose=()
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "check-deploy: no compose CLI; installing docker-compose (Debian package) to validate the file" >&2
    if { apt-get install -y -qq docker-compose >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null; }; } &&
        command -v docker-compose >/dev/null 2>&1; then
        compose=(docker-compose)
    else
        echo "check-deploy: installing docker-compose failed; the structural check decides alone" >&2
    fi
fi
if [ ${#compose[@]} -gt 0 ]; then
    echo "check-deploy: ${compose[*]} config (default services, then --profile scale, then --profile cluster)" >&2
    "${compose[@]}" -f docker-compose.local.yml config -q
    "${compose[@]}" -f docker-compose.local.yml --profile scale config -q
    "${compose[@]}" -f docker-compose.local.yml --profile cluster config -q
    echo "check-deploy: ${compose[*]}: docker-compose.local.yml is valid" >&2
else
    echo "check-deploy: no compose CLI here; the structural check decides alone" >&2
fi
python3 scripts/check_compose.py docker-compose.local.yml

step "deployment files checked"
