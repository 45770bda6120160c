#!/usr/bin/env bash
# Runs `causeway dev`: a whole cluster in one process on the embedded log, with a data dir
# under .causeway-dev (kept across runs). Installs what is missing first. Extra arguments go to
# `causeway dev` (for example --partitions 2 --replicas 2).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CAUSEWAY_TARGET_DIR:-$HOME/.cache/causeway-target}"

scripts/setup.sh
exec cargo run --locked -p causeway-cli --bin causeway -- dev --data-dir .causeway-dev "$@"
