#!/usr/bin/env bash
# Build the oomguard daemon image from deploy/Containerfile with podman (a real builder),
# and write it as an OCI image layout too (for runc, skopeo, `podman load`, a registry).
#
# Usage (as root): deploy/build-image.sh [--base IMAGE] [--out DIR] [--tag TAG]
#   --base IMAGE  build FROM IMAGE (e.g. docker.io/library/python:3.11-slim-bookworm; needs
#                 a registry that serves it). Without it, the bases are made here from
#                 Debian's packages (mmdebstrap, apt's own mirror: no container registry).
#   --out DIR     where the OCI layout goes (default deploy/build/oci); the image is also
#                 left in podman's store as TAG (default localhost/oomguard:VERSION).
# Prints the image's size (uncompressed, as `podman images` counts it) and the layout's.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE="" OUT="$REPO/deploy/build/oci" TAG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --base) BASE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    *) echo "build-image: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "build-image: run as root (podman's store, mmdebstrap)" >&2; exit 2; }
say() { printf 'build-image: %s\n' "$*" >&2; }

PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
VERSION=$("$PY" -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$REPO/pyproject.toml")
TAG=${TAG:-localhost/oomguard:$VERSION}

need=()
for tool in podman:podman skopeo:skopeo mmdebstrap:mmdebstrap; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  say "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
fi

WORK=$(mktemp -d /tmp/oomguard-image.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/context/wheels"

say "wheel from $REPO"
"$PY" -m pip wheel -q --no-deps -w "$WORK/context/wheels" "$REPO" >/dev/null

base_from_debian() {  # base_from_debian NAME PACKAGES: a bookworm rootfs imported as NAME
  local name=$1 pkgs=$2 tarball
  tarball="$WORK/$(basename "${name%%:*}").tar"
  say "base $name from Debian packages: $pkgs"
  # extract: unpack the packages and their dependencies; no maintainer scripts, no dpkg
  # database kept. The hooks add the two accounts and drop what nothing at run time reads.
  mmdebstrap --quiet --mode=root --variant=extract --include="$pkgs" \
    --extract-hook='printf "root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n" > "$1/etc/passwd"' \
    --extract-hook='printf "root:x:0:\nnogroup:x:65534:\n" > "$1/etc/group"' \
    --extract-hook='mkdir -p "$1/tmp" "$1/root" "$1/proc" "$1/sys" "$1/dev" && chmod 1777 "$1/tmp"' \
    --extract-hook='rm -rf "$1"/usr/share/doc "$1"/usr/share/man "$1"/usr/share/info "$1"/usr/share/locale "$1"/var/lib/dpkg "$1"/var/cache/* "$1"/var/log/*' \
    bookworm "$tarball" >/dev/null
  podman import --quiet --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' "$tarball" "$name" >/dev/null
}

if [ -n "$BASE" ]; then
  build_base=$BASE runtime_base=$BASE
else
  build_base=localhost/oomguard-base-pip:bookworm runtime_base=localhost/oomguard-base:bookworm
  base_from_debian "$runtime_base" python3-minimal,libpython3.11-stdlib
  base_from_debian "$build_base" python3-minimal,libpython3.11-stdlib,python3-pip
fi

say "podman build $TAG (FROM $build_base, ships $runtime_base)"
# chroot isolation: the one RUN step needs no runtime and no cgroup (pip runs --no-index).
pull=never  # the local bases are in podman's store only
[ -z "$BASE" ] || pull=missing
podman build --quiet --isolation=chroot --pull="$pull" --layers=false \
  --build-arg BASE="$build_base" --build-arg RUNTIME_BASE="$runtime_base" \
  -f "$REPO/deploy/Containerfile" -t "$TAG" "$WORK/context" >/dev/null

# The local bases are made anew each time: leave none of them behind in podman's store.
[ -n "$BASE" ] || podman rmi --force "$runtime_base" "$build_base" >/dev/null 2>&1 || true

rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
skopeo copy --quiet "containers-storage:$TAG" "oci:$OUT:$VERSION" >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$TAG")
layout=$(du -sb "$OUT" | cut -f1)
echo "image $TAG: $((size / 1024 / 1024)) MiB uncompressed ($size bytes); OCI layout $OUT:$VERSION: $((layout / 1024 / 1024)) MiB"
