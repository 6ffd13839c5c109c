//! Helpers for the end-to-end tests: a Quern engine started in-process from
//! a TOML text, and the guest scripts in `tests/guest/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod client;

use quern::config::Config;
use quern::engine::{Engine, StartOptions};

pub mod ceph;
pub mod prom;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Build (or reuse) the guest kernel and initramfs; returns their folder.
pub fn guest_dir() -> PathBuf {
    let dir = root().join("target/guest");
    let st = Command::new(root().join("tests/guest/build-guest.sh"))
        .arg(&dir)
        .status()
        .expect("run build-guest.sh");
    assert!(st.success(), "build-guest.sh failed");
    dir
}

/// A running engine and the temporary folder its files live in.
pub struct Running {
    pub engine: std::sync::Arc<Engine>,
    pub dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.engine.stop();
    }
}

/// A new temporary folder on disk (/var/tmp; /tmp may be tmpfs, which has
/// no O_DIRECT).
pub fn disk_tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .expect("tempdir")
}

/// Start Quern from a configuration text in which `@DIR@` stands for a new
/// temporary folder (on disk, so O_DIRECT works).
pub fn start(config: &str) -> Running {
    let dir = disk_tempdir("quern-e2e");
    let text = config.replace("@DIR@", dir.path().to_str().expect("utf-8 path"));
    let cfg = Config::parse(&text).expect("valid configuration");
    let engine = Engine::start(&cfg, StartOptions::default()).expect("engine starts");
    Running { engine, dir }
}

/// Boot the guest against `socket` with `args` for run-guest.sh; returns
/// (exit status success, console log).
pub fn run_guest(socket: &Path, args: &[&str], log: &Path) -> (bool, String) {
    let st = Command::new(root().join("tests/guest/run-guest.sh"))
        .arg("-g")
        .arg(guest_dir())
        .args(args)
        .arg("-l")
        .arg(log)
        .arg("--quiet")
        .arg(socket)
        .status()
        .expect("run run-guest.sh");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    (st.success(), text)
}

/// Boot the guest with its root filesystem on the disk at `socket`
/// (`tests/guest/build-rootfs.sh` image; `quern.token=TOKEN` is what it
/// writes), log the console under `dir`, check that it booted and finished
/// cleanly, and return the console.
pub fn boot_root(socket: &Path, dir: &Path, token: &str, timeout_secs: u32) -> String {
    let log = dir.join(format!("console-{token}.log"));
    let (_, console) = run_guest(
        socket,
        &[
            "-q",
            "1",
            "-a",
            &format!("root=/dev/vda quern.root=/dev/vda quern.token={token}"),
            "-t",
            &timeout_secs.to_string(),
            "--no-check",
        ],
        &log,
    );
    assert!(
        console.contains("QUERN-ROOT-BOOTED"),
        "the guest booted its root from the disk:\n{console}"
    );
    assert!(console.contains("QUERN-ROOT-END"), "{console}");
    assert!(!console.contains("QUERN-ERROR"), "{console}");
    console
}

/// Run `qemu-img` with `args`: its exit status and its output (stdout,
/// then stderr).
pub fn qemu_img(args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs (qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// The `quern` binary cargo built next to this test executable.
pub fn quern_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/quern
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("quern");
    assert!(
        p.exists(),
        "{} missing: `cargo test --workspace` builds it (or `cargo build -p quern`)",
        p.display()
    );
    p
}

/// The `quern` program run as a child process, so tests can SIGKILL it and
/// start it again on the same configuration and disks.
pub struct QuernProcess {
    pub dir: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    /// Starts so far; run n logs to `quern-<n>.log`.
    pub starts: u32,
    /// Environment for every start.
    env: Vec<(String, String)>,
}

impl QuernProcess {
    /// Write `config` (with `@DIR@` replaced by `dir`) and start quern on it.
    pub fn start(dir: &Path, config: &str) -> QuernProcess {
        Self::start_with_env(dir, config, &[])
    }

    /// [`QuernProcess::start`] with extra environment variables.
    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> QuernProcess {
        let path = dir.join("quern.toml");
        std::fs::write(&path, config.replace("@DIR@", dir.to_str().expect("utf-8")))
            .expect("write config");
        let mut p = QuernProcess {
            dir: dir.to_path_buf(),
            config: path,
            child: None,
            starts: 0,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        p.restart();
        p
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("quern-{}.log", self.starts))
    }

    /// The current run's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Start again (after `kill`), logging to a new file.
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// Wait until the current run's log contains `needle`.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.log().contains(needle) {
                return true;
            }
            if let Some(c) = &mut self.child {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("quern exited ({st}) early:\n{}", self.log());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The running quern's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Start with extra arguments (after `kill` or `stop`).
    pub fn restart_with(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "quern is still running");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let child = Command::new(quern_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn quern");
        self.child = Some(child);
    }

    /// The management socket (`quern.sock` under the state directory).
    pub fn mgmt_socket(&self) -> PathBuf {
        self.dir.join("quern.sock")
    }

    /// Call a management method (a new connection each time).
    pub fn rpc(
        &self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, quern::engine::ApiError> {
        let mut c = quern::mgmt::Client::connect(&self.mgmt_socket())
            .unwrap_or_else(|e| panic!("management socket: {e}\n{}", self.log()));
        c.call(method, params)
            .unwrap_or_else(|e| panic!("{method}: {e}\n{}", self.log()))
    }

    /// [`QuernProcess::rpc`] that must succeed.
    pub fn ok(&self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.rpc(method, params.clone())
            .unwrap_or_else(|e| panic!("{method} {params}: {e}\n{}", self.log()))
    }

    /// [`QuernProcess::rpc`] that must fail: its error.
    pub fn err(&self, method: &str, params: serde_json::Value) -> quern::engine::ApiError {
        match self.rpc(method, params.clone()) {
            Ok(v) => panic!("{method} {params} succeeded: {v}"),
            Err(e) => e,
        }
    }

    /// Wait until the management socket answers.
    pub fn wait_ready(&mut self, timeout: Duration) {
        assert!(
            self.wait_log("quern running", timeout),
            "quern did not start:\n{}",
            self.log()
        );
    }

    /// SIGKILL: no shutdown path runs, nothing is drained or flushed.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().map(|s| s.success()).unwrap_or(false)
    }
}

/// Open file descriptors, threads and memory mappings of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcCounts {
    pub fds: usize,
    pub threads: usize,
    pub maps: usize,
}

pub fn proc_counts(pid: u32) -> ProcCounts {
    let count = |p: String| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
    ProcCounts {
        fds: count(format!("/proc/{pid}/fd")),
        threads: count(format!("/proc/{pid}/task")),
        maps: std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map(|m| m.lines().count())
            .unwrap_or(0),
    }
}

impl Drop for QuernProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
