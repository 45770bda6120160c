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
OUT=${OUT:-$ROOT/bench/scale-results.md}
read -r -a SIZE_LIST <<<"$SIZES"
[ ${#SIZE_LIST[@]} -gt 0 ] || { echo "SIZES is empty" >&2; exit 1; }
for b in "${SIZE_LIST[@]}" "$DOC_BYTES"; do
  case $b in '' | *[!0-9]*) echo "document size '$b' is not a number" >&2; exit 1 ;; esac
  # 43 bytes of the document are the fixed fields; "n" takes up to 10 digits more.
  [ "$b" -ge 64 ] && [ "$b" -le 262144 ] || { echo "document size $b is not in 64..262144" >&2; exit 1; }
done
for v in DURATION CONCURRENCY KEYS DOCS; do
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

# Runs SQL on the throwaway cluster (bounded: 1800 s).
sql() { PGOPTIONS="-c client_min_messages=warning" timeout 1800 psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -At -c "$1" postgres; }

# pgbench with the script $WORK/pg/<name>.sql, CONCURRENCY clients, DURATION seconds, after a
# CHECKPOINT; the result (rate, percentiles from the per-transaction log) to $WORK/<name>.json.
pg_bench() {
  local name=$1
  log "pgbench $name"
  sql "CHECKPOINT" >/dev/null
  (cd "$WORK/pg" && timeout $((DURATION + 120)) pgbench -n -h 127.0.0.1 -p "$PG_PORT" -U postgres \
    -M prepared -c "$CONCURRENCY" -j 2 -T "$DURATION" -f "$name.sql" -l --log-prefix="$name.tx" \
    postgres >"$WORK/$name.txt" 2>&1) || { cat "$WORK/$name.txt" >&2; exit 1; }
  cat "$WORK/pg/$name".tx.* | python3 -c '
import json, sys
lat = sorted(int(line.split()[2]) for line in sys.stdin if line.strip())
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000.0 if lat else None
txt = open(sys.argv[1]).read().splitlines()
tps = float([l for l in txt if l.startswith("tps = ")][0].split()[2])
failed = [l for l in txt if l.startswith("number of failed transactions")]
errors = int(failed[0].split(":")[1].split()[0]) if failed else 0
json.dump({"ops_per_s": tps, "ok": len(lat), "errors": errors,
           "latency": {"p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999)}},
          open(sys.argv[2], "w"))
' "$WORK/$name.txt" "$WORK/$name.json"
}

# The document of causeway bench as SQL, for the key expression $1 (an integer) and size $2:
# {"n":K,"field0":"f"*16,"pad":"x"*PAD}, exactly $2 bytes for every K, as `document(K, $2)`.
pg_doc() {
  printf '%s' "('{\"n\":' || $1 || ',\"field0\":\"ffffffffffffffff\",\"pad\":\"' || repeat('x', $(($2 - 43)) - length(($1)::text)) || '\"}')::jsonb"
}
pg_id() { printf '%s' "('k' || lpad(($1)::text, 9, '0'))"; }

# pgbench scripts: upserts over $2 keys of $3 bytes, reads over $2 keys; name $1.
pg_upsert_script() {
  cat >"$WORK/pg/$1.sql" <<EOF
\set k random(0, $(($2 - 1)))
INSERT INTO docs (id, doc) VALUES ($(pg_id :k), $(pg_doc :k "$3"))
ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc;
EOF
}
pg_read_script() {
  cat >"$WORK/pg/$1.sql" <<EOF
\set k random(0, $(($2 - 1)))
SELECT doc FROM docs WHERE id = $(pg_id :k);
EOF
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

# --- the tables --------------------------------------------------------------------------------
export DURATION CONCURRENCY KEYS SIZES DOCS DOC_BYTES PROFILE PG_VERSION CW_NODE_BYTES CW_LOG_BYTES \
  CW_TOTAL_BYTES PG_LOAD_S PG_WAL_BYTES PG_WAL_DIR_BYTES PG_TOTAL PG_HEAP PG_INDEXES PG_COL
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
L.append("| workload | causeway ops/s | p50 ms | p99 ms | errors | 429 | PostgreSQL ops/s | p50 ms | p99 ms | errors | causeway ÷ PostgreSQL |")
L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for label, cw, pg, read in [("read (GET / SELECT by id)", "cw-read-docs", "pg-read-docs", True),
                            ("write (PUT / upsert)", "cw-write-docs", "pg-write-docs", False)]:
    c, p = load(cw), load(pg)
    L.append("| %s | %.0f | %s | %s | %d | %d | %.0f | %s | %s | %d | %s |" % (
        label, cw_rate(c, read), lat(c, "p50_ms"), lat(c, "p99_ms"),
        c["errors"], c.get("throttled", 0), p["ops_per_s"], lat(p, "p50_ms"), lat(p, "p99_ms"),
        p["errors"], ratio(cw_rate(c, read), p["ops_per_s"])))
L.append("")
L.append("429: causeway writes refused by admission control (they changed nothing; counted "
         "neither in the rate, nor in the latency, nor as errors). Latency: causeway from "
         "`causeway bench` (from the send), PostgreSQL from pgbench's per-transaction log.")
text = "\n".join(L) + "\n"
open(out, "w").write(text)
sys.stdout.write(text)
PY
log "done in $((SECONDS - STARTED)) s; the tables are in $OUT"
