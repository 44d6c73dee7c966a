#!/usr/bin/env bash
# Response caching at the edge: the gateway with a route `cache` against
# nginx with `proxy_cache`, side by side, in front of the same plaintext
# upstream (bench_upstream, one thread). Every request is for one URL, so
# after the first each is answered from the proxy's cache: what is measured
# is a hit. Beside them, the same gateway without `cache` (gw-plain: every
# request forwarded, what a hit saves) and the upstream called directly
# (the floor of a request over loopback). Both proxies get GW_THREADS
# workers (default 2), no JWT and no rate limit. nginx keeps its cache in
# files (its design; they stay in the page cache), the gateway in memory.
#
# With GZIP=1 the URL is a 2.4 kB JSON page, the clients take gzip, and
# both proxies compress (level 5): nginx gzips every hit again, the
# gateway keeps the gzip with the entry. Without, the body is 3 bytes.
#
# Each target is loaded with wrk -t1 -c64 for DURATION, ROUNDS times, the
# targets interleaved (every other round in reverse order); prints each
# round, then medians of requests/s, p50/p99, the proxy's CPU time per
# request (all its threads and processes, /proc), and the ratios.
#
# Needs: wrk, nginx, curl (Debian: `apt-get install -y wrk nginx-light curl`),
# cargo.
# Usage: benches/gateway/cache.sh
# Env: ROUNDS (default 3), DURATION (default 6s), GW_THREADS (default 2),
# GZIP (default 0),
# KEEP=1 keeps the temp dir (wrk's output, logs, nginx.conf).
set -euo pipefail
cd "$(dirname "$0")/../.."

source benches/gateway/common.sh

proxy_bench_settings
GZIP="${GZIP:-0}"
ITEM=/item
WRK_ARGS=()
GW_FLAGS=()
if [ "$GZIP" = 1 ]; then
  ITEM=/json
  WRK_ARGS=(-H "Accept-Encoding: gzip")
  GW_FLAGS=(--gzip)
fi
need "apt-get install -y wrk nginx-light curl" wrk curl "$NGINX"

proxy_bench_start cache

declare -A PORT PID URL
TARGET_PATH=$ITEM
start_gw_target gw-cache "${GW_FLAGS[@]}" --cache
start_gw_target gw-plain "${GW_FLAGS[@]}"
NGINX_CACHE=1 NGINX_GZIP="$GZIP" start_nginx_target nginx-cache
PORT[upstream]=$UP
PID[upstream]=$UPSTREAM_PID
URL[upstream]="http://127.0.0.1:$UP$ITEM"
for t in gw-cache gw-plain nginx-cache; do wait_port "${PORT[$t]}"; done

# Both caches answer the second request: check it, so that a proxy that
# never kept anything cannot pass for a fast one.
for t in gw-cache nginx-cache; do
  curl -s -o /dev/null "${WRK_ARGS[@]}" "${URL[$t]}"
  head=$(curl -s -D - -o /dev/null "${WRK_ARGS[@]}" "${URL[$t]}" | tr -d '\r')
  said=$(awk -F': ' 'tolower($1) == "cache-status" {print $2}' <<<"$head")
  case "$said" in
    *hit* | HIT) ;;
    *) echo "$t did not answer from its cache (Cache-Status: '$said')" >&2; exit 1 ;;
  esac
  # And, with GZIP=1, gzipped: the work being compared.
  if [ "$GZIP" = 1 ] && ! grep -qi '^content-encoding: gzip' <<<"$head"; then
    echo "$t did not gzip its hit" >&2
    exit 1
  fi
done

TARGETS=(nginx-cache gw-cache gw-plain upstream)
HZ=$(getconf CLK_TCK)

declare -A RATES P50S P99S CPUS
echo
echo "one URL ($ITEM), wrk -t1 -c64 -d$DURATION ${WRK_ARGS[*]}, $ROUNDS rounds"
measure_rounds gw-cache nginx-cache 64 "${WRK_ARGS[@]}"
# shellcheck disable=SC2086
awk -v g="$(median ${RATES[gw-cache]})" -v n="$(median ${RATES[nginx-cache]})" \
  -v gc="$(median ${CPUS[gw-cache]})" -v nc="$(median ${CPUS[nginx-cache]})" \
  -v p="$(median ${RATES[gw-plain]})" -v pc="$(median ${CPUS[gw-plain]})" 'BEGIN {
    printf "gw-cache/nginx-cache: %.2fx the requests/s at %.2fx the CPU per request\n", g / n, gc / nc
    printf "gw-cache/gw-plain (what a hit saves the gateway): %.2fx the requests/s at %.2fx the CPU per request\n", g / p, gc / pc
  }'
