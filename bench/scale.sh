#!/usr/bin/env bash
# Cost as work grows: `causeway dev` (1 partition × 1 replica, embedded log, one process) and
# PostgreSQL 15 (Debian package, installed if missing, a throwaway cluster in a temp dir, loopback
# only, synchronous_commit=on, fsync=on, the table `docs(id text primary key, doc jsonb)`), side
# by side in one run on one machine, with the same JSON documents
# {"n":K,"field0":"ffffffffffffffff","pad":"x…"} of exactly the requested size:
#
#   1. Document size: closed-loop writes at each size of SIZES, CONCURRENCY clients, KEYS keys
#      chosen uniformly, DURATION seconds: `causeway bench --workload write --zipf 0` against a
#      fresh causeway dev data dir per size, pgbench upserts (INSERT … ON CONFLICT DO UPDATE)
#      into an emptied table per size. Writes/s, p50/p99 ms, causeway ÷ PostgreSQL.
#   2. Bytes on disk per document: DOCS documents of DOC_BYTES loaded into a fresh causeway dev
#      (`causeway bench --workload read --load-only --load-batch 100`: the write workload has no
#      load phase; the load waits until every document is visible), which is then stopped with
#      SIGINT so RocksDB flushes; `du -sb` of the store node's RocksDB (<data-dir>/node-*) and of
#      the embedded log (<data-dir>/log) separately, ÷ DOCS. PostgreSQL: the same rows by one
#      INSERT … SELECT generate_series, VACUUM ANALYZE, then pg_total_relation_size,
#      pg_relation_size, pg_indexes_size (and the TOAST rest) of docs and the WAL the load
#      generated (LSN difference), ÷ DOCS.
#   3. At that size: causeway dev restarted on the same data dir, then DURATION seconds of
#      closed-loop reads (GET) and then writes (PUT), uniform over all DOCS keys; PostgreSQL the
#      same with pgbench (SELECT doc FROM docs WHERE id = …, then the upsert). Reads run first,
#      so the writes' backlog (applying, compaction, vacuum) does not slow them.
#   4. Long histories: HISTORY_KEYS documents of DOC_BYTES rewritten by a closed loop of PUTs for
#      HISTORY_S seconds on a fresh causeway dev (every write a new version: thousands of
#      versions per document), then DURATION seconds of writes and of reads over the same keys,
#      and the bytes on disk per document after a stop (GC keeps the versions reads may need,
#      re-basing bounds the automerge history). PostgreSQL the same: HISTORY_S seconds of
#      upserts on an emptied table, then the measured runs, then pg_total_relation_size.
#      HISTORY_S=0 skips it.
#
# PostgreSQL runs a CHECKPOINT before each of its measured runs. Latency of the causeway rows is
# measured by `causeway bench` (hdrhistogram, from the send); PostgreSQL's from pgbench's
# per-transaction log.
#
# Every server listens on 127.0.0.1 only and is stopped at exit; every wait and every run is
# bounded in time. The tables go to $OUT (default bench/scale-results.md) and to stdout.
# Knobs (environment):
#   DURATION=15 CONCURRENCY=32 (every measured run)
#   KEYS=10000 SIZES="256 4096 65536" (part 1: keys and document sizes in bytes, each ≥ 64)
#   DOCS=1000000 DOC_BYTES=256 (parts 2 and 3; DOC_BYTES ≥ 64)
#   HISTORY_KEYS=1000 HISTORY_S=120 (part 4)
#   PROFILE=release (or dev: only for a quick look)
#   BIN_DIR=<dir> skips the build and uses the binaries there (PROFILE then only labels the table)
#   KEEP=1 keeps the temp dir (logs, JSON reports, the data dirs; otherwise each part-1 data dir
#   is removed once measured)
#   OUT=bench/scale-results.md
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
DURATION=${DURATION:-15}
CONCURRENCY=${CONCURRENCY:-32}
KEYS=${KEYS:-10000}
SIZES=${SIZES:-256 4096 65536}
DOCS=${DOCS:-1000000}
DOC_BYTES=${DOC_BYTES:-256}
HISTORY_KEYS=${HISTORY_KEYS:-1000}
HISTORY_S=${HISTORY_S:-120}
OUT=${OUT:-$ROOT/bench/scale-results.md}
read -r -a SIZE_LIST <<<"$SIZES"
[ ${#SIZE_LIST[@]} -gt 0 ] || { echo "SIZES is empty" >&2; exit 1; }
for b in "${SIZE_LIST[@]}" "$DOC_BYTES"; do
  case $b in '' | *[!0-9]*) echo "document size '$b' is not a number" >&2; exit 1 ;; esac
  # 43 bytes of the document are the fixed fields; "n" takes up to 10 digits more.
  [ "$b" -ge 64 ] && [ "$b" -le 262144 ] || { echo "document size $b is not in 64..262144" >&2; exit 1; }
done
for v in DURATION CONCURRENCY KEYS DOCS HISTORY_KEYS; do
  case ${!v} in '' | *[!0-9]* | 0) echo "$v must be a positive integer" >&2; exit 1 ;; esac
