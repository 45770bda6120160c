#!/usr/bin/env bash
# The transition benchmark of BENCHMARKS.md ("## Transitions"): DOCS documents of DOC_BYTES on a
# 1×2 cluster (Apache Kafka 4.4, one KRaft node; config manager, four store nodes of which two
# are spares, one api-server, all processes on loopback), then a scale to 2×2 under a steady
# open-loop load of RATE requests/s, half reads and half writes (YCSB-A, uniform keys).
#
# Measured: the time from the proposal to install (`causeway admin scale --wait`), the bytes and
# records the new nodes ingested against the least possible (the moved keyspace's documents,
# once per new replica), the backfill rate, and the read and write latency of the same load
# before and during the transition, with every failed request counted.
#
# Knobs (environment): DOCS=1000000 DOC_BYTES=1024 RATE=2000 BEFORE=30 DURING=90 PROFILE=release
# BIN_DIR=<dir> (skip the build) KEEP=1 (keep the temp dir with every log). Results go to $OUT
# (default bench/transition-results.md) and stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

DOCS=${DOCS:-1000000}
DOC_BYTES=${DOC_BYTES:-1024}
RATE=${RATE:-2000}
BEFORE=${BEFORE:-30}
DURING=${DURING:-90}
OUT=${OUT:-$ROOT/bench/transition-results.md}

need_tools
start_cluster 4 1 2

load() { # name, then causeway bench flags
  local name=$1; shift
  "$BIN/causeway" bench --json --url "$API_URL" --token "$API_TOKEN" --keys "$DOCS" \
    --doc-bytes "$DOC_BYTES" --zipf 0 "$@" >"$WORK/$name.json"
}

log "loading $DOCS documents of $DOC_BYTES bytes"
started=$SECONDS
load load --workload ycsb-c --load-batch 200 --load-only --concurrency 8 --duration 1
LOAD_S=$((SECONDS - started))

log "steady load before the transition ($BEFORE s)"
load before --workload ycsb-a --no-load --rate "$RATE" --concurrency 256 --duration "$BEFORE"

log "steady load during the transition ($DURING s); scale to 2x2 after 5 s"
load during --workload ycsb-a --no-load --rate "$RATE" --concurrency 256 --duration "$DURING" &
LOAD_PID=$!
PIDS+=("$LOAD_PID")
sleep 5
started=$(date +%s.%N)
"$BIN/causeway" admin scale --config-manager "$CM_ADDR" --partitions 2 --replicas 2 --wait \
  >"$WORK/scale.txt" 2>&1 || { cat "$WORK/scale.txt" >&2; exit 1; }
TRANSITION_S=$(python3 -c "import sys,time; print('%.1f' % (time.time() - float(sys.argv[1])))" "$started")
for i in 3 4; do
  echo "$(node_metric "$i" backfill_bytes_received_total) $(node_metric "$i" backfill_records_received_total)"
done >"$WORK/moved.txt"
wait "$LOAD_PID"
"$BIN/causeway" admin status --config-manager "$CM_ADDR" >"$WORK/status.txt" || true

python3 - "$WORK" "$OUT" "$DOCS" "$DOC_BYTES" "$RATE" "$TRANSITION_S" "$LOAD_S" "$PROFILE" <<'EOF'
import json, os, platform, subprocess, sys
work, out, docs, doc_bytes, rate, transition_s, load_s, profile = sys.argv[1:]
docs, doc_bytes, transition_s = int(docs), int(doc_bytes), float(transition_s)
moved = [tuple(int(x) for x in line.split()) for line in open(os.path.join(work, "moved.txt"))]
bytes_in = sum(b for b, _ in moved)
records_in = sum(r for _, r in moved)
# Scaling 1 -> 2 partitions moves half the keyspace; each of the 2 new replicas takes it whole.
least_docs = docs // 2 * 2
least_bytes = least_docs * doc_bytes
def load(name):
    return json.load(open(os.path.join(work, name + ".json")))
before, during = load("before"), load("during")
def p99(j, op):
    s = j.get("by_op", {}).get(op)
    return "-" if not s else "%.1f" % s["p99_ms"]
lines = [
    "| 1×2 → 2×2, %d documents of %d B, %s req/s (YCSB-A) | value |" % (docs, doc_bytes, rate),
    "|---|---:|",
    "| proposal to install | %.1f s |" % transition_s,
    "| bytes ingested by the new nodes (record keys and values) | %.0f MB |" % (bytes_in / 1e6),
    "| the least possible (moved documents × JSON size × 2 new replicas) | %.0f MB |" % (least_bytes / 1e6),
    "| records ingested ÷ moved documents × 2 | %.2f |" % (records_in / least_docs if least_docs else float("nan")),
    "| backfill rate (bytes ingested ÷ time to install) | %.1f MB/s |" % (bytes_in / 1e6 / transition_s),
    "| read p99 before / during | %s / %s ms |" % (p99(before, "read"), p99(during, "read")),
    "| write p99 before / during | %s / %s ms |" % (p99(before, "patch"), p99(during, "patch")),
    "| requests before / during: ok, failed | %d, %d / %d, %d |" % (before["ok"], before["errors"], during["ok"], during["errors"]),
    "| load phase (batches of 200 documents) | %s s |" % load_s,
]
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
lines.append("")
lines.append("Build profile: %s. Machine: %s cores (%s), %s." % (profile, os.cpu_count(), cpu, platform.platform()))
if during["errors"]:
    lines.append("Errors during: %s" % json.dumps(during.get("errors_by_kind")))
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text)
EOF
