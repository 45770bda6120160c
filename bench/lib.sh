# Shared pieces of the benchmark scripts: the build, the temp dir and its processes, ports, and
# starting Apache Kafka and the cluster processes. Sourced by bench/*.sh after `cd` to the root.
# Every server listens on 127.0.0.1 only; every process started here is stopped at exit.

export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CAUSEWAY_TARGET_DIR:-$HOME/.cache/causeway-target}"
ROOT=$PWD

log() { printf '\n== %s\n' "$*" >&2; }

# Builds the binaries (or takes BIN_DIR) and sets BIN. PROFILE=release (default) or dev.
build() {
  PROFILE=${PROFILE:-release}
  if [ -n "${BIN_DIR:-}" ]; then
    BIN=$BIN_DIR
  elif [ "$PROFILE" = release ]; then
    log "release build"
    # The whole workspace, so features unify as in every other workspace build and the release
    # RocksDB and librdkafka builds are reused.
    cargo build --release --locked --workspace --bins
    cargo build --release --locked -p causeway-txlog --features testing --example kafka_cluster
    BIN=$CARGO_TARGET_DIR/release
  else
    log "dev build"
    cargo build --locked --workspace --bins
    cargo build --locked -p causeway-txlog --features testing --example kafka_cluster
    BIN=$CARGO_TARGET_DIR/debug
  fi
}

# The temp dir WORK; PIDS are stopped, and WORK removed (unless KEEP=1), at exit.
WORK=$(mktemp -d /tmp/causeway-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
NODE_PIDS=()
CLEANUP_EXTRA=${CLEANUP_EXTRA:-}
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  stop_postgres
  if [ -n "$CLEANUP_EXTRA" ]; then $CLEANUP_EXTRA; fi
  if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK" >&2; fi
}
trap cleanup EXIT

