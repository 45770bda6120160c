#!/usr/bin/env bash
# The transaction benchmark of BENCHMARKS.md ("## Transactions"): on a 2×2 cluster (Apache Kafka
# 4.4, one KRaft node; config manager, four store nodes, one api-server, all on loopback), the
# throughput (closed loop, CONCURRENCY clients) and the latency at a steady rate below
# saturation (open loop, RATE requests/s, latency from the intended send time) of:
#   - transfer:    unconditional two-account transactions (answered at append);
#   - withdraw:    one-account conditional transactions (decided by that account's partition);
#   - transfer-if: two-account transactions conditional on the payer's balance (about half span
#                  both partitions and are decided by a vote exchange), answered with their
#                  outcome.
# ACCOUNTS accounts, uniform; the conditional ones open with a balance of 1,000,000, so that the
# conditions hold and the commit path is what is measured.
#
# Knobs (environment): DURATION=20 CONCURRENCY=32 RATE=200 ACCOUNTS=10000 PROFILE=release
# BIN_DIR=<dir> KEEP=1. Results go to $OUT (default bench/transactions-results.md) and stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

DURATION=${DURATION:-20}
CONCURRENCY=${CONCURRENCY:-32}
RATE=${RATE:-200}
ACCOUNTS=${ACCOUNTS:-10000}
OUT=${OUT:-$ROOT/bench/transactions-results.md}

need_tools
start_cluster 4 2 2

run() { # name, workload, then causeway bench flags
  local name=$1 workload=$2; shift 2
  log "bench $name"
  # Each workload has its own collection: the accounts of one are not the other's.
  "$BIN/causeway" bench --json --url "$API_URL" --token "$API_TOKEN" --keys "$ACCOUNTS" --zipf 0 \
    --workload "$workload" --collection "tx_$workload" --duration "$DURATION" "$@" \
    >"$WORK/$name.json"
}

# Waits (at most 10 minutes) until the cluster has applied everything appended so far: a write
# with ?wait=visible answers visible. Unconditional writes answer at append, so a closed loop can
# leave a backlog that the next run would otherwise pay for; the time it takes is reported.
drain() { # name
  local started=$SECONDS
  until curl -s -X PUT -H "Authorization: Bearer $API_TOKEN" -H 'Content-Type: application/json' \
      -d '{"drained": true}' "$API_URL/v1/collections/tx_drain/documents/d?wait=visible" \
      | grep -q '"visible":true'; do
    [ $((SECONDS - started)) -lt 600 ] || { echo "the cluster did not drain" >&2; exit 1; }
  done
  echo "$1 $((SECONDS - started))" >>"$WORK/drain.txt"
}

for w in transfer withdraw transfer-if; do
  run "$w-closed" "$w" --concurrency "$CONCURRENCY" --load-batch 100
  drain "$w-closed"
  run "$w-open" "$w" --no-load --concurrency 256 --rate "$RATE"
  drain "$w-open"
done

python3 - "$WORK" "$OUT" "$DURATION" "$CONCURRENCY" "$RATE" "$ACCOUNTS" "$PROFILE" <<'PY'
import json, os, sys
work, out, duration, conc, rate, accounts, profile = sys.argv[1:]
def load(name): return json.load(open(os.path.join(work, name + ".json")))
def fmt(x): return "-" if x is None else "%.1f" % x
rows = [("transfer", "unconditional, two accounts (answered at append)"),
        ("withdraw", "conditional, one account (one partition)"),
        ("transfer-if", "conditional, two accounts (about half across partitions), answered with the outcome")]
lines = ["| transactions | closed loop: tx/s | p50 ms | p99 ms | errors | open loop at %s/s: p50 ms | p99 ms | p999 ms | errors | invariant |" % rate,
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
for w, label in rows:
    c, o = load(w + "-closed"), load(w + "-open")
    cl, ol = c.get("latency") or {}, o.get("latency") or {}
    lines.append("| `%s`: %s | %.0f | %s | %s | %d | %s | %s | %s | %d | %s |" % (
        w, label, c["writes_per_s"], fmt(cl.get("p50_ms")), fmt(cl.get("p99_ms")), c["errors"],
        fmt(ol.get("p50_ms")), fmt(ol.get("p99_ms")), fmt(ol.get("p999_ms")), o["errors"],
        o.get("invariant") or c.get("invariant") or "-"))
    errors = dict(c.get("errors_by_kind") or {})
    for k, v in (o.get("errors_by_kind") or {}).items():
        errors[k] = errors.get(k, 0) + v
    if errors:
        lines.append("|  errors of `%s`: %s |||||||||" % (w, ", ".join("%s × %d" % kv for kv in sorted(errors.items()))))
head = ("2×2 on Kafka 4.4 (one KRaft node), %s build, %s accounts uniform, closed loop %s clients for %s s, "
        "open loop %s/s for %s s" % (profile, accounts, conc, duration, rate, duration))
drains = [l.split() for l in open(os.path.join(work, "drain.txt"))]
tail = "Time to apply the backlog after each run (s): " + ", ".join("%s %s" % (n, t) for n, t in drains)
text = head + "\n\n" + "\n".join(lines) + "\n\n" + tail + "\n"
open(out, "w").write(text)
print(text)
PY
