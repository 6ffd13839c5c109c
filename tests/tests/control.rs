//! The control plane against real clients: the `quern` binary driven over
//! its management socket (JSON-RPC), libblkio clients verifying data on a
//! neighbouring device meanwhile, SIGKILL at random moments, and a QEMU
//! guest whose disk is created at run time and then deleted under it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quern::engine::codes;
use quern_tests::client::{block_gen, fill_block, Client};
use quern_tests::{disk_tempdir, proc_counts, run_guest, QuernProcess};
use serde_json::{json, Value};

const BASE: &str = r#"
state_dir = "@DIR@"
[reactor]
cores = [0, 1]
poll_mode = "adaptive"
[[bdev]]
name = "steady"
driver = "malloc"
size = "64M"
[[vhost_blk]]
name = "steady"
bdev = "steady"
socket = "steady.sock"
num_queues = 2
"#;

/// A libblkio client that writes and reads back 4 KiB blocks on a device
/// until told to stop; panics (in its thread) on any wrong byte or error.
struct Verifier {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Verifier {
    fn start(socket: &Path) -> Verifier {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let mut c = Client::connect_retry(socket, 2, Duration::from_secs(10));
        let (s, o) = (stop.clone(), ops.clone());
        let thread = std::thread::spawn(move || {
            let mut gen = 0u32;
            while !s.load(Ordering::Relaxed) {
                gen += 1;
                for q in 0..2usize {
                    for i in 0..8u64 {
                        let block = (gen as u64 * 16 + q as u64 * 8 + i) % 4096;
                        fill_block(c.buf(q * 65536 + i as usize * 4096, 4096), block, gen);
                        c.write(
                            q,
                            block * 4096,
                            q * 65536 + i as usize * 4096,
                            4096,
                            i as usize,
                        );
                    }
                    for (_, r) in c.wait(q, 8) {
                        assert_eq!(r, 0, "write failed");
                    }
                    for i in 0..8u64 {
                        let block = (gen as u64 * 16 + q as u64 * 8 + i) % 4096;
                        c.buf(1 << 20, 4096).fill(0);
                        c.read(
                            q,
                            block * 4096,
                            (1 << 20) + q * 65536 + i as usize * 4096,
                            4096,
                            0,
                        );
                        assert_eq!(c.wait(q, 1)[0].1, 0, "read failed");
                        let got = c
                            .buf((1 << 20) + q * 65536 + i as usize * 4096, 4096)
                            .to_vec();
                        assert_eq!(
                            block_gen(&got, block, &[gen]),
                            Some(gen),
                            "block {block} differs"
                        );
                    }
                    o.fetch_add(16, Ordering::Relaxed);
                }
            }
        });
        Verifier {
            stop,
            ops,
            thread: Some(thread),
        }
    }

    fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Stop and say whether every check passed.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("the verifier saw wrong data or an error");
        self.ops()
    }
}

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["name"].as_str().map(String::from))
        .collect();
    n.sort();
    n
}

