#!/bin/busybox sh
# /init of Quern's fio test initramfs (copied in by build-guest.sh).
#
# Runs inside the guest as PID 1 (busybox sh: POSIX sh, no bash-isms). It
# loads the virtio/ext4 modules, waits for /dev/vda (the vhost-user-blk disk),
# runs the fio job(s) named on the kernel command line, prints markers on the
# console and powers the guest off.
#
# Kernel command line parameters (read from /proc/cmdline):
#   quern.fio=JOB[,JOB...]  jobs to run, in order (default: verify). JOB is one
#                           of the files baked into /jobs (verify, randread,
#                           trim),
#                           or verify-loop.
#   quern.secs=N            verify-loop: keep doing write+verify passes until
#                           N seconds have gone by (default 30; at least 1 pass)
#   quern.size=MIB          region per fio job in MiB (default 32); capped at
#                           disk size / numjobs so jobs never overlap
#   quern.numjobs=N         parallel fio jobs for verify jobs (default 2; each
#                           is pinned to its own CPU so each uses its own queue)
#   quern.ioengine=ENGINE   io_uring (default) or libaio
#   quern.wait=SECS         how long to wait for /dev/vda (default 30)
#   quern.fio=readcheck     not fio: for quern.secs seconds, again and again:
#                           write quern.size MiB of new random data at the
#                           start of vda (O_DIRECT), drop the page cache, read
#                           it back buffered (so only the device writes those
#                           page-cache pages), wait a second, and checksum it
#                           from the page cache against what was written
#                           (QUERN-READCHECK-SUM= after the first pass,
#                           QUERN-READCHECK-BAD=... on a mismatch,
#                           QUERN-READCHECK-PASSES=n at the end): a device
#                           that writes guest memory all the time, which no
#                           guest CPU touches afterwards, for live migration
#                           tests (a page the device wrote and the dirty log
#                           missed stays stale on the destination)
#   quern.mode=disks        disks mode instead of fio: print QUERN-DISKS-READY,
#                           then answer commands read from the console: `list`
#                           prints `QUERN-DISK <name> <serial>` for every
#                           /sys/block/vd* and QUERN-LIST-END; `poweroff`.
#                           For the VM layer's tests (disks inserted and
#                           removed while the guest runs)
#   quern.root=DEV          root mode instead of fio: mount DEV (ext4, read-
#                           write) and switch_root to its /sbin/init (a disk
#                           made by build-rootfs.sh). `root=DEV` selects the
#                           same mode. Markers: QUERN-GUEST-START, QUERN-MQ,
#                           QUERN-SERIAL, then the root's own; on failure
#                           QUERN-ERROR=... and QUERN-FIO-RC=2.
#
# Console markers, one per line (host side greps for them):
#   QUERN-GUEST-START
#   QUERN-MQ=<n>                 number of blk-mq hardware queues of vda
#   QUERN-SERIAL=<s>             the serial vda reports (GET_ID)
#   QUERN-DISCARD-MAX=<bytes>    vda's discard limit (0: no DISCARD feature)
#   QUERN-WRITE-ZEROES-MAX=<b>   vda's write-zeroes limit (0: no feature)
#   QUERN-JOB-BEGIN=<job>        ... fio output ...
#   QUERN-PASS=<n> RC=<rc>       (verify-loop only, once per pass)
#   QUERN-JOB-END=<job> RC=<rc>
#   QUERN-FIO-RC=<rc>            0 if every job passed, else the first failure
#   QUERN-GUEST-END
#   QUERN-ERROR=<text>           setup problems (then QUERN-FIO-RC is non-zero)

/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /dev/shm
mount -t tmpfs tmp /tmp
mount -t tmpfs shm /dev/shm

# Everything we print goes to the console (ttyS0 when console=ttyS0).
exec </dev/console >/dev/console 2>&1

# Keep kernel messages from interleaving with fio's output.
echo 1 > /proc/sys/kernel/printk

# Power the guest off; never returns.
power_off() {
	sync
	echo o > /proc/sysrq-trigger
	sleep 5
	poweroff -f
}

# Print the closing markers and power off.
finish() {
	echo "QUERN-FIO-RC=$1"
	echo "QUERN-GUEST-END"
	power_off
}

# param NAME DEFAULT: value of quern.NAME=... on the kernel command line.
param() {
	v=
	for w in $(cat /proc/cmdline); do
		case "$w" in
		"quern.$1="*) v="${w#"quern.$1="}" ;;
		esac
	done
	echo "${v:-$2}"
}

echo "QUERN-GUEST-START"

# Modules, in dependency order (the initramfs has no modules.dep). The ext4
# ones are for tests that put a filesystem on the disk.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev \
	virtio_pci virtio_blk crc16 crc32c_generic mbcache jbd2 ext4; do
	insmod "/lib/modules/$m.ko" || echo "QUERN-ERROR=insmod $m failed"
done

# Disks mode: tell the host what disks the guest has, when asked.
if [ "$(param mode fio)" = disks ]; then
	stty -echo 2>/dev/null
	echo "QUERN-DISKS-READY"
	while read -r cmd; do
		case "$cmd" in
		list)
			for d in /sys/block/vd*; do
				[ -e "$d" ] || continue
				echo "QUERN-DISK $(basename "$d") $(cat "$d/serial" 2>/dev/null)"
			done
			echo "QUERN-LIST-END"
			;;
		poweroff) power_off ;;
		esac
	done
	power_off
fi

# Wait for the vhost-user-blk disk.
wait_secs=$(param wait 30)
i=0
while [ ! -b /dev/vda ]; do
	i=$((i + 1))
	if [ "$i" -gt $((wait_secs * 10)) ]; then
		echo "QUERN-ERROR=no /dev/vda after ${wait_secs}s"
		finish 2
	fi
	usleep 100000
