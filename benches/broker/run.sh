#!/usr/bin/env sh
# Embedded broker engine vs NATS JetStream on this machine: publish
# throughput (single and batched), publish->deliver latency (p50/p99),
# consume-with-ack throughput, and RSS with a backlog of 1M messages, each
# with its ratio to NATS. Needs `nats-server` (apt-get install nats-server);
# the bench starts its own with JetStream in a temp dir, or uses
# FLOTILLA_BENCH_NATS_URL. FLOTILLA_BENCH_SCALE multiplies message counts,
# FLOTILLA_BENCH_BACKLOG sets the backlog size (default 1000000).
set -eu
cd "$(dirname "$0")/../.."
exec cargo bench -p flotilla-broker --bench broker "$@"
