#!/usr/bin/env bash
# Profiles of `causeway dev` (api-server, store node and embedded log in one process) under a
# `causeway bench` workload, with perf's software clock (the machine has no hardware counters)
# and DWARF call graphs: the top functions by their own time and by the time under them.
#
#   bench/profile.sh   # WORKLOAD=write DURATION=20 PERF_SECS=10 CONCURRENCY=32 DOC_BYTES=256
#                      # KEYS=10000 PARTITIONS=1 REPLICAS=1 TOP=25 BIN_DIR= PROFILE=release
#
# WORKLOAD=write profiles the write path and the apply loop; WORKLOAD=read the coordinated read.
# The reports go to $OUT (default bench/profile-$WORKLOAD.txt). Installs linux-perf if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
WORKLOAD=${WORKLOAD:-write}
DURATION=${DURATION:-20}
PERF_SECS=${PERF_SECS:-10}
CONCURRENCY=${CONCURRENCY:-32}
DOC_BYTES=${DOC_BYTES:-256}
KEYS=${KEYS:-10000}
PARTITIONS=${PARTITIONS:-1}
REPLICAS=${REPLICAS:-1}
TOP=${TOP:-25}
OUT=${OUT:-$ROOT/bench/profile-$WORKLOAD.txt}
need_tools
if ! command -v perf >/dev/null; then
  log "installing linux-perf"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf
fi
build

start_dev "$WORK/dev" "$PARTITIONS" "$REPLICAS"

log "bench $WORKLOAD for $DURATION s; perf over $PERF_SECS s of it"
"$BIN/causeway" bench --url "$DEV_URL" --token "$DEV_TOKEN" --workload "$WORKLOAD" \
  --duration "$DURATION" --concurrency "$CONCURRENCY" --doc-bytes "$DOC_BYTES" --keys "$KEYS" \
  --zipf 0 >"$WORK/bench.txt" 2>"$WORK/bench.err" &
BENCH_PID=$!
PIDS+=("$BENCH_PID")
# Past the load phase and the first seconds.
sleep $(( (DURATION - PERF_SECS) / 2 + 3 ))
perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$DEV_PID" -o "$WORK/perf.data" \
  -- sleep "$PERF_SECS" >/dev/null 2>&1
wait "$BENCH_PID" || true
# perf pads every line to its widest symbol: cut the padding and very long generic names.
tidy() { grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | cut -c1-180; }
{
  echo "# bench/profile.sh: WORKLOAD=$WORKLOAD CONCURRENCY=$CONCURRENCY DOC_BYTES=$DOC_BYTES ${PARTITIONS}x${REPLICAS}"
  cat "$WORK/bench.txt"
  echo
  echo "## by own time (self), top $TOP"
  perf report -i "$WORK/perf.data" --stdio --no-children --sort symbol -g none --percent-limit 0.5 2>/dev/null \
    | tidy | head -n "$TOP"
  echo
  echo "## by time under the function (children), top $TOP"
  perf report -i "$WORK/perf.data" --stdio --children --sort symbol -g none --percent-limit 2 2>/dev/null \
    | grep -vE 'tokio::runtime|std::|core::ops::function|catch_unwind|call_once|poll_future|__clone|start_thread|\[k\]' \
    \
    | tidy | head -n "$TOP"
  echo
  echo "## by thread"
  perf report -i "$WORK/perf.data" --stdio --no-children --sort comm -g none 2>/dev/null \
    | tidy | head -n 12
} >"$OUT"
cat "$OUT"
