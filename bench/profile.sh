#!/usr/bin/env bash
# Profiles of `causeway dev` (api-server, store node and embedded log in one process) under a
# `causeway bench` workload, with perf's software clock (the machine has no hardware counters)
# and DWARF call graphs: the top functions by their own time and by the time under them.
#
#   bench/profile.sh   # WORKLOAD=write DURATION=20 PERF_SECS=10 CONCURRENCY=32 DOC_BYTES=256
#                      # KEYS=10000 PARTITIONS=1 REPLICAS=1 TOP=25 BIN_DIR= PROFILE=release
#
# WORKLOAD=write profiles the write path and the apply loop; WORKLOAD=read the coordinated read.
# RATE=<ops/s> makes the load an open loop at that rate (a closed loop by default).
# TARGET=kafka profiles a LocalCluster on Apache Kafka instead (one KRaft node, PARTITIONS ×
# REPLICAS store nodes, default 2x2 there, one api-server), the api-server and store node 1 each
# on its own, so the write path and the apply loop are apart.
# The reports go to $OUT (default bench/profile-$WORKLOAD[-kafka].txt). Installs linux-perf if
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
WORKLOAD=${WORKLOAD:-write}
DURATION=${DURATION:-20}
PERF_SECS=${PERF_SECS:-10}
CONCURRENCY=${CONCURRENCY:-32}
DOC_BYTES=${DOC_BYTES:-256}
KEYS=${KEYS:-10000}
TARGET=${TARGET:-dev}
case $TARGET in
  dev) PARTITIONS=${PARTITIONS:-1} REPLICAS=${REPLICAS:-1} suffix= ;;
  kafka) PARTITIONS=${PARTITIONS:-2} REPLICAS=${REPLICAS:-2} suffix=-kafka ;;
  *) echo "TARGET is dev or kafka, not $TARGET" >&2; exit 1 ;;
esac
TOP=${TOP:-25}
OUT=${OUT:-$ROOT/bench/profile-$WORKLOAD$suffix.txt}
need_tools
if ! command -v perf >/dev/null; then
  log "installing linux-perf"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf
fi
build

if [ "$TARGET" = dev ]; then
  start_dev "$WORK/dev" "$PARTITIONS" "$REPLICAS"
  URL=$DEV_URL TOKEN=$DEV_TOKEN
  PROFILED=("dev:$DEV_PID")
else
  start_cluster $((PARTITIONS * REPLICAS)) "$PARTITIONS" "$REPLICAS"
  URL=$API_URL TOKEN=$API_TOKEN
  PROFILED=("api-server:$API_PID" "store-node-1:${NODE_PIDS[1]}")
fi

log "bench $WORKLOAD for $DURATION s; perf over $PERF_SECS s of it"
"$BIN/causeway" bench --url "$URL" --token "$TOKEN" --workload "$WORKLOAD" \
  --duration "$DURATION" --concurrency "$CONCURRENCY" --doc-bytes "$DOC_BYTES" --keys "$KEYS" \
  --zipf 0 ${RATE:+--rate "$RATE"} >"$WORK/bench.txt" 2>"$WORK/bench.err" &
BENCH_PID=$!
PIDS+=("$BENCH_PID")
# Past the load phase and the first seconds.
sleep $(( (DURATION - PERF_SECS) / 2 + 3 ))
PERFS=()
for p in "${PROFILED[@]}"; do
  perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -p "${p#*:}" -o "$WORK/${p%%:*}.perf" \
    -- sleep "$PERF_SECS" >"$WORK/${p%%:*}.perf.log" 2>&1 &
  PERFS+=($!)
done
wait "${PERFS[@]}"
wait "$BENCH_PID" || true
# perf pads every line to its widest symbol: cut the padding and very long generic names.
# `head` ends the reports early: their SIGPIPE is no failure.
set +o pipefail
tidy() { grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | cut -c1-180; }
{
  echo "# bench/profile.sh: TARGET=$TARGET WORKLOAD=$WORKLOAD CONCURRENCY=$CONCURRENCY DOC_BYTES=$DOC_BYTES ${PARTITIONS}x${REPLICAS}"
  cat "$WORK/bench.txt"
  for p in "${PROFILED[@]}"; do
    data=$WORK/${p%%:*}.perf
    echo
    echo "# ${p%%:*}"
    echo
    echo "## by own time (self), top $TOP"
    perf report -i "$data" --stdio --no-children --sort symbol -g none --percent-limit 0.5 2>/dev/null \
      | tidy | head -n "$TOP"
    echo
    echo "## by time under the function (children), top $TOP"
    perf report -i "$data" --stdio --children --sort symbol -g none --percent-limit 2 2>/dev/null \
      | grep -vE 'tokio::runtime|std::|core::ops::function|catch_unwind|call_once|poll_future|__clone|start_thread|\[k\]' \
      | tidy | head -n "$TOP"
    echo
    echo "## by thread"
    perf report -i "$data" --stdio --no-children --sort comm -g none 2>/dev/null \
      | tidy | head -n 12
  done
} >"$OUT"
cat "$OUT"
