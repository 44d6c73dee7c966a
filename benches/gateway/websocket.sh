#!/usr/bin/env bash
# WebSocket messages through the gateway against nginx, side by side: one
# echo instance (crates/gateway/examples/bench_ws serve, one thread), and
# the same load (bench_ws load: CONNS WebSockets, each sending a SIZE-byte
# binary message and waiting for its echo, one at a time, on one thread)
# straight to the instance (direct), through nginx passing upgrades on as
# its documentation configures it (2 workers), and through the gateway
# (bench_gateway, 2 worker threads, its one route to the instance; the
# tunnel is the gateway's own, whatever the route's policies). Rounds are
# interleaved so the machine's drift hits all three alike; prints each
# round, then medians of round trips per second, p50/p99 round-trip time,
# the proxy's CPU time per message, and the gateway's ratios to nginx.
#
# Needs: nginx (Debian: `apt-get install -y nginx-light`), python3, cargo.
# Usage: benches/gateway/websocket.sh
# Env: ROUNDS (default 3), SECONDS_EACH (default 5), CONNS (default 64),
# SIZE (default 64 bytes), GW_THREADS (default 2), KEEP=1 keeps the temp dir.
set -euo pipefail
cd "$(dirname "$0")/../.."

source benches/gateway/common.sh

ROUNDS="${ROUNDS:-3}"
SECONDS_EACH="${SECONDS_EACH:-5}"
CONNS="${CONNS:-64}"
SIZE="${SIZE:-64}"
GW_THREADS="${GW_THREADS:-2}"
NGINX_WORKERS="$GW_THREADS"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
need "apt-get install -y nginx-light" python3 "$NGINX"

echo "building (release)..." >&2
build_release bench_ws
WS=target/release/examples/bench_ws
make_tmp flotilla-ws

declare -A PORT PID
PORT[direct]=$(free_port)
"$WS" serve "127.0.0.1:${PORT[direct]}" >"$TMP/instance.log" 2>&1 &
PIDS+=($!)
wait_port "${PORT[direct]}"

PORT[gateway]=$(free_port)
"$GW" --listen "127.0.0.1:${PORT[gateway]}" --upstream "127.0.0.1:${PORT[direct]}" \
  --threads "$GW_THREADS" >"$TMP/gateway.log" 2>&1 &
PID[gateway]=$!
PIDS+=("${PID[gateway]}")

PORT[nginx]=$(free_port)
NGINX_WEBSOCKET=1 start_nginx "$NGINX" "${PORT[nginx]}" "${PORT[direct]}"
PID[nginx]=$NGINX_PID
for t in gateway nginx; do wait_port "${PORT[$t]}"; done

TARGETS=(direct nginx gateway)
declare -A RATES P50S P99S CPUS LAST
HZ=$(getconf CLK_TCK)
echo "round | target  | round trips/s |  p50 µs |  p99 µs | proxy CPU µs/message"
for round in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    before=0
    [ "$t" = direct ] || before=$(ticks "${PID[$t]}")
    line=$("$WS" load "127.0.0.1:${PORT[$t]}" --connections "$CONNS" --seconds "$SECONDS_EACH" --size "$SIZE")
    cpu="-"
    read -r messages rate p50 p99 < <(echo "$line" | sed 's/[a-z0-9_]*=//g')
    if [ "$t" != direct ]; then
      after=$(ticks "${PID[$t]}")
      cpu=$(python3 -c "print(f'{($after - $before) / $HZ * 1e6 / max($messages, 1):.1f}')")
      CPUS[$t]+="$cpu "
    fi
    RATES[$t]+="$rate "
    LAST[$t]=$rate
    P50S[$t]+="$p50 "
    P99S[$t]+="$p99 "
    printf '%5s | %-7s | %13s | %7s | %7s | %s\n' "$round" "$t" "$rate" "$p50" "$p99" "$cpu"
  done
  python3 -c "print(f'round $round: gateway/nginx round trips {${LAST[gateway]} / ${LAST[nginx]}:.2f}x')"
done

echo
echo "medians of $ROUNDS rounds ($CONNS WebSockets, $SIZE-byte messages, ${SECONDS_EACH}s each):"
echo "target  | round trips/s |  p50 µs |  p99 µs | proxy CPU µs/message"
for t in "${TARGETS[@]}"; do
  cpu="-"
  # shellcheck disable=SC2086
  [ "$t" = direct ] || cpu=$(median ${CPUS[$t]})
  # shellcheck disable=SC2086
  printf '%-7s | %13s | %7s | %7s | %s\n' "$t" "$(median ${RATES[$t]})" "$(median ${P50S[$t]})" \
    "$(median ${P99S[$t]})" "$cpu"
done
# shellcheck disable=SC2086
python3 - "$(median ${RATES[gateway]})" "$(median ${RATES[nginx]})" \
  "$(median ${P99S[gateway]})" "$(median ${P99S[nginx]})" \
  "$(median ${CPUS[gateway]})" "$(median ${CPUS[nginx]})" <<'EOF'
import sys
g_rate, n_rate, g_p99, n_p99, g_cpu, n_cpu = map(float, sys.argv[1:])
print(f"gateway/nginx: round trips {g_rate / n_rate:.2f}x, p99 {g_p99 / n_p99:.2f}x, CPU per message {g_cpu / n_cpu:.2f}x")
EOF
