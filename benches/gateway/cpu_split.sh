#!/usr/bin/env bash
# Where a proxy's CPU goes: user and system time per request at saturation,
# for the gateway's transport design alone (raw-h1), the gateway with
# nothing on (gw-plain) and with JWT + a per-user rate limit (gw-jwt-rl),
# and nginx as a plain proxy, in front of the same upstream.
#
# run.sh reports CPU per request as one figure (user + system); this splits
# it, from /proc (utime and stime of all a proxy's processes and threads),
# to tell the kernel's share (sockets, wake-ups: about the same for every
# proxy that makes the same syscalls) from the proxy's own work in user
# space, which is where the gateway and nginx differ. Beside the proxy's,
# the CPU per request of the other two processes on the machine's cores:
# the upstream (from /proc) and wrk (its rusage), so that a proxy that
# made the others work harder for each request (more segments, more
# wake-ups) would show it. Targets are interleaved, ROUNDS times (default
# 3); each round prints one line per target, then the medians. wrk -t1
# -c64, DURATION (default 5s) after a 1 s warm-up; the proxies get
# GW_THREADS worker threads/processes (default 2). With GW_THREADS=1 no
# state is shared between a proxy's cores: the difference from 2 is what
# sharing costs (cache lines moving between cores: callgrind cannot see it).
#
# Needs: wrk, nginx, python3, cargo. Usage: benches/gateway/cpu_split.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

source benches/gateway/common.sh

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
need "apt-get install -y wrk nginx-light" wrk python3 "$NGINX"

echo "building (release)..." >&2
build_release bench_upstream bench_raw_h1
BIN="target/release/examples"

# Worker threads (processes, for nginx) of every proxy.
THREADS="${GW_THREADS:-2}"
make_tmp flotilla-cpu-split
UP=$(free_port)
start_upstream "$BIN/bench_upstream" "$UP"
UP_PID=${PIDS[-1]}

RAW=$(free_port); PLAIN=$(free_port); JWT=$(free_port); NG=$(free_port)
"$BIN/bench_raw_h1" "127.0.0.1:$RAW" "127.0.0.1:$UP" "$THREADS" --per-core >"$TMP/raw-h1.log" 2>&1 &
RAW_PID=$!; PIDS+=($!)
"$GW" --listen "127.0.0.1:$PLAIN" --upstream "127.0.0.1:$UP" --threads "$THREADS" \
  >"$TMP/gw-plain.log" 2>&1 &
PLAIN_PID=$!; PIDS+=($!)
"$GW" --listen "127.0.0.1:$JWT" --upstream "127.0.0.1:$UP" --threads "$THREADS" \
  "${JWT_RL_ARGS[@]}" >"$TMP/gw-jwt-rl.log" 2>&1 &
JWT_PID=$!; PIDS+=($!)
NGINX_WORKERS=$THREADS start_nginx "$NGINX" "$NG" "$UP"
for port in "$RAW" "$PLAIN" "$JWT" "$NG"; do wait_port "$port"; done

TOKEN="$(token_of "$TMP/gw-jwt-rl.log" JWT)"

HZ=$(getconf CLK_TCK)
# wrk's own CPU time: the rusage of the child it was.
timed_wrk() {
  python3 -c '
import resource, subprocess, sys
out = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True).stdout
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(out)
print("wrk-cpu", ru.ru_utime + ru.ru_stime)' "$@"
}

echo "target     round   req/s   user us/req  sys us/req  total us/req  upstream us/req  wrk us/req"
for round in $(seq 1 "$ROUNDS"); do
  for target in raw-h1:"$RAW":"$RAW_PID" gw-plain:"$PLAIN":"$PLAIN_PID" \
    gw-jwt-rl:"$JWT":"$JWT_PID" nginx:"$NG":"$NGINX_PID"; do
    IFS=: read -r name port pid <<<"$target"
    wrk -t1 -c64 -d1s -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$port/" >/dev/null
    read -r u0 s0 < <(user_sys "$pid")
    up0=$(ticks "$UP_PID")
    out=$(timed_wrk wrk -t1 -c64 -d"${DURATION}s" -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$port/")
    read -r u1 s1 < <(user_sys "$pid")
    up1=$(ticks "$UP_PID")
    wrk_cpu=$(echo "$out" | awk '/^wrk-cpu/ { print $2 }')
    if echo "$out" | grep -q "Non-2xx"; then echo "$name answered non-2xx responses" >&2; exit 1; fi
    n=$(echo "$out" | awk '/requests in/ { print $1 }')
    python3 -c "
n, hz, d = $n, $HZ, $DURATION
u, s = ($u1 - $u0) * 1e6 / hz / n, ($s1 - $s0) * 1e6 / hz / n
up, w = ($up1 - $up0) * 1e6 / hz / n, $wrk_cpu * 1e6 / n
print(f'$name'.ljust(10), f'{$round:5d}', f'{n / d:8.0f}', f'{u:12.1f}', f'{s:11.1f}', f'{u + s:13.1f}',
      f'{up:16.1f}', f'{w:11.1f}')
"
  done
done | tee "$TMP/rounds.txt"

echo
echo "medians of $ROUNDS rounds:"
python3 - "$TMP/rounds.txt" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    rows.setdefault(f[0], []).append([float(x) for x in f[2:]])
for name, rs in rows.items():
    med = [statistics.median(col) for col in zip(*rs)]
    print(f"{name:10} {med[0]:8.0f} req/s  user {med[1]:5.1f} us  sys {med[2]:5.1f} us  total {med[3]:5.1f} us"
          f"  upstream {med[4]:5.1f} us  wrk {med[5]:5.1f} us")
EOF
