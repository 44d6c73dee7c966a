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

proxy_bench_settings
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
TARGET_PATH=/
TARGET_SCHEME=https start_gw_target gw-tls --tls "$TMP"
start_gw_target gw-plain
TARGET_SCHEME=https NGINX_TLS="$TMP" start_nginx_target nginx-tls
for t in gw-tls gw-plain nginx-tls; do wait_port "${PORT[$t]}"; done

TARGETS=(nginx-tls gw-tls gw-plain)
HZ=$(getconf CLK_TCK)

declare -A RATES P50S P99S CPUS

# load NAME CONNS [wrk args...]: every round of every target, then the
# medians and the ratios.
load() {
  local name=$1 conns=$2
  shift 2
  echo
  echo "$name: wrk -t1 -c$conns -d$DURATION${*:+ $*}, $ROUNDS rounds"
  measure_rounds gw-tls nginx-tls "$conns" "$@"
  # shellcheck disable=SC2086
  awk -v g="$(median ${RATES[gw-tls]})" -v n="$(median ${RATES[nginx-tls]})" \
    -v gc="$(median ${CPUS[gw-tls]})" -v nc="$(median ${CPUS[nginx-tls]})" \
    -v p="$(median ${RATES[gw-plain]})" -v pc="$(median ${CPUS[gw-plain]})" 'BEGIN {
      printf "gw-tls/nginx-tls: %.2fx the requests/s at %.2fx the CPU per request\n", g / n, gc / nc
      printf "gw-tls/gw-plain (what TLS costs the gateway): %.2fx the requests/s at %.2fx the CPU per request\n", g / p, gc / pc
    }'
}

load keep-alive 64
load handshakes 16 -H "Connection: close"
