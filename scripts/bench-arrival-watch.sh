#!/usr/bin/env bash
# What watching new connections costs while nginx serves: `run` with the bundled config under
# SECS seconds of connection-per-request load (soak, RATE requests/s), once with the default
# adaptive delay (arrivals watched) and once with a fixed one (nothing watched). Prints the
# supervisor's CPU time and its threads' context switches (wake-ups) per second of load.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh >/dev/null
# Two builds, so that the supervisor is the lean one a pod runs (no features of the tools' deps).
cargo build --release --locked -q -p nginx-graceful
cargo build --release --locked -q -p nginx-graceful-tools
target=${CARGO_TARGET_DIR:-target}/release
secs=${SECS:-10}
rate=${RATE:-2000}
port=${PORT:-18580}
work=$(mktemp -d)
# nginx's workers (user nobody) stat the drain flag in it.
chmod 755 "$work"
supervisor=
cleanup() {
    [ -z "$supervisor" ] || kill -KILL "$supervisor" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
ticks=$(getconf CLK_TCK)

# utime + stime of the process, in clock ticks; and the context switches of all its threads.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
switches() { cat /proc/"$1"/task/*/status | awk '/ctxt_switches/ {n += $2} END {print n}'; }

for delay in auto 5s; do
    "$target/nginx-graceful" run --runtime-dir "$work/rt-$delay" --listen "127.0.0.1:$port" \
        --health-listen off --propagation-delay "$delay" >"$work/$delay.log" 2>&1 &
    supervisor=$!
    for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:$port/" && break
        sleep 0.05
    done
    sleep 1.5 # the watch starts a second after nginx
    cpu0=$(cpu_ticks "$supervisor")
    sw0=$(switches "$supervisor")
    "$target/nginx-graceful-tools" soak --url "http://127.0.0.1:$port/" --no-keepalive -c 16 \
        --rate "$rate" --duration "${secs}s" >"$work/soak-$delay.txt"
    cpu1=$(cpu_ticks "$supervisor")
    sw1=$(switches "$supervisor")
    kill -INT "$supervisor"
    kill -INT "$supervisor" # a second Ctrl-C skips the delay
    wait "$supervisor" || true
    supervisor=
    requests=$(awk '/^requests/ {print $2}' "$work/soak-$delay.txt")
    awk -v d="$delay" -v c=$((cpu1 - cpu0)) -v t="$ticks" -v s=$((sw1 - sw0)) -v secs="$secs" -v r="$requests" \
        'BEGIN { printf "--propagation-delay %-4s  %s requests  supervisor CPU %.2f %%  wake-ups %.1f/s\n", d, r, 100 * c / t / secs, s / secs }'
done
