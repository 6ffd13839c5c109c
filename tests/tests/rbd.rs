//! The rbd driver against a real single-node Ceph cluster
//! (`tests/ceph/ceph-cluster.sh`), driven through an IoEngine directly.
//! These tests fail, never skip, when Ceph cannot start.

use std::time::{Duration, Instant};

use quern_bdev::drivers::{RbdBdev, RbdOptions};
use quern_bdev::{BdevError, BdevRef, EngineConfig, IoEngine, IoKind, IoRequest, IoResult};
use quern_bdev::{MergeConfig, IOV_MAX};
use quern_tests::ceph::Cluster;

const MIB: u64 = 1 << 20;

/// Deterministic bytes, different at every offset of a seed.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn opts(c: &Cluster, image: &str) -> RbdOptions {
    let mut o = RbdOptions::new("r0", &c.pool, image);
    o.ceph_conf = c.conf.clone();
    o.keyring = Some(c.keyring.clone());
    o
}

fn engine() -> IoEngine {
    IoEngine::new(EngineConfig {
        max_requests: 256,
        ring_entries: 64,
        merge: MergeConfig {
            enabled: true,
            max_bytes: MIB,
            max_segments: 256.min(IOV_MAX),
        },
        ..EngineConfig::default()
    })
    .expect("io_uring")
}

struct Req {
    kind: IoKind,
    offset: u64,
    len: u64,
    /// Data buffers (reads fill them); empty for flush/discard/zeroes.
    bufs: Vec<Vec<u8>>,
}

impl Req {
    fn read(offset: u64, len: usize) -> Req {
        Req {
            kind: IoKind::Read,
            offset,
            len: len as u64,
            bufs: vec![vec![0; len]],
        }
    }
    /// A write of `data` split into two segments (exercises iovecs).
    fn write(offset: u64, data: &[u8]) -> Req {
        let mid = (data.len() / 2) & !511;
        let mut bufs = vec![data[..mid].to_vec(), data[mid..].to_vec()];
        bufs.retain(|b| !b.is_empty());
        Req {
            kind: IoKind::Write,
            offset,
            len: data.len() as u64,
            bufs,
        }
    }
    fn other(kind: IoKind, offset: u64, len: u64) -> Req {
        Req {
            kind,
            offset,
            len,
            bufs: Vec::new(),
        }
    }
    fn data(&self) -> Vec<u8> {
        self.bufs.concat()
    }
}

/// Submit all of `reqs` in one cycle and run until they complete.
fn run(e: &mut IoEngine, dev: u16, reqs: &mut [Req]) -> Vec<IoResult> {
    let iovs: Vec<Vec<libc::iovec>> = reqs
        .iter_mut()
        .map(|r| {
            r.bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect()
        })
        .collect();
    let mut res: Vec<Option<IoResult>> = vec![None; reqs.len()];
    for (i, r) in reqs.iter().enumerate() {
        let req = IoRequest {
            dev,
            kind: r.kind,
            offset: r.offset,
            len: r.len,
            iov: &iovs[i],
            fua: false,
            cookie: quern_bdev::Cookie::new(quern_bdev::PollerId(0), i as u64),
        };
        // SAFETY: the buffers live in `reqs`, untouched until
        // run_until_idle below has completed every request.
        let sub = unsafe { e.submit(&req) };
        if let Err(err) = sub {
            res[i] = Some(Err(err));
        }
    }
    e.run_until_idle(|c, r| res[c.tag() as usize] = Some(r));
    res.into_iter()
        .map(|r| r.expect("every request completes"))
        .collect()
}

fn read_all(e: &mut IoEngine, dev: u16, size: usize) -> Vec<u8> {
    let chunk = 128 << 10;
    let mut reqs: Vec<Req> = (0..size / chunk)
        .map(|i| Req::read((i * chunk) as u64, chunk))
        .collect();
    for r in run(e, dev, &mut reqs) {
        r.expect("read");
    }
    reqs.iter().flat_map(|r| r.data()).collect()
}

/// Abort the whole test binary if a test hangs past `secs` (a hang is the
/// failure these tests look for; a panicking thread would not end it).
fn watchdog(what: &'static str, secs: u64) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            rx.recv_timeout(Duration::from_secs(secs))
        {
            eprintln!("{what}: still running after {secs} s; aborting");
            quern_tests::ceph::stop_all();
            std::process::exit(101);
        }
    });
    tx
}

