# Shared by the scripts here (sourced, not run): a temp dir and the
# processes started into PIDS, both cleaned up on exit (KEEP=1 keeps the
# dir), free ports, waiting for a port to accept, nginx as the baseline
# proxy, and a process's CPU time.

# make_tmp PREFIX: sets TMP and the cleanup trap.
make_tmp() {
  TMP="$(mktemp -d -t "$1.XXXXXX")"
  chmod 755 "$TMP"
  PIDS=()
  trap cleanup EXIT
}

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_port PORT [SECONDS]: until something accepts on PORT (default 10 s).
wait_port() {
  local port=$1 tenths=$(( ${2:-10} * 10 )) i
  for i in $(seq 1 "$tenths"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on $port" >&2
  exit 1
}

# start_nginx NGINX PORT UPSTREAM_PORT [WRAP...]: nginx (Debian's) as a
# plain reverse proxy on PORT in front of 127.0.0.1:UPSTREAM_PORT, the
# baseline the gateway is measured against: NGINX_WORKERS workers (default
# 2; the scripts set it to the gateway's worker threads), upstream keep-alive,
# no access log. With WRAP (a command such as valgrind and its options),
# nginx runs under it as one process (no master, one worker). With
# NGINX_WEBSOCKET=1 it passes WebSocket upgrades on, as nginx's documentation
# configures it (Upgrade and Connection from the client's, 5 min read
# timeout, as the gateway's tunnel idle timeout). With NGINX_TLS=DIR it
# serves HTTPS only, with DIR/cert.pem and DIR/key.pem, TLS 1.2 and 1.3,
# and a session cache. With NGINX_CACHE=1 it keeps responses
# (proxy_cache, 200s for a minute), as the
# gateway's route `cache` does. With NGINX_GZIP=1 it gzips JSON and text
# of 1 kB or more at level 5 for clients that take it, as the gateway's
# `compression = {}` does. With NGINX_AUTH_REQUEST=1 every request is
# first checked by an auth_request subrequest to the upstream's
# /check<uri> (no body; the client's header fields go along, as every
# nginx subrequest inherits them), as the gateway's
# `[gateway.authz]` asks its service. With NGINX_LIMIT_REQ=RATE (e.g.
# 1r/m) requests are limited per client address (limit_req, no burst,
# refused with 429), as a route's `rate_limit = "1/m per ip"` does; the
# refusals are not logged (the bench gateways keep no access log). With
# NGINX_UNMATCHED=1 only /api/ is proxied and every other path gets a 404
# with a short JSON body (`return 404`), as a gateway whose one route is
# `/api/**` answers a path no route matches. With NGINX_ACCESS_LOG=PATH
# every request gets a line in PATH (the combined format, a write per
# request), as the gateway's `access_log` does. Sets NGINX_PID; its files go under $TMP/nginx.
start_nginx() {
  local nginx=$1 port=$2 upstream=$3 user_line="" procs="worker_processes ${NGINX_WORKERS:-2};"
  local map="" connection='proxy_set_header Connection "";'
  local listen="listen 127.0.0.1:$port;" ssl="" cache_path="" cache="" gzip="" auth="" check=""
  local limit_zone="" limit="" proxied="/" unmatched="" access_log="access_log off;"
  # nginx's default format (combined), unbuffered: a write per request.
  [ -n "${NGINX_ACCESS_LOG:-}" ] && access_log="access_log $NGINX_ACCESS_LOG;"
  if [ "${NGINX_UNMATCHED:-0}" = 1 ]; then
    # Only /api/ proxied; any other path answered 404 with a JSON body the
    # size of the gateway's, as the gateway answers a path no route matches.
    proxied="/api/"
    unmatched="location / { default_type application/json; return 404 '{\"error\":\"not_found\",\"message\":\"no route for GET /\",\"request_id\":\"00000000000000000000000000\"}'; }"
  fi
  if [ -n "${NGINX_LIMIT_REQ:-}" ]; then
    limit_zone="limit_req_zone \$binary_remote_addr zone=flotilla_limit:10m rate=$NGINX_LIMIT_REQ; limit_req_status 429; limit_req_log_level info;"
    limit="limit_req zone=flotilla_limit;"
  fi
  if [ "${NGINX_CACHE:-0}" = 1 ]; then
    cache_path="proxy_cache_path $TMP/nginx/cache keys_zone=flotilla:10m max_size=64m;"
    cache="proxy_cache flotilla; proxy_cache_valid 200 1m; add_header Cache-Status \$upstream_cache_status;"
  fi
  if [ "${NGINX_AUTH_REQUEST:-0}" = 1 ]; then
    auth="auth_request /_check;"
    check="location = /_check { internal; proxy_pass http://backend/check\$request_uri; proxy_pass_request_body off; proxy_set_header Content-Length \"\"; proxy_http_version 1.1; proxy_set_header Connection \"\"; }"
  fi
  if [ "${NGINX_GZIP:-0}" = 1 ]; then
    gzip="gzip on; gzip_comp_level 5; gzip_min_length 1024; gzip_vary on; gzip_types application/json text/plain;"
  fi
  if [ -n "${NGINX_TLS:-}" ]; then
    listen="listen 127.0.0.1:$port ssl;"
    ssl="ssl_certificate $NGINX_TLS/cert.pem; ssl_certificate_key $NGINX_TLS/key.pem; ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m;"
  fi
  if [ "${NGINX_WEBSOCKET:-0}" = 1 ]; then
    map='map $http_upgrade $connection_upgrade { default upgrade; "" ""; }'
    connection='proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection $connection_upgrade; proxy_read_timeout 300s;'
  fi
  shift 3
  [ $# -gt 0 ] && procs="master_process off;"
  mkdir -p "$TMP/nginx/logs" "$TMP/nginx/tmp"
  [ "$(id -u)" = 0 ] && user_line="user root;"
  cat >"$TMP/nginx/nginx.conf" <<EOF
$user_line
$procs
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  $access_log
  client_body_temp_path $TMP/nginx/tmp/body;
  proxy_temp_path $TMP/nginx/tmp/proxy;
  fastcgi_temp_path $TMP/nginx/tmp/fastcgi;
  uwsgi_temp_path $TMP/nginx/tmp/uwsgi;
  scgi_temp_path $TMP/nginx/tmp/scgi;
  keepalive_requests 1000000;
  $gzip
  $map
  $cache_path
  $limit_zone
  upstream backend {
    server 127.0.0.1:$upstream;
    keepalive 64;
  }
  server {
    $listen
    $ssl
    location $proxied {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      $connection
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      $cache
      $auth
      $limit
    }
    $check
    $unmatched
  }
}
EOF
  "$@" "$nginx" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" >"$TMP/nginx/logs/stdout.log" 2>&1 &
  NGINX_PID=$!
  PIDS+=("$NGINX_PID")
}

# proxy_bench_settings: the settings of the scripts that load a gateway
# and nginx side by side (access_log.sh, authz.sh, cache.sh, refusals.sh,
# tls.sh), from
# the environment or their defaults: ROUNDS (3), DURATION (6s),
# GW_THREADS (2) worker threads, as many nginx workers, and NGINX, the
# nginx to run.
proxy_bench_settings() {
  ROUNDS="${ROUNDS:-3}"
  DURATION="${DURATION:-6s}"
  GW_THREADS="${GW_THREADS:-2}"
  NGINX_WORKERS="$GW_THREADS"
  NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
}

# proxy_bench_start NAME: builds the bench gateway and upstream, makes the
# temp dir (flotilla-NAME) and starts the upstream on port UP (its pid in
# UPSTREAM_PID), for start_gw_target and start_nginx_target.
proxy_bench_start() {
  echo "building (release)..." >&2
  build_release bench_upstream
  make_tmp "flotilla-$1"
  UP=$(free_port)
  start_upstream target/release/examples/bench_upstream "$UP"
  UPSTREAM_PID=${PIDS[-1]}
}

# start_gw_target NAME [FLAGS...]: a bench gateway with FLAGS and
# GW_THREADS workers in front of the upstream on port UP, as target NAME
# of measure_rounds: sets PORT, PID and URL for it, the URL of
# TARGET_SCHEME (default http) and TARGET_PATH (default /item).
start_gw_target() {
  local t=$1
  shift
  PORT[$t]=$(free_port)
  "$GW" --listen "127.0.0.1:${PORT[$t]}" --upstream "127.0.0.1:$UP" --threads "$GW_THREADS" \
    "$@" >"$TMP/$t.log" 2>&1 &
  PID[$t]=$!
  PIDS+=("${PID[$t]}")
  URL[$t]="${TARGET_SCHEME:-http}://127.0.0.1:${PORT[$t]}${TARGET_PATH:-/item}"
}

# start_nginx_target NAME: nginx (start_nginx, with the NGINX_* settings
# the caller gives it) in front of the upstream on port UP, as target NAME,
# its files under $TMP/NAME: sets PORT, PID and URL for it, as
# start_gw_target does.
start_nginx_target() {
  local t=$1
  PORT[$t]=$(free_port)
  mkdir -p "$TMP/$t"
  # start_nginx writes under $TMP/nginx: one dir per nginx.
  TMP="$TMP/$t" start_nginx "$NGINX" "${PORT[$t]}" "$UP"
  PID[$t]=$NGINX_PID
  URL[$t]="${TARGET_SCHEME:-http}://127.0.0.1:${PORT[$t]}${TARGET_PATH:-/item}"
}

# need HINT TOOL...: exits, saying what is missing and HINT (how to install
# it), unless every TOOL is on the PATH (or an executable path).
need() {
  local hint=$1 missing="" tool
  shift
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
  done
  [ -z "$missing" ] || { echo "missing:$missing ($hint)" >&2; exit 1; }
}

# start_upstream BIN PORT [ARGS...]: the bench upstream on PORT, its log
# in $TMP/upstream-PORT.log; returns once it accepts.
start_upstream() {
  local bin=$1 port=$2
  shift 2
  "$bin" "127.0.0.1:$port" "$@" >"$TMP/upstream-$port.log" 2>&1 &
  PIDS+=($!)
  wait_port "$port"
}

# build_release EXAMPLE...: the release build of the bench gateway
# (target/release/bench_gateway, set as GW) and of flotilla-gateway's
# EXAMPLEs (bench_upstream, bench_raw_h1, ...; in target/release/examples).
# Two cargo runs: the examples build with the gateway's dev-dependencies,
# whose features (tokio's test-util) would otherwise also go into the bench
# gateway, which is meant to be compiled as the `flotilla` binary is.
build_release() {
  local examples=() e
  for e in "$@"; do examples+=(--example "$e"); done
  cargo build --release --quiet -p flotilla-gateway-bench
  [ $# -eq 0 ] || cargo build --release --quiet -p flotilla-gateway "${examples[@]}"
  GW=target/release/bench_gateway
}

# pgo_build_current: runs benches/gateway/pgo.sh unless
# target/pgo/bench_gateway exists and is newer than every source and
# manifest it is built from (a PGO build of older code would be measured
# as if it were this one's).
pgo_build_current() {
  local bin=target/pgo/bench_gateway newer
  if [ -x "$bin" ]; then
    newer=$(find crates benches/gateway/harness Cargo.toml Cargo.lock \
      \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) -newer "$bin" -print -quit)
    [ -z "$newer" ] && return 0
    echo "PGO=1: $bin is older than $newer; rebuilding it (benches/gateway/pgo.sh)..." >&2
  else
    echo "PGO=1: no $bin yet; building it (benches/gateway/pgo.sh)..." >&2
  fi
  benches/gateway/pgo.sh
}

# What gw-jwt-rl adds to bench_gateway's arguments in every script: every
# route needs a token (EdDSA, bench_gateway's own JWKS) and a per-user rate
# limit too high to refuse anything, so that both are checked on every
# request without changing what is measured.
JWT_RL_ARGS=(--jwt --rate-limit "1000000/s burst 1000000 per user")

# token_of LOG NAME: the token a --jwt bench gateway (NAME, for the error)
# printed into its log LOG, once it has.
token_of() {
  local log=$1 name=$2 token="" i
  for i in $(seq 1 100); do
    token="$(sed -n 's/^token: //p' "$log")"
    [ -n "$token" ] && { echo "$token"; return 0; }
    sleep 0.05
  done
  echo "the $name gateway printed no token" >&2
  return 1
}

# user_sys PID: "USER SYS", the CPU clock ticks used so far in user space
# and in the kernel by process PID, its children (nginx's workers) and all
# their threads.
user_sys() {
  local pid=$1 user=0 sys=0 p task u s
  for p in "$pid" $(pgrep -P "$pid" 2>/dev/null); do
    for task in /proc/"$p"/task/*; do
      [ -r "$task/stat" ] || continue
      read -r u s < <(awk '{ sub(/^.*\) /, ""); print $12, $13 }' "$task/stat")
      user=$((user + u)); sys=$((sys + s))
    done
  done
  echo "$user $sys"
}

# ticks PID: the CPU clock ticks used so far by PID (user + kernel), as
# user_sys counts them.
ticks() {
  local user sys
  read -r user sys < <(user_sys "$1")
  echo $((user + sys))
}

# switches PID: the context switches so far (voluntary and not) of every
# thread of PID and of its children, as user_sys counts their time.
switches() {
  local pid=$1 n=0 p task
  for p in "$pid" $(pgrep -P "$pid" 2>/dev/null); do
    for task in /proc/"$p"/task/*; do
      [ -r "$task/status" ] || continue
      n=$((n + $(awk '/^(non)?voluntary_ctxt_switches:/ { s += $2 } END { print s + 0 }' "$task/status")))
    done
  done
  echo "$n"
}

# round_order ROUND TARGET...: the targets in the order to measure them
# in ROUND: as given in odd rounds, reversed in even ones, so that a drift
# of the machine within a round does not always favour the same targets.
round_order() {
  local round=$1
  shift
  if ((round % 2)); then printf '%s\n' "$@"; else printf '%s\n' "$@" | tac; fi
}

# median V...: the middle value (the lower middle of an even count).
median() {
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

# to_ms VALUE: one of wrk's latencies ("850.00us", "1.20ms", "2.01s") in
# milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
    if (u == "us") n = n / 1000; else if (u == "s") n = n * 1000; else if (u == "m") n = n * 60000;
    printf "%.3f", n }'
}

# wrk_figures FILE: "REQ/S P50_MS P99_MS" from the output of wrk --latency
# (0 for what it lacks).
wrk_figures() {
  local rps p50 p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$1")
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$1")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$1")")
  echo "${rps:-0} ${p50:-0} ${p99:-0}"
}

# wrk_target TARGET CONNS [WRK ARGS...]: "REQ/S P50_MS P99_MS ERRORS" of
# one wrk -t1 run of DURATION against URL[TARGET] (ERRORS: 0, or ! when
# wrk saw socket errors or non-2xx answers, or with REFUSING=1 socket
# errors or any 2xx answer); wrk's output in $TMP/wrk-TARGET.txt.
wrk_target() {
  local t=$1 conns=$2 out="$TMP/wrk-$1.txt" errors
  shift 2
  wrk -t1 -c"$conns" -d"$DURATION" --latency "$@" "${URL[$t]}" >"$out" 2>&1 || true
  errors=$(awk -v refusing="${REFUSING:-0}" '
    /requests in/ { total = $1 }
    /Non-2xx/ { refused = $5; if (!refusing) s = s $0 "; " }
    /Socket errors/ { s = s $0 "; " }
    END { if (refusing && refused != total) s = s "some answered 2xx"; print (s == "" ? "0" : "!") }' "$out")
  echo "$(wrk_figures "$out") ${errors}"
}

# measure_rounds A B CONNS [WRK ARGS...]: ROUNDS rounds of every target in
# TARGETS (interleaved by round_order; each warmed for 1 s, then loaded
# for DURATION by wrk_target), the CPU each spent per request read from
# its PID (ticks; HZ clock ticks a second). Prints each run and each
# round's A/B ratio as it goes (to stderr), then a table of medians, and
# leaves the runs in RATES, P50S, P99S and CPUS (space-separated, by
# target) for the ratios the caller prints.
measure_rounds() {
  local a=$1 b=$2 conns=$3 round t before after out rps p50 p99 errors cpu note
  shift 3
  local -A last
  RATES=() P50S=() P99S=() CPUS=()
  for round in $(seq 1 "$ROUNDS"); do
    for t in $(round_order "$round" "${TARGETS[@]}"); do
      DURATION=1s wrk_target "$t" "$conns" "$@" >/dev/null
      before=$(ticks "${PID[$t]}")
      out=$(wrk_target "$t" "$conns" "$@")
      after=$(ticks "${PID[$t]}")
      read -r rps p50 p99 errors <<<"$out"
      cpu=$(awk -v d=$((after - before)) -v hz="$HZ" -v r="$rps" -v s="${DURATION%s}" \
        'BEGIN { n = r * s; if (n > 0) printf "%.1f", d / hz * 1e6 / n; else print "-" }')
      RATES[$t]+="$rps "
      P50S[$t]+="$p50 "
      P99S[$t]+="$p99 "
      CPUS[$t]+="$cpu "
      last[$t]=$rps
      note=""
      [ "$errors" = 0 ] || note=" (wrk saw socket errors or non-2xx answers; KEEP=1 keeps its output)"
      echo "  round $round $t: $rps req/s p50 $p50 ms p99 $p99 ms cpu $cpu us/req$note" >&2
    done
    awk -v x="${last[$a]}" -v y="${last[$b]}" -v r="$round" -v n="$a/$b" \
      'BEGIN { if (y > 0) printf "  round %d: %s %.2fx\n", r, n, x / y }' >&2
  done
  printf '%-12s | %10s | %8s | %8s | %12s\n' target "req/s" "p50 ms" "p99 ms" "cpu us/req"
  for t in "${TARGETS[@]}"; do
    # shellcheck disable=SC2086
    printf '%-12s | %10s | %8s | %8s | %12s\n' "$t" "$(median ${RATES[$t]})" \
      "$(median ${P50S[$t]})" "$(median ${P99S[$t]})" "$(median ${CPUS[$t]})"
  done
}
