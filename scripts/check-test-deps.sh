#!/usr/bin/env bash
# Prove the install step: every tool the tests use runs, and the QEMU tools
# are one version. Run by scripts/test.sh after scripts/install-test-deps.sh
# and before any test, so a broken install fails with a message naming the
# tool instead of as a test failure minutes later.
#
# Usage: scripts/check-test-deps.sh
set -uo pipefail

failures=()
fail() { failures+=("$*"); }

# The version line a tool prints, or a failure naming it.
version_of() {
  local tool="$1"; shift
  local out
  if ! command -v "$tool" >/dev/null; then
    fail "$tool: not found"
    return 1
  fi
  if ! out="$(timeout 20 "$tool" "$@" 2>&1)"; then
    fail "$tool $*: exit status $? ($(echo "$out" | head -n1))"
    return 1
  fi
  echo "$out" | head -n1
}

# "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-...)" -> "10.0.2 (Debian 1:10.0.2+ds-...)"
qemu_version() { sed -n 's/.*version \([0-9][^ ]*\( ([^)]*)\)\?\).*/\1/p' <<<"$1"; }

declare -A qemu
for tool in qemu-system-x86_64 qemu-storage-daemon qemu-img; do
  if line="$(version_of "$tool" --version)"; then
    qemu[$tool]="$(qemu_version "$line")"
    [ -n "${qemu[$tool]}" ] || fail "$tool: cannot read a version from '$line'"
  fi
done

# The QEMU versions agree (a qemu-img from one release and a system emulator
# from another means apt mixed two QEMUs).
first=""
for tool in "${!qemu[@]}"; do
  [ -n "${qemu[$tool]}" ] || continue
  if [ -z "$first" ]; then
    first="${qemu[$tool]}"
  elif [ "${qemu[$tool]}" != "$first" ]; then
    fail "QEMU versions disagree: $(for t in "${!qemu[@]}"; do printf '%s %s; ' "$t" "${qemu[$t]}"; done)"
    break
  fi
done

# qemu-img has QEMU's rbd driver (qemu-block-extra): with it, a missing
# ceph.conf is the rbd driver's own error; without it, "Unknown protocol".
if command -v qemu-img >/dev/null; then
  out="$(timeout 20 qemu-img info 'rbd:quern-check/none:conf=/nonexistent/ceph.conf' 2>&1)"
  if ! grep -q 'error reading conf file' <<<"$out"; then
    fail "qemu-img: no rbd driver (install qemu-block-extra at qemu-img's version): $out"
  fi
fi

fio_version="$(version_of fio --version)"
ceph_version="$(version_of ceph-mon --version)"
rbd_version="$(version_of rbd --version)"
prom_version="$(version_of prometheus --version)"

if [ "${#failures[@]}" -ne 0 ]; then
  echo "check-test-deps: the install step left the machine unable to run the tests:" >&2
  for f in "${failures[@]}"; do
    echo "  - $f" >&2
  done
  exit 1
fi

echo "check-test-deps: QEMU $first (qemu-system-x86_64, qemu-storage-daemon, qemu-img with rbd);" \
  "$fio_version; $(awk '{print $1, $2, $3}' <<<"$ceph_version") (ceph-mon, rbd: $(awk '{print $3}' <<<"$rbd_version"));" \
  "prometheus $(awk '{print $3}' <<<"$prom_version")"
