#!/usr/bin/env bash
# IP allow/deny list lookups: the compiled lists (sorted ranges, binary
# search; crates/gateway/src/ip.rs) against a scan of every network, the
# form they replaced, side by side on the same random IPv4 networks (/16
# to /32) and 20 000 random addresses, for lists of 3 to 100 000 networks.
# Prints nanoseconds per lookup and the ratio (medians of 5 passes).
#
# A release build of the gateway's unit tests, without LTO and in a target
# dir of its own (target/ip-bench), so the normal release build is left as
# it was. Needs: cargo. Usage: benches/gateway/ip_lists.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
CARGO_TARGET_DIR=target/ip-bench CARGO_PROFILE_RELEASE_LTO=false \
  CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  cargo test --release --quiet -p flotilla-gateway --lib \
  -- --ignored ip_list_lookups_against_a_scan --nocapture 2>&1 \
  | grep -E '^ *(networks|[0-9]+) \|'
