#!/usr/bin/env bash
# Runs schemathesis (PyPI) against a live `causeway dev` built in $CARGO_TARGET_DIR: it fetches
# /v1/openapi.json and sends generated requests, valid and invalid, to every operation; it fails
# on a server error, an answer the document does not describe, or invalid data that was accepted.
# Installs schemathesis in a virtualenv under ~/.cache when missing. Used by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$HOME/.cache/causeway-target}"
causeway="$target/debug/causeway"
[[ -x "$causeway" ]] || { echo "schemathesis: $causeway is not built" >&2; exit 1; }

venv="${CAUSEWAY_VENV:-$HOME/.cache/causeway-venv}"
version=4.32.5
if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$version"; then
  echo "schemathesis: installing schemathesis $version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis==$version"
fi

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$causeway" dev --data-dir "$dir/data" --listen "127.0.0.1:$port" --cdc-listen 127.0.0.1:0 >"$dir/dev.log" 2>&1 &
dev_pid=$!
cleanup() {
  kill -INT "$dev_pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$dev_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$dev_pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# `causeway dev` prints its banner once the API answers; give it 60 s.
for _ in $(seq 600); do
  grep -q "cluster ready" "$dir/dev.log" && break
  kill -0 "$dev_pid" 2>/dev/null || { cat "$dir/dev.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "cluster ready" "$dir/dev.log" || { echo "causeway dev did not start" >&2; cat "$dir/dev.log" >&2; exit 1; }
token=$(python3 -c 'import json,sys; print([t["token"] for t in json.load(open(sys.argv[1]))["tokens"] if t.get("admin")][0])' "$dir/data/tokens.json")

# Two checks are left out. use_after_free: PATCH creates a document that is absent (a merge
# patch is an upsert, API.md), so a PATCH after a DELETE rightly answers 200.
# positive_data_acceptance: some rules cannot be written in a JSON schema (a Causeway-After past
# the log's current end, the grammar of query filters and counter paths, limits in bytes of
# UTF-8), so schema-valid requests that break them get their 400. Invalid requests that the
# schema does describe must still be refused (negative_data_rejection stays on). The change
# streams are left out: a stream answers 200 and never ends (tests/tests/changes.rs covers them).
"$venv/bin/st" run "http://127.0.0.1:$port/v1/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks all \
  --exclude-checks use_after_free,positive_data_acceptance \
  --exclude-path-regex '/changes$' \
  --max-time "${SCHEMATHESIS_SECS:-120}" \
  --request-timeout 15 \
  --seed 1 \
  --no-color
status=$?
if ! kill -0 "$dev_pid" 2>/dev/null; then
  echo "causeway dev died during the run" >&2; cat "$dir/dev.log" >&2; exit 1
fi
exit $status