/// The counts once the last calls' client threads have left (their fds and
/// signal stacks go when they have): three equal readings in a row.
fn settled_counts(pid: u32) -> quern_tests::ProcCounts {
    let mut last = proc_counts(pid);
    let mut same = 0;
    let t = Instant::now();
    while same < 3 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        let now = proc_counts(pid);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// 1,000 create/delete cycles of bdevs and devices over the socket while a
/// libblkio client verifies data on another device: no error, and no file
/// descriptor, thread or memory mapping left behind (counted in /proc).
#[test]
fn a_thousand_create_delete_cycles_leak_nothing_and_disturb_no_neighbour() {
    let dir = disk_tempdir("quern-churn");
    // glibc keeps the stacks of threads that ended for reuse (up to 40
    // MiB) and gives a thread that meets contention a new malloc arena
    // (up to 8 per core) that it never unmaps: caches, not leaks, but they
    // would make the mapping count move with how threads happened to
    // overlap; without them the count is exact
    let mut q = QuernProcess::start_with_env(
        dir.path(),
        BASE,
        &[(
            "GLIBC_TUNABLES",
            "glibc.pthread.stack_cache_size=0:glibc.malloc.arena_max=1",
        )],
    );
    q.wait_ready(Duration::from_secs(20));
    let v = Verifier::start(&dir.path().join("steady.sock"));
    let cycle = |i: usize| {
        let (b, d) = (format!("b{}", i % 3), format!("d{}", i % 3));
        let driver = if i.is_multiple_of(2) {
            "malloc"
        } else {
            "null"
        };
        q.ok(
            "bdev_create",
            json!({"name": b, "driver": driver, "size": "4M"}),
        );
        q.ok(
            "vhost_blk_create",
            json!({"name": d, "bdev": b, "socket": format!("{d}.sock"), "num_queues": 2}),
        );
        assert!(dir.path().join(format!("{d}.sock")).exists());
        q.ok("vhost_blk_delete", json!({"name": d}));
        q.ok("bdev_delete", json!({"name": b}));
    };
    // warm up: allocator arenas and lazily grown tables settle
    for i in 0..50 {
        cycle(i);
    }
    let pid = q.pid().expect("running");
    let before = settled_counts(pid);
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let t = Instant::now();
    for i in 0..1000 {
        cycle(i);
    }
    let el = t.elapsed();
    let after = settled_counts(pid);
    let maps_after = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    if after != before {
        for l in maps_after.lines().filter(|l| !maps_before.contains(l)) {
            eprintln!("new mapping: {l}");
        }
        for l in maps_before.lines().filter(|l| !maps_after.contains(l)) {
            eprintln!("gone mapping: {l}");
        }
        eprintln!(
            "threads: {:?}",
            std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d
                .flatten()
                .map(|e| std::fs::read_to_string(e.path().join("comm")).unwrap_or_default())
                .collect::<Vec<_>>())
        );
    }
    let ops = v.finish();
    assert!(ops > 0, "the neighbour did no I/O");
    assert_eq!(before, after, "resources leaked over 1000 cycles");
    assert_eq!(names(&q.ok("bdev_list", json!({}))), vec!["steady"]);
    assert_eq!(names(&q.ok("vhost_blk_list", json!({}))), vec!["steady"]);
    eprintln!("1000 cycles (4000 calls) in {el:?}; neighbour verified {ops} blocks");
    assert!(q.stop());
}

