#!/usr/bin/env bash
# Makes the base image of the Dockerfile's runtime stage, docker.io/library/debian:bookworm-slim,
# in podman's local storage when it is not there: no container registry is reachable here, but
# the Debian mirror that apt uses is, so the image is a minbase debootstrap of bookworm from
# that mirror, slimmed like the official one (no docs, man pages, locales or apt lists), with
# apt sources for bookworm, bookworm-updates and (when apt has it) bookworm-security.
# Skips everything when podman already has the image. Needs podman and debootstrap
# (scripts/k8s-tools.sh installs them). Safe to run again.
set -euo pipefail

image="${1:-docker.io/library/debian:bookworm-slim}"
suite=bookworm

if podman image exists "$image"; then
  exit 0
fi
for tool in podman debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || { echo "base-image: $tool is missing (run scripts/k8s-tools.sh)" >&2; exit 1; }
done

# The Debian mirror (and security mirror) apt uses: deb822 .sources files or one-line lists.
apt_uris() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] && sed -n 's/^URIs:[[:space:]]*//p' "$f" | tr ' ' '\n'
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] && awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break } }' "$f"
  done
  return 0
}
uris=$(apt_uris | sed 's:/*$::' | grep -E '^(https?|file)://' || true)
mirror=$(grep -E '/debian$' <<<"$uris" | head -n1 || true)
security=$(grep -E '/debian-security$' <<<"$uris" | head -n1 || true)
if [[ -z "$mirror" ]]; then
  echo "base-image: found no Debian mirror (…/debian) in apt's sources" >&2
  exit 1
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/causeway-rootfs.XXXXXX")
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"

echo "base-image: debootstrap --variant=minbase $suite from $mirror"
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 20 "$work/debootstrap.log" >&2
  exit 1
}

{
  echo "deb $mirror $suite main"
  echo "deb $mirror $suite-updates main"
  [[ -n "$security" ]] && echo "deb $security $suite-security main"
} >"$rootfs/etc/apt/sources.list"

# As the official slim image: dpkg leaves out documentation and locales of later installs,
# apt keeps no package files or lists.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::GzipIndexes "true";' >"$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
echo 'APT::Install-Recommends "false";' >"$rootfs/etc/apt/apt.conf.d/docker-no-recommends"

find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$rootfs"/usr/share/{man,groff,info,lintian,linda,locale}/* \
  "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/tmp/* "$rootfs"/var/tmp/*
find "$rootfs/var/log" -type f -delete
: >"$rootfs/etc/machine-id"
printf 'localhost\n' >"$rootfs/etc/hostname"
rm -f "$rootfs/etc/resolv.conf"

echo "base-image: importing as $image"
tar --numeric-owner -C "$rootfs" -c . |
  podman import -q --change 'CMD ["bash"]' - "$image" >/dev/null
podman image inspect --format '{{.Id}} {{.Size}}' "$image"
