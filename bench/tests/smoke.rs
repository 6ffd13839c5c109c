//! Every benchmark entry point runs, in a smoke mode (tiny sizes, a second
//! or less), so that a change that breaks one fails the test suite instead
//! of rotting until someone next measures. Nothing here checks a figure:
//! benchmarks measure, tests check that they run and report.
//!
//! The smoke runs measure nothing, so they run beside the other tests; the
//! one test of `compare`'s refusal to measure beside another backend uses a
//! decoy process of its own.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The `quern` binary cargo built beside the benchmarks (`cargo test
/// --workspace` builds it for the engine's own tests).
fn quern_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_vhost-bench"))
        .parent()
        .expect("target dir")
        .join("quern");
    assert!(
        p.exists(),
        "{} missing: cargo build --release -p quern",
        p.display()
    );
    p
}

fn disk_tempdir() -> tempfile::TempDir {
    // /var/tmp: O_DIRECT needs a disk, /tmp may be tmpfs
    tempfile::Builder::new()
        .prefix("quern-bench-smoke")
        .tempdir_in("/var/tmp")
        .expect("tempdir")
}

fn show(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn merge_bench_runs() {
    let o = Command::new(env!("CARGO_BIN_EXE_merge-bench"))
        .args(["--requests", "20000", "--cpu", "0"])
        .output()
        .expect("run merge-bench");
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    // one row per batch size, with figures in it
    assert!(out.contains("|  1024 |"), "{}", show(&o));
}

#[test]
fn uring_bench_runs_against_fio() {
    let dir = disk_tempdir();
    let o = Command::new(env!("CARGO_BIN_EXE_uring-bench"))
        .arg("--file")
        .arg(dir.path().join("disk.img"))
        .args([
            "--size",
            "16M",
            "--runtime",
            "1",
            "--cpu",
            "1",
            "--only",
            "randread",
        ])
        .output()
        .expect("run uring-bench");
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("| randread qd32 | quern |"), "{}", show(&o));
    assert!(out.contains("| randread qd32 | fio |"), "{}", show(&o));
    assert!(out.contains("quern/fio IOPS"), "{}", show(&o));
}

#[test]
fn uring_bench_reports_a_bad_file_as_an_error() {
    // a directory is not a file: a message and a failure, not a panic
    let dir = disk_tempdir();
    let o = Command::new(env!("CARGO_BIN_EXE_uring-bench"))
        .arg("--file")
        .arg(dir.path())
        .args(["--size", "16M", "--runtime", "1", "--no-fio"])
        .output()
        .expect("run uring-bench");
    assert!(!o.status.success(), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("uring-bench: "), "{}", show(&o));
    assert!(err.contains("Is a directory"), "{}", show(&o));
    assert!(!err.contains("panicked"), "{}", show(&o));
}

fn compare(out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhost-bench"))
        .current_dir(root())
        .arg("compare")
        .arg(root().join("bench/jobs/randread-4k-qd32.fio"))
        .arg("--out")
        .arg(out)
        .arg("--quern")
        .arg(quern_bin())
        .arg("--smoke")
        .args(extra)
        .env_remove("SPDK_VHOST")
        .env_remove("SPDK_RPC")
        .output()
        .expect("run vhost-bench compare")
}

fn summary(out: &Path, name: &str) -> Value {
    let p = out.join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .expect("summary JSON")
}

