//! Helpers for the end-to-end tests: a Quern engine started in-process from
//! a TOML text, and the guest scripts in `tests/guest/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use quern::config::Config;
use quern::startup::Engine;

pub mod ceph;

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
    pub engine: Engine,
    pub dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.engine.stop();
    }
}

/// Start Quern from a configuration text in which `@DIR@` stands for a new
/// temporary folder (on disk, so O_DIRECT works).
pub fn start(config: &str) -> Running {
    let dir = tempfile::Builder::new()
        .prefix("quern-e2e")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let text = config.replace("@DIR@", dir.path().to_str().expect("utf-8 path"));
    let cfg = Config::parse(&text).expect("valid configuration");
    let engine = Engine::start(&cfg).expect("engine starts");
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
