#!/usr/bin/env bash
# The reconnect burst of a rolling update, for each `--close-spread` in SPREADS: a rollout of 4
# replicas (rehearse --rollout) under CLIENTS keep-alive clients over TLS (2000 by default)
# making RATE requests/s in all (2000), propagation lag LAG (1s), REPEAT rollouts (3) per
# setting. The table's burst column is the most new connections (TLS handshakes) one surviving
# pod received in 100 ms while an old pod drained. Needs root (each pod is a PID namespace).
# Writes the report to OUT (target/bench-spread by default).
#
#   scripts/bench-spread.sh
#   SPREADS="0 2s" RATE=10000 scripts/bench-spread.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PATH:/usr/sbin:/sbin"
cargo build --release --locked -p nginx-graceful
cargo build --release --locked -p nginx-graceful-tools
target=${CARGO_TARGET_DIR:-target}
out=${OUT:-$target/bench-spread}
mkdir -p "$out"
cp "$target/release/nginx-graceful" "$target/release/nginx-graceful-tools" "$out/"
# The pods' certificate (trusted as it is by the load, as `curl -k`), and the rehearsal config
# listening with TLS, with room for every client on one worker.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=rehearsal.local -keyout "$out/key.pem" -out "$out/cert.pem" 2>/dev/null
sed -e "s|listen @LISTEN@;|listen @LISTEN@ ssl; ssl_certificate $out/cert.pem; ssl_certificate_key $out/key.pem;|" \
    -e 's|worker_connections 1024;|worker_connections 8192;|' nginx-conf/rehearsal.conf > "$out/tls.conf"
grep -q 'listen @LISTEN@ ssl;' "$out/tls.conf"
grep -q 'worker_connections 8192;' "$out/tls.conf"
rows=()
for spread in ${SPREADS:-0 1s 2s 4s}; do
    rows+=(--graceful-args "--close-spread $spread")
done
name="spread-clients-${CLIENTS:-2000}-rate-${RATE:-2000}-lag-${LAG:-1s}"
"$out/nginx-graceful-tools" rehearse --rollout --tls --config "$out/tls.conf" --modes keepalive \
    --path-mix '/=1' --concurrency "${CLIENTS:-2000}" --rate "${RATE:-2000}" \
    --propagation-lag "${LAG:-1s}" --warmup 3s --repeat "${REPEAT:-3}" "${rows[@]}" \
    > "$out/$name.txt" || true
grep -E '^== |^  (v1-|keep-alive|rollout:|failed by)' "$out/$name.txt"
sed -n '/^strategy /,$p' "$out/$name.txt"
