#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every test (the Kafka tests against a real
# tansu broker that the tests start themselves). Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CAUSEWAY_TARGET_DIR:-$HOME/.cache/causeway-target}"
export CARGO_TERM_COLOR=never

scripts/setup.sh --broker

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
