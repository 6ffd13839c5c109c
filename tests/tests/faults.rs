//! Storage that fails under Quern: a full filesystem under a uring bdev,
//! and under a qcow2 overlay.
//! The affected requests complete with VIRTIO_BLK_S_IOERR (libblkio reports
//! -EIO), nothing panics, the disk keeps serving what it can, and another
//! device on the same reactors is untouched.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use quern_tests::client::Client;

const CONFIG: &str = r#"
state_dir = "@DIR@"
[reactor]
cores = [0, 1]
[[bdev]]
name = "full"
driver = "uring"
path = "@DIR@/small-fs/disk.img"
size = "16M"
[[bdev]]
name = "ram"
driver = "malloc"
size = "16M"
[[vhost_blk]]
name = "full"
bdev = "full"
socket = "full.sock"
[[vhost_blk]]
name = "ram"
bdev = "ram"
socket = "ram.sock"
"#;

const QCOW2_CONFIG: &str = r#"
state_dir = "@DIR@"
[reactor]
cores = [0, 1]
[[bdev]]
name = "base"
driver = "malloc"
size = "16M"
[[bdev]]
name = "ov"
driver = "qcow2"
path = "@DIR@/small-fs/ov.qcow2"
base = "base"
cluster_size = "64K"
[[bdev]]
name = "ram"
driver = "malloc"
size = "16M"
[[vhost_blk]]
name = "ov"
bdev = "ov"
socket = "ov.sock"
[[vhost_blk]]
name = "ram"
bdev = "ram"
socket = "ram.sock"
"#;

/// SIGKILL a process group when dropped: a test that panics must not leave
/// quern running.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

/// Quern on `config` (`@DIR@` = `d`) with `d/small-fs` a 4 MiB tmpfs in a
/// private mount namespace (as root; otherwise in a user namespace that
/// maps us to root). The shell passes SIGTERM on to quern and, once quern
/// has stopped, copies `small-fs/<keep>` out to `d/<keep>` (the tmpfs goes
/// with the namespace).
struct SmallFs {
    child: std::process::Child,
    guard: Option<KillOnDrop>,
    log: std::path::PathBuf,
}

