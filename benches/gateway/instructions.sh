#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's
# callgrind: the gateway (plain, and with JWT + rate limit) against the
# smallest proxy of the same transport design (bench_raw_h1, a runtime per
# thread as the gateway's workers have), each with one worker thread, and
# nginx (one process) as a plain proxy, in front of the same upstream.
#
# Unlike run.sh's timings these counts do not move with what else the
# machine is doing (callgrind counts instructions, it does not time them),
# so one run is enough to compare two builds of the gateway, and the
# figure to read is the ratio against raw-h1: what the gateway's own work
# (routing, headers, metrics, access log, request id, JWT, rate limit)
# costs on top of moving the bytes. nginx's count is the yardstick of the
# issue's goal. The kernel's share (about 60% of a proxied request's CPU at
# this size) is not counted.
#
# Needs: valgrind, wrk, nginx, python3, cargo. Usage: benches/gateway/instructions.sh
# Env: DURATION (default 6s, under callgrind: ~50x slower than native),
# TOP=N also prints each gateway's N costliest functions (self cost),
# CACHE=1 also simulates the caches and branch predictor (callgrind's
# --cache-sim and --branch-sim, with this machine's cache sizes) and prints
# L1 instruction and data cache misses and mispredicted branches per
# request: the gateway runs mostly straight-line code, so it misses the
# instruction cache far more often than nginx for as many instructions
# (docs/benchmarks.md), which the instruction count alone does not show.
# PGO=1 adds gw-pgo, gw-jwt-rl as built by benches/gateway/pgo.sh
# (target/pgo/bench_gateway; pgo.sh runs first if it is missing or older
# than the sources).
# AUTHZ=1 adds gw-authz (the bench gateway with `[gateway.authz]`: every
# request first checked by the upstream, as authz.sh runs it) and
# nginx-authz (nginx with `auth_request` to the same), and prints what a
# check costs each: its count less the same proxy's without the check.
# REFUSALS=1 adds gw-429 (the bench gateway with a rate limit of 1/m per
# ip, so that all but the first request are refused with 429) and
# nginx-429 (limit_req at 1r/m per address, refusing with 429), and prints
# what a refusal costs each: what a gateway spends on a flood over a limit.
# UNMATCHED=1 adds gw-404 (the bench gateway whose one route is /api/**,
# asked for /, a path no route matches) and nginx-404 (nginx proxying only
# /api/, answering any other path with a JSON 404), and prints what such
# an answer costs each: what a scanner probing paths costs a gateway.
# ACCESS_LOG=1 adds gw-log (the bench gateway writing its access log to a
# file, as `flotilla up` does) and nginx-log (nginx with access_log to a
# file, the combined format), and prints what a line costs each: its count
# less the same proxy's without a log. Only user space is counted: the
# writes and the wake-ups a line costs are the kernel's (access_log.sh
# times them).
# KEEP=1 keeps the temp dir with the callgrind files; benches/gateway/cgdiff.py
# compares two kept runs function by function, per request, and
# benches/gateway/cglines.py shows one line by line (build with
# CARGO_PROFILE_RELEASE_DEBUG=line-tables-only for the lines).
set -euo pipefail
cd "$(dirname "$0")/../.."

source benches/gateway/common.sh

DURATION="${DURATION:-6s}"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
need "apt-get install -y valgrind wrk nginx-light curl" valgrind callgrind_control callgrind_annotate wrk curl \
  python3 "$NGINX"

echo "building (release)..." >&2
build_release bench_upstream bench_raw_h1
BIN="target/release/examples"
PGO="${PGO:-0}"
[ "$PGO" = 1 ] && pgo_build_current

make_tmp flotilla-instr
UP=$(free_port)
start_upstream "$BIN/bench_upstream" "$UP"

RAW=$(free_port); PLAIN=$(free_port); JWT=$(free_port); NG=$(free_port); PGOP=$(free_port)
VG=(valgrind --tool=callgrind)
[ "${CACHE:-0}" = 1 ] && VG+=(--cache-sim=yes --branch-sim=yes)
# start NAME PORT CMD...: CMD under callgrind, its counts to $TMP/NAME.cg.
start() {
  local name=$1 port=$2; shift 2
  "${VG[@]}" --callgrind-out-file="$TMP/$name.cg" "$@" >"$TMP/$name.log" 2>&1 &
  PIDS+=($!)
  # valgrind starts slowly.
  wait_port "$port" 60
}
start raw-h1 "$RAW" "$BIN/bench_raw_h1" "127.0.0.1:$RAW" "127.0.0.1:$UP" 1 --per-core
start gw-plain "$PLAIN" "$GW" --listen "127.0.0.1:$PLAIN" --upstream "127.0.0.1:$UP" --threads 1
start gw-jwt-rl "$JWT" "$GW" --listen "127.0.0.1:$JWT" --upstream "127.0.0.1:$UP" --threads 1 \
  "${JWT_RL_ARGS[@]}"
