#!/usr/bin/env bash
# Flotilla's gateway against nginx, side by side, in one run, in front of
# the same trivial plaintext upstream (crates/gateway/examples/bench_upstream):
#
#   upstream       the upstream called directly (the floor)
#   nginx          nginx as a plain reverse proxy (the baseline)
#   gw-plain       the gateway, no JWT, no rate limit
#   gw-jwt-rl      the gateway, JWT (EdDSA) and a per-user rate limit on,
#                  the limit high enough never to refuse
#   hyper-min      the smallest hyper 1.x reverse proxy (no layers, no
#                  checks; crates/gateway/examples/bench_hyper_minimal): the
#                  floor of what a hyper-based proxy costs
#   raw-h1         the gateway's transport design with nothing else (one
#                  task per connection owning its upstream connection,
#                  httparse, a runtime per thread as the gateway's workers
#                  have; crates/gateway/examples/bench_raw_h1): the
#                  floor of the gateway's own design
#   gw-mtls        gw-jwt-rl with its normal mutual-TLS upstream hop (as
#                  under `flotilla up`), to a second upstream process that
#                  serves mTLS only; not comparable to nginx's plaintext hop,
#                  reported for what the mesh costs
#   gw-pgo         with PGO=1 only: gw-jwt-rl built with profile-guided
#                  optimisation (benches/gateway/pgo.sh; run first if
#                  target/pgo/bench_gateway is missing or older than the sources)
#
# Two measurements per target, each DURATION long with wrk, each taken
# ROUNDS times (targets interleaved) and reported as medians:
#   max    closed loop, CONNS connections: requests/s, p50, p99;
#   paced  every target at the same rate, half of gw-jwt-rl's max, to read
#          the latency a proxy adds when it is not saturated. wrk2 is not in
#          Debian, so the pace comes from wrk's `delay()` hook: N connections
#          each wait 5-15 ms (10 on average, at random so they do not move
#          in step) between requests (N = rate / 100). The achieved rate is
#          printed; it is slightly below the target (10 ms + the response
#          time per request and connection).
#
# The paced runs also read each target's CPU time from /proc (utime+stime of
# all its processes and threads) and print it per request: the figure that
# shows where a proxy spends, independent of how the 2 cores are shared.
# Each run also prints the machine's steal time (/proc/stat): the share of
# its CPU time the hypervisor gave to other guests while wrk ran, which
# slows whichever target it lands on; the most of any run is said at the end.
# And the machine's idle share (/proc/stat; in the paced runs the spinners
# below keep it at 0) and the target's context switches per request (every
# thread's, /proc/<pid>/task/*/status): whether a proxy leaves CPU unused,
# or switches more than another, at its maximum.
#
# SPIN (default 1) keeps every CPU busy during the paced runs with a
# spinner at the lowest priority there is (SCHED_IDLE: any thread that
# wakes preempts it at once), so that no CPU goes idle between requests.
# On a virtual machine an idle CPU halts, and waking it again (an
# interrupt to the hypervisor, which must schedule the virtual CPU again)
# took up to milliseconds here, with steal of 10-20 % in the paced runs:
# that wait fell on every hop of every target and was most of the paced
# p99 (docs/benchmarks.md). With the spinners the paced p99 is the
# targets' own, as on a machine whose CPUs wake in microseconds. The
# spinners' time is not any target's, so the CPU per request is unchanged
# in meaning. SPIN=0 measures without them. Needs chrt and taskset.
#
# Ratios are against nginx. The gateway, nginx, hyper-min and raw-h1 each
# get GW_THREADS worker threads/processes (default 2); wrk 1 thread; the
# upstream 1 thread. On a 2-core machine all of them share the cores, so
# read the figures as relative.
#
# Needs: wrk and nginx (Debian: `apt-get install -y wrk nginx-light`),
# python3 (free ports), cargo. Usage: benches/gateway/run.sh
# Env: DURATION (default 6s), ROUNDS (default 3), CONNS (default 64), GW_THREADS (the gateways'
# worker threads, default 2; 1 with PIN=1), KEEP=1 keeps the temp dir, SPIN
# (default 1; see above), PIN (default 0; see below), ONLY (measure only
# upstream, nginx and gw-jwt-rl, which the goal needs, and the targets
# named: ONLY="" for just those three, ONLY="raw-h1" to add raw-h1; for
# many rounds in less time), PGO (default 0; 1 adds gw-pgo, and ONLY
# keeps it).
#
# PIN=1 gives the proxies a core of their own: every proxy (all its
# threads and processes) on CPU 1, wrk and the upstreams on CPU 0, one
# worker each. Unshared, the paced p99 is what the proxy itself adds (its
# hop and its work), not how the scheduler shares two cores among four busy
# programs; the maximum is one core's worth of proxying. Needs taskset and
# at least 2 CPUs.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION="${DURATION:-6s}"
ROUNDS="${ROUNDS:-3}"
CONNS="${CONNS:-64}"
PIN="${PIN:-0}"
SPIN="${SPIN:-1}"
if [ "$SPIN" = 1 ]; then
  for tool in chrt taskset; do
    command -v "$tool" >/dev/null 2>&1 || { echo "SPIN=1 needs $tool (util-linux); or run with SPIN=0" >&2; exit 1; }
  done