impl SmallFs {
    fn start(d: &std::path::Path, config: &str, keep: Option<&str>) -> SmallFs {
        std::fs::create_dir(d.join("small-fs")).unwrap();
        let cfg = d.join("quern.toml");
        std::fs::write(&cfg, config.replace("@DIR@", d.to_str().unwrap())).unwrap();
        // SAFETY: geteuid has no preconditions.
        let ns = if unsafe { libc::geteuid() } == 0 {
            "-m"
        } else {
            "-rm"
        };
        let fs = d.join("small-fs");
        let copy = keep.map_or(String::new(), |k| {
            format!("cp {}/{k} {}/{k} || exit 1\n", fs.display(), d.display())
        });
        let script = format!(
            "mount -t tmpfs -o size=4m quern-small {fs} || exit 1\n\
             {bin} --config {cfg} & pid=$!\n\
             trap 'kill -TERM $pid' TERM\n\
             wait $pid; wait $pid; rc=$?\n\
             {copy}exit $rc",
            fs = fs.display(),
            bin = quern_tests::quern_bin().display(),
            cfg = cfg.display(),
        );
        let log = d.join("quern.log");
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new("unshare")
            .args([ns, "--propagation", "private", "sh", "-c", &script])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("unshare (util-linux) runs");
        let guard = Some(KillOnDrop(child.id() as i32));
        SmallFs { child, guard, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; quern must stop cleanly, without a panic.
    fn stop(mut self) {
        // SAFETY: signalling our own child (the shell, which passes it on).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        std::mem::forget(self.guard.take());
        let text = self.log();
        assert!(st.success(), "quern did not stop cleanly:\n{text}");
        assert!(!text.contains("panicked"), "{text}");
    }
}

/// Write 1 MiB at a time over the 16 MiB `disk` until the filesystem under
/// it runs out, with a 4 KiB write to `ram` in between each; returns the
/// MiBs whose writes failed (each with EIO).
fn fill(disk: &mut Client, ram: &mut Client) -> Vec<u64> {
    let mut failed = Vec::new();
    for mib in 0..16u64 {
        disk.buf(0, 1 << 20).fill(mib as u8 + 1);
        disk.write(0, mib << 20, 0, 1 << 20, mib as usize);
        let (_, r) = disk.wait(0, 1)[0];
        if r != 0 {
            assert_eq!(r, -libc::EIO, "a failed write reports EIO");
            failed.push(mib);
        }
        // the other device carries on in between
        ram.buf(2 << 20, 4096).fill(mib as u8);
        ram.write(0, mib * 4096, 2 << 20, 4096, 100);
        assert_eq!(ram.wait(0, 1), vec![(100, 0)]);
    }
    assert!(!failed.is_empty(), "the 4 MiB filesystem never filled up");
    assert!(failed.len() < 16, "no write succeeded at all");
    failed
}

/// After `fill`: what was written before the first failure reads back,
/// space already allocated still takes a write (and a flush), and `ram`
/// holds all it was given.
fn check_after_fill(disk: &mut Client, ram: &mut Client, first_failed: u64, log: &str) {
    for mib in 0..first_failed {
        disk.read(0, mib << 20, 2 << 20, 1 << 20, 200);
        assert_eq!(disk.wait(0, 1), vec![(200, 0)]);
        assert!(
            disk.buf(2 << 20, 1 << 20)
                .iter()
                .all(|&x| x == mib as u8 + 1),
            "MiB {mib} changed"
        );
    }
    disk.buf(0, 4096).fill(0xee);
    disk.write(0, 0, 0, 4096, 300);
    disk.flush(0, 301);
    let mut r = disk.wait(0, 2);
    r.sort();
    assert_eq!(r, vec![(300, 0), (301, 0)], "{log}");
    disk.read(0, 0, 2 << 20, 4096, 302);
    assert_eq!(disk.wait(0, 1), vec![(302, 0)]);
    assert!(disk.buf(2 << 20, 4096).iter().all(|&x| x == 0xee));
    for mib in 0..16u64 {
        ram.read(0, mib * 4096, 3 << 20, 4096, 400);
        assert_eq!(ram.wait(0, 1), vec![(400, 0)]);
        assert!(ram.buf(3 << 20, 4096).iter().all(|&x| x == mib as u8));
    }
}

#[test]
fn full_filesystem_gives_ioerr_and_quern_keeps_serving() {
    let dir = quern_tests::disk_tempdir("quern-faults");
    let d = dir.path();
    let q = SmallFs::start(d, CONFIG, None);
    let mut full = Client::connect_retry(&d.join("full.sock"), 1, Duration::from_secs(20));
    let mut ram = Client::connect_retry(&d.join("ram.sock"), 1, Duration::from_secs(20));
    assert_eq!(full.capacity(), 16 << 20, "{}", q.log());
    let failed = fill(&mut full, &mut ram);
    check_after_fill(&mut full, &mut ram, failed[0], &q.log());
    drop(full);
    drop(ram);
    q.stop();
}

/// The filesystem under a qcow2 overlay fills up while a client allocates
/// cluster after cluster: the writes that cannot be placed fail with EIO,
/// what was written reads back, allocated clusters still take writes, the
/// other device is untouched, Quern stops cleanly, and `qemu-img check`
/// finds the image free of corruption (leaked clusters are allowed: a
/// cluster whose refcount was written before its data failed).
#[test]
fn full_filesystem_under_a_qcow2_overlay() {
    let dir = quern_tests::disk_tempdir("quern-faults");
    let d = dir.path();
    let q = SmallFs::start(d, QCOW2_CONFIG, Some("ov.qcow2"));
    let mut ov = Client::connect_retry(&d.join("ov.sock"), 1, Duration::from_secs(20));
    let mut ram = Client::connect_retry(&d.join("ram.sock"), 1, Duration::from_secs(20));
    let failed = fill(&mut ov, &mut ram);
    check_after_fill(&mut ov, &mut ram, failed[0], &q.log());
    drop(ov);
    drop(ram);
    q.stop();
    // exit 0: clean; 3: leaked clusters only; 2: corruption
    let ov = d.join("ov.qcow2");
    let (st, report) = quern_tests::qemu_img(&["check", "-f", "qcow2", ov.to_str().unwrap()]);
    assert!(matches!(st.code(), Some(0 | 3)), "qemu-img check: {report}");
    assert!(!report.contains("ERROR"), "{report}");
}

const TWO_REACTORS: &str = r#"
state_dir = "@DIR@"
[reactor]
cores = [0, 1]
[[bdev]]
name = "a"
driver = "malloc"
size = "16M"
[[bdev]]
name = "b"
driver = "malloc"
size = "16M"
[[vhost_blk]]
name = "on-reactor-0"
bdev = "a"
socket = "a.sock"
cores = [0]
[[vhost_blk]]
name = "on-reactor-1"
bdev = "b"
socket = "b.sock"
cores = [1]
"#;

/// A reactor that dies (here: a message that panics on it) is reported
/// once; the devices on it fail their requests with an I/O error instead of
/// hanging, a device on the other reactor keeps serving, the management
/// API names the failed reactor, and the control plane keeps working
/// (it used to panic on every later queue start or stop).
#[test]
fn a_dead_reactor_fails_its_devices_and_spares_the_others() {
    let r = quern_tests::start(TWO_REACTORS);
    let dir = r.dir.path().to_path_buf();
    let mut a = Client::connect_retry(&dir.join("a.sock"), 1, Duration::from_secs(10));
    let mut b = Client::connect_retry(&dir.join("b.sock"), 1, Duration::from_secs(10));
    for c in [&mut a, &mut b] {
        c.write(0, 0, 0, 4096, 1);
        assert_eq!(c.wait(0, 1), vec![(1, 0)]);
    }
    r.engine.reactors[1]
        .send(Box::new(|_| panic!("injected reactor failure")))
        .unwrap();
    let t = std::time::Instant::now();
    while r.engine.reactors[1].failure().is_none() {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    // requests on the failed reactor's device fail, promptly
    b.write(0, 4096, 0, 4096, 2);
    let got = b.wait(0, 1);
    assert_eq!(got[0].0, 2);
    assert_eq!(got[0].1, -libc::EIO, "a request on the dead reactor");
    // the other device is untouched
    for i in 0..100 {
        a.write(0, i * 4096, 0, 4096, i as usize);
        assert_eq!(a.wait(0, 1)[0].1, 0);
    }
    // the API names the failed reactor
    let list = r.engine.reactor_list();
    assert_eq!(list[1]["failed"], "injected reactor failure", "{list}");
    assert!(list[0]["failed"].is_null(), "{list}");
    // a new connection to the failed reactor's device: its queue starts
    // (no panic in the control plane) and fails its requests
    drop(b);
    let mut b2 = Client::connect_retry(&dir.join("b.sock"), 1, Duration::from_secs(10));
    b2.read(0, 0, 0, 4096, 3);
    assert_eq!(b2.wait(0, 1)[0].1, -libc::EIO);
    drop(b2);
    // and the device can be deleted
    r.engine.vhost_blk_delete("on-reactor-1", true).unwrap();
    drop(a);
}