NAMES=(raw-h1 gw-plain gw-jwt-rl nginx)
declare -A PORT=([raw-h1]=$RAW [gw-plain]=$PLAIN [gw-jwt-rl]=$JWT [nginx]=$NG)
if [ "$PGO" = 1 ]; then
  start gw-pgo "$PGOP" target/pgo/bench_gateway --listen "127.0.0.1:$PGOP" --upstream "127.0.0.1:$UP" \
    --threads 1 "${JWT_RL_ARGS[@]}"
  NAMES=(raw-h1 gw-plain gw-jwt-rl gw-pgo nginx)
  PORT[gw-pgo]=$PGOP
fi
start_nginx "$NGINX" "$NG" "$UP" "${VG[@]}" --callgrind-out-file="$TMP/nginx.cg"
wait_port "$NG" 60
# start_pair SUFFIX NGINX_SETTING [GATEWAY FLAGS...]: gw-SUFFIX, the bench
# gateway with FLAGS, and nginx-SUFFIX, nginx with NGINX_SETTING (one of
# start_nginx's VAR=VALUE settings), both counted.
start_pair() {
  local suffix=$1 setting=$2 g n out; shift 2
  out="$TMP/nginx-$suffix.cg"
  g=$(free_port); n=$(free_port)
  start "gw-$suffix" "$g" "$GW" --listen "127.0.0.1:$g" --upstream "127.0.0.1:$UP" --threads 1 "$@"
  # start_nginx writes under $TMP/nginx: this one's files under its own dir.
  mkdir -p "$TMP/nginx-$suffix"
  local TMP="$TMP/nginx-$suffix" "${setting%%=*}=${setting#*=}"
  start_nginx "$NGINX" "$n" "$UP" "${VG[@]}" --callgrind-out-file="$out"
  wait_port "$n" 60
  NAMES+=("gw-$suffix" "nginx-$suffix")
  PORT[gw-$suffix]=$g
  PORT[nginx-$suffix]=$n
}
# expect_codes SUFFIX WANT PATH...: each of the pair, asked for each PATH
# in turn, answers the status codes WANT, or it measures something else.
expect_codes() {
  local suffix=$1 want=$2 name path codes; shift 2
  for name in "gw-$suffix" "nginx-$suffix"; do
    codes=""
    for path in "$@"; do
      codes+="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT[$name]}$path") "
    done
    [ "${codes% }" = "$want" ] || { echo "$name answered $codes, not $want" >&2; exit 1; }
  done
}
if [ "${AUTHZ:-0}" = 1 ]; then
  start_pair authz NGINX_AUTH_REQUEST=1 --authz
fi
if [ "${REFUSALS:-0}" = 1 ]; then
  start_pair 429 NGINX_LIMIT_REQ=1r/m --rate-limit "1/m per ip"
  # A limit that lets the first request through and refuses the next.
  expect_codes 429 "200 429" / /
fi
if [ "${UNMATCHED:-0}" = 1 ]; then
  start_pair 404 NGINX_UNMATCHED=1 --route "/api/**"
  # /api/ proxied, / answered 404.
  expect_codes 404 "200 404" /api/ /
fi
if [ "${ACCESS_LOG:-0}" = 1 ]; then
  start_pair log "NGINX_ACCESS_LOG=$TMP/nginx-log.access" --access-log "$TMP/gw-log.access"
  expect_codes log "200" /
fi
# Each JWT gateway makes its own key, so each has its own token; the
# others get gw-jwt-rl's, which they ignore.
declare -A TOKEN
TOKEN[gw-jwt-rl]="$(token_of "$TMP/gw-jwt-rl.log" JWT)"
[ "$PGO" = 1 ] && TOKEN[gw-pgo]="$(token_of "$TMP/gw-pgo.log" PGO)"
for name in "${NAMES[@]}"; do
  [ -n "${TOKEN[$name]:-}" ] || TOKEN[$name]=${TOKEN[gw-jwt-rl]}
done
for name in gw-jwt-rl gw-pgo; do
  [ -n "${PORT[$name]:-}" ] || continue
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer ${TOKEN[$name]}" \
    "http://127.0.0.1:${PORT[$name]}/" || echo "?")
  [ "$code" = 200 ] || { echo "sanity check failed: $name with token $code (want 200)" >&2; exit 1; }
done

# Warm every target (connections, pools, caches), then count from zero.
for name in "${NAMES[@]}"; do
  wrk -t1 -c8 -d2s -H "authorization: Bearer ${TOKEN[$name]}" "http://127.0.0.1:${PORT[$name]}/" >/dev/null
