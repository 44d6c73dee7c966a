#!/usr/bin/env bash
# External authorization at the edge: the gateway with `[gateway.authz]`
# (every request first checked by a policy service) against nginx with
# `auth_request` (every request first checked by a subrequest), side by
# side, in front of the same plaintext upstream (bench_upstream, one
# thread), which is also the policy service and allows everything. Beside
# them, each proxy without the check (gw-plain, nginx), what a check costs
# each, and the upstream called directly. Both proxies get GW_THREADS
# workers (default 2), no JWT and no rate limit, and keep their
# connections to the upstream (and to the policy) open.
#
# A check is a second request to the upstream for every request, so the
# upstream's one thread does twice the work: what is compared is the two
# proxies' ratios, not either's throughput against gw-plain's.
#
# Each target is loaded with wrk -t1 -c64 for DURATION, ROUNDS times, the
# targets interleaved (every other round in reverse order); prints each
# round, then medians of requests/s, p50/p99, the proxy's CPU time per
# request (all its threads and processes, /proc), and the ratios.
#
# Needs: wrk, nginx with its auth_request module (Debian's nginx-light has
# it), curl (Debian: `apt-get install -y wrk nginx-light curl`), cargo.
# Usage: benches/gateway/authz.sh
# Env: ROUNDS (default 3), DURATION (default 6s), GW_THREADS (default 2),
# KEEP=1 keeps the temp dir (wrk's output, logs, nginx.conf).
set -euo pipefail
cd "$(dirname "$0")/../.."

source benches/gateway/common.sh

proxy_bench_settings
need "apt-get install -y wrk nginx-light curl" wrk curl "$NGINX"
"$NGINX" -V 2>&1 | grep -q -- --with-http_auth_request_module ||
  { echo "this nginx has no auth_request module (Debian's nginx-light has it)" >&2; exit 1; }

proxy_bench_start authz

declare -A PORT PID URL
start_gw_target gw-authz --authz
start_gw_target gw-plain
NGINX_AUTH_REQUEST=1 start_nginx_target nginx-authz
start_nginx_target nginx
PORT[upstream]=$UP
PID[upstream]=$UPSTREAM_PID
URL[upstream]="http://127.0.0.1:$UP/item"
for t in gw-authz gw-plain nginx-authz nginx; do wait_port "${PORT[$t]}"; done

# The policy (the upstream) refuses /deny: both checking proxies must
# answer it 403, and pass /item, so that a proxy that never asked cannot
# pass for a fast one.
for t in gw-authz nginx-authz; do
  deny="${URL[$t]%/item}/deny"
  got="$(curl -s -o /dev/null -w '%{http_code}' "$deny") $(curl -s -o /dev/null -w '%{http_code}' "${URL[$t]}")"
  [ "$got" = "403 200" ] || { echo "$t: /deny and /item answered $got, not 403 200: it does not ask the policy" >&2; exit 1; }
done

TARGETS=(nginx-authz gw-authz nginx gw-plain upstream)
HZ=$(getconf CLK_TCK)

declare -A RATES P50S P99S CPUS
echo
echo "GET /item, wrk -t1 -c64 -d$DURATION, $ROUNDS rounds"
measure_rounds gw-authz nginx-authz 64
# shellcheck disable=SC2086
awk -v g="$(median ${RATES[gw-authz]})" -v n="$(median ${RATES[nginx-authz]})" \
  -v gc="$(median ${CPUS[gw-authz]})" -v nc="$(median ${CPUS[nginx-authz]})" \
  -v gp="$(median ${RATES[gw-plain]})" -v np="$(median ${RATES[nginx]})" 'BEGIN {
    printf "gw-authz/nginx-authz: %.2fx the requests/s at %.2fx the CPU per request\n", g / n, gc / nc
    printf "with the check / without: gateway %.2fx, nginx %.2fx the requests/s\n", g / gp, n / np
  }'
