//! A `quern` process for the benchmarks that drive its management API
//! (control-bench, qos-bench): started on a configuration text under a
//! fresh state directory, stopped with SIGTERM when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quern::mgmt::Client;
use serde_json::Value;

pub struct QuernChild {
    child: Child,
    /// The state directory (devices' sockets are relative to it).
    pub dir: PathBuf,
    /// The management socket.
    pub socket: PathBuf,
}

impl QuernChild {
    /// Start `quern` (`cpus`: a taskset list such as "1" or "0,1") on
    /// `config`, where `@DIR@` stands for the state directory
    /// `out/state` (emptied first); wait until the management socket
    /// answers and `ready` exists under the state directory.
    pub fn start(
        quern: &Path,
        out: &Path,
        cpus: &str,
        config: &str,
        ready: &str,
    ) -> Result<QuernChild, String> {
        if !quern.exists() {
            return Err(format!(
                "{} missing: cargo build --release -p quern",
                quern.display()
            ));
        }
        let dir = out.join("state");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cfg = out.join("quern.toml");
        std::fs::write(&cfg, config.replace("@DIR@", &dir.display().to_string()))
            .map_err(|e| format!("{}: {e}", cfg.display()))?;
        let log = out.join("quern.log");
        let child = Command::new("taskset")
            .args(["-c", cpus])
            .arg(quern)
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?)
            .spawn()
            .map_err(|e| format!("start {}: {e}", quern.display()))?;
        crate::watchdog::adopt(child.id());
        let q = QuernChild {
            child,
            socket: dir.join("quern.sock"),
            dir,
        };
        let t = Instant::now();
        while !q.dir.join(ready).exists() || Client::connect(&q.socket).is_err() {
            if t.elapsed() > Duration::from_secs(20) {
                return Err(format!("quern did not start (see {})", log.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(q)
    }

    pub fn client(&self) -> Result<Client, String> {
        Client::connect(&self.socket).map_err(|e| format!("{}: {e}", self.socket.display()))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for QuernChild {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        crate::watchdog::disown(self.child.id());
    }
}

/// Call a management method; a refusal is an error naming the call.
pub fn call(c: &mut Client, m: &str, p: Value) -> Result<Value, String> {
    c.call(m, p.clone())
        .map_err(|e| format!("{m}: {e}"))?
        .map_err(|e| format!("{m} {p}: {}", e.message))
}
