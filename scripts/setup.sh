#!/usr/bin/env bash
# Installs what building and testing Causeway needs on a Debian machine, skipping what is there:
# the C/C++ toolchain and libclang (RocksDB, librdkafka), and, with --broker, a JDK, Maven and the
# Apache Kafka broker the Kafka tests run against (its jars, from Maven Central through `mvn`, into
# ~/.cache/causeway-kafka/<version>/libs; CAUSEWAY_KAFKA_LIBS overrides the place), and iptables
# and Debian's fiu-utils for the fault suite (partitions, failing fsyncs). Safe to run again.
set -euo pipefail

want_broker=false
[[ "${1:-}" == "--broker" ]] && want_broker=true

source "$(dirname "$0")/apt.sh"

apt_install setup build-essential clang libclang-dev pkg-config libssl-dev zlib1g-dev cmake python3 python3-venv curl

if ! command -v cargo >/dev/null 2>&1; then
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: a Rust toolchain (cargo) is needed: https://rustup.rs" >&2
    exit 1
  fi
fi

# The fuzz targets (scripts/fuzz.sh) run through cargo-fuzz.
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

if $want_broker; then
  kafka_version=4.4.0
  libs="${CAUSEWAY_KAFKA_LIBS:-$HOME/.cache/causeway-kafka/$kafka_version/libs}"
  jdk=()
  command -v java >/dev/null 2>&1 || [[ -x "${JAVA_HOME:-/nonexistent}/bin/java" ]] || jdk+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null 2>&1 || jdk+=(maven)
  if ((${#jdk[@]})); then apt_install setup "${jdk[@]}"; fi
  # The fault suite: iptables cuts the network between processes, libfiu fails their fsyncs.
  apt_install setup iptables fiu-utils
  if [[ ! -f "$libs/kafka_2.13-$kafka_version.jar" ]]; then
    echo "setup: fetching the Kafka $kafka_version broker from Maven Central into $libs"
    pom="$(cd "$(dirname "$0")/.." && pwd)/txlog/kafka-broker/pom.xml"
    tmp="$libs.partial"
    rm -rf "$tmp"
    mvn -q -B -f "$pom" dependency:copy-dependencies -DoutputDirectory="$tmp"
    [[ -f "$tmp/kafka_2.13-$kafka_version.jar" ]] || { echo "setup: mvn did not bring kafka_2.13-$kafka_version.jar" >&2; exit 1; }
    rm -rf "$libs"
    mv "$tmp" "$libs"
  fi
fi
