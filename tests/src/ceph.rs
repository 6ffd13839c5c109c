//! A throw-away single-node Ceph cluster for tests (`tests/ceph/ceph-cluster.sh`).
//!
//! [`Cluster::start`] picks a free pair of loopback ports, starts one monitor
//! and one memstore OSD in a new temporary folder, and returns once pool
//! `rbd` takes images (about 2 s). Dropping the value stops the daemons and
//! removes the folder, so tests may run clusters in parallel.
//!
//! This file uses only std and tempfile, so other test crates can include
//! it with `#[path]` (the `quern` binary's tests do).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// Folders of the clusters this process runs, for [`stop_all`].
static RUNNING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Stop every cluster this process started (for a watchdog that ends the
/// process without running destructors).
pub fn stop_all() {
    let dirs = RUNNING.lock().map(|v| v.clone()).unwrap_or_default();
    for d in dirs {
        let _ = Command::new(script()).arg("stop").arg(&d).status();
    }
}

/// The cluster script, in the source tree.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("tests/ceph/ceph-cluster.sh")
}

/// A running cluster; stopped on drop.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// ceph.conf: pass it as `-c` to the CLI or as `ceph_conf` to Quern.
    pub conf: PathBuf,
    /// client.admin's keyring (ceph.conf names it too).
    pub keyring: PathBuf,
    /// The pool, ready for RBD images.
    pub pool: String,
    /// msgr v2 port of the monitor (v1 is the next one).
    pub mon_port: u16,
}

fn port_free(p: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
}

/// A port P with P and P+1 free, outside the ephemeral range, different for
/// each call in this process and likely different across processes.
fn pick_ports() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(2654435761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = 20000 + ((seed.wrapping_add(n.wrapping_mul(7919))) % 6000) as u16 * 2;
        if port_free(p) && port_free(p + 1) {
            return p;
        }
    }
}

impl Cluster {
    /// Start a cluster; panics (with the script's output) if Ceph cannot
    /// start: the tests that need it must fail, not skip.
    pub fn start() -> Cluster {
        let mut last = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("quern-ceph")
                .tempdir_in("/tmp")
                .expect("tempdir");
            let port = pick_ports();
            let out = Command::new(script())
                .arg("start")
                .arg(dir.path())
                .arg(port.to_string())
                .output()
                .expect("run ceph-cluster.sh");
            if out.status.success() {
                if let Ok(mut v) = RUNNING.lock() {
                    v.push(dir.path().to_path_buf());
                }
                let conf = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                assert!(conf.is_file(), "ceph-cluster.sh printed {conf:?}");
                return Cluster {
                    keyring: dir.path().join("keyring"),
                    conf,
                    dir,
                    pool: "rbd".into(),
                    mon_port: port,
                };
            }
            last = format!(
                "port {port}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // a port race with another cluster: try other ports
        }
        panic!("a Ceph cluster could not be started:\n{last}");
    }

    /// Stop the daemons (idempotent).
    pub fn stop(&self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
        if let Ok(mut v) = RUNNING.lock() {
            v.retain(|d| d != self.dir.path());
        }
    }

    /// Run the `rbd` CLI against this cluster.
    pub fn rbd(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("120")
            .arg("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run rbd")
    }

    /// Run `rbd` and panic with its output if it fails.
    pub fn rbd_ok(&self, args: &[&str]) -> String {
        let out = self.rbd(args);
        assert!(
            out.status.success(),
            "rbd {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `POOL/IMAGE`.
    pub fn spec(&self, image: &str) -> String {
        format!("{}/{}", self.pool, image)
    }

    /// Import a raw file as a new image.
    pub fn import(&self, file: &Path, image: &str) {
        self.rbd_ok(&[
            "import",
            "--no-progress",
            file.to_str().expect("utf-8 path"),
            &self.spec(image),
        ]);
    }

    /// Import `data` as a new image.
    pub fn import_bytes(&self, data: &[u8], image: &str) {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(data).expect("write image");
        f.flush().expect("flush image");
        self.import(f.path(), image);
    }

    /// The image's whole contents (`rbd export`; `image` may be `img@snap`).
    pub fn export(&self, image: &str) -> Vec<u8> {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        let path = f.path().to_str().expect("utf-8 path").to_string();
        drop(f);
        self.rbd_ok(&["export", "--no-progress", &self.spec(image), &path]);
        let v = std::fs::read(&path).expect("read export");
        let _ = std::fs::remove_file(&path);
        v
    }

    /// sha256 of the image's contents, as `sha256sum` prints it.
    pub fn sha256(&self, image: &str) -> String {
        let out = Command::new("bash")
            .arg("-c")
            .arg(r#"set -o pipefail; timeout 120 rbd -c "$1" export --no-progress "$2" - | sha256sum"#)
            .arg("sh")
            .arg(&self.conf)
            .arg(self.spec(image))
            .output()
            .expect("run rbd export | sha256sum");
        assert!(
            out.status.success(),
            "rbd export {image} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// Create a snapshot `image@snap`.
    pub fn snap_create(&self, image: &str, snap: &str) {
        self.rbd_ok(&["snap", "create", &format!("{}@{snap}", self.spec(image))]);
    }

    /// QEMU's name for an image (or `img@snap`) of this cluster.
    pub fn qemu_spec(&self, image: &str) -> String {
        format!("rbd:{}:conf={}", self.spec(image), self.conf.display())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// sha256 of a byte string, as hex (via `sha256sum`).
pub fn sha256_bytes(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("feed sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
