//! A real QEMU guest (Debian kernel, TCG) on a Quern vhost-user-blk disk.

use std::sync::atomic::Ordering;

const CONFIG: &str = r#"
state_dir = "@DIR@"
[reactor]
cores = [0, 1]
poll_mode = "adaptive"
[[bdev]]
name = "disk0"
driver = "uring"
path = "disk0.img"
size = "128M"
[[vhost_blk]]
name = "vm0-disk0"
bdev = "disk0"
socket = "vm0.sock"
num_queues = 2
cores = [0, 1]
serial = "quern-e2e-0001"
"#;

#[test]
fn guest_fio_verify_over_two_queues() {
    let r = quern_tests::start(CONFIG);
    let sock = r.dir.path().join("vm0.sock");
    let log = r.dir.path().join("console.log");
    let (ok, console) = quern_tests::run_guest(
        &sock,
        &["-q", "2", "-a", "quern.fio=verify", "-t", "400"],
        &log,
    );
    assert!(ok, "guest run failed:\n{console}");
    assert!(console.contains("QUERN-FIO-RC=0"), "{console}");
    assert!(console.contains("QUERN-MQ=2"), "{console}");
    assert!(
        console.contains("QUERN-SERIAL=quern-e2e-0001"),
        "the guest reads the configured serial:\n{console}"
    );
    assert!(!console.contains("verify: bad"), "{console}");
    // both queues carried I/O, on two different reactors
    let dev = &r.engine.devices()[0].1;
    let (q0, q1) = (&dev.queues[0], &dev.queues[1]);
    assert!(q0.completed.load(Ordering::Relaxed) > 0, "queue 0 idle");
    assert!(q1.completed.load(Ordering::Relaxed) > 0, "queue 1 idle");
    assert_eq!(
        dev.queues
            .iter()
            .map(|q| q.malformed.load(Ordering::Relaxed))
            .sum::<u64>(),
        0
    );
}

/// A guest on a qcow2 overlay (over a uring base) sees DISCARD and
/// WRITE_ZEROES, and fio writes, discards 30% of what it wrote, and checks
/// that the discarded blocks read back as zeroes and the rest as written.
/// The overlay is then clean for `qemu-img check`.
#[test]
fn guest_discards_on_a_qcow2_overlay() {
    let r = quern_tests::start(
        r#"
state_dir = "@DIR@"
[reactor]
cores = [0, 1]
poll_mode = "adaptive"
[[bdev]]
name = "base"
driver = "uring"
path = "base.img"
size = "64M"
[[bdev]]
name = "ov"
driver = "qcow2"
path = "ov.qcow2"
base = "base"
cluster_size = "64K"
[[vhost_blk]]
name = "vm0-ov"
bdev = "ov"
socket = "vm0.sock"
num_queues = 2
cores = [0, 1]
"#,
    );
    let sock = r.dir.path().join("vm0.sock");
    let log = r.dir.path().join("console.log");
    let (ok, console) = quern_tests::run_guest(
        &sock,
        &["-q", "2", "-a", "quern.fio=trim", "-t", "400"],
        &log,
    );
    assert!(ok, "guest run failed:\n{console}");
    assert!(console.contains("QUERN-FIO-RC=0"), "{console}");
    for marker in ["QUERN-DISCARD-MAX=", "QUERN-WRITE-ZEROES-MAX="] {
        let v: u64 = console
            .lines()
            .find_map(|l| l.trim().strip_prefix(marker))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {marker} in:\n{console}"));
        assert!(v > 0, "{marker}{v}: the guest sees no such feature");
    }
    assert!(
        console.contains("trim: IOPS="),
        "fio trimmed nothing:\n{console}"
    );
    assert!(!console.contains("verify: bad"), "{console}");
    // every request has completed (the guest powered off); the image on
    // disk is what a restart would open
    let ov = r.dir.path().join("ov.qcow2");
    let (st, report) = quern_tests::qemu_img(&["check", ov.to_str().unwrap()]);
    assert!(st.success(), "qemu-img check: {report}");
}

/// A guest's fio against a disk limited to 400 read IOPS and 4 MiB/s of
/// writes reports those limits (QoS in the backend, as cloud-hypervisor
/// asks of vhost-user disks).
#[test]
fn guest_fio_sees_the_disks_qos_limits() {
    let r = quern_tests::start(
        r#"
state_dir = "@DIR@"
[reactor]
cores = [0, 1]
poll_mode = "adaptive"
[[bdev]]
name = "disk0"
driver = "malloc"
size = "64M"
[[vhost_blk]]
name = "vm0-disk0"
bdev = "disk0"
socket = "vm0.sock"
num_queues = 2
cores = [0, 1]
qos = { read_iops = 400, write_bps = 4194304 }
"#,
    );
    let sock = r.dir.path().join("vm0.sock");
    let log = r.dir.path().join("console.log");
    let (ok, console) = quern_tests::run_guest(
        &sock,
        &["-q", "2", "-a", "quern.fio=qos", "-t", "400"],
        &log,
    );
    assert!(ok, "guest run failed:\n{console}");
    let text = console.replace('\r', "");
    let json = text
        .split("QUERN-JOB-BEGIN=qos")
        .nth(1)
        .and_then(|t| t.split("QUERN-JOB-END=qos").next())
        .and_then(|t| Some(&t[t.find('{')?..=t.rfind('}')?]))
        .unwrap_or_else(|| panic!("no fio JSON in:\n{console}"));
    let v: serde_json::Value = serde_json::from_str(json).expect("fio JSON");
    let job = |name: &str| {
        v["jobs"]
            .as_array()
            .and_then(|j| j.iter().find(|x| x["jobname"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no job {name} in {v}"))
    };
    let iops = job("read-iops")["read"]["iops"].as_f64().unwrap();
    // fio's bw is in KiB/s
    let bw = job("write-bw")["write"]["bw"].as_f64().unwrap() * 1024.0;
    eprintln!(
        "guest fio: {iops:.0} read IOPS, {:.2} MiB/s written",
        bw / 1048576.0
    );
    assert!(
        (iops / 400.0 - 1.0).abs() < 0.1,
        "read IOPS {iops}, limit 400"
    );
    assert!(
        (bw / 4194304.0 - 1.0).abs() < 0.1,
        "write bandwidth {bw} B/s, limit 4 MiB/s"
    );
    // the waits are Quern's, and counted
    let dev = &r.engine.devices()[0].1;
    assert!(dev.qos.own().throttled.load(Ordering::Relaxed) > 0);
}
