#!/usr/bin/env bash
# Builds the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer, on the stable toolchain through
# RUSTC_BOOTSTRAP=1) and runs each for SECONDS_PER_TARGET (default 10) from its corpus in
# fuzz/corpus/<target>/. Stops at the first failing target, leaving the input that failed in
# fuzz/artifacts/<target>/. See fuzz/README.md.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# New inputs the run finds go to a temporary directory, so the repository's corpus is read-only;
# with CAUSEWAY_FUZZ_KEEP=1 they are merged (minimised) into fuzz/corpus/<target>/ at the end.
# CAUSEWAY_FUZZ_SEED fixes libFuzzer's seed: the test suite's short run tries the same inputs in
# the same order every time (a faster machine more of them, so it may find what a slower one
# does not), rather than new ones at each run; a longer run without it draws a new seed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
# A fuzz build instruments every dependency with other RUSTFLAGS: it gets its own target dir.
export CARGO_TARGET_DIR="${CAUSEWAY_FUZZ_TARGET_DIR:-$HOME/.cache/causeway-fuzz-target}"
export RUSTC_BOOTSTRAP=1

seconds="${1:-10}"
shift || true
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "fuzz: SECONDS_PER_TARGET must be a number, not $seconds" >&2; exit 2; }

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

# Debug assertions and overflow checks on; no AddressSanitizer (the code under test is safe Rust,
# and it halves the speed).
flags=(--fuzz-dir fuzz -a -s none)
# The lock file is committed: refuse to change it.
cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null
echo "== cargo fuzz build"
cargo fuzz build "${flags[@]}"

targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${seconds}s"
  mkdir -p "fuzz/corpus/$t" "$scratch/$t"
  # The first directory receives new inputs; the committed corpus is only read.
  cargo fuzz run "${flags[@]}" "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
    ${CAUSEWAY_FUZZ_SEED:+-seed="$CAUSEWAY_FUZZ_SEED"} -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1 \
    2>&1 | grep -v -E '^#[0-9]+\s+(NEW|REDUCE|pulse)' || { echo "fuzz: $t failed (input in fuzz/artifacts/$t/)" >&2; exit 1; }
  if [[ "${CAUSEWAY_FUZZ_KEEP:-0}" == 1 ]]; then
    cargo fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" "$scratch/$t" -- -merge=1 -max_len=8192 2>&1 | tail -1
  fi
done
echo "fuzz: ${#targets[@]} targets passed"
