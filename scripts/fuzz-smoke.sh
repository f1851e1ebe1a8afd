#!/usr/bin/env bash
# Fuzz smoke test: runs every cargo-fuzz target in fuzz/ for a short while,
# starting from its committed seed corpus, and fails on any crash (a panic
# or a violated invariant in a target is a crash).
#
#   scripts/fuzz-smoke.sh                   # each target for FUZZ_SECONDS (30)
#   FUZZ_SECONDS=600 scripts/fuzz-smoke.sh  # a longer run
#   scripts/fuzz-smoke.sh client_event      # only these targets
#
# cargo-fuzz is installed from crates.io into ~/.cargo/bin when missing.
# It builds with -Z flags (sanitizer, coverage) that only a nightly rustc
# accepts; this machine has one stable toolchain and cannot fetch another,
# so RUSTC_BOOTSTRAP=1 unlocks them on stable. The builds (AddressSanitizer,
# release) go to their own cache, FUZZ_TARGET_DIR, so they never invalidate
# the main build: the first one takes several minutes, later ones seconds.
#
# New inputs libFuzzer finds go to a scratch directory, so the committed
# corpus stays as it is; a crash leaves its input in fuzz/artifacts/<target>/
# (replay it with `cargo fuzz run <target> <file>` from fuzz/).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-30}"

step() { printf '\n==> %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1 && [ -x "${HOME:-/nonexistent}/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    step "fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    (unset CARGO_TARGET_DIR && cargo install cargo-fuzz --locked)
fi

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${HOME:-/tmp}/.cache/chat-backend/fuzz-target}"
cd "$ROOT/fuzz"

step "fuzz: building the targets ($(cargo fuzz --version); build cache $CARGO_TARGET_DIR)"
cargo fuzz build -O

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

for target in "${targets[@]}"; do
    seeds="corpus/$target"
    [ -d "$seeds" ] || { echo "fuzz: no seed corpus at fuzz/$seeds" >&2; exit 1; }
    mkdir -p "$scratch/$target"
    step "fuzz: $target for ${SECONDS_PER_TARGET}s from $(find "$seeds" -type f | wc -l) seeds"
    # -rss_limit_mb: a leak or an unbounded allocation is a failure too.
    if ! cargo fuzz run -O "$target" "$scratch/$target" "$seeds" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 \
        -print_final_stats=1 >"$scratch/$target.log" 2>&1; then
        grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' "$scratch/$target.log" | tail -n 60 >&2
        echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$scratch/$target.log" >&2 || true
    echo "fuzz: $target passed" >&2
done
