#!/usr/bin/env bash
# nginx with the bundled config under nginx-graceful: nginx on 127.0.0.1:8080, /healthz and
# /readyz on 127.0.0.1:8081. Press Ctrl-C to watch the ordered drain (twice to skip the delay).
# Extra arguments go to `nginx-graceful run`, e.g. --propagation-delay 2s.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh demo
export PATH="$PATH:/usr/sbin:/sbin"
cargo build --release --locked -p nginx-graceful
exec "${CARGO_TARGET_DIR:-target}/release/nginx-graceful" run \
    --listen 127.0.0.1:8080 \
    --health-listen 127.0.0.1:8081 \
    --runtime-dir "${TMPDIR:-/tmp}/nginx-graceful-demo" \
    "$@"
