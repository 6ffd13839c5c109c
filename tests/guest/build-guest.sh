#!/usr/bin/env bash
# Build the guest that Quern's end-to-end tests boot under QEMU.
#
# Usage: tests/guest/build-guest.sh [OUTDIR]      (default: target/guest)
#        FORCE=1 tests/guest/build-guest.sh OUTDIR  rebuild even if up to date
#        QUERN_GUEST_KERNEL_PKG=linux-image-6.1.0-NN-amd64  pick the kernel
#
# Produces in OUTDIR:
#   vmlinuz          Debian's kernel (from linux-image-6.1.0-NN-amd64)
#   kernel/          that package, extracted with dpkg-deb -x
#   modules/         the virtio-blk and ext4 modules, uncompressed .ko
#   initrd-fio.gz    initramfs: busybox, fio + its libraries, the modules,
#                    the fio job files (tests/guest/jobs) and tests/guest/init.sh
#                    as /init
#
# Idempotent: when all outputs exist and are newer than this script, init.sh
# and the job files, it does nothing. The kernel package is downloaded only
# once per OUTDIR. Needs: apt-get, dpkg-deb, fio, busybox-static, cpio, gzip
# (scripts/install-test-deps.sh installs them). Runs without root except that
# `apt-get update` (only done if the kernel cannot be found) needs root.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUTDIR="${1:-$REPO/target/guest}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"

# Modules in load order (init.sh insmods them in this same order).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev
         virtio_pci virtio_blk crc16 crc32c_generic mbcache jbd2 ext4)

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

