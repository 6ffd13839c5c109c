#!/usr/bin/env bash
# Put a qemu-storage-daemon of another QEMU release beside the installed
# one, for side-by-side benchmarks, without installing it: the Debian
# package that carries it is downloaded and extracted under
# target/peers/qsd-RELEASE/ (its binary: usr/bin/qemu-storage-daemon). It
# links against the installed QEMU's libraries, which Debian keeps
# compatible within a distribution.
#
# Usage: bench/peers/fetch-qsd.sh RELEASE      e.g. 7.2
#
# Why: measured with the same libblkio client on null backends, QEMU 7.2's
# qemu-storage-daemon spends about a third of the CPU per I/O of 10.0's, so
# a comparison with 10.0 alone flatters Quern (bench/README.md).
set -euo pipefail
REL="${1:?usage: fetch-qsd.sh RELEASE (e.g. 7.2)}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$(cd "$HERE/../.." && pwd)/target/peers/qsd-$REL"
BIN="$OUT/usr/bin/qemu-storage-daemon"
die() { echo "fetch-qsd: $*" >&2; exit 1; }

if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
  echo "$BIN"
  exit 0
fi

# qemu-storage-daemon lives in qemu-system-common up to 7.2 and in
# qemu-utils from 8.0 on; take the newest build of the release that the
# apt sources offer.
for pkg in qemu-system-common qemu-utils; do
  ver="$(apt-cache madison "$pkg" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' |
         grep -E "^1:${REL//./\\.}([.+~-]|$)" | sort -r -V | head -n1 || true)"
  [ -n "$ver" ] || continue
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -q "$pkg=$ver" >/dev/null 2>&1) ||
    die "apt-get download $pkg=$ver failed"
  deb="$(ls "$tmp"/*.deb)"
  if dpkg-deb -c "$deb" | grep '/usr/bin/qemu-storage-daemon$' >/dev/null; then
    rm -rf "$OUT"; mkdir -p "$OUT"
    dpkg-deb -x "$deb" "$OUT"
    "$BIN" --version >/dev/null || die "$BIN does not run here (missing libraries?)"
    echo "fetch-qsd: $pkg $ver -> $OUT" >&2
    echo "$BIN"
    exit 0
  fi
  rm -rf "$tmp"; trap - EXIT
done
die "no package of QEMU $REL with qemu-storage-daemon in the apt sources (apt-cache madison qemu-system-common qemu-utils)"