done

mq=$(ls /sys/block/vda/mq | wc -l)
echo "QUERN-MQ=$mq"
echo "QUERN-SERIAL=$(cat /sys/block/vda/serial 2>/dev/null)"
echo "QUERN-DISCARD-MAX=$(cat /sys/block/vda/queue/discard_max_bytes 2>/dev/null)"
echo "QUERN-WRITE-ZEROES-MAX=$(cat /sys/block/vda/queue/write_zeroes_max_bytes 2>/dev/null)"

# Root mode: boot the disk's own userland.
rootdev=$(param root "")
if [ -z "$rootdev" ]; then
	for w in $(cat /proc/cmdline); do
		case "$w" in
		root=*) rootdev="${w#root=}" ;;
		esac
	done
fi
if [ -n "$rootdev" ]; then
	mkdir -p /newroot
	if ! mount -t ext4 -o rw "$rootdev" /newroot; then
		echo "QUERN-ERROR=cannot mount $rootdev"
		finish 2
	fi
	if [ ! -x /newroot/sbin/init ]; then
		echo "QUERN-ERROR=$rootdev has no /sbin/init"
		umount /newroot
		finish 2
	fi
	umount /tmp /dev/shm
	mkdir -p /newroot/dev /newroot/proc /newroot/sys
	mount --move /dev /newroot/dev
	umount /proc /sys
	exec switch_root /newroot /sbin/init
fi

# Parameters shared by the job files (fio expands ${VAR} from the environment).
ncpu=$(grep -c ^processor /proc/cpuinfo)
numjobs=$(param numjobs 2)
disk_mib=$(($(cat /sys/block/vda/size) / 2048))
size_mib=$(param size 32)
if [ $((size_mib * numjobs)) -gt "$disk_mib" ]; then
	size_mib=$((disk_mib / numjobs))
fi
if [ "$size_mib" -lt 1 ]; then
	echo "QUERN-ERROR=disk too small (${disk_mib} MiB) for $numjobs jobs"
	finish 2
fi
ioengine=$(param ioengine io_uring)
export QUERN_DEV=/dev/vda
export QUERN_IOENGINE="$ioengine"
export QUERN_NUMJOBS="$numjobs"
export QUERN_SIZE="${size_mib}M"
export QUERN_DISK_SIZE="${disk_mib}M"
export QUERN_CPUS="0-$((ncpu - 1))"
export QUERN_SEED=1
echo "QUERN-INFO=disk ${disk_mib}MiB cpus $ncpu numjobs $numjobs size/job ${size_mib}MiB engine $QUERN_IOENGINE"

# run_fio JOB: run fio on the baked-in /jobs/JOB.fio, with the extra command
# line options in /jobs/JOB.args if there is one; return fio's exit code.
run_fio() {
	args=
	[ -f "/jobs/$1.args" ] && args=$(cat "/jobs/$1.args")
	# shellcheck disable=SC2086  # $args is a list of options: split it
	fio $args "/jobs/$1.fio"
}

# verify_loop SECS: write+verify passes until SECS have elapsed. Each pass
# uses a different random seed, so stale data from an earlier pass (e.g. a
# write lost across a backend restart) fails the header check.
verify_loop() {
	start=$(date +%s)
	pass=0
	while :; do
		pass=$((pass + 1))
		export QUERN_SEED=$pass
		run_fio verify
		rc=$?
		echo "QUERN-PASS=$pass RC=$rc"
		[ "$rc" -ne 0 ] && return "$rc"
		[ $(($(date +%s) - start)) -ge "$1" ] && return 0
	done
}

# read_check MIB SECS: see quern.fio=readcheck above.
read_check() {
	start=$(date +%s)
	pass=0
	while [ $(($(date +%s) - start)) -lt "$2" ]; do
		pass=$((pass + 1))
		# new data each pass, so a page left over from an earlier pass
		# (or sent before the device filled it) cannot pass for this one
		dd if=/dev/urandom of=/tmp/readcheck bs=1M count="$1" 2>/dev/null
		want=$(md5sum /tmp/readcheck | cut -d' ' -f1)
		dd if=/tmp/readcheck of=/dev/vda bs=1M oflag=direct 2>/dev/null
		[ "$pass" = 1 ] && echo "QUERN-READCHECK-SUM=$want"
		echo 1 > /proc/sys/vm/drop_caches
		# buffered: the device writes the page-cache pages, the guest's
		# CPU never does; the second read is served from those pages
		dd if=/dev/vda of=/dev/null bs=1M count="$1" 2>/dev/null
		sleep 1
		got=$(dd if=/dev/vda bs=1M count="$1" 2>/dev/null | md5sum | cut -d' ' -f1)
		if [ "$got" != "$want" ]; then
			echo "QUERN-READCHECK-BAD=pass $pass got $got want $want"
			rm -f /tmp/readcheck
			return 1
		fi
	done
	rm -f /tmp/readcheck
	echo "QUERN-READCHECK-PASSES=$pass"
	return 0
}

overall=0
for job in $(param fio verify | tr , ' '); do
	echo "QUERN-JOB-BEGIN=$job"
	case "$job" in
	verify-loop)
		verify_loop "$(param secs 30)"
		rc=$?
		;;
	readcheck)
		read_check "$(param size 16)" "$(param secs 30)"
		rc=$?
		;;
	*)
		if [ -f "/jobs/$job.fio" ]; then
			run_fio "$job"
			rc=$?
		else
			echo "QUERN-ERROR=unknown job $job"
			rc=2
		fi
		;;
	esac
	echo "QUERN-JOB-END=$job RC=$rc"
	[ "$overall" -eq 0 ] && overall=$rc
done

finish "$overall"
