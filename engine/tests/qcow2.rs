//! A qcow2 overlay served end to end: the quern binary (interrupt-mode
//! reactors, so completions must wake a sleeping reactor) serves an overlay
//! over a raw base; libblkio writes and reads through vhost-user-blk; after
//! a clean stop, `qemu-img check` and `qemu-img compare` judge the image.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SIZE: usize = 8 << 20;

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img is required for this test: {e}"))
}

#[test]
fn serves_a_qcow2_overlay_that_qemu_img_accepts() {
    let dir = tempfile::Builder::new()
        .prefix("quern-qcow2-e2e")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = dir.path();
    let base: Vec<u8> = (0..SIZE).map(|i| (i / 4096) as u8 ^ (i as u8)).collect();
    std::fs::write(d.join("base.raw"), &base).unwrap();
    let cfg = format!(
        r#"state_dir = "{}"
[reactor]
cores = [0]
poll_mode = "interrupt"
[[bdev]]
name = "golden"
driver = "uring"
path = "base.raw"
read_only = true
[[bdev]]
name = "ov"
driver = "qcow2"
path = "ov.qcow2"
base = "golden"
cluster_size = "64K"
[[vhost_blk]]
name = "vm"
bdev = "ov"
socket = "vm.sock"
"#,
        d.display()
    );
    std::fs::write(d.join("q.toml"), cfg).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_quern"))
        .args(["--config", d.join("q.toml").to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sock = d.join("vm.sock");
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(sock.exists(), "quern serves the overlay");
    let mut model = base.clone();
    {
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", sock.to_str().unwrap()).unwrap();
        b.connect().unwrap();
        let mut queues = b.start().unwrap().queues;
        let q = &mut queues[0];
        assert_eq!(b.get_u64("capacity").unwrap(), SIZE as u64);
        let region = b.alloc_mem_region(1 << 20).unwrap();
        b.map_mem_region(&region).unwrap();
        // SAFETY: the region is ours, 1 MiB long.
        let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, 1 << 20) };
        let wait = |q: &mut blkio::Blkioq| {
            let mut c = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
            let mut to = Duration::from_secs(10);
            assert_eq!(q.do_io(&mut c, 1, Some(&mut to), None).unwrap(), 1);
            // SAFETY: do_io filled one completion.
            unsafe { c[0].assume_init_read() }.ret
        };
        // the base, through the overlay
        q.read(4096, mem.as_mut_ptr(), 65536, 1, blkio::ReqFlags::empty());
        assert_eq!(wait(q), 0);
        assert!(mem[..65536] == base[4096..4096 + 65536]);
        // a write into new clusters (the worker), then in place, then read back
        for (off, len, fill) in [
            (100_000usize & !511, 70_000usize & !511, 0x5a),
            (102_400, 4096, 0xa5),
        ] {
            mem[..len].fill(fill);
            q.write(off as u64, mem.as_ptr(), len, 2, blkio::ReqFlags::empty());
            assert_eq!(wait(q), 0);
            model[off..off + len].fill(fill);
        }
        q.read(
            65536,
            mem.as_mut_ptr(),
            1 << 20,
            3,
            blkio::ReqFlags::empty(),
        );
        assert_eq!(wait(q), 0);
        assert!(mem[..] == model[65536..65536 + (1 << 20)]);
        q.flush(4, blkio::ReqFlags::empty());
        assert_eq!(wait(q), 0);
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        std::fs::read(d.join("base.raw")).unwrap() == base,
        "base changed"
    );
    let ov = d.join("ov.qcow2");
    let out = qemu_img(&["check", ov.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::write(d.join("ref.raw"), &model).unwrap();
    let out = qemu_img(&[
        "compare",
        ov.to_str().unwrap(),
        d.join("ref.raw").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
