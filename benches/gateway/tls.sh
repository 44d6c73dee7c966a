#!/usr/bin/env bash
# HTTPS at the edge: the gateway terminating TLS ([gateway.tls]) against
# nginx terminating TLS (`listen ... ssl`, Debian's OpenSSL), side by side,
# in front of the same plaintext upstream (bench_upstream, one thread),
# with the same certificate (ECDSA P-256, made here with openssl), both
# offering TLS 1.3 and 1.2 (wrk, with OpenSSL, takes 1.3). Both proxies
# get GW_THREADS workers (default 2), no JWT and no rate limit: what is
# measured is the TLS. The gateway without TLS (gw-plain) runs beside them
# as the reference for what TLS costs. Two loads, the targets interleaved
# in each of ROUNDS rounds (every other round in reverse order):
#
#  - keep-alive: wrk -t1 -c64, requests over established connections (the
#    records' encryption and decryption);
#  - handshakes: wrk -t1 -c16 with `Connection: close`, a new connection,
#    and a full handshake (wrk resumes no session), for every request: the
#    key exchange and the certificate's signature.
#
# Prints each round, then medians of requests/s, p50/p99, the proxy's CPU
# time per request (all its threads and processes, /proc), and the
# gateway/nginx ratios.
#
# Needs: wrk, nginx (Debian: `apt-get install -y wrk nginx-light`),
# openssl, cargo.
# Usage: benches/gateway/tls.sh
# Env: ROUNDS (default 3), DURATION (default 6s), GW_THREADS (default 2),
# KEEP=1 keeps the temp dir (wrk's output, logs, nginx.conf).
set -euo pipefail
cd "$(dirname "$0")/../.."

source benches/gateway/common.sh

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-6s}"
GW_THREADS="${GW_THREADS:-2}"
NGINX_WORKERS="$GW_THREADS"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
need "apt-get install -y wrk nginx-light openssl" wrk openssl "$NGINX"

echo "building (release)..." >&2
build_release bench_upstream
make_tmp flotilla-tls

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null

UP=$(free_port)
start_upstream target/release/examples/bench_upstream "$UP"

declare -A PORT PID URL
PORT[gw-tls]=$(free_port)
"$GW" --listen "127.0.0.1:${PORT[gw-tls]}" --upstream "127.0.0.1:$UP" --threads "$GW_THREADS" \
  --tls "$TMP" >"$TMP/gw-tls.log" 2>&1 &
PID[gw-tls]=$!
PIDS+=("${PID[gw-tls]}")
URL[gw-tls]="https://127.0.0.1:${PORT[gw-tls]}/"

PORT[gw-plain]=$(free_port)
"$GW" --listen "127.0.0.1:${PORT[gw-plain]}" --upstream "127.0.0.1:$UP" --threads "$GW_THREADS" \
  >"$TMP/gw-plain.log" 2>&1 &
PID[gw-plain]=$!
PIDS+=("${PID[gw-plain]}")
URL[gw-plain]="http://127.0.0.1:${PORT[gw-plain]}/"

PORT[nginx-tls]=$(free_port)
NGINX_TLS="$TMP" start_nginx "$NGINX" "${PORT[nginx-tls]}" "$UP"
PID[nginx-tls]=$NGINX_PID
URL[nginx-tls]="https://127.0.0.1:${PORT[nginx-tls]}/"
for t in gw-tls gw-plain nginx-tls; do wait_port "${PORT[$t]}"; done

TARGETS=(nginx-tls gw-tls gw-plain)
HZ=$(getconf CLK_TCK)

# wrk_run TARGET CONNS [wrk args...]: "REQ/S P50_MS P99_MS ERRORS".
wrk_run() {
  local t=$1 conns=$2 out="$TMP/wrk-$1.txt"
  shift 2
  wrk -t1 -c"$conns" -d"$DURATION" --latency "$@" "${URL[$t]}" >"$out" 2>&1 || true
  local errors
  errors=$(awk '/Socket errors|Non-2xx/ {s = s $0 "; "} END {print (s == "" ? "0" : "!")}' "$out")
  echo "$(wrk_figures "$out") ${errors}"
}

# load NAME CONNS [wrk args...]: every round of every target, then the medians.
load() {
  local name=$1 conns=$2
  shift 2
  local -A rates p50s p99s cpus last
  local round t before after out rps p50 p99 errors cpu note
  echo
  echo "$name: wrk -t1 -c$conns -d$DURATION${*:+ $*}, $ROUNDS rounds"
  for round in $(seq 1 "$ROUNDS"); do
    for t in $(round_order "$round" "${TARGETS[@]}"); do
      DURATION=1s wrk_run "$t" "$conns" "$@" >/dev/null
      before=$(ticks "${PID[$t]}")
      out=$(wrk_run "$t" "$conns" "$@")
      after=$(ticks "${PID[$t]}")
      read -r rps p50 p99 errors <<<"$out"
      cpu=$(awk -v d=$((after - before)) -v hz="$HZ" -v r="$rps" -v s="${DURATION%s}" \
        'BEGIN { n = r * s; if (n > 0) printf "%.1f", d / hz * 1e6 / n; else print "-" }')
      rates[$t]+="$rps "
      p50s[$t]+="$p50 "
      p99s[$t]+="$p99 "
      cpus[$t]+="$cpu "
      last[$t]=$rps
      note=""
      [ "$errors" = 0 ] || note=" (wrk saw socket errors or non-2xx answers; KEEP=1 keeps its output)"
      echo "  round $round $t: $rps req/s p50 $p50 ms p99 $p99 ms cpu $cpu us/req$note" >&2
    done
    awk -v a="${last[gw-tls]}" -v b="${last[nginx-tls]}" -v r="$round" \
      'BEGIN { if (b > 0) printf "  round %d: gw-tls/nginx-tls %.2fx\n", r, a / b }' >&2
  done
  printf '%-10s | %10s | %8s | %8s | %12s\n' target "req/s" "p50 ms" "p99 ms" "cpu us/req"
  for t in "${TARGETS[@]}"; do
    # shellcheck disable=SC2086
    printf '%-10s | %10s | %8s | %8s | %12s\n' "$t" "$(median ${rates[$t]})" \
      "$(median ${p50s[$t]})" "$(median ${p99s[$t]})" "$(median ${cpus[$t]})"
  done
  # shellcheck disable=SC2086
  awk -v g="$(median ${rates[gw-tls]})" -v n="$(median ${rates[nginx-tls]})" \
    -v gc="$(median ${cpus[gw-tls]})" -v nc="$(median ${cpus[nginx-tls]})" \
    -v p="$(median ${rates[gw-plain]})" -v pc="$(median ${cpus[gw-plain]})" 'BEGIN {
      printf "gw-tls/nginx-tls: %.2fx the requests/s at %.2fx the CPU per request\n", g / n, gc / nc
      printf "gw-tls/gw-plain (what TLS costs the gateway): %.2fx the requests/s at %.2fx the CPU per request\n", g / p, gc / pc
    }'
}

load keep-alive 64
load handshakes 16 -H "Connection: close"
