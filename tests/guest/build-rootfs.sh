#!/usr/bin/env bash
# Build a tiny ext4 root filesystem image for boot tests.
#
# Usage: tests/guest/build-rootfs.sh OUT.img [SIZE_MIB]     (default 32 MiB)
#
# The image holds the static busybox (every applet as a symlink) and an
# /sbin/init that, booted by the test initramfs in root mode
# (`quern.root=/dev/vda`, see init.sh):
#   - mounts /proc, /sys (and /dev unless the initramfs moved it there),
#   - prints QUERN-ROOT-BOOTED on the console,
#   - writes /quern-boot-N (N = one more than the boots so far) holding the
#     token of `quern.token=...` on the kernel command line, and syncs,
#   - prints `QUERN-SEEN NAME CONTENT` for every /quern-boot-* file,
#   - prints QUERN-ROOT-END, remounts / read-only and powers off.
# A later boot over the same disk (or an overlay of it) thus shows what
# earlier boots wrote. Made with `mkfs.ext4 -d` (no mount, no root needed).
# Needs busybox-static and e2fsprogs (scripts/install-test-deps.sh).
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 OUT.img [SIZE_MIB]" >&2; exit 2; }
OUT=$1
SIZE=${2:-32}
BUSYBOX=/bin/busybox
die() { echo "build-rootfs: error: $*" >&2; exit 1; }
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found (install busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
  die "$BUSYBOX is dynamically linked: install busybox-static"
fi
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found (install e2fsprogs)"

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,root}
cp "$BUSYBOX" "$STAGE/bin/busybox"
for a in $("$BUSYBOX" --list); do
  [ "$a" = busybox ] || [ -e "$STAGE/bin/$a" ] || ln -s busybox "$STAGE/bin/$a"
done
cat > "$STAGE/sbin/init" <<'INIT'
#!/bin/sh
# /sbin/init of Quern's test root filesystem (tests/guest/build-rootfs.sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
[ -e /dev/console ] || mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
echo "QUERN-ROOT-BOOTED"
token=none
for w in $(cat /proc/cmdline); do
	case "$w" in
	quern.token=*) token="${w#quern.token=}" ;;
	esac
done
n=1
while [ -e "/quern-boot-$n" ]; do
	n=$((n + 1))
done
echo "$token" > "/quern-boot-$n"
sync
for f in /quern-boot-*; do
	[ -e "$f" ] && echo "QUERN-SEEN ${f#/} $(cat "$f")"
done
echo "QUERN-ROOT-END"
mount -o remount,ro / 2>/dev/null
sync
echo o > /proc/sysrq-trigger
sleep 5
poweroff -f
INIT
chmod 755 "$STAGE/sbin/init"
rm -f "$OUT"
mkfs.ext4 -q -F -L quern-root -E root_owner=0:0 -d "$STAGE" "$OUT" "${SIZE}M" >&2 ||
  die "mkfs.ext4 failed"
echo "build-rootfs: $OUT (${SIZE} MiB)" >&2
