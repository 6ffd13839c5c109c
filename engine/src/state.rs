//! The state directory: what the engine was told to have (bdevs, QoS
//! groups, devices and their limits)
//! kept in `<state_dir>/state.toml`, in the configuration file's own
//! format, so that it survives a restart and a SIGKILL at any moment.
//!
//! Every change is written whole to a temporary file, fsynced, renamed over
//! `state.toml`, and the folder fsynced: after a crash the file holds the
//! state before the change or after it, never half of one.
//!
//! How it combines with the configuration file: the file's `[[bdev]]` and
//! `[[vhost_blk]]` tables seed a state directory that has no `state.toml`
//! yet; from then on the state directory is what the engine has, and
//! changes come through the management API. The file keeps deciding the
//! engine's settings (reactors, merging, the management socket).
//! `quern --config FILE --reset-state` starts from the file's objects again.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{BdevSection, ConfigError, QosGroupSection, VhostBlkSection};

/// The version of `state.toml`'s layout this engine writes and reads.
pub const STATE_VERSION: u32 = 1;

/// Everything the state directory keeps.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Persisted {
    pub version: u32,
    /// Latency histograms as switched at run time
    /// (`metrics_set_histograms`); absent: as the file's `[metrics]` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histograms: Option<bool>,
    #[serde(default, rename = "bdev", skip_serializing_if = "Vec::is_empty")]
    pub bdevs: Vec<BdevSection>,
    #[serde(default, rename = "qos_group", skip_serializing_if = "Vec::is_empty")]
    pub qos_groups: Vec<QosGroupSection>,
    #[serde(default, rename = "vhost_blk", skip_serializing_if = "Vec::is_empty")]
    pub vhost_blk: Vec<VhostBlkSection>,
    /// The VMs Quern knows, with their disk maps.
    #[serde(default, rename = "vm", skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<quern_vm::VmRecord>,
}

/// One process's hold on a state directory: `<state_dir>/lock`, locked
/// with `flock` for as long as this lives (the kernel lets go when the
/// process dies, SIGKILL included). Two engines on one state directory
/// would overwrite each other's `state.toml` and take each other's
/// sockets, so the second one is refused.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    pub fn acquire(dir: &Path) -> std::io::Result<StateLock> {
        use std::io::{Read, Seek};
        let path = dir.join("lock");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if !crate::sys::try_lock_exclusive(&f)? {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!(
                    "in use by another quern{}; stop it first, or give this one its own state_dir",
                    if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {pid})")
                    }
                ),
            ));
        }
        // who holds it, for the message above (not needed for the lock)
        f.set_len(0)?;
        f.rewind()?;
        writeln!(f, "{}", std::process::id())?;
        Ok(StateLock { _file: f })
    }
}

/// `state.toml` in one state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: &Path) -> Self {
        StateStore {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("state.toml")
    }

    /// The kept state, if there is one.
    pub fn load(&self) -> Result<Option<Persisted>, ConfigError> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let p: Persisted = crate::config::from_toml(&text, &path)?;
        if p.version != STATE_VERSION {
            return Err(ConfigError::Parse {
                path,
                message: format!(
                    "version {} is not the {STATE_VERSION} this quern reads",
                    p.version
                ),
            });
        }
        Ok(Some(p))
    }

    /// Make `p` the kept state, durably (write, fsync, rename, fsync the
    /// folder).
    pub fn save(&self, p: &Persisted) -> std::io::Result<()> {
        let text = toml::to_string(p).map_err(std::io::Error::other)?;
        let tmp = self.dir.join("state.toml.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(b"# Quern's state: what it was told to have. Written by quern;\n")?;
        f.write_all(b"# change it through the management API (quern ctl), not by hand.\n")?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, self.path())?;
        crate::sys::sync_dir(&self.dir)
    }

    /// Forget the kept state (for `--reset-state`).
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        crate::sys::sync_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Driver, Size};

    #[test]
    fn saved_state_loads_back_and_a_missing_one_is_none() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        assert_eq!(s.load().unwrap(), None);
        let p = Persisted {
            version: STATE_VERSION,
            histograms: Some(true),
            bdevs: vec![BdevSection {
                size: Some(Size::Text("16M".into())),
                ..BdevSection::new("m", Driver::Malloc)
            }],
            qos_groups: vec![],
            vhost_blk: vec![],
            vms: vec![],
        };
        s.save(&p).unwrap();
        assert_eq!(s.load().unwrap(), Some(p));
        assert!(!d.path().join("state.toml.tmp").exists());
        s.remove().unwrap();
        assert_eq!(s.load().unwrap(), None);
    }

    #[test]
    fn another_version_is_refused_with_its_number() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("state.toml"), "version = 7\n").unwrap();
        let e = StateStore::new(d.path()).load().unwrap_err().to_string();
        assert!(e.contains("version 7"), "{e}");
    }
}
