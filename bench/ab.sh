#!/usr/bin/env bash
# A/B of two builds of `causeway dev` on this machine, minutes apart: each serves a closed-loop
# write run and a YCSB-B run (zipf 0.99) from the same load generator (B's `causeway bench`),
# ROUNDS times, alternating A and B, so that a slower machine on the day moves both alike.
#
#   bench/ab.sh A_CAUSEWAY_BINARY B_CAUSEWAY_BINARY
#
# Knobs (environment): DURATION=15 CONCURRENCY=32 KEYS=10000 ROUNDS=2. Every server listens on
# 127.0.0.1 and is stopped by its PID. Build an older commit's binary with
# `git checkout <commit> && cargo build --release -p causeway-cli --bin causeway` and copy it out
# of the target dir before building again.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
[ $# -eq 2 ] || { echo "usage: bench/ab.sh A_CAUSEWAY_BINARY B_CAUSEWAY_BINARY" >&2; exit 2; }
A=$1
B=$2
DURATION=${DURATION:-15}
CONCURRENCY=${CONCURRENCY:-32}
KEYS=${KEYS:-10000}
ROUNDS=${ROUNDS:-2}
need_tools
# start_dev runs $BIN/causeway: each build gets a directory of its own.
mkdir -p "$WORK/A" "$WORK/B"
cp "$A" "$WORK/A/causeway"
cp "$B" "$WORK/B/causeway"

one() {
  local label=$1 round=$2 workload
  BIN=$WORK/$label
  start_dev "$WORK/$label-$round" 1 1
  for workload in "write --zipf 0" "ycsb-b --zipf 0.99"; do
    # shellcheck disable=SC2086
    printf '%s %s: %s\n' "$label" "${workload%% *}" "$("$WORK/B/causeway" bench --url "$DEV_URL" \
      --token "$DEV_TOKEN" --workload $workload --keys "$KEYS" --duration "$DURATION" \
      --concurrency "$CONCURRENCY" 2>/dev/null | grep -m1 'throughput')"
  done
  stop_all
}

for round in $(seq 1 "$ROUNDS"); do
  one A "$round"
  one B "$round"
done
