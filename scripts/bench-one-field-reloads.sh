#!/usr/bin/env bash
# Reloads under keep-alive load, two clients at once: soak's keep-alive mode (a close in any
# Connection field counts) and its first-field mode (only the first field counts, as Python's
# http.client). RELOADS `nginx-graceful reload`s (50 by default), 300 ms apart, against the
# bundled config on 127.0.0.1:8080 with the default close window. Prints each mode's JSON report.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PATH:/usr/sbin:/sbin"
cargo build --release --locked -p nginx-graceful
cargo build --release --locked -p nginx-graceful-tools
bin=${CARGO_TARGET_DIR:-target}/release
runtime=$(mktemp -d)
out=$(mktemp -d)
reloads=${RELOADS:-50}
"$bin/nginx-graceful" run --listen 127.0.0.1:8080 --health-listen off --runtime-dir "$runtime" \
    2> "$out/supervisor.log" &
supervisor=$!
trap 'kill -TERM $supervisor 2>/dev/null; wait $supervisor; rm -rf "$runtime" "$out"' EXIT
for _ in $(seq 50); do
    curl -sf -o /dev/null http://127.0.0.1:8080/ && break
    sleep 0.1
done
duration=$((reloads * 4 / 10 + 2))s
for mode in keepalive first-field; do
    "$bin/nginx-graceful-tools" soak --url http://127.0.0.1:8080/ "--$mode" -c 8 --rate 800 \
        --duration "$duration" --json > "$out/$mode.json" &
done
sleep 1
for i in $(seq "$reloads"); do
    "$bin/nginx-graceful" reload --runtime-dir "$runtime" > /dev/null 2>&1 || echo "reload $i failed" >&2
    sleep 0.3
done
# soak exits 1 when a request failed: its report says which.
wait $(jobs -p | grep -v "^$supervisor\$") || true
for mode in keepalive first-field; do
    echo "$mode: $(cat "$out/$mode.json")"
done
