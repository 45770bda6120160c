#!/usr/bin/env bash
# The Helm chart and the container image, checked with the real tools (installed first by
# scripts/k8s-tools.sh when missing): charts/causeway/tests/test_chart.py (helm lint --strict and
# helm template of every ci/ values file, kubernetes-validate --strict for Kubernetes 1.29 to the
# newest, trivy and checkov, the upgrade and schema checks), then
# charts/causeway/tests/test_image.py (the image built with podman from the binaries in
# $CARGO_TARGET_DIR/debug, and a cluster run from it with the chart's command lines, against a
# throwaway Kafka broker). Used by scripts/test.sh, after the binaries are built.
#
#   scripts/chart.sh [--no-image]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/causeway-target}"
tools="${CAUSEWAY_K8S_TOOLS:-$HOME/.cache/causeway-k8s}"

image=true
[[ "${1:-}" == "--no-image" ]] && image=false

scripts/k8s-tools.sh
python="$tools/venv/bin/python"
echo "== chart: lint, validate, scan, upgrade, schema"
"$python" -m unittest discover -s charts/causeway/tests -p 'test_chart.py'
if $image; then
  echo "== chart: the image and a cluster run from it"
  cargo build -p causeway-txlog --features testing --example kafka_cluster --locked
  "$python" -m unittest discover -s charts/causeway/tests -p 'test_image.py'
fi
