#!/usr/bin/env bash
# What the drain snippet costs while nginx is not draining: one nginx with one worker, three
# servers: none without the snippet, old with the snippet from before the close spread (one
# stat() per request), new with today's (a regular expression on $connection and one stat()). soak drives each in turn at RATE requests/s on CLIENTS keep-alive connections, SECS
# seconds, ROUNDS times (the order reversed every other round). Prints, per run, the worker's
# CPU time per request (utime + stime from /proc, whatever else runs on the machine) and p99.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh >/dev/null
cargo build --release --locked -q -p nginx-graceful-tools
soak=${CARGO_TARGET_DIR:-target}/release/nginx-graceful-tools
secs=${SECS:-10}
rounds=${ROUNDS:-3}
clients=${CLIENTS:-8}
rate=${RATE:-20000}
none_port=${PORT:-18590}
old_port=$((none_port + 1))
new_port=$((none_port + 2))
work=$(mktemp -d)
# nginx's workers (user nobody when run as root) stat the flags in it.
chmod 755 "$work"
mkdir "$work/rt"
nginx_pid=
cleanup() {
    [ -z "$nginx_pid" ] || kill -TERM "$nginx_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The snippet as it was before the close spread.
git show 36996ad~1:nginx-conf/graceful-drain.conf >"$work/old.conf"
cp nginx-conf/graceful-drain.conf "$work/new.conf"
sed -i "s|/run/nginx-graceful|$work/rt|g" "$work/old.conf" "$work/new.conf"
cat >"$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/error.log notice;
daemon off;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $work/cb; proxy_temp_path $work/p; fastcgi_temp_path $work/f;
    uwsgi_temp_path $work/u; scgi_temp_path $work/s;
    server { listen 127.0.0.1:$none_port; location = / { return 200 "ok\n"; } }
    server { listen 127.0.0.1:$old_port; include $work/old.conf; location = / { return 200 "ok\n"; } }
    server { listen 127.0.0.1:$new_port; include $work/new.conf; location = / { return 200 "ok\n"; } }
}
CONF
nginx -e "$work/error.log" -c "$work/nginx.conf" &
nginx_pid=$!
for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$new_port/" && break
    sleep 0.05
done

worker=$(pgrep -P "$nginx_pid")
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ticks=$(getconf CLK_TCK)

echo "nginx $(nginx -v 2>&1 | sed 's/.*\///'), 1 worker; soak -c $clients keep-alive at $rate requests/s, ${secs}s per run"
order="none old new"
for round in $(seq "$rounds"); do
    for which in $order; do
        port=$none_port
        [ "$which" != old ] || port=$old_port
        [ "$which" != new ] || port=$new_port
        before=$(cpu_ticks "$worker")
        "$soak" soak --url "http://127.0.0.1:$port/" -c "$clients" --rate "$rate" --duration "${secs}s" \
            --json >"$work/$which-$round.json"
        after=$(cpu_ticks "$worker")
        jq -r --arg w "$which" --arg r "$round" --argjson cpu "$((after - before))" --argjson hz "$ticks" \
            '"round \($r) \($w): \(.ok) requests, worker CPU \($cpu * 1000000 / $hz / .ok * 100 | round / 100) us per request, p99 \(.latency_ms.p99) ms, \(.failed) failed"' \
            "$work/$which-$round.json"
    done
    order=$(echo "$order" | tr ' ' '\n' | tac | tr '\n' ' ')
done
