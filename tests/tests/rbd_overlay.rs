//! VMs boot from a boot image kept in Ceph RBD, through local qcow2
//! copy-on-write overlays served by Quern: the image never changes, each
//! VM's writes land in its own overlay, and QEMU's own tools agree with
//! what Quern serves.

use std::path::{Path, PathBuf};
use std::process::Command;

use quern_tests::ceph::{sha256_bytes, Cluster};
use quern_tests::client::Client;

/// The busybox ext4 root image (built once per test).
fn rootfs(dir: &Path) -> PathBuf {
    let img = dir.join("root.img");
    let st = Command::new(quern_tests::root().join("tests/guest/build-rootfs.sh"))
        .arg(&img)
        .status()
        .expect("run build-rootfs.sh");
    assert!(st.success(), "build-rootfs.sh failed");
    img
}

/// `[[bdev]]` for a read-only RBD base plus one qcow2 overlay and one
/// vhost-user-blk device per name in `vms`.
fn config(c: &Cluster, image: &str, vms: &[&str]) -> String {
    let mut s = format!(
        r#"
state_dir = "@DIR@"
[reactor]
cores = [0, 1]
poll_mode = "adaptive"
[[bdev]]
name = "base"
driver = "rbd"
pool = "{pool}"
image = "{image}"
ceph_conf = "{conf}"
read_only = true
"#,
        pool = c.pool,
        conf = c.conf.display()
    );
    for vm in vms {
        s += &format!(
            r#"
[[bdev]]
name = "{vm}"
driver = "qcow2"
path = "{vm}.qcow2"
base = "base"
"#
        );
    }
    for vm in vms {
        s += &format!(
            r#"
[[vhost_blk]]
name = "{vm}"
bdev = "{vm}"
socket = "{vm}.sock"
"#
        );
    }
    s
}

/// Boot a guest with its root on `socket`; returns its console.
fn boot(socket: &Path, dir: &Path, token: &str) -> String {
    quern_tests::boot_root(socket, dir, token, 300)
}

/// `qemu-img` with `args`: whether it succeeded, and its output.
fn qemu_img(args: &[&str]) -> (bool, String) {
    let (st, text) = quern_tests::qemu_img(args);
    (st.success(), text)
}

/// `qemu-img check` reports a clean image (QEMU opens the RBD backing file
/// the overlay names).
fn assert_clean(overlay: &Path) {
    let (ok, text) = qemu_img(&["check", overlay.to_str().unwrap()]);
    assert!(
        ok && text.contains("No errors were found"),
        "qemu-img check {}:\n{text}",
        overlay.display()
    );
}

