#!/usr/bin/env bash
# RBD through Quern next to `rbd bench`, in one run, on one single-node Ceph
# (1 mon + 1 memstore OSD on loopback, started here by
# tests/ceph/ceph-cluster.sh and stopped at the end).
#
# Usage: bench/rbd-bench.sh [--out DIR] [--size MIB] [--poll MODE] [--client wait|spin] [--smoke] [--port MON_PORT]
#
# 1. creates a SIZE MiB image (default 256) and fills it with `rbd bench
#    --io-type write` (sequential, 4 MiB);
# 2. `rbd bench --io-type read` (rbd cache off): 4k random QD32 and 64k
#    sequential QD32, the store's own figure;
# 3. Quern (`quern`, reactor on core 1, `--poll` mode, default interrupt)
#    serves the image as a vhost-user-blk disk, merging on, then off;
#    `vhost-bench run` (libblkio, core 0) drives
#    bench/jobs/rbd-randread-4k-qd32.fio and bench/jobs/rbd-seqread-64k-qd32.fio
#    against it, blocking for completions (`--client wait`, the default) or
#    spinning (`--client spin`). The Ceph daemons share the same two cores,
#    so every spinning thread takes CPU from the store;
# 4. prints IOPS and MiB/s per case and the Quern/rbd-bench ratios. JSON and
#    logs stay in DIR (default /var/tmp/quern-bench/rbd).
# --smoke: a check that the benchmark runs (the test suite does this), not a
#    measurement: a 16 MiB image, 1 s client runs, small rbd bench totals.
#
# Needs the release binaries: cargo build --release -p quern -p quern-bench
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT=/var/tmp/quern-bench/rbd
SIZE=256
POLL=interrupt
CLIENT=wait
SMOKE=0
PORT=3390
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --size) SIZE="$2"; shift 2 ;;
    --poll) POLL="$2"; shift 2 ;;
    --client) CLIENT="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --port) PORT="$2"; shift 2 ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done
QUERN="${QUERN:-$REPO/target/release/quern}"
VB="${VHOST_BENCH:-$REPO/target/release/vhost-bench}"
RUNTIME=()
RAND_TOTAL=400M
SEQ_TOTAL="$((SIZE * 4))M"
if [ "$SMOKE" = 1 ]; then
  SIZE=16
  RUNTIME=(--runtime 1)
  RAND_TOTAL=4M
  SEQ_TOTAL=16M
fi
WAIT=""
[ "$CLIENT" = wait ] && WAIT=--wait
for b in "$QUERN" "$VB"; do
  [ -x "$b" ] || { echo "rbd-bench: $b missing: cargo build --release -p quern -p quern-bench" >&2; exit 2; }
done

rm -rf "$OUT"; mkdir -p "$OUT"
CL="$OUT/ceph"
"$REPO/tests/ceph/ceph-cluster.sh" start "$CL" "$PORT" >/dev/null
QPID=""
cleanup() {
  [ -n "$QPID" ] && kill "$QPID" 2>/dev/null && wait "$QPID" 2>/dev/null
  "$REPO/tests/ceph/ceph-cluster.sh" stop "$CL" >/dev/null 2>&1 || true
}
trap cleanup EXIT
C="$CL/ceph.conf"
rbd -c "$C" create --size "${SIZE}M" rbd/bench
rbd -c "$C" bench --rbd-cache=false --io-type write --io-size 4M --io-threads 4 \
  --io-pattern seq --io-total "${SIZE}M" rbd/bench >/dev/null

# rbd_bench SIZE PATTERN: ops/sec of `rbd bench` reads (20 s worth at most)
rbd_bench() {
  rbd -c "$C" bench --rbd-cache=false --io-type read --io-size "$1" --io-threads 32 \
    --io-pattern "$2" --io-total "$3" rbd/bench 2>&1 | tee "$OUT/rbd-bench-$1-$2.log" |
    sed -n 's/.*ops\/sec: *\([0-9.]*\).*/\1/p' | tail -n1
}
RB_RAND=$(rbd_bench 4K rand "$RAND_TOTAL")
RB_SEQ=$(rbd_bench 64K seq "$SEQ_TOTAL")

