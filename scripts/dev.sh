#!/usr/bin/env bash
# Runs `causeway dev`: a whole cluster in one process on the embedded log, with a data dir
# under .causeway-dev (kept across runs). Installs what is missing first. Extra arguments go to
# `causeway dev` (for example --partitions 2 --replicas 2). With --kafka BOOTSTRAP (a broker from
# scripts/kafka.sh, say) it runs on Kafka instead, in .causeway-dev-kafka unless --data-dir says.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CAUSEWAY_TARGET_DIR:-$HOME/.cache/causeway-target}"

data_dir=(--data-dir .causeway-dev)
for arg in "$@"; do
  case "$arg" in
    --data-dir | --data-dir=*) data_dir=() ;;
    --kafka | --kafka=*) [[ ${#data_dir[@]} -eq 0 ]] || data_dir=(--data-dir .causeway-dev-kafka) ;;
  esac
done

scripts/setup.sh
exec cargo run --locked -p causeway-cli --bin causeway -- dev "${data_dir[@]}" "$@"
