//! Live migration of a QEMU guest whose disk Quern serves, as a cloud
//! operator does it: the source QEMU migrates over QMP to a destination
//! QEMU started with -incoming, each with its own vhost-user-blk device on
//! storage both reach (two devices on one bdev in one Quern, or on one RBD
//! image). Quern logs the guest pages it writes while LOG_ALL is on; the
//! guest verifies its data before, during and after the move.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quern_tests::{disk_tempdir, guest_dir, QuernProcess};
use quern_vm::qmp::Qmp;
use serde_json::{json, Value};

/// One QEMU, as run-guest.sh starts it, with a QMP socket.
struct Qemu {
    child: Child,
    qmp: Qmp,
    console: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A peer process killed when the test ends, a failed one too (a
/// qemu-storage-daemon left running made the next benchmark refuse to
/// measure).
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start a guest on vhost-user-blk `sock`: the fio initramfs with
/// `append`; `incoming`: wait for a migration there.
fn qemu(dir: &Path, name: &str, sock: &Path, append: &str, incoming: Option<&Path>) -> Qemu {
    let g = guest_dir();
    let qmp = dir.join(format!("{name}-qmp.sock"));
    let console = dir.join(format!("{name}-console.log"));
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-m",
        "512",
        "-smp",
        "2",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args([
        "-object",
        "memory-backend-memfd,id=mem,size=512M,share=on",
        "-numa",
        "node,memdev=mem",
    ])
    .arg("-kernel")
    .arg(g.join("vmlinuz"))
    .arg("-initrd")
    .arg(g.join("initrd-fio.gz"))
    .arg("-append")
    .arg(format!("console=ttyS0 quiet panic=-1 {append}"))
    .arg("-chardev")
    .arg(format!("socket,id=vub0,path={}", sock.display()))
    .args(["-device", "vhost-user-blk-pci,chardev=vub0,num-queues=2"])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(dir.join(format!("{name}-qemu.log"))).unwrap())
    .stderr(std::fs::File::create(dir.join(format!("{name}-qemu.err"))).unwrap());
    if let Some(i) = incoming {
        c.arg("-incoming").arg(format!("unix:{}", i.display()));
    }
    let child = c.spawn().expect("start qemu-system-x86_64");
    let qmp = Qmp::connect(&qmp, Duration::from_secs(30)).unwrap_or_else(|e| {
        panic!(
            "{name}: {e}\n{}",
            std::fs::read_to_string(dir.join(format!("{name}-qemu.err"))).unwrap_or_default()
        )
    });
    Qemu {
        child,
        qmp,
        console,
    }
}

fn console(q: &Qemu) -> String {
    std::fs::read_to_string(&q.console)
        .unwrap_or_default()
        .replace('\r', "")
}

fn wait_console(q: &Qemu, needle: &str, secs: u64) {
    let t0 = Instant::now();
    while !console(q).contains(needle) {
        if t0.elapsed() >= Duration::from_secs(secs) {
            panic!("no {needle} after {secs} s\n{}", diagnose(q));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a guest that did not get somewhere in time was doing: its console,
/// QEMU's run state, vCPUs and block devices, QEMU's stderr, and the logs
/// of the processes beside it (Quern, qemu-storage-daemon) in its
/// directory.
fn diagnose(q: &Qemu) -> String {
    let mut out = format!("console:\n{}\n", console(q));
    for cmd in ["query-status", "query-cpus-fast", "query-block"] {
        let r = q.qmp.execute(cmd, json!({}), Duration::from_secs(10));
        out += &format!("{cmd}: {r:?}\n");
    }
    let dir = q.console.parent().unwrap();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut names: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "err" || e == "log")
                    && !p.to_string_lossy().ends_with("-console.log")
            })
            .collect();
        names.sort();
        for p in names {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out += &format!("--- {} (last 40 lines)\n", p.display());
            for l in tail.into_iter().rev() {
                out += l;
                out.push('\n');
            }
        }
    }
    out
}

const T: Duration = Duration::from_secs(30);