# Inputs whose changes make the outputs stale.
INPUTS=("$HERE/build-guest.sh" "$HERE/init.sh" "$HERE"/jobs/*)

# --- Up to date? ---------------------------------------------------------
up_to_date() {
  local out in
  for out in "$OUTDIR/vmlinuz" "$OUTDIR/initrd-fio.gz" "$OUTDIR/modules/virtio_blk.ko"; do
    [ -e "$out" ] || return 1
    for in in "${INPUTS[@]}"; do
      [ "$out" -nt "$in" ] || return 1
    done
  done
}
if [ "${FORCE:-0}" != 1 ] && up_to_date; then
  log "up to date in $OUTDIR"
  exit 0
fi

for tool in apt-get apt-cache dpkg-deb cpio gzip ldd; do
  command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-test-deps.sh)"
done
FIO="$(command -v fio)" || die "fio not found (run scripts/install-test-deps.sh)"
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found (install busybox-static)"
# Must be the static busybox: the initramfs has no libc for a dynamic one
# (busybox-static replaces /bin/busybox with a static build).
if ldd "$BUSYBOX" >/dev/null 2>&1; then
  die "$BUSYBOX is dynamically linked: install busybox-static"
fi

# --- Kernel ---------------------------------------------------------------
# Name of the current Debian kernel package, e.g. linux-image-6.1.0-56-amd64.
kernel_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

# Download the kernel .deb into $OUTDIR/deb; echo its path.
download_kernel() {
  local pkg="$1" deb
  mkdir -p "$OUTDIR/deb"
  deb="$(ls "$OUTDIR"/deb/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)"
  if [ -z "$deb" ]; then
    log "downloading $pkg"
    # apt-get download writes into the current directory. As root, apt
    # would drop to user _apt, who cannot write there: say so up front
    # rather than get a warning.
    local opts=()
    [ "$(id -u)" -ne 0 ] || opts=(-o APT::Sandbox::User=root)
    (cd "$OUTDIR/deb" && apt-get "${opts[@]}" download "$pkg" >&2) || return 1
    deb="$(ls "$OUTDIR"/deb/"${pkg}"_*.deb | head -n1)"
  fi
  echo "$deb"
}

PKG="${QUERN_GUEST_KERNEL_PKG:-$(kernel_pkg)}"
if [ -z "$PKG" ]; then
  log "linux-image-amd64 unknown to apt-cache; running apt-get update"
  apt-get update >&2
  PKG="$(kernel_pkg)"
  [ -n "$PKG" ] || die "cannot find the kernel package behind linux-image-amd64"
fi
KVER="${PKG#linux-image-}"   # e.g. 6.1.0-56-amd64

if [ ! -f "$OUTDIR/kernel/boot/vmlinuz-$KVER" ]; then
  if ! DEB="$(download_kernel "$PKG")"; then
    # The package lists may be stale (the mirror dropped that version).
    [ -n "${QUERN_GUEST_KERNEL_PKG:-}" ] && die "cannot download $PKG"
    log "download failed; running apt-get update and retrying"
    apt-get update >&2
    PKG="$(kernel_pkg)"; KVER="${PKG#linux-image-}"
    DEB="$(download_kernel "$PKG")" || die "cannot download $PKG"
  fi
  log "extracting $(basename "$DEB")"
  rm -rf "$OUTDIR/kernel"
  dpkg-deb -x "$DEB" "$OUTDIR/kernel"
fi
[ -f "$OUTDIR/kernel/boot/vmlinuz-$KVER" ] || die "no boot/vmlinuz-$KVER in $PKG"
cp "$OUTDIR/kernel/boot/vmlinuz-$KVER" "$OUTDIR/vmlinuz.tmp"
mv "$OUTDIR/vmlinuz.tmp" "$OUTDIR/vmlinuz"
echo "$KVER" > "$OUTDIR/kernel-version"

# --- Modules ----------------------------------------------------------------
# Debian 12 ships plain .ko files; later kernels may ship .ko.xz or .ko.zst,
# which busybox insmod cannot load: decompress those here.
MODDIR="$OUTDIR/kernel/lib/modules/$KVER/kernel"
rm -rf "$OUTDIR/modules"
mkdir -p "$OUTDIR/modules"
for m in "${MODULES[@]}"; do
  src="$(find "$MODDIR" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \
          -o -name "$m.ko.gz" \) -print -quit)"
  [ -n "$src" ] || die "module $m not found under $MODDIR"
  dst="$OUTDIR/modules/$m.ko"
  case "$src" in
    *.ko)     cp "$src" "$dst" ;;
    *.ko.xz)  xz -dc "$src" > "$dst" ;;
    *.ko.zst) zstd -qdc "$src" > "$dst" ;;
    *.ko.gz)  gzip -dc "$src" > "$dst" ;;
  esac
done
log "modules: ${MODULES[*]}"

# --- Initramfs ----------------------------------------------------------------
STAGE="$(mktemp -d "$OUTDIR/initrd-stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,jobs,lib/modules,newroot}
cp "$BUSYBOX" "$STAGE/bin/busybox"
cp "$HERE/init.sh" "$STAGE/init"
chmod 755 "$STAGE/init"
cp "$OUTDIR"/modules/*.ko "$STAGE/lib/modules/"
cp "$HERE"/jobs/* "$STAGE/jobs/"

# fio is dynamically linked (Debian builds it against librbd, glusterfs, rdma,
# ...: ~60 libraries). Copy it and every library ldd names, dereferencing
# symlinks, at the same absolute paths (the dynamic linker and RUNPATHs look
# there). The host's /lib is a symlink to usr/lib (merged /usr), so a path
# under /lib/... is stored as a real directory in the initramfs; that is fine.
mkdir -p "$STAGE/usr/bin"
cp "$FIO" "$STAGE/usr/bin/fio"
ldd "$FIO" | awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]*ld-linux/ {print $1}' |
  while read -r lib; do
    mkdir -p "$STAGE$(dirname "$lib")"
    cp -L "$lib" "$STAGE$lib"
  done
[ -e "$STAGE/lib64/ld-linux-x86-64.so.2" ] || die "dynamic linker not copied"

# Pack: newc cpio, owned by root, gzip -1 (the kernel unpacks it quickly; a
# higher level saves little on these libraries and costs time under TCG).
(cd "$STAGE" && find . -print0 | sort -z |
   cpio --null -o -H newc -R 0:0 --quiet | gzip -1) > "$OUTDIR/initrd-fio.gz.tmp"
mv "$OUTDIR/initrd-fio.gz.tmp" "$OUTDIR/initrd-fio.gz"
log "initrd-fio.gz: $(du -h "$OUTDIR/initrd-fio.gz" | cut -f1) ($(du -sh "$STAGE" | cut -f1) unpacked)"
log "built kernel $KVER in $OUTDIR"
