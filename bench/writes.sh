#!/usr/bin/env bash
# Writes on a 2×2 cluster on Apache Kafka (one KRaft node; a config manager, four store nodes,
# one api-server, all on loopback): a closed loop of PUTs, then an open loop at RATE. The quick
# before/after measure of a lever (BENCHMARKS.md, "Write path"): run it with BIN_DIR set to each
# build; BENCH_BIN picks the `causeway` that runs the load (default: the one in BIN_DIR).
#
#   bench/writes.sh   # DURATION=15 CONCURRENCY=32 DOC_BYTES=256 KEYS=10000 RATE=500
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DURATION=${DURATION:-15}
CONCURRENCY=${CONCURRENCY:-32}
DOC_BYTES=${DOC_BYTES:-256}
KEYS=${KEYS:-10000}
RATE=${RATE:-500}
need_tools
start_cluster 4 2 2
BENCH_BIN=${BENCH_BIN:-$BIN/causeway}
run() {
  "$BENCH_BIN" bench --url "$API_URL" --token "$API_TOKEN" --workload write --keys "$KEYS" \
    --zipf 0 --duration "$DURATION" --concurrency "$CONCURRENCY" --doc-bytes "$DOC_BYTES" "$@"
}
log "closed loop"
run
log "open loop at $RATE/s"
run --no-load --rate "$RATE"