#[test]
fn vhost_bench_compares_quern_with_qemu_storage_daemon_on_null_devices() {
    let dir = disk_tempdir();
    let o = compare(dir.path(), &["--null", "--backends", "quern,qsd,spdk"]);
    assert!(o.status.success(), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    // SPDK is not part of the project: skipped with a message
    assert!(err.contains("skipping spdk"), "{}", show(&o));
    let s = summary(dir.path(), "randread-4k-qd32-null-summary.json");
    let ratios = s["ratios"].as_object().expect("ratios");
    // every qemu-storage-daemon row is labelled with its version
    let qsd: Vec<&String> = ratios
        .keys()
        .filter(|k| k.starts_with("quern-busy-mergeon/qsd-"))
        .collect();
    assert!(!qsd.is_empty(), "{}", show(&o));
    for k in qsd {
        let iops = ratios[k]["IOPS"]["median"].as_f64().expect("IOPS ratio");
        assert!(iops.is_finite() && iops > 0.0, "{k}: {iops}");
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("| quern-busy-mergeon | 1 |"),
        "{}",
        show(&o)
    );
    assert!(dir
        .path()
        .join("randread-4k-qd32-null-latency.svg")
        .exists());
    // nothing left running
    assert!(
        quern_bench::proc::running_backends(&[])
            .iter()
            .all(|(pid, _)| !is_child_of_test(*pid, dir.path())),
        "a backend outlived compare"
    );
}

/// Whether `pid` was started with `dir` in its command line (one of the
/// backends this test's compare started).
fn is_child_of_test(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(dir.to_str().unwrap_or("?")))
        .unwrap_or(false)
}

#[test]
fn vhost_bench_compares_quern_with_fio_on_a_file() {
    let dir = disk_tempdir();
    let file = dir.path().join("disk.img");
    let o = compare(
        dir.path(),
        &[
            "--file",
            file.to_str().expect("utf-8"),
            "--size",
            "16M",
            "--backends",
            "quern,fio,fio-spin",
        ],
    );
    assert!(o.status.success(), "{}", show(&o));
    let s = summary(dir.path(), "randread-4k-qd32-file-summary.json");
    for peer in ["fio", "fio-spin"] {
        let r = s["ratios"][format!("quern-busy-mergeon/{peer}")]["IOPS"]["median"]
            .as_f64()
            .unwrap_or_else(|| panic!("no quern/{peer} ratio: {}", show(&o)));
        assert!(r > 0.0, "{}", show(&o));
    }
}

#[test]
fn vhost_bench_compare_refuses_to_measure_beside_another_backend() {
    let dir = disk_tempdir();
    // a decoy named like a backend, idle: compare must refuse all the same
    let decoy = dir.path().join("quern");
    std::fs::copy("/bin/sleep", &decoy).expect("copy sleep");
    let mut child = Command::new(&decoy).arg("30").spawn().expect("decoy");
    let o = Command::new(env!("CARGO_BIN_EXE_vhost-bench"))
        .arg("compare")
        .arg(root().join("bench/jobs/randread-4k-qd1.fio"))
        .arg("--out")
        .arg(dir.path())
        .arg("--quern")
        .arg(quern_bin())
        .args(["--null", "--backends", "quern", "--runtime", "1"])
        .output()
        .expect("run vhost-bench");
    let _ = child.kill();
    let _ = child.wait();
    assert!(!o.status.success(), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("still running"), "{}", show(&o));
    assert!(err.contains(&format!("pid {}", child.id())), "{}", show(&o));
    // and nothing was measured
    assert!(!dir
        .path()
        .join("randread-4k-qd1-null-summary.json")
        .exists());
}

/// Start `quern` in `dir` with one device, `dev.sock`, on one bdev whose
/// keys (after `name`) are `bdev`; `reactor`: more `[reactor]` lines.
/// Returns once the socket exists (or after 5 s).
fn start_quern(dir: &Path, reactor: &str, bdev: &str) -> (std::process::Child, PathBuf) {
    let sock = dir.join("dev.sock");
    let cfg = dir.join("quern.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{d}\"\n[reactor]\ncores = [1]\n{reactor}\
             [[bdev]]\nname = \"b\"\n{bdev}\n\
             [[vhost_blk]]\nname = \"dev\"\nbdev = \"b\"\nsocket = \"{s}\"\n",
            d = dir.display(),
            s = sock.display()
        ),
    )
    .expect("config");
    let quern = Command::new(quern_bin())
        .arg("--config")
        .arg(&cfg)
        .stderr(std::fs::File::create(dir.join("quern.log")).expect("log"))
        .spawn()
        .expect("start quern");
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    (quern, sock)
}