# iops FILE: jobs[0].read.iops of a fio-style JSON
iops() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"])' "$1"; }

# quern_run MERGE: serve the image, run both jobs, print "rand_iops seq_iops"
quern_run() {
  cat >"$OUT/quern-$1.toml" <<TOML
state_dir = "$OUT/state-$1"
[reactor]
cores = [1]
poll_mode = "$POLL"
[merge]
enabled = $1
[[bdev]]
name = "bench"
driver = "rbd"
pool = "rbd"
image = "bench"
ceph_conf = "$C"
read_only = true
[[vhost_blk]]
name = "rbd0"
bdev = "bench"
socket = "rbd0.sock"
TOML
  "$QUERN" --config "$OUT/quern-$1.toml" >"$OUT/quern-$1.log" 2>&1 &
  QPID=$!
  for _ in $(seq 1 200); do [ -S "$OUT/state-$1/rbd0.sock" ] && break; sleep 0.05; done
  local r s
  [ -S "$OUT/state-$1/rbd0.sock" ] || { echo "rbd-bench: quern did not start (log: $OUT/quern-$1.log)" >&2; exit 1; }
  "$VB" run "$REPO/bench/jobs/rbd-randread-4k-qd32.fio" --socket "$OUT/state-$1/rbd0.sock" --cpu 0 $WAIT \
    "${RUNTIME[@]}" >"$OUT/quern-merge-$1-randread.json"
  "$VB" run "$REPO/bench/jobs/rbd-seqread-64k-qd32.fio" --socket "$OUT/state-$1/rbd0.sock" --cpu 0 $WAIT \
    "${RUNTIME[@]}" >"$OUT/quern-merge-$1-seqread.json"
  kill "$QPID"; wait "$QPID" || true; QPID=""
  r=$(iops "$OUT/quern-merge-$1-randread.json")
  s=$(iops "$OUT/quern-merge-$1-seqread.json")
  echo "$r $s"
}
read -r Q_RAND_ON Q_SEQ_ON < <(quern_run true)
read -r Q_RAND_OFF Q_SEQ_OFF < <(quern_run false)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
mib() { awk -v i="$1" -v k="$2" 'BEGIN { printf "%.0f", i * k / 1024 }'; }
echo "quern poll_mode=$POLL, client=$CLIENT"
printf '\n%-34s %10s %8s %10s\n' "RBD image ${SIZE} MiB, memstore" IOPS MiB/s "vs rbd"
printf '%-34s %10.0f %8s %10s\n' "rbd bench 4k randread QD32" "$RB_RAND" "$(mib "$RB_RAND" 4)" 1.00
printf '%-34s %10.0f %8s %10s\n' "quern 4k randread QD32 merge on" "$Q_RAND_ON" "$(mib "$Q_RAND_ON" 4)" "$(ratio "$Q_RAND_ON" "$RB_RAND")"
printf '%-34s %10.0f %8s %10s\n' "quern 4k randread QD32 merge off" "$Q_RAND_OFF" "$(mib "$Q_RAND_OFF" 4)" "$(ratio "$Q_RAND_OFF" "$RB_RAND")"
printf '%-34s %10.0f %8s %10s\n' "rbd bench 64k seqread QD32" "$RB_SEQ" "$(mib "$RB_SEQ" 64)" 1.00
printf '%-34s %10.0f %8s %10s\n' "quern 64k seqread QD32 merge on" "$Q_SEQ_ON" "$(mib "$Q_SEQ_ON" 64)" "$(ratio "$Q_SEQ_ON" "$RB_SEQ")"
printf '%-34s %10.0f %8s %10s\n' "quern 64k seqread QD32 merge off" "$Q_SEQ_OFF" "$(mib "$Q_SEQ_OFF" 64)" "$(ratio "$Q_SEQ_OFF" "$RB_SEQ")"
grep -h "merge" "$OUT"/quern-*.log | tail -n 4 || true
