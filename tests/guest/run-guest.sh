#!/usr/bin/env bash
# Boot the fio test guest (see build-guest.sh) under QEMU against a
# vhost-user-blk backend (Quern, or qemu-storage-daemon as reference), and
# report how its fio jobs went.
#
# Usage: tests/guest/run-guest.sh [options] SOCKET
#   SOCKET               the backend's vhost-user-blk unix socket
#   -q, --queues N       virtqueues of the vhost-user-blk-pci device (default 2)
#   -a, --append ARGS    extra kernel command line, e.g. "quern.fio=randread"
#                        (see init.sh for the quern.* parameters)
#   -t, --timeout SECS   kill QEMU after SECS (default 300)
#   -l, --log FILE       also write the guest console to FILE
#       --quiet          do not echo the console to stdout (use with --log)
#   -r, --reconnect      reconnect=1 on the chardev: QEMU reconnects to the
#                        backend after it restarts (crash-restart tests)
#   -g, --guest DIR      build-guest.sh output dir (default: target/guest, or
#                        $QUERN_GUEST_DIR)
#   -i, --initrd FILE    initramfs to boot (default: GUEST/initrd-fio.gz)
#   -m, --mem MIB        guest RAM (default 512), shared with the backend
#       --smp N          guest CPUs (default 2)
#       --qemu-arg ARG   one extra argument for qemu-system-x86_64 (repeatable)
#       --no-check       exit with QEMU's status instead of checking markers
#
# Exit status (unless --no-check):
#   0    the guest printed QUERN-GUEST-END and QUERN-FIO-RC=0
#   1    the guest finished but fio failed (QUERN-FIO-RC not 0)
#   2    the guest did not finish (no QUERN-GUEST-END: crash, hang, bad setup)
#   124  timeout
#   other  QEMU's own failure status (e.g. it could not connect to SOCKET)
#
# Example:
#   tests/guest/run-guest.sh -a quern.fio=verify -t 300 -l /tmp/g.log /tmp/vub.sock
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit "${1:-2}"; }
die() { echo "run-guest: error: $*" >&2; exit 2; }

QUEUES=2
APPEND=""
TIMEOUT=300
LOG=""
QUIET=0
RECONNECT=0
GUEST="${QUERN_GUEST_DIR:-$REPO/target/guest}"
INITRD=""
MEM=512
SMP=2
EXTRA=()
CHECK=1
SOCKET=""

while [ $# -gt 0 ]; do
  case "$1" in
    -q|--queues)    QUEUES="$2"; shift 2 ;;
    -a|--append)    APPEND="$APPEND $2"; shift 2 ;;
    -t|--timeout)   TIMEOUT="$2"; shift 2 ;;
    -l|--log)       LOG="$2"; shift 2 ;;
    --quiet)        QUIET=1; shift ;;
    -r|--reconnect) RECONNECT=1; shift ;;
    -g|--guest)     GUEST="$2"; shift 2 ;;
    -i|--initrd)    INITRD="$2"; shift 2 ;;
    -m|--mem)       MEM="$2"; shift 2 ;;
    --smp)          SMP="$2"; shift 2 ;;
    --qemu-arg)     EXTRA+=("$2"); shift 2 ;;
    --no-check)     CHECK=0; shift ;;
    -h|--help)      usage 0 ;;
    -*)             echo "run-guest: unknown option $1" >&2; usage ;;
    *)              [ -z "$SOCKET" ] || usage; SOCKET="$1"; shift ;;
  esac
done
[ -n "$SOCKET" ] || usage
# With --reconnect QEMU keeps retrying, so the backend may come up later.
if [ "$RECONNECT" = 0 ] && [ ! -S "$SOCKET" ]; then
  die "$SOCKET is not a unix socket (is the backend running?)"
fi
INITRD="${INITRD:-$GUEST/initrd-fio.gz}"
for f in "$GUEST/vmlinuz" "$INITRD"; do
  [ -f "$f" ] || die "$f missing: run tests/guest/build-guest.sh $GUEST"
done
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found"

# The console always goes to a log file so it can be checked afterwards.
TMPLOG=""
if [ -z "$LOG" ]; then
  TMPLOG="$(mktemp /tmp/quern-guest.XXXXXX.log)"
  LOG="$TMPLOG"
fi
cleanup() { [ -z "$TMPLOG" ] || rm -f "$TMPLOG"; }
trap cleanup EXIT

CHARDEV="socket,id=vub0,path=$SOCKET"
[ "$RECONNECT" = 1 ] && CHARDEV="$CHARDEV,reconnect=1"

# No KVM here (nested KVM hangs): software emulation, multi-threaded.
# vhost-user needs the guest RAM in shared memory the backend can map: memfd.
# -nodefaults: no VGA, NIC or option ROMs; the only serial port is the console.
# panic=-1 + -no-reboot: a guest panic (e.g. /init dying) ends QEMU at once.
# shellcheck disable=SC2054  # the commas are QEMU option syntax
QEMU=(
  qemu-system-x86_64
  -accel tcg,thread=multi -cpu max
  -m "$MEM" -smp "$SMP"
  -nodefaults -no-user-config -display none -no-reboot
  -serial stdio -monitor none
  -kernel "$GUEST/vmlinuz" -initrd "$INITRD"
  -append "console=ttyS0 quiet panic=-1$APPEND"
  -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on"
  -numa node,memdev=mem
  -chardev "$CHARDEV"
  -device "vhost-user-blk-pci,chardev=vub0,num-queues=$QUEUES"
  "${EXTRA[@]}"
)

echo "run-guest: ${QEMU[*]}" >&2
start=$(date +%s.%N)
set +e
if [ "$QUIET" = 1 ]; then
  timeout --kill-after=10 "$TIMEOUT" "${QEMU[@]}" </dev/null >"$LOG" 2>&1
  rc=$?
else
  timeout --kill-after=10 "$TIMEOUT" "${QEMU[@]}" </dev/null 2>&1 | tee "$LOG"
  rc=${PIPESTATUS[0]}
fi
set -e
secs=$(echo "$start $(date +%s.%N)" | awk '{printf "%.1f", $2 - $1}')

# The serial console ends lines with \r\n.
marker() { tr -d '\r' <"$LOG" | sed -n "s/^$1//p" | tail -n1; }
fio_rc="$(marker 'QUERN-FIO-RC=')"
mq="$(marker 'QUERN-MQ=')"
echo "run-guest: qemu rc=$rc after ${secs}s; guest queues=${mq:-?} fio rc=${fio_rc:-?}" >&2

if [ "$CHECK" = 0 ]; then
  exit "$rc"
fi
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "run-guest: timed out after ${TIMEOUT}s" >&2
  exit 124
fi
if ! tr -d '\r' <"$LOG" | grep -qx 'QUERN-GUEST-END'; then
  echo "run-guest: guest did not finish (no QUERN-GUEST-END)" >&2
  [ "$rc" = 0 ] && exit 2
  exit "$rc"
fi
if [ "$fio_rc" != 0 ]; then
  echo "run-guest: fio failed in the guest" >&2
  exit 1
fi
# virtio_blk uses at most one queue per guest CPU.
want_mq=$(( QUEUES < SMP ? QUEUES : SMP ))
if [ "$mq" != "$want_mq" ]; then
  echo "run-guest: guest sees $mq queues, expected $want_mq" >&2
  exit 1
fi
exit 0