/// A source guest on `src.sock` running `append`, and a destination QEMU
/// on `dst.sock` waiting for it; the migration's address.
fn pair(d: &Path, append: &str) -> (Qemu, Qemu, PathBuf) {
    let src = qemu(d, "src", &d.join("src.sock"), append, None);
    let uri = d.join("mig.sock");
    let dst = qemu(d, "dst", &d.join("dst.sock"), append, Some(&uri));
    (src, dst, uri)
}

/// What one migration measured.
#[derive(Debug)]
struct Moved {
    total_ms: u64,
    downtime_ms: u64,
}

/// Start migrating `src` to the QEMU listening on `uri`.
fn start_migration(src: &Qemu, uri: &Path, max_bandwidth: Option<u64>) {
    if let Some(bw) = max_bandwidth {
        src.qmp
            .execute("migrate-set-parameters", json!({"max-bandwidth": bw}), T)
            .unwrap();
    }
    src.qmp
        .execute(
            "migrate",
            json!({"uri": format!("unix:{}", uri.display())}),
            T,
        )
        .unwrap();
}

/// Migrate `src` to `dst` (listening on `uri`), wait until QEMU reports it
/// completed, and leave the source paused.
fn migrate(src: &Qemu, uri: &Path, max_bandwidth: Option<u64>) -> Moved {
    start_migration(src, uri, max_bandwidth);
    let t0 = Instant::now();
    loop {
        let s = src.qmp.execute("query-migrate", json!({}), T).unwrap();
        match s["status"].as_str() {
            Some("completed") => {
                return Moved {
                    total_ms: s["total-time"].as_u64().unwrap_or(0),
                    downtime_ms: s["downtime"].as_u64().unwrap_or(0),
                }
            }
            Some("failed") | Some("cancelled") => panic!("migration ended: {s}"),
            _ => {}
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "migration never completed: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest on `dst` after the move: it finishes with every check passed.
fn finishes_clean(dst: &Qemu, secs: u64) -> String {
    wait_console(dst, "QUERN-GUEST-END", secs);
    let out = console(dst);
    assert!(out.contains("QUERN-FIO-RC=0"), "{out}");
    assert!(
        !out.contains("verify: bad") && !out.contains("QUERN-READCHECK-BAD"),
        "{out}"
    );
    out
}

const QUERN: &str = r#"
state_dir = "@DIR@"
[reactor]
cores = [0, 1]
poll_mode = "adaptive"
[[bdev]]
name = "shared"
driver = "uring"
path = "shared.img"
size = "128M"
[[vhost_blk]]
name = "src"
bdev = "shared"
socket = "src.sock"
num_queues = 2
[[vhost_blk]]
name = "dst"
bdev = "shared"
socket = "dst.sock"
num_queues = 2
"#;

/// The operator's case: fio verify on a Quern disk while the guest moves
/// to another QEMU whose device serves the same bdev; QEMU reports the
/// migration completed and fio finishes on the destination with no error.
/// The same with qemu-storage-daemon serving both sides (one export per
/// side, the same file), in the same run, for its total time and downtime.
#[test]
fn a_guest_running_fio_verify_migrates_live_on_quern_and_on_qsd() {
    let dir = disk_tempdir("quern-mig");
    let d = dir.path();
    let mut q = QuernProcess::start(d, QUERN);
    q.wait_ready(Duration::from_secs(20));
    let append = "quern.fio=verify-loop quern.secs=30 quern.size=16";
    let (src, dst, uri) = pair(d, append);
    wait_console(&src, "QUERN-PASS=1", 240);
    let quern = migrate(&src, &uri, None);
    // the source device logged while the migration ran, and stopped
    assert!(q.log().contains("dirty page logging on"), "{}", q.log());
    assert!(q.log().contains("dirty log mapped"), "{}", q.log());
    let out = finishes_clean(&dst, 240);
    assert!(out.contains("QUERN-PASS="), "{out}");
    drop(src);
    drop(dst);
    assert!(q.stop());

    // qemu-storage-daemon, one export per side on the same file
    let qsd = |name: &str| -> Child {
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={},cache.direct=on,aio=io_uring,locking=off",
                d.join("shared.img").display()
            ))
            .args(["--blockdev", "driver=raw,node-name=r,file=f"])
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=r,addr.type=unix,addr.path={},writable=on,num-queues=2",
                d.join(format!("{name}.sock")).display()
            ))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join(format!("{name}.log"))).unwrap())
            .spawn()
            .expect("qemu-storage-daemon")
    };
    let daemons = [Peer(qsd("qsd-src")), Peer(qsd("qsd-dst"))];
    for s in ["qsd-src.sock", "qsd-dst.sock"] {
        let t0 = Instant::now();
        while !d.join(s).exists() {
            assert!(t0.elapsed() < Duration::from_secs(20), "{s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let uri2 = d.join("mig2.sock");
    let src = qemu(d, "qsrc", &d.join("qsd-src.sock"), append, None);
    let dst = qemu(d, "qdst", &d.join("qsd-dst.sock"), append, Some(&uri2));
    wait_console(&src, "QUERN-PASS=1", 240);
    let qsd = migrate(&src, &uri2, None);
    // The peer has a defect of its own: its source side once ended with
    // `vu_panic: Error writing eventfd: Bad file descriptor` as the
    // migration finished, and the requests it held never completed (the
    // guest's fio stalled on the destination). That is reported as the
    // peer's failure, its figures left out; Quern's leg above has been
    // checked in full either way.
    let peer_broke = || {
        ["qsd-src.log", "qsd-dst.log"].iter().find_map(|f| {
            let log = std::fs::read_to_string(d.join(f)).unwrap_or_default();
            log.contains("vu_panic")
                .then(|| format!("{f}: {}", log.trim()))
        })
    };
    let t0 = Instant::now();
    // how many markers the guest has printed, and when the last one came:
    // a guest whose disk stopped answering still prints fio's status
    // line, so stalled means no new marker for 30 s
    let mut progress = (0usize, Instant::now());
    let peer_failure = loop {
        let out = console(&dst);
        if out.contains("QUERN-GUEST-END") {
            break None;
        }
        let markers = out.matches("QUERN-").count();
        if markers != progress.0 {
            progress = (markers, Instant::now());
        }
        if progress.1.elapsed() > Duration::from_secs(30) {
            if let Some(why) = peer_broke() {
                break Some(why);
            }
        }
        if t0.elapsed() >= Duration::from_secs(240) {
            panic!("no QUERN-GUEST-END after 240 s\n{}", diagnose(&dst));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let peer_failed = match peer_failure {
        Some(why) => {
            eprintln!(
                "qemu-storage-daemon failed the migration itself (a peer defect, not Quern's); \
                 its figures are left out: {why}"
            );
            true
        }
        None => {
            finishes_clean(&dst, 1);
            false
        }
    };
    drop(src);
    drop(dst);
    drop(daemons);
    if peer_failed {
        eprintln!(
            "live migration under fio verify (TCG guest, 512 MiB): Quern total {} ms, downtime {} ms",
            quern.total_ms, quern.downtime_ms
        );
    } else {
        eprintln!(
            "live migration under fio verify (TCG guest, 512 MiB): Quern total {} ms, downtime {} ms; \
             qemu-storage-daemon total {} ms, downtime {} ms",
            quern.total_ms, quern.downtime_ms, qsd.total_ms, qsd.downtime_ms
        );
    }
}

/// A guest that reads its disk all the time, so Quern writes guest RAM all
/// through the migration, into pages the guest's CPU never writes (page
/// cache filled by buffered reads after new data went to the disk with
/// O_DIRECT), and checks each pass from those pages against the checksum
/// of what it wrote: on the destination, no page is stale. With Quern's
/// marking of request pages switched off by hand, this test fails (a
/// pass on the destination reads pages that were sent before the device
/// filled them).
#[test]
fn heavy_reads_during_migration_leave_no_stale_page() {
    let dir = disk_tempdir("quern-migread");
    let d = dir.path();
    let mut q = QuernProcess::start(d, QUERN);
    q.wait_ready(Duration::from_secs(20));
    // init_on_alloc=0: Debian's kernel zeroes pages as it allocates them
    // (a CPU write QEMU tracks, just before the device fills the page)
    let (src, dst, uri) = pair(
        d,
        "init_on_alloc=0 quern.fio=readcheck quern.secs=40 quern.size=32",
    );
    wait_console(&src, "QUERN-READCHECK-SUM=", 240);
    std::thread::sleep(Duration::from_secs(3));
    // slow enough that many read passes run while pages are being sent
    let m = migrate(&src, &uri, Some(64 << 20));
    let out = finishes_clean(&dst, 240);
    let passes: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("QUERN-READCHECK-PASSES="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(passes > 2, "{out}");
    eprintln!("read-heavy migration: {m:?}, {passes} verified read passes");
    drop(src);
    drop(dst);
    assert!(q.stop());
}

/// A migration cancelled halfway: the guest keeps running on the source,
/// Quern stops logging, and fio still verifies.
#[test]
fn a_cancelled_migration_leaves_the_guest_running_and_logging_off() {
    let dir = disk_tempdir("quern-migcancel");
    let d = dir.path();
    let mut q = QuernProcess::start(d, QUERN);
    q.wait_ready(Duration::from_secs(20));
    let (src, _dst, uri) = pair(d, "quern.fio=verify-loop quern.secs=25 quern.size=16");
    wait_console(&src, "QUERN-PASS=1", 240);
    start_migration(&src, &uri, Some(4 << 20));
    let t0 = Instant::now();
    while !q.log().contains("dirty page logging on") {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", q.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    src.qmp.execute("migrate_cancel", json!({}), T).unwrap();
    let t0 = Instant::now();
    loop {
        let s: Value = src.qmp.execute("query-migrate", json!({}), T).unwrap();
        if s["status"] == "cancelled" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    while !q.log().contains("dirty page logging off") {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", q.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = src.qmp.execute("query-status", json!({}), T).unwrap();
    assert_eq!(st["status"], "running", "{st}");
    finishes_clean(&src, 240);
    assert!(q.stop());
}

/// The same with the disk on Ceph: the source and destination devices each
/// open the one RBD image (the exclusive lock passes from one handle to
/// the other when the destination starts writing).
#[test]
fn a_guest_on_an_rbd_disk_migrates_live() {
    let c = quern_tests::ceph::Cluster::start();
    c.rbd_ok(&["create", "--size", "128M", &c.spec("mig")]);
    let dir = disk_tempdir("quern-migrbd");
    let d = dir.path();
    let bdev = |name: &str| {
        format!(
            "[[bdev]]\nname = \"{name}\"\ndriver = \"rbd\"\npool = \"{}\"\nimage = \"mig\"\nceph_conf = \"{}\"\n",
            c.pool,
            c.conf.display()
        )
    };
    let config = format!(
        "state_dir = \"@DIR@\"\n[reactor]\ncores = [0, 1]\npoll_mode = \"adaptive\"\n{}{}\
         [[vhost_blk]]\nname = \"src\"\nbdev = \"ra\"\nsocket = \"src.sock\"\nnum_queues = 2\n\
         [[vhost_blk]]\nname = \"dst\"\nbdev = \"rb\"\nsocket = \"dst.sock\"\nnum_queues = 2\n",
        bdev("ra"),
        bdev("rb")
    );
    let mut q = QuernProcess::start(d, &config);
    q.wait_ready(Duration::from_secs(60));
    let append = "quern.fio=verify-loop quern.secs=30 quern.size=16";
    let (src, dst, uri) = pair(d, append);
    wait_console(&src, "QUERN-PASS=1", 180);
    let m = migrate(&src, &uri, None);
    finishes_clean(&dst, 300);
    eprintln!("live migration on RBD: {m:?}");
    drop(src);
    drop(dst);
    assert!(q.stop());
}