#[test]
fn rbd_bdev_reads_writes_snapshots_and_refuses() {
    let _w = watchdog("rbd_bdev_reads_writes_snapshots_and_refuses", 300);
    let c = Cluster::start();
    let size = 16 * MIB as usize;
    let mut model = pattern(size, 1);
    c.import_bytes(&model, "img");

    let bdev: BdevRef = std::sync::Arc::new(RbdBdev::open(&opts(&c, "img")).expect("open rbd"));
    let info = bdev.info().clone();
    assert_eq!(info.capacity_bytes, size as u64);
    assert!(!info.read_only);
    assert_eq!(info.driver, "rbd");
    assert_eq!(
        bdev.backing_spec().unwrap(),
        format!(
            "rbd:rbd/img:conf={}:id=admin:keyring={}",
            c.conf.display(),
            c.keyring.display()
        )
    );
    let mut e = engine();
    let dev = e.add_device(bdev.clone()).expect("channel");

    // the imported pattern reads back intact
    assert!(
        read_all(&mut e, dev, size) == model,
        "imported image reads back"
    );

    // a whole-object discard and a write-zeroes read back as zeros
    let (zo, zl) = (2 * MIB, 192 << 10);
    let mut reqs = vec![
        Req::other(IoKind::Discard, 12 * MIB, 4 * MIB),
        Req::other(IoKind::WriteZeroes, zo, zl),
    ];
    for r in run(&mut e, dev, &mut reqs) {
        r.expect("discard / write-zeroes");
    }
    model[12 * MIB as usize..].fill(0);
    model[zo as usize..(zo + zl) as usize].fill(0);

    // writes at various offsets and sizes, crossing object (4 MiB) boundaries
    let writes: [(u64, usize); 7] = [
        (0, 512),
        (4096, 4096),
        (MIB - 512, 1024),
        (4 * MIB - 4096, 8192),
        (7 * MIB + 512, 65536 + 512),
        (15 * MIB, MIB as usize),
        (12 * MIB + 4096, 3 * 4096),
    ];
    let mut reqs: Vec<Req> = writes
        .iter()
        .enumerate()
        .map(|(i, &(o, l))| {
            let d = pattern(l, 100 + i as u64);
            model[o as usize..o as usize + l].copy_from_slice(&d);
            Req::write(o, &d)
        })
        .collect();
    for r in run(&mut e, dev, &mut reqs) {
        r.expect("write");
    }
    // 64 sequential 4 KiB writes in one cycle: the engine merges them
    let before = e.merge_stats();
    let base = 9 * MIB;
    let mut reqs: Vec<Req> = (0..64u64)
        .map(|i| {
            let d = pattern(4096, 1000 + i);
            let o = base + i * 4096;
            model[o as usize..o as usize + 4096].copy_from_slice(&d);
            Req::write(o, &d)
        })
        .collect();
    for r in run(&mut e, dev, &mut reqs) {
        r.expect("merged write");
    }
    let after = e.merge_stats();
    let (inn, out) = (
        after.requests_in - before.requests_in,
        after.requests_out - before.requests_out,
    );
    assert_eq!(inn, 64);
    assert!(out < 8, "64 sequential writes merged into {out} operations");
    let r = run(&mut e, dev, &mut [Req::other(IoKind::Flush, 0, 0)]);
    r[0].expect("flush");

    assert!(read_all(&mut e, dev, size) == model, "reads see the writes");
    let exported = c.export("img");
    assert!(exported == model, "rbd export sees every write");
    assert_eq!(c.sha256("img"), quern_tests::ceph::sha256_bytes(&model));

    // a snapshot opens read-only, refuses writes, and keeps its contents
    c.snap_create("img", "s1");
    let mut so = opts(&c, "img");
    so.snapshot = Some("s1".into());
    let snap: BdevRef = std::sync::Arc::new(RbdBdev::open(&so).expect("open snapshot"));
    assert!(snap.info().read_only, "a snapshot is read-only");
    assert!(snap
        .backing_spec()
        .unwrap()
        .starts_with("rbd:rbd/img@s1:conf="));
    let sdev = e.add_device(snap).expect("snapshot channel");
    let d = pattern(4096, 7);
    let refused = run(&mut e, sdev, &mut [Req::write(0, &d)]);
    assert_eq!(
        refused[0],
        Err(BdevError::ReadOnly {
            kind: IoKind::Write
        })
    );
    // the head moves on; the snapshot does not
    let r = run(&mut e, dev, &mut [Req::write(0, &d)]);
    r[0].expect("write to head");
    assert!(read_all(&mut e, sdev, size) == model, "snapshot unchanged");
    model[..4096].copy_from_slice(&d);
    assert!(read_all(&mut e, dev, size) == model, "head changed");

    // a missing image, a missing pool and a missing snapshot are named
    let err = RbdBdev::open(&opts(&c, "nope"))
        .err()
        .expect("missing image");
    assert!(err.to_string().contains("rbd/nope"), "{err}");
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    let mut o = opts(&c, "img");
    o.pool = "nopool".into();
    let err = RbdBdev::open(&o).err().expect("missing pool");
    assert!(err.to_string().contains("pool `nopool`"), "{err}");
    let mut o = opts(&c, "img");
    o.snapshot = Some("nosnap".into());
    let err = RbdBdev::open(&o).err().expect("missing snapshot");
    assert!(err.to_string().contains("rbd/img@nosnap"), "{err}");
    // an image whose own settings turn librbd's cache back on is refused
    c.rbd_ok(&["create", "--size", "8M", &c.spec("cached")]);
    c.rbd_ok(&[
        "config",
        "image",
        "set",
        &c.spec("cached"),
        "rbd_cache",
        "true",
    ]);
    let err = RbdBdev::open(&opts(&c, "cached"))
        .err()
        .expect("image with rbd_cache on");
    assert!(err.to_string().contains("rbd_cache is enabled"), "{err}");
    c.rbd_ok(&["config", "image", "rm", &c.spec("cached"), "rbd_cache"]);
    RbdBdev::open(&opts(&c, "cached")).expect("opens once the override is gone");
    e.remove_device(sdev);
    e.remove_device(dev);
}

