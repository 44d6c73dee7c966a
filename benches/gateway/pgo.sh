#!/usr/bin/env bash
# Builds the bench gateway with profile-guided optimisation (PGO), the way
# rustc, Chromium and CPython are built for release: an instrumented build
# first, a training load through it, then the optimised build that uses
# what the training counted (which branches go which way, which calls are
# hot) to lay out and inline the code.
#
#   benches/gateway/pgo.sh             # -> target/pgo/{bench_gateway,flotilla}
#   PGO=1 benches/gateway/run.sh       # measures it beside the others
#
# Both binaries are built in the same cargo runs, from the same profile:
# the bench gateway (its own package, compiled as `flotilla` compiles the
# gateway, so the profile's function names are the same in both) and
# `flotilla` itself, the release binary with the gateway as measured.
# Only the gateway's code is trained; the rest of `flotilla` (runtime,
# broker) is built as without PGO, except code it shares with the gateway
# (tokio, hyper, rustls), which is laid out for the gateway's use of it.
#
# Why: the gateway's request path is long straight-line code (async state
# machines of 18-32 KB) and it misses the L1 instruction cache about twice
# as often per request as nginx (instructions.sh CACHE=1); PGO moves the
# cold code (errors, rejections, reloads) out of the hot path's way.
#
# Training load (TRAIN seconds per step, default 10), through instrumented
# gateways in front of the bench upstream, in the proportions of a healthy
# system rather than only of what run.sh measures:
#   - JWT + per-user rate limit, plaintext upstream (TRAIN)
#   - no JWT, no rate limit, plaintext upstream (TRAIN)
#   - JWT + rate limit, mutual-TLS upstream, as under `flotilla up` (TRAIN)
#   - rejections, a fifth of TRAIN each: no token (401), a forged token
#     (401), over a low rate limit (429)
# Like every PGO build, the result is tuned to this mix; a path it never
# ran (WebSocket-free CORS preflights, retries) is laid out as cold, which
# costs it a little, never correctness.
#
# Output: target/pgo/bench_gateway, target/pgo/flotilla,
# target/pgo/gateway.profdata. The builds
# use their own target dirs (target/pgo-generate, target/pgo-use), so the
# normal release build is left as it was. The profile is tied to this
# toolchain's LLVM and to this source: rebuild it after changing either.
#
# Needs: llvm-profdata (`rustup component add llvm-tools`), wrk, python3,
# cargo. Env: TRAIN (default 10), CONNS (default 64), GW_THREADS (default
# 2), KEEP=1 keeps the temp dir.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

source benches/gateway/common.sh

TRAIN="${TRAIN:-10}"
CONNS="${CONNS:-64}"
GW_THREADS="${GW_THREADS:-2}"
need "apt-get install -y wrk" wrk python3 curl
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"
[ -x "$PROFDATA" ] || { echo "missing: llvm-profdata (rustup component add llvm-tools)" >&2; exit 1; }
if [ -n "${RUSTFLAGS:-}" ]; then
  echo "RUSTFLAGS is set ($RUSTFLAGS); unset it: this script sets its own" >&2
  exit 1
fi

make_tmp flotilla-pgo
# A fixed place (not under $TMP): the path is part of RUSTFLAGS, and a new
# one each run would rebuild the instrumented gateway each run.
RAW="$ROOT/target/pgo/profraw"
rm -rf "$RAW"
mkdir -p "$RAW"

# The packages of both builds: the same set in both, so that each crate
# is compiled with the same features (and named the same) in both.
PACKAGES=(-p flotilla -p flotilla-gateway-bench)
echo "building the upstream (release) and the instrumented gateway (target/pgo-generate)..." >&2
cargo build --release --quiet -p flotilla-gateway --example bench_upstream
RUSTFLAGS="-Cprofile-generate=$RAW" CARGO_TARGET_DIR=target/pgo-generate \
  cargo build --release --quiet "${PACKAGES[@]}"
GEN=target/pgo-generate/release/bench_gateway

UP=$(free_port)
start_upstream target/release/examples/bench_upstream "$UP"
"$GEN" --issue "$TMP/ids"
UP_TLS=$(free_port)
start_upstream target/release/examples/bench_upstream "$UP_TLS" --tls "$TMP/ids/upstream"