done
STARTED=$SECONDS

# --- prerequisites -----------------------------------------------------------------------------
need_postgres

# PROFILE=dev measures the dev profile instead; BIN_DIR=<dir> skips the build.
build

# --- helpers -----------------------------------------------------------------------------------
# `causeway bench` against the running dev: name, then bench flags; the JSON report goes to
# $WORK/<name>.json. Bounded by its duration plus the load deadline of the bench (1800 s).
cw_bench() {
  local name=$1; shift
  log "causeway bench $name"
  timeout $((DURATION + 2000)) "$BIN/causeway" bench --json --url "$DEV_URL" --token "$DEV_TOKEN" \
    --duration "$DURATION" --concurrency "$CONCURRENCY" "$@" >"$WORK/$name.json"
}

du_b() { # total bytes of the paths given (0 for none)
  if [ $# -eq 0 ]; then echo 0; else du -scb "$@" | tail -1 | cut -f1; fi
}

# --- PostgreSQL 15 -----------------------------------------------------------------------------
start_postgres "$CONCURRENCY"
PG_VERSION=$(sql "SHOW server_version")

# --- 1. document size --------------------------------------------------------------------------
for size in "${SIZE_LIST[@]}"; do
  log "document size $size: causeway dev"
  start_dev "$WORK/dev-$size"
  cw_bench "cw-write-$size" --workload write --keys "$KEYS" --zipf 0 --doc-bytes "$size"
  stop "$DEV_PID"
  [ -n "${KEEP:-}" ] || rm -rf "$WORK/dev-$size"

  log "document size $size: PostgreSQL"
  sql "DROP TABLE IF EXISTS docs; CREATE TABLE docs (id text PRIMARY KEY, doc jsonb NOT NULL)"
  pg_upsert_script "pg-write-$size" "$KEYS" "$size"
  pg_bench "pg-write-$size"
done

# --- 2. bytes on disk per document -------------------------------------------------------------
log "load $DOCS documents of $DOC_BYTES bytes into causeway dev"
DEV_DIR=$WORK/dev-docs
start_dev "$DEV_DIR"
cw_bench cw-load --workload read --load-only --keys "$DOCS" --load-batch 100 \
  --doc-bytes "$DOC_BYTES" --zipf 0
# The bench waited until the load's last commit was visible; check the first and last document.
for k in 0 $((DOCS - 1)); do
  deadline=$((SECONDS + 60))
  until [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $DEV_TOKEN" \
      "$DEV_URL/v1/collections/bench/documents/$(printf 'k%09d' "$k")")" = 200 ]; do
    [ $SECONDS -lt $deadline ] || { echo "document $k is not visible after the load" >&2; exit 1; }
    sleep 0.5
  done
done
stop "$DEV_PID"
CW_NODE_BYTES=$(du_b "$DEV_DIR"/node-*)
CW_LOG_BYTES=$(du_b "$DEV_DIR/log")
CW_TOTAL_BYTES=$(du_b "$DEV_DIR")

log "load $DOCS documents of $DOC_BYTES bytes into PostgreSQL"
sql "DROP TABLE IF EXISTS docs; CREATE TABLE docs (id text PRIMARY KEY, doc jsonb NOT NULL)"
sql "CHECKPOINT"
PG_LSN0=$(sql "SELECT pg_current_wal_lsn()")
t0=$(date +%s.%N)
sql "INSERT INTO docs (id, doc) SELECT $(pg_id i), $(pg_doc i "$DOC_BYTES") FROM generate_series(0, $((DOCS - 1))) AS i"
t1=$(date +%s.%N)
PG_LOAD_S=$(python3 -c 'import sys; print(float(sys.argv[2]) - float(sys.argv[1]))' "$t0" "$t1")
sql "VACUUM ANALYZE docs"
PG_WAL_BYTES=$(sql "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$PG_LSN0')::bigint")
PG_ROWS=$(sql "SELECT count(*) FROM docs")
# The stored size of one jsonb value (after any compression), on average.
PG_COL=$(sql "SELECT round(avg(pg_column_size(doc)), 1) FROM docs")
read -r PG_TOTAL PG_HEAP PG_INDEXES < <(sql "SELECT pg_total_relation_size('docs'), pg_relation_size('docs'), pg_indexes_size('docs')" | tr '|' ' ')
PG_WAL_DIR_BYTES=$(du_b "$WORK/pg/data/pg_wal")
[ "$PG_ROWS" = "$DOCS" ] || { echo "PostgreSQL holds $PG_ROWS rows, not $DOCS" >&2; exit 1; }

# --- 3. reads and writes at that size ----------------------------------------------------------
log "causeway dev restarted on the loaded data dir"
start_dev "$DEV_DIR"
cw_bench cw-read-docs --workload read --no-load --keys "$DOCS" --zipf 0 --doc-bytes "$DOC_BYTES"
cw_bench cw-write-docs --workload write --keys "$DOCS" --zipf 0 --doc-bytes "$DOC_BYTES"
stop "$DEV_PID"
pg_read_script pg-read-docs "$DOCS"
pg_bench pg-read-docs
pg_upsert_script pg-write-docs "$DOCS" "$DOC_BYTES"
pg_bench pg-write-docs

# --- 4. long histories -------------------------------------------------------------------------
HIST_NODE_BYTES=0 PG_HIST_TOTAL=0
if [ "$HISTORY_S" -gt 0 ]; then
  log "long histories: $HISTORY_KEYS documents rewritten for $HISTORY_S s, causeway dev"
  HIST_DIR=$WORK/dev-history
  start_dev "$HIST_DIR"
  DURATION=$HISTORY_S cw_bench cw-hist-fill --workload write --keys "$HISTORY_KEYS" --zipf 0 \
    --doc-bytes "$DOC_BYTES"
  cw_bench cw-hist-write --workload write --keys "$HISTORY_KEYS" --zipf 0 --doc-bytes "$DOC_BYTES"
  cw_bench cw-hist-read --workload read --no-load --keys "$HISTORY_KEYS" --zipf 0 \
    --doc-bytes "$DOC_BYTES"
  stop "$DEV_PID"
  HIST_NODE_BYTES=$(du_b "$HIST_DIR"/node-*)

  log "long histories: PostgreSQL"
  sql "DROP TABLE IF EXISTS docs; CREATE TABLE docs (id text PRIMARY KEY, doc jsonb NOT NULL)"
  pg_upsert_script pg-hist "$HISTORY_KEYS" "$DOC_BYTES"
  DURATION=$HISTORY_S pg_bench pg-hist
  mv "$WORK/pg-hist.json" "$WORK/pg-hist-fill.json"
  pg_bench pg-hist
  mv "$WORK/pg-hist.json" "$WORK/pg-hist-write.json"
  pg_read_script pg-hist-read "$HISTORY_KEYS"
  pg_bench pg-hist-read
  PG_HIST_TOTAL=$(sql "SELECT pg_total_relation_size('docs')")
fi

# --- the tables --------------------------------------------------------------------------------
export DURATION CONCURRENCY KEYS SIZES DOCS DOC_BYTES PROFILE PG_VERSION CW_NODE_BYTES CW_LOG_BYTES \
  CW_TOTAL_BYTES PG_LOAD_S PG_WAL_BYTES PG_WAL_DIR_BYTES PG_TOTAL PG_HEAP PG_INDEXES PG_COL \
  HISTORY_KEYS HISTORY_S HIST_NODE_BYTES PG_HIST_TOTAL
export ELAPSED=$((SECONDS - STARTED))
python3 - "$WORK" "$OUT" <<'PY'
import json, os, platform, subprocess, sys

work, out = sys.argv[1:3]
env = os.environ.get
docs, doc_bytes = int(env("DOCS")), int(env("DOC_BYTES"))


def load(name):
    return json.load(open(os.path.join(work, name + ".json")))


def fmt(x, digits=2):
    return "-" if x is None else ("%.*f" % (digits, x))


def lat(j, p):
    return fmt((j.get("latency") or {}).get(p))


def cw_rate(j, read=False):
    return j["reads_per_s"] if read else j["writes_per_s"]


def ratio(a, b):
    return "%.2f" % (a / b) if b else "-"


def ops_table(rows):
    """A causeway-against-PostgreSQL table: (label, causeway report, pgbench report, is a read)."""
    L.append("| workload | causeway ops/s | p50 ms | p99 ms | errors | 429 | PostgreSQL ops/s | p50 ms | p99 ms | errors | causeway ÷ PostgreSQL |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, cw, pg, read in rows:
        c, p = load(cw), load(pg)
        L.append("| %s | %.0f | %s | %s | %d | %d | %.0f | %s | %s | %d | %s |" % (
            label, cw_rate(c, read), lat(c, "p50_ms"), lat(c, "p99_ms"),
            c["errors"], c.get("throttled", 0), p["ops_per_s"], lat(p, "p50_ms"),
            lat(p, "p99_ms"), p["errors"], ratio(cw_rate(c, read), p["ops_per_s"])))


try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, timeout=10).stdout.strip() or "?"
except Exception:
    rev = "?"
cpu = "?"
try:
    cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
except Exception:
    pass

L = []
L.append("# Cost as work grows: causeway dev vs PostgreSQL (bench/scale.sh)")
L.append("")
L.append("Knobs: `DURATION=%s CONCURRENCY=%s KEYS=%s SIZES=\"%s\" DOCS=%s DOC_BYTES=%s PROFILE=%s`"
         % (env("DURATION"), env("CONCURRENCY"), env("KEYS"), env("SIZES"), env("DOCS"),
            env("DOC_BYTES"), env("PROFILE")))
L.append("")
L.append("Machine: %s, %d cores; commit %s; PostgreSQL %s; the run took %s s. causeway dev is 1 "
         "partition x 1 replica on the embedded log (one process); PostgreSQL runs "
         "synchronous_commit=on, fsync=on, a CHECKPOINT before each measured run. Closed loop, "
         "uniform keys, %s s per run, %s clients."
         % (cpu, os.cpu_count() or 0, rev, env("PG_VERSION"), env("ELAPSED"), env("DURATION"),
            env("CONCURRENCY")))
L.append("")
L.append("## Document size: closed-loop writes over %s keys" % env("KEYS"))
L.append("")
L.append("| doc bytes | causeway writes/s | p50 ms | p99 ms | errors | 429 | PostgreSQL upserts/s | p50 ms | p99 ms | errors | causeway ÷ PostgreSQL |")
L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for size in env("SIZES").split():
    c, p = load("cw-write-" + size), load("pg-write-" + size)
    L.append("| %s | %.0f | %s | %s | %d | %d | %.0f | %s | %s | %d | %s |" % (
        size, cw_rate(c), lat(c, "p50_ms"), lat(c, "p99_ms"), c["errors"], c.get("throttled", 0),
        p["ops_per_s"], lat(p, "p50_ms"), lat(p, "p99_ms"), p["errors"],
        ratio(cw_rate(c), p["ops_per_s"])))
L.append("")
L.append("## Bytes on disk: %d documents of %d bytes" % (docs, doc_bytes))
L.append("")
cl = load("cw-load")
cw_load_s = cl.get("load_s")
pg_load_s = float(env("PG_LOAD_S"))
node, logb, total = int(env("CW_NODE_BYTES")), int(env("CW_LOG_BYTES")), int(env("CW_TOTAL_BYTES"))
pg_total, pg_heap, pg_idx = int(env("PG_TOTAL")), int(env("PG_HEAP")), int(env("PG_INDEXES"))
pg_wal, pg_wal_dir = int(env("PG_WAL_BYTES")), int(env("PG_WAL_DIR_BYTES"))
L.append("| what | bytes | bytes/doc | ÷ doc bytes |")
L.append("|---|---:|---:|---:|")
rows = [
    ("causeway: store node RocksDB (`du -sb <data-dir>/node-*`, after SIGINT)", node),
    ("causeway: embedded log (`du -sb <data-dir>/log`)", logb),
    ("causeway: whole data dir", total),
    ("PostgreSQL: `pg_relation_size('docs')` (heap)", pg_heap),
    ("PostgreSQL: `pg_indexes_size('docs')`", pg_idx),
    ("PostgreSQL: TOAST and maps (total − heap − indexes)", pg_total - pg_heap - pg_idx),
    ("PostgreSQL: `pg_total_relation_size('docs')`", pg_total),
    ("PostgreSQL: WAL written by the load and VACUUM ANALYZE (LSN difference)", pg_wal),
    ("PostgreSQL: `du -sb pg_wal` afterwards (segments kept or recycled)", pg_wal_dir),
]
for label, b in rows:
    L.append("| %s | %d | %.1f | %.2f |" % (label, b, b / docs, b / docs / doc_bytes))
L.append("")
L.append("Load: causeway %s docs/s (`causeway bench --load-only`, %s clients, 100 documents per "
         "transaction, until visible, %s s); PostgreSQL %.0f docs/s (one INSERT … SELECT "
         "generate_series, %.1f s; a stored jsonb value takes %s bytes on average, `pg_column_size`)."
         % (fmt(docs / cw_load_s if cw_load_s else None, 0), env("CONCURRENCY"), fmt(cw_load_s, 1),
            docs / pg_load_s if pg_load_s else 0.0, pg_load_s, env("PG_COL")))
L.append("")
L.append("## At %d documents: closed-loop reads, then writes, uniform over all keys" % docs)
L.append("")
ops_table([("read (GET / SELECT by id)", "cw-read-docs", "pg-read-docs", True),
           ("write (PUT / upsert)", "cw-write-docs", "pg-write-docs", False)])
L.append("")
L.append("429: causeway writes refused by admission control (they changed nothing; counted "
         "neither in the rate, nor in the latency, nor as errors). Latency: causeway from "
         "`causeway bench` (from the send), PostgreSQL from pgbench's per-transaction log.")
if int(env("HISTORY_S")) > 0:
    hk = int(env("HISTORY_KEYS"))
    cf, pf = load("cw-hist-fill"), load("pg-hist-fill")
    L.append("")
    L.append("## Long histories: %d documents rewritten for %s s" % (hk, env("HISTORY_S")))
    L.append("")
    L.append("Versions written per document in the fill: causeway %.0f, PostgreSQL %.0f (its "
             "rate %.0f/s against %.0f/s)." % (cf["ok"] / hk, pf["ok"] / hk, cw_rate(cf),
                                                pf["ops_per_s"]))
    L.append("")
    ops_table([("write (PUT / upsert)", "cw-hist-write", "pg-hist-write", False),
               ("read (GET / SELECT by id)", "cw-hist-read", "pg-hist-read", True)])
    L.append("")
    L.append("Bytes on disk per document afterwards: causeway store node RocksDB %.0f, "
             "PostgreSQL `pg_total_relation_size` %.0f." % (int(env("HIST_NODE_BYTES")) / hk,
                                                            int(env("PG_HIST_TOTAL")) / hk))
text = "\n".join(L) + "\n"
open(out, "w").write(text)
sys.stdout.write(text)
PY
log "done in $((SECONDS - STARTED)) s; the tables are in $OUT"