fi
if [ "$PIN" = 1 ]; then
  GW_THREADS="${GW_THREADS:-1}"
  command -v taskset >/dev/null 2>&1 || { echo "PIN=1 needs taskset (util-linux)" >&2; exit 1; }
  [ "$(nproc)" -ge 2 ] || { echo "PIN=1 needs 2 CPUs" >&2; exit 1; }
else
  GW_THREADS="${GW_THREADS:-2}"
fi
# nginx gets as many worker processes as the gateway has threads.
NGINX_WORKERS="$GW_THREADS"

missing=""
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
NGINX="$(command -v nginx || true)"
[ -z "$NGINX" ] && [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx
[ -z "$NGINX" ] && missing="$missing nginx"
command -v python3 >/dev/null 2>&1 || missing="$missing python3"
if [ -n "$missing" ]; then
  echo "missing:$missing — install with: apt-get install -y wrk nginx-light python3" >&2
  exit 1
fi

echo "building (release)..." >&2
source benches/gateway/common.sh
build_release bench_upstream bench_hyper_minimal bench_raw_h1
BIN="target/release/examples"
PGO="${PGO:-0}"
[ "$PGO" = 1 ] && pgo_build_current

make_tmp flotilla-bench

declare -A PID_OF
UP_PORT=$(free_port)
"$BIN/bench_upstream" "127.0.0.1:$UP_PORT" >"$TMP/upstream.log" 2>&1 &
PIDS+=($!)
PID_OF[upstream]=$!
wait_port "$UP_PORT"

MIN_PORT=$(free_port)
"$BIN/bench_hyper_minimal" "127.0.0.1:$MIN_PORT" "127.0.0.1:$UP_PORT" "$GW_THREADS" >"$TMP/hyper-min.log" 2>&1 &
PIDS+=($!)
PID_OF[hyper-min]=$!

RAW_PORT=$(free_port)
"$BIN/bench_raw_h1" "127.0.0.1:$RAW_PORT" "127.0.0.1:$UP_PORT" "$GW_THREADS" --per-core >"$TMP/raw-h1.log" 2>&1 &
PIDS+=($!)
PID_OF[raw-h1]=$!

# The mTLS hop's identities (a CA, the gateway's leaf, the upstream's).
"$GW" --issue "$TMP/ids"
UP_TLS_PORT=$(free_port)
"$BIN/bench_upstream" "127.0.0.1:$UP_TLS_PORT" --tls "$TMP/ids/upstream" >"$TMP/upstream-tls.log" 2>&1 &
PIDS+=($!)
UP_TLS_PID=$!
wait_port "$UP_TLS_PORT"

PLAIN_PORT=$(free_port)
"$GW" --listen "127.0.0.1:$PLAIN_PORT" --upstream "127.0.0.1:$UP_PORT" \
  --threads "$GW_THREADS" >"$TMP/gw-plain.log" 2>&1 &
PIDS+=($!)
PID_OF[gw-plain]=$!

JWT_PORT=$(free_port)
"$GW" --listen "127.0.0.1:$JWT_PORT" --upstream "127.0.0.1:$UP_PORT" \
  --threads "$GW_THREADS" "${JWT_RL_ARGS[@]}" >"$TMP/gw-jwt.log" 2>&1 &
PIDS+=($!)
PID_OF[gw-jwt-rl]=$!

MTLS_PORT=$(free_port)
"$GW" --listen "127.0.0.1:$MTLS_PORT" --upstream "127.0.0.1:$UP_TLS_PORT" \
  --threads "$GW_THREADS" "${JWT_RL_ARGS[@]}" \
  --upstream-tls "$TMP/ids/gateway" >"$TMP/gw-mtls.log" 2>&1 &
PIDS+=($!)
PID_OF[gw-mtls]=$!

if [ "$PGO" = 1 ]; then
  PGO_PORT=$(free_port)
  target/pgo/bench_gateway --listen "127.0.0.1:$PGO_PORT" --upstream "127.0.0.1:$UP_PORT" \
    --threads "$GW_THREADS" "${JWT_RL_ARGS[@]}" >"$TMP/gw-pgo.log" 2>&1 &
  PIDS+=($!)
  PID_OF[gw-pgo]=$!
fi

NGINX_PORT=$(free_port)
start_nginx "$NGINX" "$NGINX_PORT" "$UP_PORT"
PID_OF[nginx]=$NGINX_PID

wait_port "$PLAIN_PORT"
wait_port "$JWT_PORT"
wait_port "$NGINX_PORT"
wait_port "$MTLS_PORT"
wait_port "$MIN_PORT"
wait_port "$RAW_PORT"
[ "$PGO" = 1 ] && wait_port "$PGO_PORT"
# pin CPU PID...: every thread of each PID and of its children on CPU.
pin() {
  local cpu=$1 pid p
  shift
  for pid in "$@"; do
    for p in "$pid" $(pgrep -P "$pid" 2>/dev/null); do
      taskset -a -p -c "$cpu" "$p" >/dev/null
    done
  done
}
WRK=(wrk)
if [ "$PIN" = 1 ]; then
  pin 0 "${PID_OF[upstream]}" "$UP_TLS_PID"
  pin 1 "${PID_OF[nginx]}" "${PID_OF[hyper-min]}" "${PID_OF[raw-h1]}" "${PID_OF[gw-plain]}" \
    "${PID_OF[gw-jwt-rl]}" "${PID_OF[gw-mtls]}" ${PID_OF[gw-pgo]:-}
  WRK=(taskset -c 0 wrk)
  echo "pinned: proxies on CPU 1 ($GW_THREADS worker each), wrk and the upstreams on CPU 0" >&2
fi
TOKEN="$(token_of "$TMP/gw-jwt.log" JWT)" || exit 1
MTLS_TOKEN="$(token_of "$TMP/gw-mtls.log" mTLS)" || exit 1
if [ "$PGO" = 1 ]; then
  PGO_TOKEN="$(token_of "$TMP/gw-pgo.log" PGO)" || exit 1
  pcode=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $PGO_TOKEN" "http://127.0.0.1:$PGO_PORT/" 2>/dev/null || echo "?")
  [ "$pcode" = 200 ] || { echo "sanity check failed: the PGO gateway answered $pcode (want 200)" >&2; exit 1; }
fi
mcode=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $MTLS_TOKEN" "http://127.0.0.1:$MTLS_PORT/" 2>/dev/null || echo "?")
if command -v curl >/dev/null 2>&1 && [ "$mcode" != 200 ]; then
  echo "sanity check failed: through the mTLS upstream $mcode (want 200)" >&2
  exit 1
fi

# A token-bearing request must pass (and one without must not) before
# anything is measured.
code=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$JWT_PORT/" 2>/dev/null || echo "?")
nocode=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$JWT_PORT/" 2>/dev/null || echo "?")
if command -v curl >/dev/null 2>&1 && { [ "$code" != 200 ] || [ "$nocode" != 401 ]; }; then
  echo "sanity check failed: with token $code (want 200), without $nocode (want 401)" >&2
  exit 1
fi

# 5-15 ms (10 on average) rather than exactly 10: with a fixed delay the
# connections stay in step and every 10 ms the whole pace arrives as one
# burst, so the p99 would measure the burst's queue, not the proxy.
cat >"$TMP/paced.lua" <<'EOF'
math.randomseed(os.time())
function delay() return math.random(5, 15) end
EOF

HZ=$(getconf CLK_TCK)

# run NAME URL CONNS [extra wrk args...] -> "rps p50 p99 errors"
run() {
  local name=$1 url=$2 conns=$3; shift 3
  local out="$TMP/wrk-$name.txt"
  local auth=()
  [ "$name" = gw-jwt-rl ] && auth=(-H "authorization: Bearer $TOKEN")
  [ "$name" = gw-mtls ] && auth=(-H "authorization: Bearer $MTLS_TOKEN")
  [ "$name" = gw-pgo ] && auth=(-H "authorization: Bearer $PGO_TOKEN")
  "${WRK[@]}" -t1 -c"$conns" -d"$DURATION" --latency "${auth[@]}" "$@" "$url" >"$out" 2>&1 || true
  local non2xx
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$out")
  echo "$(wrk_figures "$out") ${non2xx:-0}"
}

declare -A URL=(
  [upstream]="http://127.0.0.1:$UP_PORT/"
  [nginx]="http://127.0.0.1:$NGINX_PORT/"
  [gw-plain]="http://127.0.0.1:$PLAIN_PORT/"
  [gw-jwt-rl]="http://127.0.0.1:$JWT_PORT/"
  [gw-mtls]="http://127.0.0.1:$MTLS_PORT/"
  [hyper-min]="http://127.0.0.1:$MIN_PORT/"
  [raw-h1]="http://127.0.0.1:$RAW_PORT/"
)
TARGETS=(upstream nginx hyper-min raw-h1 gw-plain gw-jwt-rl gw-mtls)
if [ "$PGO" = 1 ]; then
  URL[gw-pgo]="http://127.0.0.1:$PGO_PORT/"
  TARGETS+=(gw-pgo)
fi
if [ -n "${ONLY+set}" ]; then
  # The three the goal needs, and the others named.
  picked=(upstream nginx)
  for t in hyper-min raw-h1 gw-plain gw-jwt-rl gw-mtls gw-pgo; do
    [ "$t" = gw-pgo ] && [ "$PGO" != 1 ] && continue
    case " gw-jwt-rl gw-pgo $ONLY " in *" $t "*) picked+=("$t") ;; esac
  done
  for t in $ONLY; do
    [ -n "${URL[$t]:-}" ] || { echo "ONLY: no target '$t' (one of: ${TARGETS[*]})" >&2; exit 1; }
  done
  TARGETS=("${picked[@]}")
