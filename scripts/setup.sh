#!/usr/bin/env bash
# Installs what building and testing Causeway needs on a Debian machine, skipping what is there:
# the C/C++ toolchain and libclang (RocksDB, librdkafka), and, with --broker, the tansu
# Kafka-protocol broker the Kafka tests run against. Safe to run again.
set -euo pipefail

want_broker=false
[[ "${1:-}" == "--broker" ]] && want_broker=true

sudo_if_needed() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

packages=(build-essential clang libclang-dev pkg-config libssl-dev zlib1g-dev cmake python3 python3-venv curl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: a Rust toolchain (cargo) is needed: https://rustup.rs" >&2
    exit 1
  fi
fi

if $want_broker; then
  tansu_bin="${TANSU_BIN:-$(command -v tansu || echo "$HOME/.cargo/bin/tansu")}"
  if [[ ! -x "$tansu_bin" ]]; then
    echo "setup: building the tansu broker (once per machine, about 10 minutes)"
    cargo install tansu --locked --features libsql
  fi
fi
