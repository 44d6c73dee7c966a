#!/usr/bin/env bash
# Service-to-service requests over mutual TLS vs plain HTTP on the same code
# path (a chassis client calling a chassis server, connections reused), and
# the cost of new connections (a full TLS 1.3 handshake each for mTLS).
# Prints requests/s, p50/p99 and new connections/s for each transport and
# the ratios against the named baseline, `plaintext`.
#
# Usage (from the repository root): benches/mesh/run.sh [SECONDS] [CONCURRENCY]
#   SECONDS      per measurement (default 5; 3 alternating rounds are run)
#   CONCURRENCY  concurrent callers (default 16)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p flotilla-chassis --example mesh-bench
exec target/release/examples/mesh-bench "${1:-5}" "${2:-16}"
