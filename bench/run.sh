#!/usr/bin/env bash
# The end-to-end benchmark of BENCHMARKS.md ("## End to end"), in one go on one machine:
#
#   1. `causeway dev` (everything in one process, embedded log) under `causeway bench`;
#   2. a LocalCluster on Apache Kafka 4.4 (KAFKA_NODES KRaft nodes on loopback, started by the
#      txlog `kafka_cluster` example; replication factor 3 and min.insync.replicas 2 with three
#      nodes), the processes causeway-config-manager, causeway-store-node × NODES and
#      causeway-api-server, under `causeway bench`;
#   3. the raw log-append baselines with the same record payload (`causeway bench --raw-log`),
#      on the embedded log and on the same Kafka;
#   4. PostgreSQL 15 (Debian package, installed if missing, a throwaway cluster in a temp dir,
#      loopback only, synchronous_commit=on) doing jsonb upserts of the same documents at the
#      same concurrency with pgbench.
#
# The write rows also search the sustained rate (`causeway bench --sustained`): the highest
# open-loop rate at which write p99 stays under 50 ms and visibility lag p99 under 20 ms for a
# whole step of STEP seconds.
#
# Every server listens on 127.0.0.1 only and is stopped at exit. The results go to
# $OUT (default bench/results.md) and to stdout, and as JSON to $OUT_JSON (default
# bench/results.json, what bench/guard.py compares with BENCHMARKS.md). Knobs (environment):
#   DURATION=20 CONCURRENCY=32 DOC_BYTES=256 KEYS=10000 STEADY_RATE=500 STEP=8 STEPS=6
#   DEV_PARTITIONS=1 DEV_REPLICAS=1 (causeway dev)  PARTITIONS=2 REPLICAS=2 (the Kafka cluster)
#   KAFKA_NODES=1
#   PROFILE=release
#   KEEP=1 keeps the temp dir (logs, JSON reports; the Kafka brokers' own logs go with them only
#   with CAUSEWAY_KEEP_BROKER_DIR=1, which keeps the brokers' temp dir, named in kafka.out).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DURATION=${DURATION:-20}
CONCURRENCY=${CONCURRENCY:-32}
DOC_BYTES=${DOC_BYTES:-256}
KEYS=${KEYS:-10000}
PARTITIONS=${PARTITIONS:-2}
REPLICAS=${REPLICAS:-2}
DEV_PARTITIONS=${DEV_PARTITIONS:-1}
DEV_REPLICAS=${DEV_REPLICAS:-1}
STEP=${STEP:-8}
STEPS=${STEPS:-6}
export STEADY_RATE=${STEADY_RATE:-500}
KAFKA_NODES=${KAFKA_NODES:-1}
NODES=$((PARTITIONS * REPLICAS))
OUT=${OUT:-$ROOT/bench/results.md}
OUT_JSON=${OUT_JSON:-$ROOT/bench/results.json}

# --- prerequisites -----------------------------------------------------------------------------
need_postgres
# Java, Maven and the Kafka jars (from Maven Central), when missing.
scripts/setup.sh --broker

# PROFILE=dev measures the dev profile instead (dependencies optimised, our code not): only for
# a quick look; BENCHMARKS.md records release numbers.
# BIN_DIR=<dir> skips the build and uses the binaries there (PROFILE then only labels the table).
build
# BENCH_BIN=<causeway binary> runs the load with another build's `causeway bench` (to measure an
# older build's servers with this build's load generator).
BENCH_BIN=${BENCH_BIN:-$BIN/causeway}

SUSTAINED=(--sustained --step-duration "$STEP" --steps "$STEPS")
bench() { # name, then causeway bench flags
  local name=$1; shift
  log "bench $name"
  "$BENCH_BIN" bench --json --duration "$DURATION" --concurrency "$CONCURRENCY" \
    --doc-bytes "$DOC_BYTES" "$@" >"$WORK/$name.json"
}

# --- 1. causeway dev ---------------------------------------------------------------------------
log "causeway dev ${DEV_PARTITIONS}x${DEV_REPLICAS}"
start_dev "$WORK/dev" "$DEV_PARTITIONS" "$DEV_REPLICAS"
bench dev-write --url "$DEV_URL" --token "$DEV_TOKEN" --workload write \
  --keys "$KEYS" --zipf 0 "${SUSTAINED[@]}"
bench dev-ycsb-b --url "$DEV_URL" --token "$DEV_TOKEN" --workload ycsb-b \
  --keys "$KEYS" --zipf 0.99
stop "$DEV_PID"

# --- 2. raw embedded log -----------------------------------------------------------------------
bench raw-embedded --raw-log "{\"backend\":\"embedded\",\"dir\":\"$WORK/rawlog\"}"

# --- 3. Kafka + LocalCluster -------------------------------------------------------------------
start_kafka "$KAFKA_NODES"
KAFKA_LOG=$(kafka_log causeway-tx)

log "LocalCluster: config manager, $NODES store nodes, api-server on Kafka"
start_config_manager
for i in $(seq 1 "$NODES"); do start_store_node "$i" "$KAFKA_LOG"; done
"$BIN/causeway" admin bootstrap --config-manager "$CM_ADDR" \
  --partitions "$PARTITIONS" --replicas "$REPLICAS" --wait 60
start_api_server "$KAFKA_LOG"
bench kafka-write --url "$API_URL" --token "$API_TOKEN" --workload write \
  --keys "$KEYS" --zipf 0 "${SUSTAINED[@]}"
bench kafka-ycsb-b --url "$API_URL" --token "$API_TOKEN" --workload ycsb-b \
  --keys "$KEYS" --zipf 0.99
bench kafka-read --url "$API_URL" --token "$API_TOKEN" --workload read \
  --keys "$KEYS" --zipf 0
# A steady write load below saturation (open loop, latency from the intended send time): the
# visibility lag of a cluster that keeps up.
bench kafka-steady --url "$API_URL" --token "$API_TOKEN" --workload write \
  --keys "$KEYS" --zipf 0 --rate "$STEADY_RATE"
"$BIN/causeway" admin status --config-manager "$CM_ADDR" >"$WORK/kafka-status.txt" || true

bench raw-kafka --raw-log "$(kafka_log raw-baseline)"

# --- 4. PostgreSQL 15 --------------------------------------------------------------------------
# Alone on the machine: an idle cluster's store nodes and broker still take CPU (gossip, fetches).
stop_all
start_postgres "$CONCURRENCY"
sql "CREATE TABLE docs (id text PRIMARY KEY, doc jsonb NOT NULL)"
pg_upsert_script postgres "$KEYS" "$DOC_BYTES"
pg_bench postgres

# --- the table ---------------------------------------------------------------------------------
export DURATION CONCURRENCY DOC_BYTES KEYS PARTITIONS REPLICAS DEV_PARTITIONS DEV_REPLICAS PROFILE KAFKA_NODES
python3 bench/run_table.py "$WORK" "$OUT" "$OUT_JSON"
