#!/usr/bin/env bash
# Two builds of the gateway side by side, with nginx as the yardstick:
# gw-jwt-rl (JWT + a per-user rate limit, as in run.sh) from build A and
# build B, and nginx as a plain proxy, in front of the same upstream,
# measured in interleaved rounds (A, B, nginx, A, B, nginx, ...) so that
# the machine's drift hits all three alike. Prints each round and the
# medians of requests/s and CPU microseconds per request.
#
# Use it to judge a change that instructions.sh cannot: one whose cost is
# in cache misses, contention between cores or the kernel. Build A first,
# keep its binary, then:
#
#   cp target/release/bench_gateway /tmp/gw-before
#   ... change, cargo build --release -p flotilla-gateway-bench
#   benches/gateway/ab.sh /tmp/gw-before target/release/bench_gateway
#
# Needs: wrk and nginx (Debian: `apt-get install -y wrk nginx-light`),
# python3, cargo. Usage: benches/gateway/ab.sh BIN_A BIN_B
# Env: ROUNDS (default 6), DURATION (default 5s), CONNS (default 64),
# GW_THREADS (default 2), KEEP=1 keeps the temp dir.
set -euo pipefail
[ $# -eq 2 ] || { sed -n '2,20p' "$0" >&2; exit 2; }
A_BIN=$(realpath "$1")
B_BIN=$(realpath "$2")
cd "$(dirname "$0")/../.."

source benches/gateway/common.sh

ROUNDS="${ROUNDS:-6}"
DURATION="${DURATION:-5s}"
CONNS="${CONNS:-64}"
GW_THREADS="${GW_THREADS:-2}"
# nginx gets as many worker processes as the gateway has threads.
NGINX_WORKERS="$GW_THREADS"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
need "apt-get install -y wrk nginx-light" wrk python3 "$NGINX"

echo "building the upstream (release)..." >&2
cargo build --release --quiet -p flotilla-gateway --example bench_upstream
make_tmp flotilla-ab
UP=$(free_port)
start_upstream target/release/examples/bench_upstream "$UP"

declare -A PORT PID TOKEN
for side in A B; do
  bin=$A_BIN; [ "$side" = B ] && bin=$B_BIN
  PORT[$side]=$(free_port)
  "$bin" --listen "127.0.0.1:${PORT[$side]}" --upstream "127.0.0.1:$UP" --threads "$GW_THREADS" \
    "${JWT_RL_ARGS[@]}" >"$TMP/$side.log" 2>&1 &
  PID[$side]=$!
  PIDS+=("${PID[$side]}")
done
PORT[nginx]=$(free_port)
start_nginx "$NGINX" "${PORT[nginx]}" "$UP"
PID[nginx]=$NGINX_PID
for side in A B nginx; do wait_port "${PORT[$side]}"; done
for side in A B; do
  TOKEN[$side]="$(token_of "$TMP/$side.log" "$side")"
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer ${TOKEN[$side]}" \
    "http://127.0.0.1:${PORT[$side]}/" || echo "?")
  [ "$code" = 200 ] || { echo "sanity check failed: gateway $side answered $code (want 200)" >&2; exit 1; }
done
TOKEN[nginx]=${TOKEN[A]}
HZ=$(getconf CLK_TCK)

declare -A RPS CPU
echo "gw-jwt-rl, A=$1 B=$2; wrk -t1 -c$CONNS -d$DURATION, $ROUNDS rounds"
for round in $(seq 1 "$ROUNDS"); do
  line="round $round:"
  for side in A B nginx; do
    url="http://127.0.0.1:${PORT[$side]}/"
    auth=(-H "authorization: Bearer ${TOKEN[$side]}")
    wrk -t1 -c"$CONNS" -d1s "${auth[@]}" "$url" >/dev/null
    before=$(ticks "${PID[$side]}")
    rps=$(wrk -t1 -c"$CONNS" -d"$DURATION" "${auth[@]}" "$url" | awk '/^Requests\/sec:/ { print $2 }')
    after=$(ticks "${PID[$side]}")
    cpu=$(awk -v d=$((after - before)) -v hz="$HZ" -v r="${rps:-0}" -v s="${DURATION%s}" \
      'BEGIN { n = r * s; if (n > 0) printf "%.1f", d / hz * 1e6 / n; else print "-" }')
    RPS[$side]="${RPS[$side]:-} ${rps:-0}"
    CPU[$side]="${CPU[$side]:-} $cpu"
    line="$line $side $(printf '%.0f' "${rps:-0}") req/s ${cpu} us/req;"
  done
  echo "$line"
done
# shellcheck disable=SC2086
{
  a=$(median ${RPS[A]}); b=$(median ${RPS[B]}); n=$(median ${RPS[nginx]})
  ac=$(median ${CPU[A]}); bc=$(median ${CPU[B]}); nc=$(median ${CPU[nginx]})
}
awk -v a="$a" -v b="$b" -v n="$n" -v ac="$ac" -v bc="$bc" -v nc="$nc" 'BEGIN {
  printf "medians: A %.0f req/s (%.2fx nginx, %s us/req), B %.0f req/s (%.2fx nginx, %s us/req), nginx %.0f req/s (%s us/req)\n", a, a / n, ac, b, b / n, bc, n, nc;
  printf "B / A: %.3fx throughput, %.3fx CPU per request\n", b / a, bc / ac }'
