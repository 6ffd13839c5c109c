//! A QEMU guest boots its root filesystem from a Ceph RBD image served by
//! Quern's rbd bdev (read-write): `tests/guest/build-rootfs.sh` makes the
//! ext4 image, `rbd import` puts it in a single-node cluster, and the test
//! initramfs switch_roots to /dev/vda (`quern.root=/dev/vda`). Two boots:
//! the second sees the file the first wrote.

use std::process::Command;

use quern_tests::ceph::Cluster;

#[test]
fn guest_boots_from_an_rbd_root_and_keeps_its_writes() {
    let c = Cluster::start();
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("root.img");
    let st = Command::new(quern_tests::root().join("tests/guest/build-rootfs.sh"))
        .arg(&img)
        .status()
        .expect("run build-rootfs.sh");
    assert!(st.success(), "build-rootfs.sh failed");
    c.import(&img, "root");

    let r = quern_tests::start(&format!(
        r#"
state_dir = "@DIR@"
[reactor]
cores = [0]
poll_mode = "adaptive"
[[bdev]]
name = "root"
driver = "rbd"
pool = "{pool}"
image = "root"
ceph_conf = "{conf}"
[[vhost_blk]]
name = "vm0-root"
bdev = "root"
socket = "vm0.sock"
num_queues = 1
"#,
        pool = c.pool,
        conf = c.conf.display()
    ));
    let sock = r.dir.path().join("vm0.sock");
    let boot = |token: &str| quern_tests::boot_root(&sock, r.dir.path(), token, 240);
    let first = boot("first");
    assert!(first.contains("QUERN-SEEN quern-boot-1 first"), "{first}");
    let second = boot("second");
    assert!(second.contains("QUERN-SEEN quern-boot-1 first"), "{second}");
    assert!(
        second.contains("QUERN-SEEN quern-boot-2 second"),
        "{second}"
    );
    drop(r);

    // the writes are in the RBD image itself
    let exported = work.path().join("export.img");
    std::fs::write(&exported, c.export("root")).unwrap();
    let out = Command::new("debugfs")
        .args(["-R", "cat /quern-boot-2"])
        .arg(&exported)
        .output()
        .expect("run debugfs");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "second");
}

/// fio --verify in a guest over two queues on two reactors, each reactor
/// with its own handle on the same RBD image.
#[test]
fn guest_fio_verify_on_rbd_over_two_queues() {
    let c = Cluster::start();
    c.rbd_ok(&["create", "--size", "128M", &c.spec("fio")]);
    let r = quern_tests::start(&format!(
        r#"
state_dir = "@DIR@"
[reactor]
cores = [0, 1]
poll_mode = "adaptive"
[[bdev]]
name = "fio"
driver = "rbd"
pool = "{pool}"
image = "fio"
ceph_conf = "{conf}"
[[vhost_blk]]
name = "vm0-fio"
bdev = "fio"
socket = "vm0.sock"
num_queues = 2
cores = [0, 1]
"#,
        pool = c.pool,
        conf = c.conf.display()
    ));
    let sock = r.dir.path().join("vm0.sock");
    let log = r.dir.path().join("console.log");
    let t = std::time::Instant::now();
    let (ok, console) = quern_tests::run_guest(
        &sock,
        &[
            "-q",
            "2",
            "-a",
            "quern.fio=verify quern.size=16",
            "-t",
            "400",
        ],
        &log,
    );
    eprintln!("fio verify on rbd: {:?}", t.elapsed());
    assert!(ok, "guest run failed:\n{console}");
    assert!(console.contains("QUERN-FIO-RC=0"), "{console}");
    assert!(!console.contains("verify: bad"), "{console}");
}