/// `vhost-bench run` of `bench/jobs/JOB` against `sock` for `runtime` s.
fn vhost_bench_run(job: &str, sock: &Path, runtime: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vhost-bench"));
    c.arg("run")
        .arg(root().join("bench/jobs").join(job))
        .arg("--socket")
        .arg(sock)
        .args(["--runtime", runtime]);
    c
}

#[test]
fn vhost_bench_run_and_idle_drive_a_read_only_device() {
    // a read-only device offers VIRTIO_BLK_F_RO: read jobs must open it
    // read-only (rbd-bench serves its image so)
    let dir = disk_tempdir();
    let (mut quern, sock) = start_quern(
        dir.path(),
        "",
        "driver = \"malloc\"\nsize = \"16M\"\nread_only = true",
    );
    let run = vhost_bench_run("randread-4k-qd32.fio", &sock, "1")
        .output()
        .expect("vhost-bench run");
    let idle = Command::new(env!("CARGO_BIN_EXE_vhost-bench"))
        .arg("idle")
        .arg("--socket")
        .arg(&sock)
        .args(["--pid", &quern.id().to_string(), "--secs", "1"])
        .output()
        .expect("vhost-bench idle");
    // a write job against it fails with a message, not a panic
    let write = vhost_bench_run("randwrite-4k-qd1.fio", &sock, "1")
        .output()
        .expect("vhost-bench run");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(quern.id() as i32, libc::SIGTERM) };
    let _ = quern.wait();
    assert!(run.status.success(), "{}", show(&run));
    let v: Value = serde_json::from_slice(&run.stdout).expect("fio-style JSON");
    assert!(
        v["jobs"][0]["read"]["iops"].as_f64().unwrap_or(0.0) > 0.0,
        "{}",
        show(&run)
    );
    assert!(idle.status.success(), "{}", show(&idle));
    let v: Value = serde_json::from_slice(&idle.stdout).expect("idle JSON");
    assert!(v["backend_cpu_secs"].is_number(), "{}", show(&idle));
    assert!(!write.status.success(), "{}", show(&write));
    let err = String::from_utf8_lossy(&write.stderr);
    assert!(err.starts_with("vhost-bench: "), "{}", show(&write));
    assert!(!err.contains("panicked"), "{}", show(&write));
}