# gateway NAME ARGS...: an instrumented gateway on a free port, writing its
# profile into $RAW when it exits; sets PORT[NAME] and GW_PID[NAME].
declare -A PORT GW_PID
gateway() {
  local name=$1
  shift
  PORT[$name]=$(free_port)
  LLVM_PROFILE_FILE="$RAW/$name-%p-%m.profraw" "$GEN" --listen "127.0.0.1:${PORT[$name]}" \
    --threads "$GW_THREADS" "$@" >"$TMP/$name.log" 2>&1 &
  GW_PID[$name]=$!
  PIDS+=($!)
}
gateway jwt --upstream "127.0.0.1:$UP" "${JWT_RL_ARGS[@]}"
gateway plain --upstream "127.0.0.1:$UP"
gateway mtls --upstream "127.0.0.1:$UP_TLS" "${JWT_RL_ARGS[@]}" --upstream-tls "$TMP/ids/gateway"
gateway limited --upstream "127.0.0.1:$UP" --jwt --rate-limit "100/s burst 100 per user"
for name in jwt plain mtls limited; do wait_port "${PORT[$name]}"; done
declare -A TOKEN
for name in jwt mtls limited; do TOKEN[$name]="$(token_of "$TMP/$name.log" "$name")"; done

# train NAME SECONDS WANT [wrk args...]: wrk against gateway NAME after
# one curl has seen the status WANT (so that a broken setup is not what
# gets trained).
train() {
  local name=$1 secs=$2 want=$3 url code
  shift 3
  url="http://127.0.0.1:${PORT[$name]}/"
  code=$(curl -s -o /dev/null -w '%{http_code}' "$@" "$url" || echo "?")
  [ "$code" = "$want" ] || { echo "training $name: answered $code, want $want" >&2; exit 1; }
  echo "training: $name, ${secs}s (status $want)" >&2
  wrk -t1 -c"$CONNS" -d"${secs}s" "$@" "$url" >"$TMP/wrk-$name-$want.txt"
}
REJECT=$(( TRAIN / 5 > 0 ? TRAIN / 5 : 1 ))
train jwt "$TRAIN" 200 -H "authorization: Bearer ${TOKEN[jwt]}"
train plain "$TRAIN" 200
train mtls "$TRAIN" 200 -H "authorization: Bearer ${TOKEN[mtls]}"
train jwt "$REJECT" 401
# The token with its signature's last characters changed: well formed,
# signed by nobody.
FORGED="${TOKEN[jwt]%????}AAAA"
train jwt "$REJECT" 401 -H "authorization: Bearer $FORGED"
train limited "$REJECT" 200 -H "authorization: Bearer ${TOKEN[limited]}"
grep -q "Non-2xx" "$TMP/wrk-limited-200.txt" || { echo "training limited: the rate limit refused nothing" >&2; exit 1; }

# A gateway writes its profile when it exits; SIGINT is its Ctrl-C.
for name in jwt plain mtls limited; do kill -INT "${GW_PID[$name]}"; done
for name in jwt plain mtls limited; do
  wait "${GW_PID[$name]}" || { echo "gateway $name exited with $? (log: $TMP/$name.log)" >&2; exit 1; }
done
ls "$RAW"/*.profraw >/dev/null 2>&1 || { echo "the gateways wrote no profile into $RAW" >&2; exit 1; }
"$PROFDATA" merge -o target/pgo/gateway.profdata "$RAW"/*.profraw

# Cargo does not see a profile as an input: the same RUSTFLAGS with a new
# profile would reuse the last build. Naming the profile by its hash makes
# a new one a new RUSTFLAGS, which rebuilds everything (the dependencies
# were profiled too).
SUM=$(sha256sum target/pgo/gateway.profdata | cut -c1-16)
rm -f target/pgo/gateway-*.profdata
cp target/pgo/gateway.profdata "target/pgo/gateway-$SUM.profdata"
echo "building the optimised gateway and flotilla (target/pgo-use)..." >&2
RUSTFLAGS="-Cprofile-use=$ROOT/target/pgo/gateway-$SUM.profdata" CARGO_TARGET_DIR=target/pgo-use \
  cargo build --release --quiet "${PACKAGES[@]}"
cp target/pgo-use/release/bench_gateway target/pgo/bench_gateway
cp target/pgo-use/release/flotilla target/pgo/flotilla
echo "built: target/pgo/bench_gateway, target/pgo/flotilla (profile: target/pgo/gateway.profdata)"
