#!/usr/bin/env bash
# The comparison in BENCHMARKS.md: every strategy, REPEAT runs each (10 by default), with a
# propagation lag of 1 s and of 3 s. Needs root (each pod is a PID namespace). Writes the
# report and the plot of each lag to OUT (target/bench-rehearse by default).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PATH:/usr/sbin:/sbin"
if ! command -v tini >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends tini
fi
# Two builds, so that the supervisor is the lean one a pod runs (no features of the tools' deps).
cargo build --release --locked -p nginx-graceful
cargo build --release --locked -p nginx-graceful-tools
target=${CARGO_TARGET_DIR:-target}
out=${OUT:-$target/bench-rehearse}
mkdir -p "$out"
# Copies, so that a rebuild during the run changes nothing; rehearse runs the supervisor beside it.
cp "$target/release/nginx-graceful" "$target/release/nginx-graceful-tools" "$out/"
for lag in ${LAGS:-1s 3s}; do
    echo "== propagation lag $lag" >&2
    "$out/nginx-graceful-tools" rehearse --compare --repeat "${REPEAT:-10}" --propagation-lag "$lag" \
        --plot "$out/lag-$lag.svg" > "$out/lag-$lag.txt" || true
    sed -n '/^strategy /,$p' "$out/lag-$lag.txt"
done
