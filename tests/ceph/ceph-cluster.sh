#!/usr/bin/env bash
# A throw-away single-node Ceph cluster on loopback, for tests.
#
#   ceph-cluster.sh start DIR [MON_PORT]   create and start; prints DIR/ceph.conf
#   ceph-cluster.sh stop DIR               stop (idempotent; OSD first, then mon)
#
# One monitor (msgr v2 on MON_PORT, v1 on MON_PORT+1; default 3300), one
# memstore OSD (2 GiB of RAM at most, nothing on disk but small metadata),
# cephx on, every socket on 127.0.0.1, and a pool `rbd` (size 1, 8 PGs)
# initialised for RBD. No manager (RBD I/O does not need one). The client
# keyring (client.admin) is DIR/keyring, which ceph.conf names, so
# `rbd -c DIR/ceph.conf ...` and librbd with conf=DIR/ceph.conf just work.
# Start takes about 2 s. DIR must not hold a running cluster; several
# clusters may run at once with different DIRs and ports.
set -euo pipefail

usage() { echo "usage: $0 start DIR [MON_PORT] | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
D=$(realpath -m "$2")
C=$D/ceph.conf

stop_pidfile() { # NAME: kill the daemon whose pid file is run/NAME.pid, wait for it
  local f=$D/run/$1.pid pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      # a zombie still answers kill -0; it is gone for our purposes
      [ "$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1)" = Z ] && break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

case $cmd in
stop)
  [ -d "$D/run" ] || exit 0
  for f in "$D"/run/osd.*.pid; do
    [ -e "$f" ] && stop_pidfile "$(basename "$f" .pid)"
  done
  stop_pidfile mon.a
  exit 0
  ;;
start) ;;
*) usage ;;
esac

PORT=${3:-3300}
PORT1=$((PORT + 1))
for b in ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd uuidgen; do
  command -v "$b" >/dev/null || { echo "ceph-cluster.sh: $b not found (run scripts/install-test-deps.sh)" >&2; exit 1; }
done
if [ -e "$D/run/mon.a.pid" ] && kill -0 "$(cat "$D/run/mon.a.pid")" 2>/dev/null; then
  echo "ceph-cluster.sh: a cluster is already running in $D" >&2
  exit 1
fi
# DIR is ours to wipe only if it is empty or holds an earlier cluster
if [ -d "$D" ] && [ -n "$(ls -A "$D")" ] && [ ! -f "$C" ]; then
  echo "ceph-cluster.sh: $D is not empty and holds no ceph.conf; refusing to wipe it" >&2
  exit 1
fi
"$0" stop "$D"
rm -rf "$D"
mkdir -p "$D"/{run,log,mon.a,osd.0}
FSID=$(uuidgen)
ADDR="[v2:127.0.0.1:$PORT,v1:127.0.0.1:$PORT1]"
cat >"$C" <<CONF
[global]
fsid = $FSID
mon host = $ADDR
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $D/run
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
log file = $D/log/\$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
[mon]
mon data = $D/mon.\$id
paxos propose interval = 0.1
[osd]
osd data = $D/osd.\$id
osd objectstore = memstore
memstore device bytes = 2147483648
[client]
keyring = $D/keyring
CONF

fail() {
  echo "ceph-cluster.sh: $* (logs in $D/log)" >&2
  tail -n 20 "$D"/log/*.log >&2 2>/dev/null || true
  "$0" stop "$D" || true
  exit 1
}
q() { "$@" >>"$D/log/setup.log" 2>&1; }
# every CLI call gets a timeout so a broken cluster fails instead of hanging
CEPH="timeout 60 ceph -c $C --connect-timeout 30"

q ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *' || fail "keyring"
q ceph-authtool "$D/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' || fail "keyring"
q monmaptool --create --fsid "$FSID" --addv a "$ADDR" "$D/monmap" || fail "monmaptool"
q ceph-mon -c "$C" -i a --mkfs --monmap "$D/monmap" --keyring "$D/keyring" || fail "ceph-mon --mkfs"
q ceph-mon -c "$C" -i a || fail "ceph-mon did not start (port $PORT/$PORT1 in use?)"
OSD_UUID=$(uuidgen)
ID=$(cd "$D" && $CEPH osd create "$OSD_UUID" 2>>"$D/log/setup.log") || fail "ceph osd create"
[ "$ID" = 0 ] || fail "unexpected OSD id $ID"
q ceph-osd -c "$C" -i 0 --mkfs --mkkey --no-mon-config --osd-uuid "$OSD_UUID" || fail "ceph-osd --mkfs"
q $CEPH auth add osd.0 osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' -i "$D/osd.0/keyring" || fail "auth add osd.0"
q ceph-osd -c "$C" -i 0 || fail "ceph-osd did not start"
q $CEPH osd pool create rbd 8 8 || fail "pool create"
q timeout 60 rbd -c "$C" pool init rbd || fail "rbd pool init"
echo "$C"
