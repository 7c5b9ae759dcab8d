#!/usr/bin/env bash
# The rolling-termination tables in BENCHMARKS.md: for each propagation lag in LAGS, REPEAT
# rehearsals of each strategy in STRATEGIES (every preset when empty), in the client modes of
# MODES. RATE and CONCURRENCY set the load (rehearse's defaults: as fast as the pods answer,
# over 32 connections per mode); EXTRA goes to rehearse as it is. ROLLOUT=1 rehearses a whole
# rolling update (rehearse --rollout, 4 replicas) instead of one termination. Needs root (each
# pod is a PID namespace). Writes the report and the plot of each lag to OUT
# (target/bench-rehearse by default).
#
#   scripts/bench-rehearse.sh             # every strategy (nginx-graceful also with a fixed 5 s
#                                         # delay), 3 runs each, 4 lags: about 15 minutes
#   ROLLOUT=1 LAGS="1s 8s" scripts/bench-rehearse.sh
#   STRATEGIES=nginx-graceful REPEAT=10 scripts/bench-rehearse.sh
#   STRATEGIES=nginx-graceful LAGS=3s RATE=2 CONCURRENCY=2 REPEAT=10 scripts/bench-rehearse.sh
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
load=()
[ -z "${RATE:-}" ] || load+=(--rate "$RATE")
[ -z "${CONCURRENCY:-}" ] || load+=(--concurrency "$CONCURRENCY")
# shellcheck disable=SC2206 # EXTRA is words for rehearse
extra=(${EXTRA:-})
[ -z "${ROLLOUT:-}" ] || extra+=(--rollout)
# Every strategy: nginx-graceful with its defaults, and with the fixed 5 s delay it had before.
[ -n "${STRATEGIES:-}" ] || extra+=(--graceful-args '' --graceful-args '--propagation-delay 5s')
for lag in ${LAGS:-1s 3s 8s 15s}; do
    echo "== propagation lag $lag" >&2
    name="${ROLLOUT:+rollout-}lag-$lag${RATE:+-rate-$RATE}"
    "$out/nginx-graceful-tools" rehearse --compare ${STRATEGIES:-} --repeat "${REPEAT:-3}" \
        --propagation-lag "$lag" --modes "${MODES:-close,keepalive,first-field}" "${load[@]}" \
        "${extra[@]}" --plot "$out/$name.svg" > "$out/$name.txt" || true
    sed -n '/^strategy /,$p' "$out/$name.txt"
done
