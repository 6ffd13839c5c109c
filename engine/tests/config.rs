//! Configuration errors, each checked by its message, and the binary's
//! start, check and clean stop on the bundled default configuration.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quern::config::Config;

const BASE: &str = r#"
[reactor]
cores = [0]
[[bdev]]
name = "m0"
driver = "malloc"
size = "16M"
"#;

fn err(text: &str) -> String {
    match Config::parse(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn base_is_valid_and_defaults_apply() {
    let c = Config::parse(BASE).unwrap();
    assert_eq!(c.reactor.poll_mode, quern_reactor::PollMode::Adaptive);
    assert!(c.merge.enabled);
    assert_eq!(c.merge.max_bytes, 1 << 20);
    assert_eq!(c.reactor.submit_batch, 4);
}

#[test]
fn unknown_key_is_named() {
    let e = err(&format!("{BASE}\nbogus_key = 1\n"));
    assert!(e.contains("bogus_key"), "{e}");
    let e = err(&BASE.replace("cores = [0]", "cores = [0]\nspin = 3"));
    assert!(e.contains("spin"), "{e}");
}

#[test]
fn wrong_type_is_named() {
    let e = err(&BASE.replace("cores = [0]", "cores = \"zero\""));
    assert!(e.contains("cores") || e.contains("invalid type"), "{e}");
    let e = err(&format!("{BASE}\n[merge]\nenabled = \"yes\"\n"));
    assert!(e.contains("enabled") || e.contains("invalid type"), "{e}");
}

#[test]
fn missing_core_is_refused() {
    let e = err(&BASE.replace("cores = [0]", "cores = [0, 4096]"));
    assert!(
        e.contains("reactor.cores") && e.contains("core 4096 does not exist"),
        "{e}"
    );
    let e = err(&BASE.replace("cores = [0]", "cores = [0, 0]"));
    assert!(e.contains("listed twice"), "{e}");
    let e = err(&BASE.replace("cores = [0]", "cores = []"));
    assert!(e.contains("at least one core"), "{e}");
}

#[test]
fn bad_poll_mode_is_refused() {
    let e = err(&BASE.replace("cores = [0]", "cores = [0]\npoll_mode = \"lazy\""));
    assert!(e.contains("reactor.poll_mode") && e.contains("lazy"), "{e}");
}

#[test]
fn submit_batch_is_bounded() {
    let c = Config::parse(&BASE.replace("cores = [0]", "cores = [0]\nsubmit_batch = 0")).unwrap();
    assert_eq!(c.reactor.submit_batch, 0);
    let e = err(&BASE.replace("cores = [0]", "cores = [0]\nsubmit_batch = 70000"));
    assert!(
        e.contains("reactor.submit_batch") && e.contains("70000"),
        "{e}"
    );
    let e = err(&BASE.replace("cores = [0]", "cores = [0]\nsubmit_batch = -1"));
    assert!(e.contains("submit_batch"), "{e}");
}

#[test]
fn duplicate_bdev_names_are_refused() {
    let e = err(&format!(
        "{BASE}\n[[bdev]]\nname = \"m0\"\ndriver = \"null\"\nsize = \"1G\"\n"
    ));
    assert!(
        e.contains("bdev[1].name") && e.contains("`m0` is used by another bdev"),
        "{e}"
    );
}

#[test]
fn missing_backing_file_is_refused() {
    let e = err(&format!(
        "{BASE}\n[[bdev]]\nname = \"u\"\ndriver = \"uring\"\npath = \"/nonexistent/q.img\"\n"
    ));
    assert!(
        e.contains("bdev[1].path") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn driver_and_size_errors_are_named() {
    let e = err(&BASE.replace("\"malloc\"", "\"floppy\""));
    assert!(e.contains("bdev[0].driver") && e.contains("floppy"), "{e}");
    let e = err(&BASE.replace("\"16M\"", "\"16Q\""));
    assert!(
        e.contains("bdev[0].size") && e.contains("unknown unit"),
        "{e}"
    );
    let e = err(&BASE.replace("size = \"16M\"", ""));
    assert!(
        e.contains("bdev[0].size") && e.contains("needs a size"),
        "{e}"
    );
}

#[test]
fn merge_limits_are_checked() {
    let e = err(&format!("{BASE}\n[merge]\nmax_segments = 5000\n"));
    assert!(
        e.contains("merge.max_segments") && e.contains("IOV_MAX"),
        "{e}"
    );
    let e = err(&format!("{BASE}\n[merge]\nmax_bytes = 10\n"));
    assert!(e.contains("merge.max_bytes"), "{e}");
}

/// SIGKILL a child process when dropped (a test that panics).
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

const OVERLAY: &str = r#"
[[bdev]]
name = "ov"
driver = "qcow2"
path = "/var/tmp/quern-config-test-never-created.qcow2"
base = "m0"
"#;

#[test]
fn qcow2_overlay_is_accepted_and_its_errors_named() {
    let c = Config::parse(&format!("{BASE}{OVERLAY}")).unwrap();
    assert_eq!(c.bdevs[1].base.as_deref(), Some("m0"));
    assert!(!c.bdevs[1].copy_on_read);
    let with = |extra: &str| format!("{BASE}{OVERLAY}{extra}\n");
    let e = err(&format!("{BASE}{}", OVERLAY.replace("base = \"m0\"", "")));
    assert!(
        e.contains("bdev[1].base") && e.contains("needs a base"),
        "{e}"
    );
    let e = err(&format!("{BASE}{}", OVERLAY.replace("\"m0\"", "\"ov\"")));
    assert!(
        e.contains("bdev[1].base") && e.contains("is this bdev itself"),
        "{e}"
    );
    let e = err(&format!("{BASE}{}", OVERLAY.replace("\"m0\"", "\"m9\"")));
    assert!(
        e.contains("bdev[1].base") && e.contains("`m9` is not a bdev"),
        "{e}"
    );
    let later = format!(
        "{BASE}{}\n[[bdev]]\nname = \"m1\"\ndriver = \"malloc\"\nsize = \"16M\"\n",
        OVERLAY.replace("\"m0\"", "\"m1\"")
    );
    let e = err(&later);
    assert!(
        e.contains("bdev[1].base") && e.contains("defined after this bdev"),
        "{e}"
    );
    let e = err(&with("cluster_size = \"3K\""));
    assert!(
        e.contains("bdev[1].cluster_size") && e.contains("power of two"),
        "{e}"
    );
    let e = err(&with("cluster_size = \"4M\""));
    assert!(e.contains("bdev[1].cluster_size"), "{e}");
    let e = err(&with("size = \"32M\""));
    assert!(
        e.contains("bdev[1].size") && e.contains("differs from the size 16777216 of base `m0`"),
        "{e}"
    );
    assert!(Config::parse(&with("size = \"16M\"\ncluster_size = \"4K\"")).is_ok());
    let e = err(&format!("{BASE}{}", OVERLAY.replace("path = ", "#")));
    assert!(
        e.contains("bdev[1].path") && e.contains("needs a path"),
        "{e}"
    );
    let e = err(&with("copy_on_read = true\nread_only = true"));
    assert!(e.contains("bdev[1].copy_on_read"), "{e}");
    let e = err(&BASE.replace("size = \"16M\"", "size = \"16M\"\nbase = \"x\""));
    assert!(
        e.contains("bdev[0].base") && e.contains("only the qcow2 driver"),
        "{e}"
    );
}

fn quern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quern"))
}

fn example() -> String {
    format!("{}/../examples/quern.toml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_config_accepts_the_default_and_names_errors() {
    let out = quern().args(["check-config", &example()]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[reactor]\ncores = [0]\ncolour = \"blue\"\n").unwrap();
    let out = quern()
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("colour"), "{msg}");
    let out = quern().args(["--frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The README's first command: the bundled default configuration serves a
/// working two-queue vhost-user-blk disk; a real client (libblkio) writes and
/// reads it back; SIGTERM stops Quern cleanly.
#[test]
fn runs_the_default_config_serves_a_disk_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::Builder::new()
        .prefix("quern-default")
        .tempdir_in("/var/tmp")
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let text = std::fs::read_to_string(example())
        .unwrap()
        .replace("/tmp/quern", dir.path().to_str().unwrap())
        .replace("127.0.0.1:9469", &metrics);
    let cfg = dir.path().join("quern.toml");
    std::fs::write(&cfg, text).unwrap();
    let child = quern()
        .args(["--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // a failed assertion must not leave quern running (and holding pipes)
    let guard = KillOnDrop(child.id() as i32);
    let sock = dir.path().join("vm0-disk0.sock");
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        sock.exists(),
        "the default config serves its vhost-user-blk socket"
    );
    assert_eq!(
        std::fs::metadata(dir.path().join("disk0.img"))
            .unwrap()
            .len(),
        1 << 30
    );
    {
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", sock.to_str().unwrap()).unwrap();
        b.connect().unwrap();
        b.set_i32("num-queues", 2).unwrap();
        let mut queues = b.start().unwrap().queues;
        assert_eq!(b.get_u64("capacity").unwrap(), 1 << 30);
        let region = b.alloc_mem_region(1 << 20).unwrap();
        b.map_mem_region(&region).unwrap();
        // SAFETY: the region is ours, 1 MiB long.
        let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, 1 << 20) };
        for (i, x) in mem[..65536].iter_mut().enumerate() {
            *x = (i % 253) as u8;
        }
        let wait = |q: &mut blkio::Blkioq| {
            let mut c = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
            let mut to = Duration::from_secs(10);
            assert_eq!(q.do_io(&mut c, 1, Some(&mut to), None).unwrap(), 1);
            // SAFETY: do_io filled one completion.
            unsafe { c[0].assume_init_read() }.ret
        };
        queues[0].write(
            1 << 20,
            mem.as_mut_ptr(),
            65536,
            1,
            blkio::ReqFlags::empty(),
        );
        assert_eq!(wait(&mut queues[0]), 0);
        queues[1].read(
            1 << 20,
            mem[65536..].as_mut_ptr(),
            65536,
            2,
            blkio::ReqFlags::empty(),
        );
        assert_eq!(wait(&mut queues[1]), 0);
        assert!(mem[..65536] == mem[65536..131072]);

        // the management socket shows each queue's reactor and counts
        let ctl = |args: &[&str]| {
            let out = quern()
                .args(["ctl", "--config", cfg.to_str().unwrap()])
                .args(args)
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        };
        let (code, text) = ctl(&["--json", "vhost_blk_list"]);
        assert_eq!(code, Some(0), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let q = &v[0]["queues"];
        assert_eq!(v[0]["name"], "vm0-disk0");
        assert_eq!(v[0]["connected"], true, "{text}");
        assert_eq!(q.as_array().unwrap().len(), 2);
        assert!(
            q[0]["reactor"].is_u64() && q[1]["reactor"].is_u64(),
            "{text}"
        );
        assert_ne!(q[0]["reactor"], q[1]["reactor"], "{text}");
        assert_eq!(q[0]["completed"], 1, "{text}");
        assert_eq!(q[1]["completed"], 1, "{text}");
        // and so does the Prometheus endpoint
        let scrape = || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(&metrics).unwrap();
            write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let text = scrape();
        for line in [
            "quern_requests_total{device=\"vm0-disk0\",queue=\"0\",op=\"write\"} 1",
            "quern_requests_total{device=\"vm0-disk0\",queue=\"1\",op=\"read\"} 1",
            "quern_request_bytes_total{device=\"vm0-disk0\",queue=\"1\",op=\"read\"} 65536",
        ] {
            assert!(text.contains(line), "no `{line}` in:\n{text}");
        }
        // latency histograms are off by default, and switched on at run
        // time (the requests before that are not in them)
        assert!(
            !text.contains("quern_request_duration_seconds_count{"),
            "{text}"
        );
        let (code, text) = ctl(&["--json", "metrics_set_histograms", "--enabled", "true"]);
        assert_eq!(code, Some(0), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v, serde_json::json!({"histograms": true, "was": false}));
        let text = scrape();
        let line =
            "quern_request_duration_seconds_count{device=\"vm0-disk0\",queue=\"0\",op=\"write\"} 0";
        assert!(text.contains(line), "no `{line}` in:\n{text}");
        let (code, text) = ctl(&["--json", "stats"]);
        assert_eq!(code, Some(0));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["bdevs"].as_array().unwrap().len(), 2, "{text}");
        assert_eq!(v["reactors"].as_array().unwrap().len(), 2, "{text}");
        assert!(
            v["reactors"][0]["ios_completed"].as_u64().unwrap() >= 1,
            "{text}"
        );
        // the human table
        let (code, text) = ctl(&["vhost_blk_list"]);
        assert_eq!(code, Some(0));
        assert!(
            text.starts_with("NAME") && text.contains("vm0-disk0") && text.contains("attached"),
            "{text}"
        );
        // ctl needs only the socket's path: it works under an affinity
        // that excludes the configured reactor cores (a benchmark client
        // pinned to one core asking about reactors on others)
        let first = quern_reactor::available_cores()[0].to_string();
        let out = std::process::Command::new("taskset")
            .args(["-c", &first])
            .arg(env!("CARGO_BIN_EXE_quern"))
            .args(["ctl", "--config", cfg.to_str().unwrap(), "reactor_list"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // an unknown method: the server's message, exit status 1
        let (code, text) = ctl(&["rpc", "frobnicate"]);
        assert_eq!(code, Some(1));
        assert!(
            text.contains("unknown method `frobnicate`") && text.contains("-32601"),
            "{text}"
        );
        // clients beyond the limit are told so; the others stay served
        {
            use std::io::{BufRead, Write};
            let version = r#"{"jsonrpc":"2.0","id":1,"method":"version"}"#;
            let held: Vec<_> = (0..quern::mgmt::MAX_CLIENTS)
                .map(|_| {
                    std::os::unix::net::UnixStream::connect(dir.path().join("quern.sock")).unwrap()
                })
                .collect();
            // each held client has its thread once it answers a request
            for s in &held {
                let mut s = s.try_clone().unwrap();
                writeln!(s, "{version}").unwrap();
                let mut line = String::new();
                std::io::BufReader::new(s).read_line(&mut line).unwrap();
                assert!(line.contains("version"), "{line}");
            }
            let s = std::os::unix::net::UnixStream::connect(dir.path().join("quern.sock")).unwrap();
            let mut line = String::new();
            std::io::BufReader::new(s).read_line(&mut line).unwrap();
            assert!(
                line.contains("management clients at once") && line.contains("-32004"),
                "{line}"
            );
            drop(held);
        }
        let t = Instant::now();
        while ctl(&["version"]).0 != Some(0) {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "clients were not released"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    std::mem::forget(guard);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("quern running") && log.contains("quern stopped"),
        "{log}"
    );
    assert!(log.contains("queue bound to reactor"), "{log}");
    assert!(
        log.contains("queue statistics") && log.contains("completed=1"),
        "{log}"
    );
}

#[test]
fn start_up_failure_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("q.toml");
    // a directory is not a block device or file: refused at start, clean exit 1
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}/state\"\n[reactor]\ncores = [0]\n[[bdev]]\nname = \"u\"\ndriver = \"uring\"\npath = \"{}\"\n",
            dir.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let out = quern()
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("bdev `u`"), "{log}");
}

/// A second quern with the same configuration is refused (its state
/// directory is held) and takes nothing from the first; a device socket
/// another process serves, or a path that is not a socket, is refused;
/// and a quern whose socket paths someone else took since still stops at
/// once on SIGTERM, leaving their sockets alone. (Stopping used to wake
/// its accept loops by connecting to the socket paths: with the paths
/// taken, SIGTERM never returned, and the stop removed the other
/// process's socket files.)
#[test]
fn a_second_quern_on_the_same_state_is_refused_and_stop_never_depends_on_socket_paths() {
    let dir = tempfile::Builder::new()
        .prefix("quern-second")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = dir.path();
    let config = |state: &str, socket: &str| {
        format!(
            "state_dir = \"{}/{state}\"\n[reactor]\ncores = [0]\n[[bdev]]\nname = \"m0\"\ndriver = \"malloc\"\nsize = \"16M\"\n[[vhost_blk]]\nname = \"d0\"\nbdev = \"m0\"\nsocket = \"{socket}\"\n",
            d.display()
        )
    };
    let dev = d.join("d0.sock");
    let first_cfg = d.join("first.toml");
    std::fs::write(&first_cfg, config("state", dev.to_str().unwrap())).unwrap();
    let first = quern()
        .args(["--config", first_cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(first.id() as i32);
    let mgmt = d.join("state/quern.sock");
    let t = Instant::now();
    while !(dev.exists() && mgmt.exists()) && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dev.exists() && mgmt.exists(), "the first quern serves");

    let second = |cfg: &str| {
        let p = d.join("second.toml");
        std::fs::write(&p, cfg).unwrap();
        let out = quern()
            .args(["--config", p.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // the same configuration: the state directory is held
    let (code, log) = second(&config("state", dev.to_str().unwrap()));
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("in use by another quern") && log.contains(&format!("pid {}", first.id())),
        "{log}"
    );
    // its own state directory, the first's device socket
    let (code, log) = second(&config("state2", dev.to_str().unwrap()));
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("served by another process"), "{log}");
    // a device socket path that names a file: refused, the file kept
    let image = d.join("image.raw");
    std::fs::write(&image, b"not a socket").unwrap();
    let (code, log) = second(&config("state3", image.to_str().unwrap()));
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("is not a socket"), "{log}");
    assert_eq!(std::fs::read(&image).unwrap(), b"not a socket");

    // the first still serves its disk
    {
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", dev.to_str().unwrap()).unwrap();
        b.connect().unwrap();
        b.start().unwrap();
        assert_eq!(b.get_u64("capacity").unwrap(), 16 << 20);
    }

    // someone else takes both of the first's socket paths
    std::fs::remove_file(&dev).unwrap();
    std::fs::remove_file(&mgmt).unwrap();
    let other_dev = std::os::unix::net::UnixListener::bind(&dev).unwrap();
    let other_mgmt = std::os::unix::net::UnixListener::bind(&mgmt).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let out = first.wait_with_output().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("quern stopped"), "{log}");
    // their sockets are still there
    assert!(dev.exists() && mgmt.exists(), "{log}");
    drop((other_dev, other_mgmt));
}
