#!/usr/bin/env bash
# An access log on: the gateway writing its access log to a file (as
# `flotilla up` always does) against nginx writing its own (access_log to
# a file, the combined format, a write per request), both passing
# requests on to the same upstream. Beside them, each without a log
# (gw-plain, nginx), for what the log costs each.
#
# Each target is loaded with wrk -t1 -c64 for DURATION, ROUNDS times, the
# targets interleaved; prints each round, then medians of requests/s,
# p50/p99 and the proxy's CPU time per request (all its processes and
# threads: the gateway's log writer and nginx's writes included), and the
# ratios. The user-space instructions a line costs each, which do not move
# with the machine: `ACCESS_LOG=1 benches/gateway/instructions.sh`.
#
# Needs: wrk, nginx, curl (Debian: `apt-get install -y wrk nginx-light
# curl`), cargo. Usage: benches/gateway/access_log.sh
# Env: ROUNDS (default 3), DURATION (default 6s), GW_THREADS (default 2),
# KEEP=1 keeps the temp dir (wrk's output, logs, nginx.conf).
set -euo pipefail
cd "$(dirname "$0")/../.."

source benches/gateway/common.sh

proxy_bench_settings
need "apt-get install -y wrk nginx-light curl" wrk curl "$NGINX"

proxy_bench_start access-log

declare -A PORT PID URL
start_gw_target gw-log --access-log "$TMP/gw-log.access"
start_gw_target gw-plain
NGINX_ACCESS_LOG="$TMP/nginx-log.access" start_nginx_target nginx-log
start_nginx_target nginx
for t in gw-log gw-plain nginx-log nginx; do wait_port "${PORT[$t]}"; done

HZ=$(getconf CLK_TCK)
declare -A RATES P50S P99S CPUS
echo
echo "GET /item, wrk -t1 -c64 -d$DURATION, $ROUNDS rounds; gw-log and nginx-log write a line per request"
TARGETS=(gw-log nginx-log)
measure_rounds gw-log nginx-log 64
# Each must have written its lines, or it measured a proxy without a log.
for t in gw-log nginx-log; do
  [ -s "$TMP/$t.access" ] || { echo "$t wrote no access log" >&2; exit 1; }
done
# shellcheck disable=SC2086
GC="$(median ${CPUS[gw-log]})" NC="$(median ${CPUS[nginx-log]})"
# shellcheck disable=SC2086
awk -v g="$(median ${RATES[gw-log]})" -v n="$(median ${RATES[nginx-log]})" -v gc="$GC" -v nc="$NC" 'BEGIN {
    printf "gw-log/nginx-log: %.2fx the requests/s at %.2fx the CPU per request\n", g / n, gc / nc }'
echo
echo "for scale, without a log:"
TARGETS=(gw-plain nginx)
measure_rounds gw-plain nginx 64
# (measure_rounds starts its medians afresh: the logged ones are in GC, NC.)
# shellcheck disable=SC2086
awk -v gc="$GC" -v nc="$NC" -v gp="$(median ${CPUS[gw-plain]})" -v np="$(median ${CPUS[nginx]})" 'BEGIN {
    printf "CPU per request a log adds (medians, with less without): gateway %.1f us, nginx %.1f us\n", gc - gp, nc - np }'