# Installs python3 and curl when missing (the scripts drive the servers with them).
need_tools() {
  command -v python3 >/dev/null && command -v curl >/dev/null && return 0
  log "installing python3 and curl"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 curl
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits (at most 60 s) until the API at $1 serves a read with token $2.
wait_api() {
  local deadline=$((SECONDS + 60))
  until [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $2" \
      "$1/v1/collections/_probe/documents/none")" = 404 ]; do
    [ $SECONDS -lt $deadline ] || { echo "the API at $1 did not serve within 60 s" >&2; return 1; }
    sleep 0.2
  done
}

# Stops the process $1 with SIGINT and waits (at most 30 s).
stop() {
  kill -INT "$1" 2>/dev/null || return 0
  local deadline=$((SECONDS + 30))
  while kill -0 "$1" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { kill -9 "$1"; break; }
    sleep 0.1
  done
}

# Stops every process started so far (SIGINT, then at most 30 s each), so the next measurement
# has the machine to itself.
stop_all() {
  for pid in "${PIDS[@]}"; do stop "$pid"; done
  PIDS=()
}

# Starts Apache Kafka 4.4 with $1 KRaft nodes (the txlog `kafka_cluster` example); sets
# KAFKA_BOOTSTRAP. `kafka_log TOPIC` then prints the LogOptions JSON of a topic on it, with the
# fields of KAFKA_LOG_EXTRA added (say `"linger_ms":0,"compression":"none"`).
start_kafka() {
  log "Kafka 4.4, $1 node(s)"
  "$BIN/examples/kafka_cluster" --nodes "$1" >"$WORK/kafka.out" 2>"$WORK/kafka.log" &
  PIDS+=($!)
  local deadline=$((SECONDS + 120))
  until grep -q '^dir=' "$WORK/kafka.out" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { cat "$WORK/kafka.log" >&2; exit 1; }
    kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$WORK/kafka.log" >&2; exit 1; }
    sleep 0.2
  done
  KAFKA_BOOTSTRAP=$(kafka_setting bootstrap_servers)
}
kafka_setting() { sed -n "s/^$1=//p" "$WORK/kafka.out"; }
kafka_log() { # topic
  printf '{"backend":"kafka","bootstrap_servers":"%s","topic":"%s","replication_factor":%s,"min_insync_replicas":%s%s}' \
    "$KAFKA_BOOTSTRAP" "$1" "$(kafka_setting replication_factor)" "$(kafka_setting min_insync_replicas)" \
    "${KAFKA_LOG_EXTRA:+,$KAFKA_LOG_EXTRA}"
}

# Starts a config manager; sets CM_ADDR.
start_config_manager() {
  CM_ADDR=127.0.0.1:$(free_port)
  "$BIN/causeway-config-manager" --listen "$CM_ADDR" --data-dir "$WORK/cluster/cm" \
    >"$WORK/cm.log" 2>&1 &
  PIDS+=($!)
}

# Starts store node $1 on the log $2 (LogOptions JSON), with its admin (metrics) server on a
# free port written to $WORK/node-$1.admin; extra JSON fields of its options in $3. Its PID goes to
# NODE_PIDS[$1].
start_store_node() {
  local admin=127.0.0.1:$(free_port)
  echo "$admin" >"$WORK/node-$1.admin"
  cat >"$WORK/node-$1.json" <<JSON
{"node_id": $1, "listen": "127.0.0.1:$(free_port)", "admin_listen": "$admin",
 "data_dir": "$WORK/cluster/node-$1", "config_manager": "$CM_ADDR", "log": $2 ${3:-}}
JSON
  "$BIN/causeway-store-node" --config "$WORK/node-$1.json" >"$WORK/node-$1.log" 2>&1 &
  PIDS+=($!)
  NODE_PIDS[$1]=$!
}

# A counter or gauge from store node $1's metrics.
node_metric() {
  curl -s "http://$(cat "$WORK/node-$1.admin")/metrics" | sed -n "s/^causeway_store_$2 //p"
}

# The whole cluster of the single-broker benchmarks: Kafka (one KRaft node), a config manager,
# $1 store nodes (with the option fields of NODE_EXTRA, say `"store":{"sync_writes":false}`), a
# $2×$3 bootstrap and one api-server; sets LOG (the LogOptions JSON) and what the pieces set.
start_cluster() {
  scripts/setup.sh --broker
  build
  start_kafka 1
  LOG=$(kafka_log causeway-tx)
  start_config_manager
  for i in $(seq 1 "$1"); do start_store_node "$i" "$LOG" "${NODE_EXTRA:+, $NODE_EXTRA}"; done
  "$BIN/causeway" admin bootstrap --config-manager "$CM_ADDR" --partitions "$2" --replicas "$3" --wait 60
  start_api_server "$LOG"
}

# Starts an api-server on the log $1 with an admin token; sets API_URL, API_TOKEN and API_PID.
start_api_server() {
  API_TOKEN="bench-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
  printf '{"tokens": [{"name": "bench", "token": "%s", "admin": true}]}\n' "$API_TOKEN" \
    >"$WORK/tokens.json"
  local port
  port=$(free_port)
  "$BIN/causeway-api-server" --listen "127.0.0.1:$port" --config-manager "$CM_ADDR" \
    --log "$1" --tokens-file "$WORK/tokens.json" >"$WORK/api.log" 2>&1 &
  API_PID=$!
  PIDS+=("$API_PID")
  API_URL=http://127.0.0.1:$port
  wait_api "$API_URL" "$API_TOKEN"
}

# Starts causeway dev on the data dir $1 with $2 partitions × $3 replicas (default 1 × 1), its
# output in $1.log; sets DEV_PID, DEV_URL, DEV_TOKEN.
start_dev() {
  local dir=$1 port deadline
  port=$(free_port)
  "$BIN/causeway" dev --data-dir "$dir" --listen "127.0.0.1:$port" \
    --partitions "${2:-1}" --replicas "${3:-1}" >>"$dir.log" 2>&1 &
  DEV_PID=$!
  PIDS+=("$DEV_PID")
  deadline=$((SECONDS + 60))
  until [ -f "$dir/tokens.json" ]; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 "$DEV_PID" 2>/dev/null; then
      cat "$dir.log" >&2
      exit 1
    fi
    sleep 0.2
  done
  DEV_TOKEN=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tokens"][0]["token"])' "$dir/tokens.json")
  DEV_URL=http://127.0.0.1:$port
  wait_api "$DEV_URL" "$DEV_TOKEN" || { cat "$dir.log" >&2; exit 1; }
}

# PostgreSQL 15 from Debian's packages, for the side-by-side runs.
PGBIN=/usr/lib/postgresql/15/bin
# Installs python3, curl and PostgreSQL when missing (the package's own cluster is stopped:
# the benchmarks start theirs).
need_postgres() {
  local need=()
  command -v python3 >/dev/null || need+=(python3)
  command -v curl >/dev/null || need+=(curl)
  [ -x "$PGBIN/initdb" ] || need+=(postgresql)
  [ ${#need[@]} -gt 0 ] || return 0
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  systemctl stop postgresql 2>/dev/null || service postgresql stop 2>/dev/null || true
}
# Starts a throwaway cluster in $WORK/pg, loopback only, synchronous_commit=on, fsync=on, room
# for $1 clients; sets PG_PORT. Stopped at exit.
start_postgres() {
  log "PostgreSQL 15 (synchronous_commit=on)"
  PG_PORT=$(free_port)
  mkdir -p "$WORK/pg"
  chown postgres: "$WORK/pg"
  runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg/data" -A trust -U postgres >/dev/null
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $WORK/pg -c synchronous_commit=on -c fsync=on -c max_connections=$(($1 + 20))" \
    start >/dev/null
}
stop_postgres() {
  if [ -f "$WORK/pg/data/postmaster.pid" ]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m fast stop >/dev/null 2>&1 || true
  fi
}

# Runs SQL on the throwaway cluster (bounded: 1800 s).
sql() { PGOPTIONS="-c client_min_messages=warning" timeout 1800 psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -At -c "$1" postgres; }

# pgbench with the script $WORK/pg/<name>.sql, CONCURRENCY clients, DURATION seconds (both set
# by the caller), after a CHECKPOINT; the result (rate, percentiles from the per-transaction
# log) to $WORK/<name>.json.
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
