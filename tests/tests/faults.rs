//! Storage that fails under Quern: a full filesystem under a uring bdev.
//! The affected requests complete with VIRTIO_BLK_S_IOERR (libblkio reports
//! -EIO), nothing panics, the disk keeps serving what it can, and another
//! device on the same reactors is untouched.

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

/// SIGKILL a child (sh exec'd into quern) when dropped: a test that panics.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

#[test]
fn full_filesystem_gives_ioerr_and_quern_keeps_serving() {
    let dir = quern_tests::disk_tempdir("quern-faults");
    let d = dir.path();
    std::fs::create_dir(d.join("small-fs")).unwrap();
    let cfg = d.join("quern.toml");
    std::fs::write(&cfg, CONFIG.replace("@DIR@", d.to_str().unwrap())).unwrap();
    // a 4 MiB tmpfs in a private mount namespace holds a sparse 16 MiB disk
    // (as root; otherwise in a user namespace that maps us to root)
    // SAFETY: geteuid has no preconditions.
    let ns = if unsafe { libc::geteuid() } == 0 {
        "-m"
    } else {
        "-rm"
    };
    let script = format!(
        "mount -t tmpfs -o size=4m quern-small {fs} && exec {bin} --config {cfg}",
        fs = d.join("small-fs").display(),
        bin = quern_tests::quern_bin().display(),
        cfg = cfg.display()
    );
    let log = std::fs::File::create(d.join("quern.log")).unwrap();
    let mut child = Command::new("unshare")
        .args([ns, "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("unshare (util-linux) runs");
    let log_text = || std::fs::read_to_string(d.join("quern.log")).unwrap_or_default();
    // a failed assertion must not leave quern running
    let guard = KillOnDrop(child.id() as i32);

    let mut full = Client::connect_retry(&d.join("full.sock"), 1, Duration::from_secs(20));
    let mut ram = Client::connect_retry(&d.join("ram.sock"), 1, Duration::from_secs(20));
    assert_eq!(full.capacity(), 16 << 20, "{}", log_text());
    // fill the disk 1 MiB at a time: the filesystem runs out part way
    let mut failed = Vec::new();
    for mib in 0..16u64 {
        full.buf(0, 1 << 20).fill(mib as u8 + 1);
        full.write(0, mib << 20, 0, 1 << 20, mib as usize);
        let (_, r) = full.wait(0, 1)[0];
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
    // what was written before the filesystem filled reads back intact
    for mib in 0..failed[0] {
        full.read(0, mib << 20, 2 << 20, 1 << 20, 200);
        assert_eq!(full.wait(0, 1), vec![(200, 0)]);
        assert!(full
            .buf(2 << 20, 1 << 20)
            .iter()
            .all(|&x| x == mib as u8 + 1));
    }
    // overwriting space already allocated still works, flush too
    full.buf(0, 4096).fill(0xee);
    full.write(0, 0, 0, 4096, 300);
    full.flush(0, 301);
    let mut r = full.wait(0, 2);
    r.sort();
    assert_eq!(r, vec![(300, 0), (301, 0)]);
    for mib in 0..16u64 {
        ram.read(0, mib * 4096, 3 << 20, 4096, 400);
        assert_eq!(ram.wait(0, 1), vec![(400, 0)]);
        assert!(ram.buf(3 << 20, 4096).iter().all(|&x| x == mib as u8));
    }
    drop(full);
    drop(ram);
    // SAFETY: signalling our own child (sh exec'd into quern).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    std::mem::forget(guard);
    let text = log_text();
    assert!(st.success(), "quern did not stop cleanly:\n{text}");
    assert!(!text.contains("panicked"), "{text}");
}
