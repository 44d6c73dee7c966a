#!/usr/bin/env bash
# Where the CPU of a proxied request goes, by sampling, for gw-jwt-rl (the
# gateway with JWT and a per-user rate limit, as in run.sh) and nginx as a
# plain proxy, in front of the same upstream, under the same load.
#
# `perf record` samples each proxy's threads on the cpu-clock (this
# machine's VM has no hardware counters) while wrk drives it; the samples
# per 1000 requests are CPU time per request, split into the kernel's and
# user space's, and within user space two items callgrind cannot weigh:
# reading the clock through the vDSO (under valgrind it is a syscall) and
# memmove (large copies are one `rep movsb` instruction to callgrind).
# Each target gets ROUNDS rounds (default 2), interleaved; the table gives
# the medians, and the gateway's figures over nginx's.
#
# Needs: perf (Debian: linux-perf), wrk, nginx, python3, cargo.
# Usage: benches/gateway/profile.sh
# Env: ROUNDS (default 2), DURATION (default 5), FREQ (samples per second
# per thread, default 2999), GW_THREADS (default 2), KEEP=1 keeps the temp
# dir with the perf.data files.
set -euo pipefail
cd "$(dirname "$0")/../.."

source benches/gateway/common.sh

ROUNDS="${ROUNDS:-2}"
DURATION="${DURATION:-5}"
FREQ="${FREQ:-2999}"
GW_THREADS="${GW_THREADS:-2}"
NGINX_WORKERS="$GW_THREADS"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
need "apt-get install -y linux-perf wrk nginx-light" perf wrk python3 "$NGINX"

echo "building (release)..." >&2
build_release bench_upstream
BIN="target/release/examples"

make_tmp flotilla-profile
UP=$(free_port); JWT=$(free_port); NG=$(free_port)
start_upstream "$BIN/bench_upstream" "$UP"
"$GW" --listen "127.0.0.1:$JWT" --upstream "127.0.0.1:$UP" --threads "$GW_THREADS" \
  "${JWT_RL_ARGS[@]}" >"$TMP/gw-jwt-rl.log" 2>&1 &
JWT_PID=$!; PIDS+=($!)
start_nginx "$NGINX" "$NG" "$UP"
for port in "$JWT" "$NG"; do wait_port "$port"; done
TOKEN="$(token_of "$TMP/gw-jwt-rl.log" JWT)"

# threads_of PID: the thread ids of PID and its children, comma-separated.
threads_of() {
  local p t ids=""
  for p in "$1" $(pgrep -P "$1" || true); do
    for t in /proc/"$p"/task/*; do ids="$ids,${t##*/}"; done
  done
  echo "${ids#,}"
}

for round in $(seq 1 "$ROUNDS"); do
  for target in gw-jwt-rl:"$JWT":"$JWT_PID" nginx:"$NG":"$NGINX_PID"; do
    IFS=: read -r name port pid <<<"$target"
    wrk -t1 -c64 -d1s -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$port/" >/dev/null
    data="$TMP/$name-$round.data"
    perf record -q -F "$FREQ" -t "$(threads_of "$pid")" -o "$data" -- sleep "$DURATION" \
      >"$TMP/perf-$name-$round.log" 2>&1 &
    rec=$!
    out=$(wrk -t1 -c64 -d"${DURATION}s" -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$port/")
    wait "$rec"
    if echo "$out" | grep -q "Non-2xx"; then echo "$name answered non-2xx responses" >&2; exit 1; fi
    n=$(echo "$out" | awk '/requests in/ { print $1 }')
    perf script -i "$data" -F ip,sym,dso 2>/dev/null | python3 -c "
import sys
total = kernel = vdso = memmove = 0
for line in sys.stdin:
    total += 1
    if '[kernel.kallsyms]' in line:
        kernel += 1
    elif '[vdso]' in line:
        vdso += 1
    elif 'memmove' in line or 'memcpy' in line:
        memmove += 1
per = 1000 / $n
print('$name', $round, $n / $DURATION, total * per, kernel * per, (total - kernel) * per, vdso * per, memmove * per)
"
  done
done | tee "$TMP/rounds.txt" >/dev/null

echo "samples per 1000 requests at $FREQ Hz per thread (CPU time per request), medians of $ROUNDS rounds:"
python3 - "$TMP/rounds.txt" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    rows.setdefault(f[0], []).append([float(x) for x in f[2:]])
med = {name: [statistics.median(c) for c in zip(*rs)] for name, rs in rows.items()}
cols = ["req/s", "all", "kernel", "user", "vDSO", "memmove"]
print(f"{'target':10}" + "".join(f"{c:>10}" for c in cols))
for name, m in med.items():
    print(f"{name:10}" + f"{m[0]:10.0f}" + "".join(f"{x:10.2f}" for x in m[1:]))
g, n = med.get("gw-jwt-rl"), med.get("nginx")
if g and n:
    ratio = lambda a, b: f"{a / b:10.2f}" if b else f"{'-':>10}"
    print(f"{'gw / nginx':10}" + ratio(g[0], n[0]) + "".join(ratio(a, b) for a, b in zip(g[1:], n[1:])))
EOF
