#!/usr/bin/env bash
# Refusing a flood: the gateway with a rate limit of 1/m per ip (a route's
# `rate_limit = "1/m per ip"`) against nginx with limit_req at 1r/m per
# address (limit_req_status 429, refusals not logged), both loaded by one
# client far over its limit, so that every request but the first is
# refused with 429 at the proxy and none reaches the upstream. What a
# gateway spends on a client it refuses is what it has left for the
# others when one floods it. Beside them, each proxy passing requests on
# (gw-plain, nginx without the limit), for scale.
#
# Each target is loaded with wrk -t1 -c64 for DURATION, ROUNDS times, the
# targets interleaved; prints each round, then medians of requests/s,
# p50/p99 and the proxy's CPU time per request, and the ratio. The
# instructions a refusal costs each, which do not move with the machine:
# `REFUSALS=1 benches/gateway/instructions.sh`.
#
# Needs: wrk, nginx, curl (Debian: `apt-get install -y wrk nginx-light
# curl`), cargo. Usage: benches/gateway/refusals.sh
# Env: ROUNDS (default 3), DURATION (default 6s), GW_THREADS (default 2),
# KEEP=1 keeps the temp dir (wrk's output, logs, nginx.conf).
set -euo pipefail
cd "$(dirname "$0")/../.."

source benches/gateway/common.sh

proxy_bench_settings
need "apt-get install -y wrk nginx-light curl" wrk curl "$NGINX"

proxy_bench_start refusals

declare -A PORT PID URL
start_gw_target gw-429 --rate-limit "1/m per ip"
start_gw_target gw-plain
NGINX_LIMIT_REQ=1r/m start_nginx_target nginx-429
start_nginx_target nginx
for t in gw-429 gw-plain nginx-429 nginx; do wait_port "${PORT[$t]}"; done

# Each limited proxy must pass the first request and refuse the next, or
# it measures nothing.
for t in gw-429 nginx-429; do
  codes="$(curl -s -o /dev/null -w '%{http_code}' "${URL[$t]}") $(curl -s -o /dev/null -w '%{http_code}' "${URL[$t]}")"
  [ "$codes" = "200 429" ] || { echo "$t answered $codes, not 200 429: it does not limit" >&2; exit 1; }
done

HZ=$(getconf CLK_TCK)
declare -A RATES P50S P99S CPUS
echo
echo "GET /item, wrk -t1 -c64 -d$DURATION, $ROUNDS rounds; gw-429 and nginx-429 refuse every request"
TARGETS=(gw-429 nginx-429)
REFUSING=1 measure_rounds gw-429 nginx-429 64
# shellcheck disable=SC2086
awk -v g="$(median ${RATES[gw-429]})" -v n="$(median ${RATES[nginx-429]})" \
  -v gc="$(median ${CPUS[gw-429]})" -v nc="$(median ${CPUS[nginx-429]})" 'BEGIN {
    printf "gw-429/nginx-429: %.2fx the refusals/s at %.2fx the CPU per refusal\n", g / n, gc / nc }'
echo
echo "for scale, passing requests on:"
TARGETS=(gw-plain nginx)
measure_rounds gw-plain nginx 64