/// A backend that stops answering (here stopped with SIGSTOP) ends `run`
/// with a message and exit status 1 instead of hanging the benchmark:
/// mid-run with a polling client, mid-run with a sleeping one (which
/// blocks with no timeout: the watchdog ends it), and in the vhost-user
/// handshake.
#[test]
fn vhost_bench_run_gives_up_on_a_backend_that_stops_answering() {
    let dir = disk_tempdir();
    let (mut quern, sock) = start_quern(
        dir.path(),
        "poll_mode = \"interrupt\"\n",
        "driver = \"null\"\nsize = \"16M\"",
    );
    let pid = quern.id() as i32;
    let cfg = dir.path().join("quern.toml");
    let completed = || {
        let o = Command::new(quern_bin())
            .args(["ctl", "--config"])
            .arg(&cfg)
            .args(["rpc", "stats"])
            .output()
            .expect("quern ctl");
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        v["devices"][0]["queues"][0]["completed"]
            .as_u64()
            .unwrap_or(0)
    };
    let mut outcomes = Vec::new();
    for case in ["sleeping", "polling", "handshake"] {
        let before = completed();
        if case == "handshake" {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        let mut run = vhost_bench_run("randread-4k-qd1.fio", &sock, "60");
        run.env("QUERN_BENCH_STUCK_SECS", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if case == "sleeping" {
            run.arg("--wait");
        }
        let child = run.spawn().expect("vhost-bench run");
        if case != "handshake" {
            // stopped once it serves the run
            let t = std::time::Instant::now();
            while completed() <= before && t.elapsed().as_secs() < 30 {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        let t = std::time::Instant::now();
        let o = child.wait_with_output().expect("vhost-bench run");
        let took = t.elapsed();
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        outcomes.push((case, o, took));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = quern.wait();
    for (case, o, took) in outcomes {
        assert!(!o.status.success(), "{case}: {}", show(&o));
        assert!(took.as_secs() < 20, "{case}: {took:?}: {}", show(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        let expect = if case == "polling" {
            "unanswered for 1 s"
        } else {
            "the backend answered nothing for 1 s"
        };
        assert!(err.contains(expect), "{case}: {}", show(&o));
        assert!(!err.contains("panicked"), "{case}: {}", show(&o));
    }
}

#[test]
fn rbd_bench_runs_on_a_test_ceph() {
    let dir = disk_tempdir();
    // a port pair of its own, clear of the other tests' clusters
    let port = (0..200)
        .map(|i| 27000 + 2 * i)
        .find(|p| {
            std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
        })
        .expect("a free port pair");
    let o = Command::new(root().join("bench/rbd-bench.sh"))
        .args(["--smoke", "--port", &port.to_string(), "--out"])
        .arg(dir.path().join("rbd"))
        .env("QUERN", quern_bin())
        .env("VHOST_BENCH", env!("CARGO_BIN_EXE_vhost-bench"))
        .output()
        .expect("run rbd-bench.sh");
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for case in [
        "quern 4k randread QD32 merge on",
        "quern 64k seqread QD32 merge off",
        "rbd bench 4k randread QD32",
    ] {
        assert!(out.contains(case), "{case}:\n{}", show(&o));
    }
}

/// The metrics-cost comparison: Quern with histograms and a QoS limit
/// that never binds against Quern with neither, in one run.
#[test]
fn vhost_bench_compares_quern_metered_with_bare() {
    let dir = disk_tempdir();
    let o = compare(
        dir.path(),
        &["--null", "--backends", "quern-metered,quern-bare"],
    );
    assert!(o.status.success(), "{}", show(&o));
    let s = summary(dir.path(), "randread-4k-qd32-null-summary.json");
    let r = &s["ratios"]["quern-busy-mergeon-metered/quern-busy-mergeon-bare"];
    let iops = r["IOPS"]["median"]
        .as_f64()
        .unwrap_or_else(|| panic!("{s}"));
    assert!(iops.is_finite() && iops > 0.0, "{s}");
    // the metered run's configuration really had both on
    let cfg = std::fs::read_to_string(dir.path().join("quern.toml")).unwrap();
    assert!(
        cfg.contains("histograms = false"),
        "the last run is the bare one:\n{cfg}"
    );
}

/// Two flavors interleaved in short windows (`--interleave-ms`), with a
/// polling and with a sleeping client: both rounds run, each backend is
/// measured in its windows, the IOPS and client CPU ratios are printed; a
/// third backend is refused with a message.
#[test]
fn vhost_bench_interleaves_two_quern_flavors_in_short_windows() {
    let dir = disk_tempdir();
    let o = compare(
        dir.path(),
        &[
            "--null",
            "--backends",
            "quern-metered,quern-bare",
            "--interleave-ms",
            "10",
        ],
    );
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    // smoke: two rounds of one pair
    assert!(
        out.contains("| quern-busy-mergeon-metered | 2 |")
            && out.contains("| quern-busy-mergeon-bare | 2 |"),
        "{}",
        show(&o)
    );
    assert!(
        out.contains(
            "quern-busy-mergeon-metered/quern-busy-mergeon-bare: IOPS, median of 2 rounds"
        ),
        "{}",
        show(&o)
    );
    // the polling client's CPU per I/O is compared as well (in the rounds
    // where both sides counted requests: a 10 ms window on a loaded
    // machine can count none)
    assert!(
        out.contains("the polling client's CPU per I/O, median of "),
        "{}",
        show(&o)
    );
    // a sleeping client, interleaved the same way
    let o = compare(
        dir.path(),
        &[
            "--null",
            "--client-wait",
            "--backends",
            "quern,quern-noevidx",
            "--interleave-ms",
            "10",
        ],
    );
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("| quern-busy-mergeon-noevidx | 2 |")
            && out.contains("the sleeping client's CPU per I/O, median of "),
        "{}",
        show(&o)
    );
    let o = compare(
        dir.path(),
        &[
            "--null",
            "--backends",
            "quern,quern-metered,quern-bare",
            "--interleave-ms",
            "10",
        ],
    );
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("compares two backends, not 3"),
        "{}",
        show(&o)
    );
}

/// A build against another build (`--quern-base`, here the same binary,
/// in a flavor) with a sleeping client: both run, the summary has their
/// ratio, and the client's mode is in the header; a missing base and an
/// unknown flavor are messages.
#[test]
fn vhost_bench_compares_a_build_with_a_base_build_and_a_sleeping_client() {
    let dir = disk_tempdir();
    let base = quern_bin();
    let o = compare(
        dir.path(),
        &[
            "--null",
            "--client-wait",
            "--backends",
            "quern,quern-base-noevidx",
            "--quern-base",
            base.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("client=waiting"),
        "{}",
        show(&o)
    );
    let s = summary(dir.path(), "randread-4k-qd32-null-summary.json");
    let r = &s["ratios"]["quern-busy-mergeon/quern-base-busy-mergeon-noevidx"];
    let iops = r["IOPS"]["median"]
        .as_f64()
        .unwrap_or_else(|| panic!("{s}"));
    assert!(iops.is_finite() && iops > 0.0, "{s}");

    let o = compare(
        dir.path(),
        &[
            "--null",
            "--backends",
            "quern-base",
            "--quern-base",
            "/nonexistent/quern",
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("--quern-base /nonexistent/quern does not exist"),
        "{}",
        show(&o)
    );

    let o = compare(
        dir.path(),
        &[
            "--null",
            "--backends",
            "quern-base-fast",
            "--quern-base",
            base.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unknown backend quern-base-fast"),
        "{}",
        show(&o)
    );
}

#[test]
fn qos_bench_runs() {
    let dir = disk_tempdir();
    let o = Command::new(env!("CARGO_BIN_EXE_qos-bench"))
        .current_dir(root())
        .args(["--smoke", "--quern"])
        .arg(quern_bin())
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("run qos-bench");
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "| iops |",
        "| write_bps |",
        "iops 5000 → 2000",
        "neighbour loaded/alone",
        "neighbour loaded/alone in windows: median of 2 pairs",
        "QoS targets:",
    ] {
        assert!(out.contains(needle), "no `{needle}`:\n{}", show(&o));
    }
}

#[test]
fn control_bench_runs() {
    let dir = disk_tempdir();
    let o = Command::new(env!("CARGO_BIN_EXE_control-bench"))
        .current_dir(root())
        .args([
            "--smoke", "--runs", "3", "--pairs", "1", "--secs", "2", "--quern",
        ])
        .arg(quern_bin())
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("run control-bench");
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("| bdev_create | qcow2 | 3 |"), "{}", show(&o));
    // the neighbour: one pair, read also on the busy run's timeline
    assert!(out.contains("| 0 | quiet first |"), "{}", show(&o));
    assert!(
        out.contains("on the busy runs' timelines") && out.contains("within the busy runs: p99"),
        "{}",
        show(&o)
    );
}

#[test]
fn path_bench_runs() {
    let o = Command::new(env!("CARGO_BIN_EXE_path-bench"))
        .arg("--smoke")
        .output()
        .expect("run path-bench");
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for v in [
        "| 1 | bare |",
        "| 32 | histograms+qos |",
        "| 32 | dirty-log |",
    ] {
        assert!(out.contains(v), "no `{v}`:\n{}", show(&o));
    }
}
