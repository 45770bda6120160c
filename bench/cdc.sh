#!/usr/bin/env bash
# Change data capture under a steady write rate (BENCHMARKS.md, "Change data capture"): a
# `causeway dev` (embedded log, P×R), a webhook feed of its cdc service into a local receiver, a
# Kafka feed into a one-node Apache Kafka (KAFKA=0 leaves it out) and a reader of its change
# stream (SSE), while `causeway bench` writes at RATE for DURATION seconds; bench/cdc.py prints
# events/s and commit-to-delivery lag per sink.
#
#   bench/cdc.sh   # RATE=500 DURATION=15 PARTITIONS=1 REPLICAS=1 KAFKA=1; PROFILE=dev: a debug build
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
RATE=${RATE:-500}
DURATION=${DURATION:-15}
need_tools
build
kafka=()
if [ "${KAFKA:-1}" = 1 ]; then
  start_kafka 1
  kafka=(--kafka "$KAFKA_BOOTSTRAP")
fi
dir=$WORK/dev
port=$(free_port)
cdc_port=$(free_port)
log "causeway dev ${PARTITIONS:-1}x${REPLICAS:-1}, cdc on $cdc_port"
"$BIN/causeway" dev --data-dir "$dir" --listen "127.0.0.1:$port" --cdc-listen "127.0.0.1:$cdc_port" \
  --partitions "${PARTITIONS:-1}" --replicas "${REPLICAS:-1}" >>"$dir.log" 2>&1 &
PIDS+=($!)
deadline=$((SECONDS + 60))
until [ -f "$dir/tokens.json" ]; do
  [ $SECONDS -lt $deadline ] && kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$dir.log" >&2; exit 1; }
  sleep 0.2
done
token=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tokens"][0]["token"])' "$dir/tokens.json")
wait_api "http://127.0.0.1:$port" "$token" || { cat "$dir.log" >&2; exit 1; }
log "writes at $RATE/s for $DURATION s"
python3 bench/cdc.py --api "http://127.0.0.1:$port" --token "$token" \
  --cdc "http://127.0.0.1:$cdc_port" --causeway "$BIN/causeway" --rate "$RATE" --duration "$DURATION" \
  "${kafka[@]}"
