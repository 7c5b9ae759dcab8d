#!/usr/bin/env bash
# The supervisor table in BENCHMARKS.md: the release binary a pod runs, glibc and static (musl),
# against tini and dumb-init, in one run. Extra NAME=PATH entries in BENCH_SUPERVISORS_EXTRA are
# measured too (a build of another commit, say).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PATH:/usr/sbin:/sbin"
for peer in tini dumb-init; do
    command -v "$peer" >/dev/null || missing="${missing:-} $peer"
done
if [ -n "${missing:-}" ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
target=${CARGO_TARGET_DIR:-target}
out=$target/bench-supervisor
mkdir -p "$out"
# Built alone (-p), as the Dockerfile builds it: no feature of a dev-dependency leaks in.
cargo build --release --locked -p nginx-graceful
cp "$target/release/nginx-graceful" "$out/nginx-graceful-glibc"
cp "$(scripts/build-static.sh)" "$out/nginx-graceful-static"
supervisors="nginx-graceful run (glibc)=$out/nginx-graceful-glibc,nginx-graceful run (static)=$out/nginx-graceful-static"
[ -z "${BENCH_SUPERVISORS_EXTRA:-}" ] || supervisors="$supervisors,$BENCH_SUPERVISORS_EXTRA"
BENCH_SUPERVISORS="$supervisors" cargo bench --locked --bench supervisor
