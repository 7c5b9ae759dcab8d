#!/usr/bin/env bash
# How many new connections the adaptive propagation delay sees: `run` with the bundled config,
# a drain, then COUNT connections (curl, one request each) spaced SPACING apart during the
# delay, each far from the others (the watch rests 50 ms after a wake), so each one seen is one
# burst in the drain's summary (propagation_arrivals). Prints seen / made for ROUNDS drains,
# and the connections that failed (the delay ended while they still came).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh >/dev/null
cargo build --release --locked -q -p nginx-graceful
bin=${CARGO_TARGET_DIR:-target}/release/nginx-graceful
count=${COUNT:-40}
spacing=${SPACING:-0.1}
rounds=${ROUNDS:-5}
port=${PORT:-18480}
work=$(mktemp -d)
# nginx's workers (user nobody) stat the drain flag in it.
chmod 755 "$work"
supervisor=
cleanup() {
    [ -z "$supervisor" ] || kill -KILL "$supervisor" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
total_made=0
total_seen=0
for round in $(seq "$rounds"); do
    log=$work/run-$round.log
    "$bin" --log-format json run --runtime-dir "$work/rt-$round" --listen "127.0.0.1:$port" \
        --health-listen off --max-propagation-delay 20s >"$log" 2>&1 &
    supervisor=$!
    for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:$port/" && break
        sleep 0.05
    done
    kill -TERM "$supervisor"
    sleep 0.2
    failed=0
    for _ in $(seq "$count"); do
        curl -s -o /dev/null "http://127.0.0.1:$port/" || failed=$((failed + 1))
        sleep "$spacing"
    done
    wait "$supervisor" || true
    supervisor=
    seen=$(grep -o '"propagation_arrivals":[0-9]*' "$log" | tail -1 | cut -d: -f2)
    echo "round $round: seen ${seen:-?} of $count new connections, $failed failed"
    total_made=$((total_made + count))
    total_seen=$((total_seen + ${seen:-0}))
done
echo "seen $total_seen of $total_made new connections ($((100 * total_seen / total_made)) %)"