/// Garbage, truncated JSON, huge lines, unknown methods, wrong parameter
/// types, batches and notifications: each gets its JSON-RPC error (or,
/// for a notification, nothing), the connection serves on, and data on a
/// running device still verifies. A client that sends half a line and
/// stops delays no other client.
#[test]
fn bad_requests_get_json_rpc_errors_and_nothing_else_notices() {
    let dir = disk_tempdir("quern-badrpc");
    let mut q = QuernProcess::start(dir.path(), BASE);
    q.wait_ready(Duration::from_secs(20));
    let v = Verifier::start(&dir.path().join("steady.sock"));
    let s = UnixStream::connect(q.mgmt_socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut ask = |line: &str| -> Value {
        writeln!(w, "{line}").unwrap();
        let mut out = String::new();
        r.read_line(&mut out).unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let code = |v: &Value| v["error"]["code"].as_i64();
    assert_eq!(code(&ask("}{ not json")), Some(codes::PARSE_ERROR));
    assert_eq!(
        code(&ask(r#"{"jsonrpc":"2.0","method":"#)),
        Some(codes::PARSE_ERROR)
    );
    assert_eq!(code(&ask(r#"[]"#)), Some(codes::INVALID_REQUEST));
    assert_eq!(code(&ask(r#"42"#)), Some(codes::INVALID_REQUEST));
    assert_eq!(
        code(&ask(r#"{"jsonrpc":"1.0","id":1,"method":"version"}"#)),
        Some(codes::INVALID_REQUEST)
    );
    let e = ask(r#"{"jsonrpc":"2.0","id":2,"method":"frobnicate"}"#);
    assert_eq!(code(&e), Some(codes::METHOD_NOT_FOUND));
    assert_eq!(e["id"], 2);
    let e = ask(
        r#"{"jsonrpc":"2.0","id":"x","method":"bdev_create","params":{"name":"m","driver":"malloc","size":"4M","block_size":"big"}}"#,
    );
    assert_eq!(code(&e), Some(codes::INVALID_PARAMS));
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("block_size"),
        "{e}"
    );
    let e = ask(r#"{"jsonrpc":"2.0","id":3,"method":"bdev_create","params":[1,2]}"#);
    assert_eq!(code(&e), Some(codes::INVALID_PARAMS));
    // the same value refused in a TOML file is refused with the same reason
    let e = ask(
        r#"{"jsonrpc":"2.0","id":4,"method":"bdev_create","params":{"name":"m","driver":"malloc","size":"16Q"}}"#,
    );
    let msg = e["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("size:") && msg.contains("unknown unit"),
        "{msg}"
    );
    let toml =
        "[reactor]\ncores = [0]\n[[bdev]]\nname = \"m\"\ndriver = \"malloc\"\nsize = \"16Q\"\n";
    let file_err = quern::config::Config::parse(toml).unwrap_err().to_string();
    let reason = msg.split("size: ").nth(1).unwrap();
    assert!(file_err.ends_with(reason), "file: {file_err}\napi: {msg}");
    // a batch: answers for the requests, none for the notification
    let b = ask(
        r#"[{"jsonrpc":"2.0","id":10,"method":"version"},{"jsonrpc":"2.0","method":"version"},{"jsonrpc":"2.0","id":11,"method":"nope"}]"#,
    );
    let b = b.as_array().unwrap();
    assert_eq!(b.len(), 2);
    assert_eq!(b[0]["id"], 10);
    assert_eq!(code(&b[1]), Some(codes::METHOD_NOT_FOUND));
    // a huge line: an error, and that client is closed
    writeln!(w, "{}", "x".repeat(quern::mgmt::MAX_REQUEST_BYTES + 10)).ok();
    let mut out = String::new();
    r.read_line(&mut out).unwrap();
    assert!(out.contains("longer than"), "{out}");
    // half a line from one client does not hold up another
    let mut slow = UnixStream::connect(q.mgmt_socket()).unwrap();
    slow.write_all(br#"{"jsonrpc":"2.0","id":1,"meth"#).unwrap();
    let t = Instant::now();
    assert_eq!(
        q.ok("version", json!({}))["version"],
        env!("CARGO_PKG_VERSION")
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // ... and is told, after the line deadline, that its line is too slow
    slow.set_read_timeout(Some(quern::mgmt::LINE_DEADLINE * 2))
        .unwrap();
    let mut out = String::new();
    BufReader::new(slow).read_line(&mut out).unwrap();
    assert!(out.contains("must arrive whole"), "{out}");
    assert!(v.finish() > 0);
    assert!(q.stop());
}

/// The socket is its owner's alone unless the file names a group; every
/// mutating call is logged with the caller's pid and uid.
#[test]
fn the_socket_is_owner_only_and_changes_are_logged_with_the_caller() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = disk_tempdir("quern-perm");
    let mut q = QuernProcess::start(dir.path(), BASE);
    q.wait_ready(Duration::from_secs(20));
    let m = std::fs::metadata(q.mgmt_socket()).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    q.ok(
        "bdev_create",
        json!({"name": "x", "driver": "null", "size": "1M"}),
    );
    let me = std::process::id();
    assert!(
        q.log().contains("management call") && q.log().contains(&format!("pid={me}")),
        "{}",
        q.log()
    );
    assert!(q.stop());
    // a group: 0660, group-owned
    let cfg = BASE.to_string() + "[management]\ngroup = \"root\"\n";
    let dir2 = disk_tempdir("quern-perm2");
    let mut q2 = QuernProcess::start(dir2.path(), &cfg);
    q2.wait_ready(Duration::from_secs(20));
    let m = std::fs::metadata(q2.mgmt_socket()).unwrap();
    assert_eq!((m.permissions().mode() & 0o777, m.gid()), (0o660, 0));
    assert!(q2.stop());
    // a group that does not exist is refused by name
    let out = std::process::Command::new(quern_tests::quern_bin())
        .args(["check-config"])
        .arg({
            let p = dir2.path().join("bad.toml");
            std::fs::write(
                &p,
                BASE.replace("@DIR@", dir2.path().to_str().unwrap())
                    + "[management]\ngroup = \"no-such-group-q\"\n",
            )
            .unwrap();
            p
        })
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("management.group") && e.contains("no-such-group-q"),
        "{e}"
    );
}

/// The rule of the state directory: the file's objects seed it; after that
/// the state wins (a restart keeps run-time changes and ignores edits to
/// the file's objects); `--reset-state` starts from the file again.
#[test]
fn the_state_directory_wins_over_the_file_until_reset() {
    let dir = disk_tempdir("quern-state");
    let mut q = QuernProcess::start(dir.path(), BASE);
    q.wait_ready(Duration::from_secs(20));
    q.ok(
        "bdev_create",
        json!({"name": "runtime", "driver": "malloc", "size": "8M"}),
    );
    assert!(q.stop());
    // the file gains a bdev; the state does not have it
    let edited = BASE.replace("@DIR@", dir.path().to_str().unwrap())
        + "[[bdev]]\nname = \"edited\"\ndriver = \"null\"\nsize = \"1M\"\n";
    std::fs::write(&q.config, &edited).unwrap();
    q.restart();
    q.wait_ready(Duration::from_secs(20));
    assert_eq!(
        names(&q.ok("bdev_list", json!({}))),
        vec!["runtime", "steady"]
    );
    assert!(
        q.log().contains("come from the state directory"),
        "{}",
        q.log()
    );
    assert!(q.stop());
    q.restart_with(&["--reset-state"]);
    q.wait_ready(Duration::from_secs(20));
    assert_eq!(
        names(&q.ok("bdev_list", json!({}))),
        vec!["edited", "steady"]
    );
    // config_save is a file quern --config accepts, with the same objects
    let saved = q.ok("config_save", json!({}))["toml"]
        .as_str()
        .unwrap()
        .to_string();
    let c = quern::config::Config::parse(&saved).expect("config_save parses");
    let mut n: Vec<&str> = c.bdevs.iter().map(|b| b.name.as_str()).collect();
    n.sort();
    assert_eq!(n, vec!["edited", "steady"]);
    assert!(q.stop());
}

/// SIGKILL at random moments while a client creates and deletes: after
/// each restart the state loads, and holds every change that was answered
/// (and, of the one in flight when the kill came, all or nothing).
#[test]
fn sigkill_during_changes_leaves_a_state_that_loads_and_is_exact() {
    let dir = disk_tempdir("quern-kill");
    let mut q = QuernProcess::start(dir.path(), BASE);
    q.wait_ready(Duration::from_secs(20));
    let mut expected: std::collections::BTreeSet<String> = ["steady".to_string()].into();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..8 {
        let sock = q.mgmt_socket();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<(String, bool, bool)>();
        let s2 = stop.clone();
        let seed = next();
        let worker = std::thread::spawn(move || {
            let mut x = seed | 1;
            while !s2.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let name = format!("k{}", x % 6);
                let create = x & 64 != 0;
                // tell the main thread what is being tried before trying it
                let _ = tx.send((name.clone(), create, false));
                let Ok(mut c) = quern::mgmt::Client::connect(&sock) else {
                    break;
                };
                let r = if create {
                    c.call(
                        "bdev_create",
                        json!({"name": name, "driver": "null", "size": "1M"}),
                    )
                } else {
                    c.call("bdev_delete", json!({"name": name}))
                };
                match r {
                    Ok(Ok(_)) => {
                        let _ = tx.send((name, create, true));
                    }
                    Ok(Err(_)) => {}
                    Err(_) => break,
                }
            }
        });
        std::thread::sleep(Duration::from_millis(30 + next() % 300));
        q.kill();
        stop.store(true, Ordering::Relaxed);
        let _ = worker.join();
        // the answered changes, and the one that was in flight
        let mut pending: Option<(String, bool)> = None;
        for (name, create, done) in rx.try_iter() {
            if done {
                if create {
                    expected.insert(name);
                } else {
                    expected.remove(&name);
                }
                pending = None;
            } else {
                pending = Some((name, create));
            }
        }
        q.restart();
        q.wait_ready(Duration::from_secs(20));
        let have: std::collections::BTreeSet<String> =
            names(&q.ok("bdev_list", json!({}))).into_iter().collect();
        let mut alt = expected.clone();
        if let Some((name, create)) = pending {
            if create {
                alt.insert(name);
            } else {
                alt.remove(&name);
            }
        }
        assert!(
            have == expected || have == alt,
            "round {round}: have {have:?}, expected {expected:?} or {alt:?}"
        );
        expected = have;
        // the state file is whole: it parses on its own
        let text = std::fs::read_to_string(dir.path().join("state.toml")).unwrap();
        assert!(text.contains("version = 1"), "{text}");
    }
    assert!(q.stop());
}

/// A QEMU guest attaches to a device created at run time and verifies
/// data on it; the device is then deleted with force, and the guest sees
/// its disk fail (fio reports I/O errors and the guest powers off), not
/// hang. The name and socket are free again at once.
#[test]
fn a_guest_uses_a_device_created_at_run_time_and_sees_a_forced_delete_fail_its_disk() {
    let dir = disk_tempdir("quern-ctl-guest");
    let mut q = QuernProcess::start(dir.path(), BASE);
    q.wait_ready(Duration::from_secs(20));
    q.ok(
        "bdev_create",
        json!({"name": "live", "driver": "uring", "path": "live.img", "size": "128M"}),
    );
    q.ok(
        "vhost_blk_create",
        json!({"name": "live", "bdev": "live", "socket": "live.sock", "num_queues": 2}),
    );
    let sock = dir.path().join("live.sock");
    let log = dir.path().join("console.log");
    let guest = {
        let (sock, log) = (sock.clone(), log.clone());
        std::thread::spawn(move || {
            run_guest(
                &sock,
                &[
                    "-a",
                    "quern.fio=verify-loop quern.secs=300 quern.size=16",
                    "-t",
                    "240",
                ],
                &log,
            )
        })
    };
    // a first pass verifies: the run-time device serves the guest
    let t = Instant::now();
    loop {
        let c = std::fs::read_to_string(&log).unwrap_or_default();
        if c.contains("QUERN-PASS=1 RC=0") {
            break;
        }
        assert!(
            !guest.is_finished() && t.elapsed() < Duration::from_secs(180),
            "no verified pass:\n{c}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let e = q
        .rpc("vhost_blk_delete", json!({"name": "live"}))
        .unwrap_err();
    assert_eq!(e.code, codes::IN_USE, "{}", e.message);
    let r = q.ok("vhost_blk_delete", json!({"name": "live", "force": true}));
    assert_eq!(r["frontend_was_attached"], true);
    assert!(!sock.exists(), "the socket is gone");
    // the guest's disk fails: fio stops with an error and the guest ends
    let t = Instant::now();
    let (passed, console) = guest.join().expect("guest thread");
    assert!(!passed, "fio passed on a deleted disk:\n{console}");
    assert!(
        console.contains("QUERN-GUEST-END"),
        "the guest hung:\n{console}"
    );
    assert!(!console.contains("QUERN-FIO-RC=0"), "{console}");
    assert!(
        t.elapsed() < Duration::from_secs(120),
        "took {:?}",
        t.elapsed()
    );
    // the name and the socket can be used again
    q.ok(
        "vhost_blk_create",
        json!({"name": "live", "bdev": "live", "socket": "live.sock"}),
    );
    assert!(sock.exists());
    assert!(q.stop());
}