#[test]
fn unreachable_cluster_fails_start_up_within_the_timeout() {
    let _w = watchdog("unreachable_cluster_fails_start_up_within_the_timeout", 120);
    let dir = tempfile::tempdir().unwrap();
    // a port with nothing listening
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.path().join("ceph.conf");
    let keyring = dir.path().join("keyring");
    let st = std::process::Command::new("ceph-authtool")
        .args(["--create-keyring", keyring.to_str().unwrap()])
        .args(["--gen-key", "-n", "client.admin"])
        .output()
        .expect("ceph-authtool");
    assert!(st.status.success());
    std::fs::write(
        &conf,
        format!(
            "[global]\nfsid = {}\nmon host = [v2:127.0.0.1:{port}]\nms bind ipv6 = false\n",
            "8d3cd4a5-7c39-4f2a-9f0e-4b0b3e7c1b11"
        ),
    )
    .unwrap();
    let mut o = RbdOptions::new("r0", "rbd", "img");
    o.ceph_conf = conf.clone();
    o.keyring = Some(keyring);
    o.timeout_secs = 2;
    let t = Instant::now();
    let err = RbdBdev::open(&o).err().expect("no cluster there");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "gave up after {took:?} (timeout 2 s)"
    );
    assert!(
        err.to_string().contains("connecting to the Ceph cluster"),
        "{err}"
    );
    // a missing ceph.conf is named before anything is tried
    o.ceph_conf = dir.path().join("missing.conf");
    let err = RbdBdev::open(&o).err().expect("no conf");
    assert!(err.to_string().contains("missing.conf"), "{err}");
}

#[test]
fn io_after_the_cluster_stops_fails_within_the_timeout() {
    let _w = watchdog("io_after_the_cluster_stops_fails_within_the_timeout", 180);
    let c = Cluster::start();
    let size = 8 * MIB as usize;
    let data = pattern(size, 3);
    c.import_bytes(&data, "img");
    let mut o = opts(&c, "img");
    o.timeout_secs = 3;
    let bdev: BdevRef = std::sync::Arc::new(RbdBdev::open(&o).expect("open"));
    let mut e = engine();
    let dev = e.add_device(bdev).expect("channel");
    let mut r = [Req::read(0, 4096)];
    run(&mut e, dev, &mut r)[0].expect("read while up");
    assert!(r[0].data() == data[..4096]);
    c.stop();
    let t = Instant::now();
    let mut reqs = [
        Req::read(4 * MIB, 65536),
        Req::write(MIB, &pattern(4096, 9)),
    ];
    let res = run(&mut e, dev, &mut reqs);
    let took = t.elapsed();
    for r in &res {
        assert!(matches!(r, Err(BdevError::Io(_))), "{res:?}");
    }
    assert!(
        took < Duration::from_secs(30),
        "I/O to a stopped cluster took {took:?} to fail (timeout 3 s)"
    );
    eprintln!("I/O failed after {took:?}: {res:?}");
    let t = Instant::now();
    drop(e);
    eprintln!("closing the image took {:?}", t.elapsed());
}

#[test]
fn config_names_rbd_key_errors() {
    let base = "[reactor]\ncores = [0]\n[[bdev]]\nname = \"r\"\n";
    let err = |extra: &str| {
        quern::config::Config::parse(&format!("{base}{extra}"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(err("driver = \"rbd\"\npool = \"rbd\"\n").contains("bdev[0].image"));
    assert!(err("driver = \"rbd\"\nimage = \"i\"\n").contains("bdev[0].pool"));
    assert!(
        err("driver = \"rbd\"\npool = \"p\"\nimage = \"i\"\nsize = \"1G\"\n")
            .contains("bdev[0].size")
    );
    assert!(err("driver = \"malloc\"\nsize = \"1M\"\npool = \"p\"\n").contains("bdev[0].pool"));
    assert!(
        err("driver = \"rbd\"\npool = \"p\"\nimage = \"i\"\nceph_conf = \"/nonexistent/c\"\n")
            .contains("bdev[0].ceph_conf")
    );
    assert!(
        err("driver = \"rbd\"\npool = \"p\"\nimage = \"i\"\ntimeout_secs = 0\n")
            .contains("bdev[0].timeout_secs")
    );
    assert!(err("driver = \"rbd\"\npool = \"p\"\nimage = \"i@s\"\n").contains("bdev[0].image"));
    assert_eq!(
        err("driver = \"rbd\"\npool = \"p\"\nimage = \"i\"\nsnapshot = \"s\"\n"),
        ""
    );
}