/// A file's content inside an ext4 image in a qcow2 overlay, read with
/// QEMU's tools (convert to raw, then debugfs).
fn file_in_overlay(overlay: &Path, name: &str) -> String {
    let raw = overlay.with_extension("raw");
    let (ok, text) = qemu_img(&[
        "convert",
        "-O",
        "raw",
        overlay.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat /{name}")])
        .arg(&raw)
        .output()
        .expect("debugfs runs (e2fsprogs)");
    let _ = std::fs::remove_file(&raw);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Boot from RBD through an overlay twice; the image is unchanged, the
/// guest's writes are in the overlay (qemu-img check clean), and the second
/// boot sees the first one's file.
#[test]
fn vm_boots_from_an_rbd_image_through_a_qcow2_overlay() {
    let c = Cluster::start();
    let work = tempfile::tempdir().unwrap();
    c.import(&rootfs(work.path()), "golden");
    let before = c.sha256("golden");

    let r = quern_tests::start(&config(&c, "golden", &["vm0"]));
    let sock = r.dir.path().join("vm0.sock");
    let first = boot(&sock, r.dir.path(), "first");
    assert!(first.contains("QUERN-SEEN quern-boot-1 first"), "{first}");
    let second = boot(&sock, r.dir.path(), "second");
    assert!(second.contains("QUERN-SEEN quern-boot-1 first"), "{second}");
    assert!(
        second.contains("QUERN-SEEN quern-boot-2 second"),
        "{second}"
    );
    r.engine.stop();

    assert_eq!(c.sha256("golden"), before, "the RBD image changed");
    let overlay = r.dir.path().join("vm0.qcow2");
    assert_clean(&overlay);
    assert_eq!(file_in_overlay(&overlay, "quern-boot-2"), "second");
    let (_, info) = qemu_img(&["info", overlay.to_str().unwrap()]);
    assert!(info.contains("backing file: rbd:"), "{info}");
}

/// Two VMs boot at once from one RBD image through two overlays; each sees
/// only its own writes, also when booted again.
#[test]
fn two_vms_boot_at_once_from_one_image_and_see_only_their_writes() {
    let c = Cluster::start();
    let work = tempfile::tempdir().unwrap();
    c.import(&rootfs(work.path()), "golden");
    let before = c.sha256("golden");

    let r = quern_tests::start(&config(&c, "golden", &["vm0", "vm1"]));
    let dir = r.dir.path().to_path_buf();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| boot(&dir.join("vm0.sock"), &dir, "alpha"));
        let b = s.spawn(|| boot(&dir.join("vm1.sock"), &dir, "beta"));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(
        a.contains("QUERN-SEEN quern-boot-1 alpha") && !a.contains("beta"),
        "{a}"
    );
    assert!(
        b.contains("QUERN-SEEN quern-boot-1 beta") && !b.contains("alpha"),
        "{b}"
    );
    let again = boot(&dir.join("vm1.sock"), &dir, "gamma");
    assert!(again.contains("QUERN-SEEN quern-boot-1 beta"), "{again}");
    assert!(again.contains("QUERN-SEEN quern-boot-2 gamma"), "{again}");
    assert!(!again.contains("alpha"), "{again}");
    r.engine.stop();

    assert_eq!(c.sha256("golden"), before, "the RBD image changed");
    for vm in ["vm0", "vm1"] {
        assert_clean(&dir.join(format!("{vm}.qcow2")));
    }
    assert_eq!(
        file_in_overlay(&dir.join("vm0.qcow2"), "quern-boot-1"),
        "alpha"
    );
    assert_eq!(
        file_in_overlay(&dir.join("vm1.qcow2"), "quern-boot-2"),
        "gamma"
    );
}

/// The image as QEMU's rbd driver reads it and as Quern serves it through
/// an empty overlay are identical (`qemu-img compare`); so is the overlay
/// file itself, opened by QEMU with its RBD backing file.
#[test]
fn qemu_img_compare_agrees_with_quern_over_an_empty_overlay() {
    const SIZE: usize = 24 << 20;
    let c = Cluster::start();
    let mut data = vec![0u8; SIZE];
    let mut x = 0x1234_5678_9abc_def1u64;
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // leave some 64 KiB stretches zero, as real images have
        if (i / 8192) % 3 != 1 {
            chunk.copy_from_slice(&x.to_le_bytes());
        }
    }
    c.import_bytes(&data, "golden");

    let r = quern_tests::start(&config(&c, "golden", &["vm0"]));
    let mut cl = Client::connect(&r.dir.path().join("vm0.sock"), 1).unwrap();
    assert_eq!(cl.capacity(), SIZE as u64);
    let out = r.dir.path().join("through-quern.raw");
    let mut served = Vec::with_capacity(SIZE);
    // one buffer per read: at most the device's size_max (1 MiB)
    const CHUNK: usize = 1 << 20;
    for off in (0..SIZE).step_by(CHUNK) {
        cl.read(0, off as u64, 0, CHUNK, 1);
        assert_eq!(cl.wait(0, 1), vec![(1, 0)]);
        served.extend_from_slice(cl.buf(0, CHUNK));
    }
    drop(cl);
    std::fs::write(&out, &served).unwrap();
    assert_eq!(sha256_bytes(&served), sha256_bytes(&data));

    let qemu_rbd = c.qemu_spec("golden");
    let (ok, text) = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        out.to_str().unwrap(),
        &qemu_rbd,
    ]);
    assert!(ok && text.contains("Images are identical"), "{text}");
    r.engine.stop();
    let overlay = r.dir.path().join("vm0.qcow2");
    let (ok, text) = qemu_img(&["compare", "-F", "raw", overlay.to_str().unwrap(), &qemu_rbd]);
    assert!(ok && text.contains("Images are identical"), "{text}");
    assert_clean(&overlay);
}