fi
declare -A MAX PACED CPU MAX_CPU MAX_RATIOS PACED_RATIOS
# per_req COUNT RPS: COUNT per request over one run (wrk's rate times the
# run's length: the requests served).
per_req() {
  awk -v c="$1" -v r="$2" -v s="${DURATION%s}" 'BEGIN { n = r * s; if (n > 0) printf "%.3f", c / n; else print "-" }'
}
# cpu_per_req TICKS RPS: CPU microseconds per request over one run.
cpu_per_req() {
  awk -v d="$1" -v hz="$HZ" -v r="$2" -v s="${DURATION%s}" \
    'BEGIN { n = r * s; if (n > 0) printf "%.1f", d / hz * 1e6 / n; else print "-" }'
}
# steal_now: "STEAL TOTAL", the machine's CPU time so far (all CPUs, in
# clock ticks) that the hypervisor gave to other guests, and all of it
# (/proc/stat's first line).
steal_now() {
  awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print $9 + 0, t; exit }' /proc/stat
}
# idle_now: "IDLE TOTAL", the machine's idle CPU time so far (idle and
# iowait, all CPUs, in clock ticks) and all of it; read with steal_pct.
idle_now() {
  awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print $5 + $6, t; exit }' /proc/stat
}
# steal_pct "STEAL TOTAL" "STEAL TOTAL": the share of the time between two
# readings the hypervisor took, in %.
steal_pct() {
  awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ");
    d = y[2] - x[2]; if (d > 0) printf "%.0f", (y[1] - x[1]) * 100 / d; else print 0 }'
}
# The most steal any measured run saw, in %.
MAX_STEAL=0
# maxof V...: the largest value.
maxof() {
  printf '%s\n' "$@" | sort -g | tail -n 1
}
# field N "A B C D"...: the Nth word of each argument.
field() {
  local n=$1; shift
  local x
  for x in "$@"; do echo "$x" | awk -v n="$n" '{ print $n }'; done
}

