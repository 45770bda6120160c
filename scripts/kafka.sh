#!/usr/bin/env bash
# Runs a local single-node Apache Kafka (KRaft: controller and broker in one JVM) in the
# foreground, for `causeway dev --kafka 127.0.0.1:9092`. Fetches the broker from Maven Central
# first when it is missing (scripts/setup.sh --broker). Its data stays in .causeway-kafka/ across
# runs; Ctrl-C stops it.
#
#   scripts/kafka.sh [--port 9092] [--data-dir .causeway-kafka] [--heap 1g]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

port=9092
data_dir="$root/.causeway-kafka"
heap=1g
while (($#)); do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --heap) heap="$2"; shift 2 ;;
    *) echo "kafka.sh: unknown argument $1 (--port, --data-dir, --heap)" >&2; exit 2 ;;
  esac
done

"$root/scripts/setup.sh" --broker
libs="${CAUSEWAY_KAFKA_LIBS:-$HOME/.cache/causeway-kafka/4.4.0/libs}"
java="${JAVA_HOME:+$JAVA_HOME/bin/}java"
mkdir -p "$data_dir"
data_dir="$(cd "$data_dir" && pwd)"
controller_port=$((port + 1))

cat >"$data_dir/server.properties" <<PROPERTIES
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$data_dir/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
PROPERTIES

jvm=("$java" "-Xmx$heap" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
  -Dcauseway.kafka.log.level=warn "-Dlog4j2.configurationFile=$root/txlog/kafka-broker/log4j2.properties"
  -cp "$libs/*")
if [[ ! -f "$data_dir/data/meta.properties" ]]; then
  # The cluster id is fixed for this data dir at its first start.
  cluster_id="$("${jvm[@]}" kafka.tools.StorageTool random-uuid | tail -n 1)"
  "${jvm[@]}" kafka.tools.StorageTool format --cluster-id "$cluster_id" \
    --config "$data_dir/server.properties" >/dev/null
fi
echo "kafka.sh: Kafka 4.4.0 on 127.0.0.1:$port, data in $data_dir (Ctrl-C stops it)"
echo "kafka.sh: then, in another shell: $root/scripts/dev.sh --kafka 127.0.0.1:$port"
exec env -u KAFKA_OPTS -u JAVA_TOOL_OPTIONS "${jvm[@]}" kafka.Kafka "$data_dir/server.properties"