done
callgrind_control -z >/dev/null 2>&1

declare -A REQS
for name in "${NAMES[@]}"; do
  out=$(wrk -t1 -c8 -d"$DURATION" -H "authorization: Bearer ${TOKEN[$name]}" "http://127.0.0.1:${PORT[$name]}/")
  REQS[$name]=$(echo "$out" | awk '/requests in/ { print $1 }')
  case $name in
    *-429 | *-404)
      # Every response a refusal.
      [ "$(echo "$out" | awk '/Non-2xx/ { print $5 }')" = "${REQS[$name]}" ] ||
        { echo "$name answered some requests other than ${name##*-}" >&2; exit 1; } ;;
    *) if echo "$out" | grep -q "Non-2xx"; then echo "$name answered non-2xx responses" >&2; exit 1; fi ;;
  esac
done
callgrind_control -d >/dev/null 2>&1
sleep 1

# The dump of each process: the newest NAME.cg.* file with counts in it.
total_of() {
  local f
  f=$(ls -t "$TMP/$1".cg* 2>/dev/null | while read -r c; do grep -q '^totals:' "$c" && { echo "$c"; break; }; done)
  [ -n "$f" ] || { echo "no callgrind dump for $1" >&2; exit 1; }
  echo "$f $(awk '/^totals:/ { print $2 }' "$f")"
}

printf '%-11s | %9s %12s %10s\n' target requests "instr/req" "x raw-h1"
printf -- '------------+-----------------------------------\n'
base=""
declare -A PER
for name in "${NAMES[@]}"; do
  read -r file total < <(total_of "$name")
  per=$((total / REQS[$name]))
  PER[$name]=$per
  [ -z "$base" ] && base=$per
  awk -v n="$name" -v r="${REQS[$name]}" -v p="$per" -v b="$base" \
    'BEGIN { printf "%-11s | %9d %12d %9.2fx\n", n, r, p, p / b }'
  if [ "${CACHE:-0}" = 1 ]; then
    awk -v r="${REQS[$name]}" '
      /^events:/ { for (i = 2; i <= NF; i++) col[$i] = i }
      /^totals:/ { for (e in col) v[e] = $(col[e]) }
      END { printf "             per request: %.0f L1i misses, %.0f L1d misses, %.0f mispredicted branches\n",
              v["I1mr"] / r, (v["D1mr"] + v["D1mw"]) / r, (v["Bcm"] + v["Bim"]) / r }' "$file"
  fi
  if [ "${TOP:-0}" -gt 0 ] && [ "${name%%-*}" = gw ]; then
    callgrind_annotate --show=Ir --threshold=100 --inclusive=no "$file" 2>/dev/null \
      | awk -v r="${REQS[$name]}" -v top="$TOP" '
          # callgrind_annotate lists the entry frames of threads at ~100%
          # even as self cost; not the gateway code.
          match($0, /^ *[0-9,]+ \( *[0-9.]+%\)  /) && !/PROGRAM TOTALS/ && !/\((100\.0|9[89]\.[0-9]+)%\)/ {
            n = $1; gsub(",", "", n)
            line = $0; sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, "", line); sub(/ \[.*$/, "", line)
            if (shown++ < top) printf "    %7.0f  %s\n", n / r, line }'
  fi
done
if [ "${AUTHZ:-0}" = 1 ]; then
  awk -v g=$((PER[gw-authz] - PER[gw-plain])) -v n=$((PER[nginx-authz] - PER[nginx])) 'BEGIN {
    printf "a check costs: gateway %d instructions per request, nginx %d (%.2fx)\n", g, n, g / n }'
fi
if [ "${REFUSALS:-0}" = 1 ]; then
  awk -v g="${PER[gw-429]}" -v n="${PER[nginx-429]}" 'BEGIN {
    printf "a refusal (429) costs: gateway %d instructions, nginx %d (%.2fx)\n", g, n, g / n }'
fi
if [ "${UNMATCHED:-0}" = 1 ]; then
  awk -v g="${PER[gw-404]}" -v n="${PER[nginx-404]}" 'BEGIN {
    printf "a path no route matches (404) costs: gateway %d instructions, nginx %d (%.2fx)\n", g, n, g / n }'
fi
if [ "${ACCESS_LOG:-0}" = 1 ]; then
  for name in gw-log nginx-log; do
    [ -s "$TMP/$name.access" ] || { echo "$name wrote no access log" >&2; exit 1; }
  done
  awk -v g=$((PER[gw-log] - PER[gw-plain])) -v n=$((PER[nginx-log] - PER[nginx])) 'BEGIN {
    printf "an access-log line costs: gateway %d instructions, nginx %d (%.2fx)\n", g, n, g / n }'
fi
