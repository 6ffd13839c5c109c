#!/usr/bin/env bash
# Install the Debian packages Quern's tests need (guest boots, fio, Ceph).
#
# Idempotent: if every package below is already installed, it does nothing
# (no apt-get update, no network). Otherwise it runs apt-get update once and
# installs the whole set. Needs root (or sudo) and Debian 12 package sources.
#
# Usage: scripts/install-test-deps.sh
set -euo pipefail

# Packages for booting real QEMU guests against a vhost-user-blk backend
# (tests/guest/*):
#   qemu-system-x86  qemu-system-x86_64, and qemu-storage-daemon (the
#                    reference vhost-user-blk backend)
#   qemu-utils       qemu-img
#   fio, busybox-static, cpio, gzip   the guest initramfs
#   xz-utils         decompressing .ko.xz kernel modules, if shipped so
#   libc-bin         ldd (fio's shared libraries)
#   e2fsprogs        mkfs.ext4 / debugfs for ext4 root images
#   python3, coreutils (timeout)      test drivers
# The guest kernel itself is fetched by tests/guest/build-guest.sh with
# `apt-get download` (it is not installed on the host).
GUEST_TEST_PACKAGES=(
  qemu-system-x86
  qemu-utils
  fio
  busybox-static
  cpio
  e2fsprogs
  python3
  gzip
  xz-utils
  libc-bin
  coreutils
)

# Packages for the Ceph/RBD backend tests: a single-host Ceph cluster
# (monitor + OSD + CLI), the C client libraries (Quern loads librbd.so.1 and
# librados.so.2 at run time; the -dev packages are only for reference), and
# QEMU's rbd: block driver (qemu-img compare/convert against RBD images).
CEPH_TEST_PACKAGES=(
  ceph-mon
  ceph-osd
  ceph-common
  librbd-dev
  librados-dev
  qemu-block-extra
)

ALL_PACKAGES=("${GUEST_TEST_PACKAGES[@]}" "${CEPH_TEST_PACKAGES[@]}")

# Return success if package $1 is fully installed.
is_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

missing=()
for pkg in "${ALL_PACKAGES[@]}"; do
  is_installed "$pkg" || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-test-deps: all ${#ALL_PACKAGES[@]} packages already installed"
  exit 0
fi

echo "install-test-deps: missing: ${missing[*]}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

$SUDO apt-get update
# Install the full list (already-installed ones are no-ops) so versions stay
# consistent with each other.
$SUDO env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y --no-install-recommends "${ALL_PACKAGES[@]}"

echo "install-test-deps: done"