# The machine's throughput drifts by 10-15 % between runs, more than most
# changes move it, so each target is measured ROUNDS times, the targets
# interleaved (round 1 of every target, then round 2, ..., every other
# round in reverse order), and the
# medians reported; the gw-jwt-rl/nginx ratio is also given per round,
# from runs seconds apart.
#
# measure RESULT CPU_RESULT RATIOS CONNS [extra wrk args...]: every round
# of every target, each after a 1 s warm-up at the same connection count
# (a round outlasts the pools' 30 s idle timeout, and the connections and
# TLS handshakes a warm-up opens are not what is measured). Sets
# RESULT[target] to "rps p50 p99 non2xx" (medians; non2xx the most of any
# round), CPU_RESULT[target] to the median CPU microseconds per request
# (wrk's rate times the run's length: the requests served), and
# RATIOS[round] to that round's gw-jwt-rl/nginx throughput ratio.
measure() {
  local -n result=$1 cpu_result=$2 ratios=$3
  local conns=$4
  shift 4
  local -A runs_of cpus_of
  local round t before after rps cpu out jr nr stolen steal switched idled idle
  for round in $(seq 1 "$ROUNDS"); do
    for t in $(round_order "$round" "${TARGETS[@]}"); do
      DURATION=1s run "$t" "${URL[$t]}" "$conns" "$@" >/dev/null
      before=$(ticks "${PID_OF[$t]}")
      switched=$(switches "${PID_OF[$t]}")
      stolen=$(steal_now)
      idled=$(idle_now)
      out=$(run "$t" "${URL[$t]}" "$conns" "$@")
      idle=$(steal_pct "$idled" "$(idle_now)")
      after=$(ticks "${PID_OF[$t]}")
      switched=$(($(switches "${PID_OF[$t]}") - switched))
      steal=$(steal_pct "$stolen" "$(steal_now)")
      [ "$steal" -gt "$MAX_STEAL" ] && MAX_STEAL=$steal
      read -r rps _ <<<"$out"
      cpu=$(cpu_per_req $((after - before)) "$rps")
      runs_of[$t]="${runs_of[$t]:-}|$out"
      cpus_of[$t]="${cpus_of[$t]:-} $cpu"
      echo "  round $round $t: $out cpu $cpu us/req steal $steal% idle $idle% switches/req $(per_req "$switched" "$rps")" >&2
    done
    read -r jr _ <<<"$(echo "${runs_of[gw-jwt-rl]}" | awk -F'|' '{ print $NF }')"
    read -r nr _ <<<"$(echo "${runs_of[nginx]}" | awk -F'|' '{ print $NF }')"
    ratios[$round]=$(awk -v a="$jr" -v b="$nr" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    if [ -n "${runs_of[gw-pgo]:-}" ]; then
      read -r jr _ <<<"$(echo "${runs_of[gw-pgo]}" | awk -F'|' '{ print $NF }')"
      ratios[pgo-$round]=$(awk -v a="$jr" -v b="$nr" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    fi
  done
  local -a runs
  for t in "${TARGETS[@]}"; do
    IFS='|' read -r -a runs <<<"${runs_of[$t]#|}"
    # shellcheck disable=SC2046
    result[$t]="$(median $(field 1 "${runs[@]}")) $(median $(field 2 "${runs[@]}")) $(median $(field 3 "${runs[@]}")) $(maxof $(field 4 "${runs[@]}"))"
    # shellcheck disable=SC2086
    cpu_result[$t]=$(median ${cpus_of[$t]})
  done
}

echo "max throughput: wrk -t1 -c$CONNS -d$DURATION, $ROUNDS rounds" >&2
measure MAX MAX_CPU MAX_RATIOS "$CONNS"

read -r jwt_rps _ <<<"${MAX[gw-jwt-rl]}"
HALF=$(awk -v r="$jwt_rps" 'BEGIN { printf "%d", r / 2 }')
PACE_CONNS=$(awk -v r="$HALF" 'BEGIN { c = int(r / 100 + 0.5); if (c < 1) c = 1; print c }')
echo "paced at ~$HALF req/s (half of gw-jwt-rl's median max): $PACE_CONNS connections x 1 request / 10 ms, $ROUNDS rounds" >&2
SPINNERS=()
if [ "$SPIN" = 1 ]; then
  # One per CPU, each held to its CPU, at SCHED_IDLE (see SPIN above).
  for cpu in $(seq 0 $(($(nproc) - 1))); do
    taskset -c "$cpu" chrt -i 0 python3 -c 'while True: pass' &
    PIDS+=($!)
    SPINNERS+=($!)
  done
  echo "spinning: $(nproc) SCHED_IDLE spinners keep the CPUs from halting while paced (SPIN=0: without)" >&2
fi
measure PACED CPU PACED_RATIOS "$PACE_CONNS" -s "$TMP/paced.lua"
if [ "${#SPINNERS[@]}" -gt 0 ]; then
  kill "${SPINNERS[@]}" 2>/dev/null || true
  wait "${SPINNERS[@]}" 2>/dev/null || true
fi

read -r ng_rps ng_p50 ng_p99 _ <<<"${MAX[nginx]}"
read -r _ _ up_pp99 _ <<<"${PACED[upstream]}"
read -r _ _ ng_pp99 _ <<<"${PACED[nginx]}"
echo
printf '%-10s | %10s %8s %8s %6s %8s %10s | %10s %8s %8s %13s %10s\n' \
  target "max req/s" "p50 ms" "p99 ms" non2xx "x nginx" "cpu us/req" "paced r/s" "p50 ms" "p99 ms" "+p99 vs up" "cpu us/req"
printf -- '-----------+-------------------------------------------------------------+---------------------------------------------------------\n'
for t in "${TARGETS[@]}"; do
  read -r rps p50 p99 bad <<<"${MAX[$t]}"
  read -r prps pp50 pp99 _ <<<"${PACED[$t]}"
  ratio=$(awk -v a="$rps" -v b="$ng_rps" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
  added=$(awk -v a="$pp99" -v b="$up_pp99" 'BEGIN { printf "%+.3f ms", a - b }')
  printf '%-10s | %10.0f %8.3f %8.3f %6s %8s %10s | %10.0f %8.3f %8.3f %13s %10s\n' \
    "$t" "$rps" "$p50" "$p99" "$bad" "${ratio}x" "${MAX_CPU[$t]}" "$prps" "$pp50" "$pp99" "$added" "${CPU[$t]}"
done
echo
read -r jwt_rps jwt_p50 jwt_p99 _ <<<"${MAX[gw-jwt-rl]}"
read -r _ _ jwt_pp99 _ <<<"${PACED[gw-jwt-rl]}"
awk -v g="$jwt_rps" -v n="$ng_rps" -v gp="$jwt_pp99" -v up="$up_pp99" -v np="$ng_pp99" -v rounds="$(for r in $(seq 1 "$ROUNDS"); do printf '%s ' "${MAX_RATIOS[$r]}"; done)" 'BEGIN {
  printf "gw-jwt-rl throughput vs nginx: %.2fx of the medians; per round: %s (goal >= 1.0x)\n", g / n, rounds;
  above = 0; total = split(rounds, r, " "); for (i = 1; i <= total; i++) if (r[i] + 0 >= 1.0) above++;
  printf "gw-jwt-rl at or above nginx in %d of %d rounds\n", above, total;
  printf "gw-jwt-rl p99 added at half its max rate: %+.3f ms over the upstream alone (goal <= 1 ms); nginx adds %+.3f ms\n", gp - up, np - up }'
if [ "$PGO" = 1 ]; then
  read -r pgo_rps _ <<<"${MAX[gw-pgo]}"
  read -r _ _ pgo_pp99 _ <<<"${PACED[gw-pgo]}"
  awk -v g="$pgo_rps" -v n="$ng_rps" -v j="$jwt_rps" -v gp="$pgo_pp99" -v up="$up_pp99" -v rounds="$(for r in $(seq 1 "$ROUNDS"); do printf '%s ' "${MAX_RATIOS[pgo-$r]}"; done)" 'BEGIN {
    printf "gw-pgo (gw-jwt-rl built with PGO) throughput vs nginx: %.2fx of the medians (%.2fx gw-jwt-rl); per round: %s\n", g / n, g / j, rounds;
    above = 0; total = split(rounds, r, " "); for (i = 1; i <= total; i++) if (r[i] + 0 >= 1.0) above++;
    printf "gw-pgo at or above nginx in %d of %d rounds; p99 added at half gw-jwt-rl max rate: %+.3f ms\n", above, total, gp - up }'
fi
# On a virtual machine the hypervisor may give this machine's CPUs to
# other guests mid-run ("steal"): what it takes is not the proxies' doing
# and lands on whichever target was running. Said, so a run it disturbed
# is read as such.
if [ "$MAX_STEAL" -ge 5 ]; then
  echo "the hypervisor took up to $MAX_STEAL% of the CPU time during a measured run (steal, /proc/stat): figures from such rounds are the host's as much as the targets'"
else
  echo "steal (/proc/stat): at most $MAX_STEAL% during any measured run"
fi
