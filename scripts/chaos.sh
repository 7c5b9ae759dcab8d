#!/usr/bin/env bash
# Faults at random moments while `run` serves under load, each round ending in a drain; see
# scripts/chaos.py for what a round checks. Bounded: MINUTES (3 by default) plus one round.
#
#   scripts/chaos.sh                  # 3 minutes, a random seed (printed)
#   MINUTES=10 SEED=42 scripts/chaos.sh
#
# Prints one line per round and a JSON summary (the numbers in BENCHMARKS.md); exits 1 if any
# round failed, keeping that round's files.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PATH:/usr/sbin:/sbin"
cargo build --release --locked -p nginx-graceful
cargo build --release --locked -p nginx-graceful-tools
target=${CARGO_TARGET_DIR:-target}
out=$target/chaos
mkdir -p "$out"
# Copies, so that a rebuild during the run changes nothing.
cp "$target/release/nginx-graceful" "$target/release/nginx-graceful-tools" "$out/"
seed=()
[ -z "${SEED:-}" ] || seed=(--seed "$SEED")
exec python3 scripts/chaos.py --minutes "${MINUTES:-3}" "${seed[@]}" \
    --supervisor "$out/nginx-graceful" --tools "$out/nginx-graceful-tools" --workdir "$out/rounds"
