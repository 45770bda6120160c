#!/usr/bin/env bash
# Builds the Causeway image (default tag localhost/causeway:dev) with podman from binaries
# already built on this machine, without pulling anything: the runtime stage of the repository's
# Dockerfile, on the local debian:bookworm-slim that scripts/base-image.sh makes, with the
# Dockerfile's build stage replaced by a directory of stripped copies of the five binaries
# (`--build-context build=DIR`), so the Rust build stage never runs.
#
#   scripts/image.sh [--profile debug|release] [--version V] [TAG]
#
# --profile: which cargo output to take, $CARGO_TARGET_DIR/<profile> (default debug, what CI
# builds; CARGO_TARGET_DIR defaults to ~/.cache/causeway-target, then ./target). TAG (or
# CAUSEWAY_IMAGE) names the image. Prints the image id on the last line. Installs podman and the
# base image first when they are missing (scripts/k8s-tools.sh --podman, scripts/base-image.sh).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
profile=debug
version=""
tag="${CAUSEWAY_IMAGE:-localhost/causeway:dev}"
while (($#)); do
  case "$1" in
    --profile) profile="${2:?--profile needs debug or release}"; shift 2 ;;
    --profile=*) profile="${1#--profile=}"; shift ;;
    --version) version="${2:?--version needs a value}"; shift 2 ;;
    --version=*) version="${1#--version=}"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "image: unknown option $1" >&2; exit 2 ;;
    *) tag="$1"; shift ;;
  esac
done
case "$profile" in
  debug|release) ;;
  *) echo "image: --profile is debug or release, not $profile" >&2; exit 2 ;;
esac

target_dir="${CARGO_TARGET_DIR:-}"
if [[ -z "$target_dir" ]]; then
  if [[ -d "$HOME/.cache/causeway-target" ]]; then target_dir="$HOME/.cache/causeway-target"; else target_dir="$repo/target"; fi
fi
bins=(causeway causeway-store-node causeway-config-manager causeway-api-server causeway-cdc)
for b in "${bins[@]}"; do
  [[ -x "$target_dir/$profile/$b" ]] || {
    echo "image: $target_dir/$profile/$b is missing (cargo build$([[ $profile == release ]] && echo ' --release') --bins)" >&2
    exit 1
  }
done

"$repo/scripts/k8s-tools.sh" --podman
"$repo/scripts/base-image.sh"

stage=$(mktemp -d "${TMPDIR:-/var/tmp}/causeway-image.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/out/bin"
for b in "${bins[@]}"; do
  # Stripped copies; the cargo output stays as it is.
  strip -o "$stage/out/bin/$b" "$target_dir/$profile/$b"
done

if [[ -z "$version" ]]; then
  version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
fi

# --network host: the runtime stage's apt-get reaches the Debian mirror the way the host does.
podman build --quiet --network host --target runtime \
  --build-context "build=$stage" \
  --build-arg "VERSION=$version" \
  --file "$repo/Dockerfile" --tag "$tag" "$repo" >/dev/null
echo "image: $tag ($profile binaries, version $version), $(podman image inspect --format '{{.Size}}' "$tag" | awk '{ printf "%.0f MB", $1 / 1e6 }')" >&2
podman image inspect --format '{{.Id}}' "$tag"
