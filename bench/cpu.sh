#!/usr/bin/env bash
# Where the CPU goes: the same closed loop of 256-byte PUTs as bench/run.sh on causeway dev 1×1,
# on a LocalCluster on Apache Kafka 4.4 (one KRaft node, PARTITIONS × REPLICAS store nodes, one
# api-server), a raw append loop to that Kafka, and PostgreSQL's pgbench upserts, each with the
# CPU time every process used during it (bench/cpu.py, from /proc: user + system), by kind of
# process (the load generator included), and per acknowledged write. On a machine whose cores
# are all busy, the CPU a write costs in all is what bounds the rate: cores ÷ that cost.
#
#   bench/cpu.sh   # DURATION=15 CONCURRENCY=32 DOC_BYTES=256 KEYS=10000 PARTITIONS=2 REPLICAS=2
#
# SETUPS="dev kafka postgres" picks the setups run. RATE=<writes/s> makes the causeway write loads
# open loops at that rate: the same batching in every run, so the CPU per write of two builds
# compares (a closed loop's varies with the rate it reaches). Extra fields for the Kafka cluster: NODE_EXTRA (store node options), KAFKA_LOG_EXTRA (the
# LogOptions of every process). BIN_DIR=<dir> skips the build. Every server listens on
# 127.0.0.1 and is stopped at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DURATION=${DURATION:-15}
CONCURRENCY=${CONCURRENCY:-32}
DOC_BYTES=${DOC_BYTES:-256}
KEYS=${KEYS:-10000}
PARTITIONS=${PARTITIONS:-2}
REPLICAS=${REPLICAS:-2}
SETUPS=${SETUPS:-dev kafka postgres}
runs() { [[ " $SETUPS " == *" $1 "* ]]; }
runs postgres && need_postgres
build

# Runs "$@" (a bench writing its JSON report to $WORK/$1.json, after the name) while bench/cpu.py
# samples, and prints the CPU table of the run, per acknowledged operation.
measured() {
  local name=$1 sampler; shift
  python3 bench/cpu.py sample "$WORK/$name.cpu" &
  sampler=$!
  "$@"
  kill -TERM "$sampler"
  wait "$sampler"
  printf '\n### %s: ' "$name"
  python3 bench/cpu.py report "$WORK/$name.cpu" "$WORK/$name.json"
}
cw() { # name, then causeway bench flags
  local name=$1; shift
  log "bench $name"
  timeout $((DURATION + 300)) "$BIN/causeway" bench --json --duration "$DURATION" \
    --concurrency "$CONCURRENCY" --doc-bytes "$DOC_BYTES" "$@" >"$WORK/$name.json"
}
writes() { # name url token
  cw "$1" --url "$2" --token "$3" --workload write --keys "$KEYS" --zipf 0 ${RATE:+--rate "$RATE"}
}

# Everything printed goes to $OUT too.
exec > >(tee "${OUT:-$ROOT/bench/cpu-results.md}")

if runs dev; then
  log "causeway dev 1x1"
  start_dev "$WORK/dev"
  measured dev-write writes dev-write "$DEV_URL" "$DEV_TOKEN"
  stop_all
fi

if runs kafka; then
  log "LocalCluster on Kafka, ${PARTITIONS}x${REPLICAS}"
  start_cluster $((PARTITIONS * REPLICAS)) "$PARTITIONS" "$REPLICAS"
  measured kafka-write writes kafka-write "$API_URL" "$API_TOKEN"
  measured raw-kafka cw raw-kafka --raw-log "$(kafka_log raw-baseline)"
  stop_all
fi

if runs postgres; then
  start_postgres "$CONCURRENCY"
  sql "CREATE TABLE docs (id text PRIMARY KEY, doc jsonb NOT NULL)"
  pg_upsert_script postgres "$KEYS" "$DOC_BYTES"
  measured postgres pg_bench postgres
fi
