#!/usr/bin/env bash
# The fault suite's soak: randomly scheduled faults (kill -9 and restart of a store node, of the
# config manager, of an api-server, of a Kafka node and of the cdc service; SIGSTOP pauses of a
# store node; a store node cut off from all or from its peers; a full disk; failing fsyncs;
# transitions between 2×2 and 3×2) under the recording load on a 2×2 cluster with two
# api-servers and three Kafka nodes, for DURATION seconds, the schedule drawn from SEED (random
# when not given; printed, so that a run can be replayed). Fails on any anomaly in the history
# or the change feed. Needs root (iptables, tmpfs mounts, group ids), as the bounded run does.
# Writes the report (operations by kind and result, each fault with its failed requests and the
# time to serve again, anomalies) to REPORT and the history (JSON lines) next to it.
#
#   scripts/soak.sh DURATION [SEED] [REPORT]      e.g. scripts/soak.sh 3600 42 soak.md
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CAUSEWAY_TARGET_DIR:-$HOME/.cache/causeway-target}"

duration="${1:?usage: scripts/soak.sh DURATION [SEED] [REPORT]}"
[[ "$duration" =~ ^[0-9]+$ ]] || { echo "soak: DURATION is a number of seconds, not $duration" >&2; exit 2; }
seed="${2:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
[[ "$seed" =~ ^[0-9]+$ ]] || { echo "soak: SEED is a number, not $seed" >&2; exit 2; }
report="$(realpath -m "${3:-soak-$seed.md}")"

scripts/setup.sh --broker
cargo build --workspace --bins --locked
echo "soak: $duration s, seed $seed, report $report"
# The cluster's directory (every process's log) is kept; its path is printed.
CAUSEWAY_KEEP_TEST_DIR=1 \
  CAUSEWAY_SOAK_SECONDS="$duration" CAUSEWAY_SOAK_SEED="$seed" CAUSEWAY_SOAK_REPORT="$report" \
  CAUSEWAY_HISTORY_FILE="${report%.md}.history.jsonl" \
  cargo test --locked -p causeway-tests --test nemesis soak -- --ignored --nocapture
