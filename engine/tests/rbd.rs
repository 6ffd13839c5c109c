//! The `quern` binary serving a Ceph RBD image over vhost-user-blk: a real
//! client (libblkio) writes and reads it, and QEMU's own rbd driver
//! (`qemu-img compare`) agrees with what Quern served.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../tests/src/ceph.rs"]
#[allow(dead_code)]
mod ceph;

const MIB: usize = 1 << 20;

#[test]
fn quern_serves_an_rbd_image_that_qemu_img_reads_identically() {
    let c = ceph::Cluster::start();
    let size = 8 * MIB;
    let image: Vec<u8> = (0..size)
        .map(|i| ((i / 512) as u8) ^ (i % 251) as u8)
        .collect();
    c.import_bytes(&image, "vm0");

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm0.sock");
    let cfg = dir.path().join("quern.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"state_dir = "{dir}"
[reactor]
cores = [0, 1]
[[bdev]]
name = "vm0"
driver = "rbd"
pool = "rbd"
image = "vm0"
ceph_conf = "{conf}"
client_id = "admin"
keyring = "{keyring}"
timeout_secs = 10
[[vhost_blk]]
name = "vm0"
bdev = "vm0"
socket = "{sock}"
num_queues = 2
cores = [0, 1]
"#,
            dir = dir.path().display(),
            conf = c.conf.display(),
            keyring = c.keyring.display(),
            sock = sock.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_quern"))
        .args(["--config", cfg.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(sock.exists(), "quern serves the rbd image");
    let raw = dir.path().join("served.raw");
    {
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", sock.to_str().unwrap()).unwrap();
        b.connect().unwrap();
        b.set_i32("num-queues", 2).unwrap();
        let mut queues = b.start().unwrap().queues;
        assert_eq!(b.get_u64("capacity").unwrap(), size as u64);
        let region = b.alloc_mem_region(size + MIB).unwrap();
        b.map_mem_region(&region).unwrap();
        // SAFETY: the region is ours, size + 1 MiB long.
        let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, size + MIB) };
        let wait = |q: &mut blkio::Blkioq| {
            let mut c = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
            let mut to = Duration::from_secs(30);
            assert_eq!(q.do_io(&mut c, 1, Some(&mut to), None).unwrap(), 1);
            // SAFETY: do_io filled one completion.
            unsafe { c[0].assume_init_read() }.ret
        };
        // queues 0 and 1 run on two reactors, each with its own image
        // handle: a write on one is read back on the other
        let (q0, q1) = queues.split_at_mut(1);
        let (q0, q1) = (&mut q0[0], &mut q1[0]);
        // a write through Quern lands in the image
        for (i, x) in mem[size..size + 65536].iter_mut().enumerate() {
            *x = (i % 13) as u8 + 1;
        }
        q0.write(
            3 * MIB as u64 + 4096,
            mem[size..].as_mut_ptr(),
            65536,
            1,
            blkio::ReqFlags::empty(),
        );
        assert_eq!(wait(q0), 0);
        // and a write on the other queue's handle (librbd passes the
        // image's exclusive lock between the two handles)
        q1.write(
            5 * MIB as u64,
            mem[size + 4096..].as_mut_ptr(),
            8192,
            4,
            blkio::ReqFlags::empty(),
        );
        assert_eq!(wait(q1), 0);
        q0.flush(2, blkio::ReqFlags::empty());
        assert_eq!(wait(q0), 0);
        // read the whole device back through Quern
        for k in 0..size / MIB {
            let q = if k % 2 == 0 { &mut *q1 } else { &mut *q0 };
            q.read(
                (k * MIB) as u64,
                mem[k * MIB..].as_mut_ptr(),
                MIB,
                3,
                blkio::ReqFlags::empty(),
            );
            assert_eq!(wait(q), 0);
        }
        let mut expect = image.clone();
        expect[3 * MIB + 4096..3 * MIB + 4096 + 65536].copy_from_slice(&mem[size..size + 65536]);
        expect[5 * MIB..5 * MIB + 8192].copy_from_slice(&mem[size + 4096..size + 4096 + 8192]);
        assert!(
            mem[..size] == expect[..],
            "quern serves the image and the write"
        );
        std::fs::write(&raw, &mem[..size]).unwrap();
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("driver=\"rbd\"") || log.contains("driver=rbd"),
        "{log}"
    );

    // QEMU's rbd driver reads the image Quern wrote identically
    let qo = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(c.qemu_spec("vm0"))
        .arg(&raw)
        .output()
        .expect("run qemu-img (scripts/install-test-deps.sh installs qemu-block-extra)");
    assert!(
        qo.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&qo.stdout),
        String::from_utf8_lossy(&qo.stderr)
    );
    assert!(String::from_utf8_lossy(&qo.stdout).contains("identical"));
}

#[test]
fn quern_start_up_names_a_missing_rbd_image() {
    let c = ceph::Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("quern.toml");
    std::fs::write(
        &cfg,
        format!(
            "[reactor]\ncores = [0]\n[[bdev]]\nname = \"r\"\ndriver = \"rbd\"\npool = \"rbd\"\nimage = \"absent\"\nceph_conf = \"{}\"\n",
            c.conf.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_quern"))
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("bdev `r`") && log.contains("rbd/absent"),
        "{log}"
    );
}

#[test]
fn the_rbd_example_config_is_valid() {
    // the example names /etc/ceph/ceph.conf, which only exists on Ceph hosts:
    // point it at a file that exists for the syntax and key check
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("ceph.conf");
    std::fs::write(&conf, "[global]\n").unwrap();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/quern-rbd.toml"
    ))
    .unwrap()
    .replace("/etc/ceph/ceph.conf", conf.to_str().unwrap());
    let cfg = dir.path().join("quern-rbd.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_quern"))
        .args(["check-config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
