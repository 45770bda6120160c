#!/usr/bin/env bash
# The whole test suite: formatting, lints, every test (the Kafka tests against real Apache Kafka
# brokers, KRaft JVMs that the tests start themselves), schemathesis against a live `causeway dev`,
# and the Helm chart and the container image (scripts/chart.sh: helm, kubernetes-validate, trivy,
# checkov and podman). Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CAUSEWAY_TARGET_DIR:-$HOME/.cache/causeway-target}"
export CARGO_TERM_COLOR=never

scripts/setup.sh --broker

echo "== bench/guard.py"
python3 -m unittest bench/test_guard.py
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (the binaries the cluster tests start)"
cargo build --workspace --bins --locked
echo "== cargo test"
cargo test --workspace --locked
echo "== fuzz targets (10 s each; scripts/fuzz.sh 600 for a longer run)"
CAUSEWAY_FUZZ_SEED=1 scripts/fuzz.sh 10
echo "== schemathesis"
scripts/schemathesis.sh
echo "== the Helm chart and the container image"
scripts/chart.sh
