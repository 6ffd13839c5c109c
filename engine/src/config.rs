//! The TOML configuration file.
//!
//! Parsing is strict: unknown keys and wrong types are refused by serde with
//! the key's name and line; [`Config::validate`] then checks what types
//! cannot express (cores that exist, unique names, references, limits), and
//! names the offending key in every message. Nothing starts until the whole
//! file is valid.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub reactor: ReactorSection,
    #[serde(default)]
    pub merge: MergeSection,
    #[serde(default, rename = "bdev")]
    pub bdevs: Vec<BdevSection>,
    #[serde(default, rename = "vhost_blk")]
    pub vhost_blk: Vec<VhostBlkSection>,
    /// Where Quern keeps its state and, by default, created backing files.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub management: ManagementSection,
}

/// The management socket (statistics and bindings as JSON; `quern ctl`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagementSection {
    /// UNIX socket path (relative: under state_dir); empty disables it.
    #[serde(default = "default_mgmt_socket")]
    pub socket: PathBuf,
}

impl Default for ManagementSection {
    fn default() -> Self {
        ManagementSection {
            socket: default_mgmt_socket(),
        }
    }
}

fn default_mgmt_socket() -> PathBuf {
    PathBuf::from("quern.sock")
}

fn default_state_dir() -> PathBuf {
    std::env::temp_dir().join("quern")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReactorSection {
    pub cores: Vec<usize>,
    #[serde(default = "default_poll_mode")]
    pub poll_mode: String,
    #[serde(default = "default_idle_spin")]
    pub idle_spin_us: u64,
    /// Requests one reactor keeps in flight at most.
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    /// Most io_uring submissions per kernel entry (0: all of a cycle's).
    #[serde(default = "default_submit_batch")]
    pub submit_batch: usize,
}

fn default_poll_mode() -> String {
    "adaptive".into()
}
fn default_idle_spin() -> u64 {
    200
}
fn default_max_requests() -> usize {
    1024
}
fn default_submit_batch() -> usize {
    quern_bdev::engine::DEFAULT_SUBMIT_BATCH
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "default_max_segments")]
    pub max_segments: usize,
}

fn yes() -> bool {
    true
}
fn default_max_bytes() -> u64 {
    1 << 20
}
fn default_max_segments() -> usize {
    256
}

impl Default for MergeSection {
    fn default() -> Self {
        MergeSection {
            enabled: true,
            max_bytes: default_max_bytes(),
            max_segments: default_max_segments(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevSection {
    pub name: String,
    pub driver: String,
    /// uring: the file or block device (relative paths are under state_dir).
    pub path: Option<PathBuf>,
    /// Size: malloc/null capacity; uring: size of the file created when missing.
    pub size: Option<String>,
    #[serde(default = "yes")]
    pub direct: bool,
    #[serde(default)]
    pub read_only: bool,
    pub block_size: Option<u32>,
    /// uring: microseconds of latency added to every request (emulates
    /// slower storage; for tests and experiments).
    #[serde(default)]
    pub delay_us: u32,
    /// rbd: the Ceph pool.
    pub pool: Option<String>,
    /// rbd: the image in the pool.
    pub image: Option<String>,
    /// rbd: a snapshot of the image to open (read-only).
    pub snapshot: Option<String>,
    /// rbd: ceph.conf of the cluster (default /etc/ceph/ceph.conf).
    pub ceph_conf: Option<PathBuf>,
    /// rbd: the cephx user without `client.` (default `admin`).
    pub client_id: Option<String>,
    /// rbd: a keyring file (default: what ceph.conf says).
    pub keyring: Option<PathBuf>,
    /// rbd: connect, monitor and OSD operation timeout in seconds (default 10).
    pub timeout_secs: Option<u32>,
    /// qcow2: the name of an earlier bdev the overlay reads through to.
    pub base: Option<String>,
    /// qcow2: cluster size of a created image (default 64K).
    pub cluster_size: Option<String>,
    /// qcow2: copy clusters read from the base into the overlay.
    #[serde(default)]
    pub copy_on_read: bool,
}

/// Keys only the rbd driver takes.
const RBD_KEYS: [&str; 7] = [
    "pool",
    "image",
    "snapshot",
    "ceph_conf",
    "client_id",
    "keyring",
    "timeout_secs",
];

impl BdevSection {
    /// The rbd-only keys this section sets.
    fn rbd_keys_set(&self) -> impl Iterator<Item = &'static str> + '_ {
        let set = [
            self.pool.is_some(),
            self.image.is_some(),
            self.snapshot.is_some(),
            self.ceph_conf.is_some(),
            self.client_id.is_some(),
            self.keyring.is_some(),
            self.timeout_secs.is_some(),
        ];
        RBD_KEYS
            .into_iter()
            .zip(set)
            .filter_map(|(k, s)| s.then_some(k))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostBlkSection {
    pub name: String,
    pub bdev: String,
    /// UNIX socket QEMU connects to (relative paths are under state_dir).
    pub socket: PathBuf,
    #[serde(default = "one")]
    pub num_queues: u16,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Round-robin binding: queue i runs on cores[i % len] (default: every reactor core).
    pub cores: Option<Vec<usize>>,
    /// Explicit binding: queue i runs on queue_cores[i].
    pub queue_cores: Option<Vec<usize>>,
    #[serde(default)]
    pub read_only: bool,
    /// Serial number the guest reads (GET_ID), at most 20 bytes; default the name.
    pub serial: Option<String>,
}

fn one() -> u16 {
    1
}
fn default_queue_size() -> u16 {
    256
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let cfg = Self::load_unvalidated(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read and parse a file without checking it against this machine
    /// (cores, files, libraries): for `quern ctl`, which only needs the
    /// management socket's path and may run under another CPU affinity.
    pub fn load_unvalidated(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })
    }

    /// Parse and validate a configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = &self.reactor;
        if r.cores.is_empty() {
            return Err(invalid("reactor.cores", "must list at least one core"));
        }
        let avail = quern_reactor::available_cores();
        let mut seen = HashSet::new();
        for &c in &r.cores {
            if !avail.contains(&c) {
                return Err(invalid(
                    "reactor.cores",
                    format!("core {c} does not exist (this machine has cores {avail:?})"),
                ));
            }
            if !seen.insert(c) {
                return Err(invalid(
                    "reactor.cores",
                    format!("core {c} is listed twice"),
                ));
            }
        }
        r.poll_mode
            .parse::<quern_reactor::PollMode>()
            .map_err(|e| invalid("reactor.poll_mode", e))?;
        if r.max_requests == 0 || r.max_requests > 65536 {
            return Err(invalid(
                "reactor.max_requests",
                format!("{} is outside 1..=65536", r.max_requests),
            ));
        }
        if r.submit_batch > 65536 {
            return Err(invalid(
                "reactor.submit_batch",
                format!("{} is outside 0..=65536 (0: no limit)", r.submit_batch),
            ));
        }
        let m = &self.merge;
        if m.max_segments == 0 || m.max_segments > quern_bdev::IOV_MAX {
            return Err(invalid(
                "merge.max_segments",
                format!(
                    "{} is outside 1..={} (IOV_MAX)",
                    m.max_segments,
                    quern_bdev::IOV_MAX
                ),
            ));
        }
        if m.max_bytes < 4096 || m.max_bytes > 64 << 20 {
            return Err(invalid(
                "merge.max_bytes",
                format!("{} is outside 4096..=64 MiB", m.max_bytes),
            ));
        }
        let mut names = HashSet::new();
        for (i, b) in self.bdevs.iter().enumerate() {
            let key = |k: &str| format!("bdev[{i}].{k}");
            if b.name.is_empty() {
                return Err(invalid(key("name"), "must not be empty"));
            }
            if !names.insert(b.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("`{}` is used by another bdev", b.name),
                ));
            }
            let size = match &b.size {
                Some(s) => Some(quern_bdev::parse_size(s).map_err(|e| invalid(key("size"), e))?),
                None => None,
            };
            if let Some(bs) = b.block_size {
                if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
                    return Err(invalid(
                        key("block_size"),
                        format!("{bs} is not a power of two in 512..=65536"),
                    ));
                }
            }
            if b.delay_us > 0 && b.driver != "uring" {
                return Err(invalid(
                    key("delay_us"),
                    format!("only the uring driver takes delay_us, not {}", b.driver),
                ));
            }
            if b.delay_us > 10_000_000 {
                return Err(invalid(key("delay_us"), "at most 10000000 (10 s)"));
            }
            if b.driver != "rbd" {
                if let Some(k) = b.rbd_keys_set().next() {
                    return Err(invalid(
                        key(k),
                        format!("only the rbd driver takes `{k}` (driver is {})", b.driver),
                    ));
                }
            }
            match b.driver.as_str() {
                "rbd" => self.validate_rbd(b, &key)?,
                "malloc" | "null" => {
                    if b.path.is_some() {
                        return Err(invalid(
                            key("path"),
                            format!("the {} driver takes no path", b.driver),
                        ));
                    }
                    match size {
                        None => {
                            return Err(invalid(
                                key("size"),
                                format!("the {} driver needs a size", b.driver),
                            ))
                        }
                        Some(s) if s < u64::from(b.block_size.unwrap_or(512)) => {
                            return Err(invalid(key("size"), "must be at least one block"))
                        }
                        _ => {}
                    }
                }
                "uring" => {
                    let Some(p) = &b.path else {
                        return Err(invalid(key("path"), "the uring driver needs a path"));
                    };
                    let full = self.resolve(p);
                    if !full.exists() && size.is_none() {
                        return Err(invalid(
                            key("path"),
                            format!(
                                "{} does not exist (give `size` to have it created)",
                                full.display()
                            ),
                        ));
                    }
                    if !full.exists() && b.read_only {
                        return Err(invalid(
                            key("path"),
                            format!(
                                "{} does not exist and the bdev is read-only",
                                full.display()
                            ),
                        ));
                    }
                }
                "qcow2" => self.validate_qcow2(i, size)?,
                other => {
                    return Err(invalid(
                        key("driver"),
                        format!(
                            "unknown driver `{other}` (expected uring, rbd, qcow2, malloc or null)"
                        ),
                    ))
                }
            }
            if b.driver != "qcow2" {
                let given = [
                    ("base", b.base.is_some()),
                    ("cluster_size", b.cluster_size.is_some()),
                    ("copy_on_read", b.copy_on_read),
                ];
                if let Some((k, _)) = given.iter().find(|(_, g)| *g) {
                    return Err(invalid(key(k), "only the qcow2 driver takes this key"));
                }
            }
        }
        self.validate_vhost()
    }

    fn validate_rbd(
        &self,
        b: &BdevSection,
        key: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        if !cfg!(feature = "rbd") {
            return Err(invalid(
                key("driver"),
                "this quern was built without the rbd feature",
            ));
        }
        for (k, v) in [("path", b.path.is_some()), ("size", b.size.is_some())] {
            if v {
                return Err(invalid(key(k), format!("the rbd driver takes no {k}")));
            }
        }
        for (k, v) in [
            ("pool", &b.pool),
            ("image", &b.image),
            ("snapshot", &b.snapshot),
            ("client_id", &b.client_id),
        ] {
            match v {
                None if k == "pool" || k == "image" => {
                    return Err(invalid(key(k), format!("the rbd driver needs {k}")))
                }
                Some(s) if s.is_empty() => return Err(invalid(key(k), "must not be empty")),
                Some(s) if s.contains('\0') => {
                    return Err(invalid(key(k), "must not contain a NUL byte"))
                }
                _ => {}
            }
        }
        if b.image
            .as_deref()
            .is_some_and(|i| i.contains('@') || i.contains('/'))
        {
            return Err(invalid(
                key("image"),
                "must not contain `@` or `/` (give the snapshot as `snapshot`)",
            ));
        }
        if let Some(t) = b.timeout_secs {
            if !(1..=3600).contains(&t) {
                return Err(invalid(
                    key("timeout_secs"),
                    format!("{t} is outside 1..=3600"),
                ));
            }
        }
        for (k, p) in [("ceph_conf", &b.ceph_conf), ("keyring", &b.keyring)] {
            if let Some(p) = p {
                let full = self.resolve(p);
                if !full.is_file() {
                    return Err(invalid(
                        key(k),
                        format!("{} does not exist or is not a file", full.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A qcow2 overlay: a path, a base opened before it, a valid cluster
    /// size, and a size (if given) equal to the base's where that is known.
    fn validate_qcow2(&self, i: usize, size: Option<u64>) -> Result<(), ConfigError> {
        let b = &self.bdevs[i];
        let key = |k: &str| format!("bdev[{i}].{k}");
        if b.copy_on_read && b.read_only {
            return Err(invalid(
                key("copy_on_read"),
                "needs a writable overlay (read_only is set)",
            ));
        }
        let Some(p) = &b.path else {
            return Err(invalid(key("path"), "the qcow2 driver needs a path"));
        };
        if !self.resolve(p).exists() && b.read_only {
            return Err(invalid(
                key("path"),
                format!(
                    "{} does not exist and the bdev is read-only",
                    self.resolve(p).display()
                ),
            ));
        }
        if b.block_size.is_some() {
            return Err(invalid(
                key("block_size"),
                "a qcow2 overlay takes its block size from its base",
            ));
        }
        let Some(base) = &b.base else {
            return Err(invalid(key("base"), "the qcow2 driver needs a base bdev"));
        };
        if *base == b.name {
            return Err(invalid(
                key("base"),
                format!("`{base}` is this bdev itself"),
            ));
        }
        let Some(bb) = self.bdevs[..i].iter().find(|x| x.name == *base) else {
            let why = if self.bdevs.iter().any(|x| x.name == *base) {
                "is defined after this bdev (bdevs open in file order; move it up)"
            } else {
                "is not a bdev"
            };
            return Err(invalid(key("base"), format!("`{base}` {why}")));
        };
        if let Some(cs) = &b.cluster_size {
            let v = quern_bdev::parse_size(cs).map_err(|e| invalid(key("cluster_size"), e))?;
            if !v.is_power_of_two() || !(4096..=2 << 20).contains(&v) {
                return Err(invalid(
                    key("cluster_size"),
                    format!("{v} is not a power of two in 4K..=2M"),
                ));
            }
        }
        let base_size = match (bb.driver.as_str(), &bb.size) {
            ("malloc" | "null", Some(s)) => quern_bdev::parse_size(s).ok().map(|s| {
                let bs = u64::from(bb.block_size.unwrap_or(512));
                s - s % bs
            }),
            _ => None,
        };
        if let (Some(want), Some(have)) = (size, base_size) {
            if want != have {
                return Err(invalid(
                    key("size"),
                    format!("{want} differs from the size {have} of base `{base}`"),
                ));
            }
        }
        Ok(())
    }

    fn validate_vhost(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let mut sockets = HashSet::new();
        for (i, v) in self.vhost_blk.iter().enumerate() {
            let key = |k: &str| format!("vhost_blk[{i}].{k}");
            if v.name.is_empty() || !names.insert(v.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("`{}` is empty or used by another device", v.name),
                ));
            }
            if !self.bdevs.iter().any(|b| b.name == v.bdev) {
                return Err(invalid(key("bdev"), format!("no bdev named `{}`", v.bdev)));
            }
            if !sockets.insert(self.resolve(&v.socket)) {
                return Err(invalid(
                    key("socket"),
                    format!("{} is used by another device", v.socket.display()),
                ));
            }
            if self.management_socket() == Some(self.resolve(&v.socket)) {
                return Err(invalid(
                    key("socket"),
                    format!(
                        "{} is the management socket (management.socket)",
                        v.socket.display()
                    ),
                ));
            }
            if v.num_queues == 0 || v.num_queues > 64 {
                return Err(invalid(
                    key("num_queues"),
                    format!("{} is outside 1..=64", v.num_queues),
                ));
            }
            if !v.queue_size.is_power_of_two() || v.queue_size > 32768 {
                return Err(invalid(
                    key("queue_size"),
                    format!("{} is not a power of two up to 32768", v.queue_size),
                ));
            }
            if v.serial.as_ref().is_some_and(|s| s.len() > 20) {
                return Err(invalid(key("serial"), "is longer than 20 bytes"));
            }
            if v.cores.is_some() && v.queue_cores.is_some() {
                return Err(invalid(
                    key("queue_cores"),
                    "give either cores or queue_cores, not both",
                ));
            }
            for (k, list) in [("cores", &v.cores), ("queue_cores", &v.queue_cores)] {
                if let Some(list) = list {
                    if list.is_empty() {
                        return Err(invalid(key(k), "must not be empty"));
                    }
                    if let Some(c) = list.iter().find(|c| !self.reactor.cores.contains(c)) {
                        return Err(invalid(
                            key(k),
                            format!(
                                "core {c} has no reactor (reactor.cores = {:?})",
                                self.reactor.cores
                            ),
                        ));
                    }
                }
            }
            if let Some(q) = &v.queue_cores {
                if q.len() != v.num_queues as usize {
                    return Err(invalid(
                        key("queue_cores"),
                        format!("lists {} cores for {} queues", q.len(), v.num_queues),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reactor indices a device's queues bind to, in queue order (round
    /// robin) or one per queue (explicit).
    pub fn binding(&self, v: &VhostBlkSection) -> (bool, Vec<usize>) {
        let idx = |c: &usize| {
            self.reactor
                .cores
                .iter()
                .position(|x| x == c)
                .expect("validated")
        };
        match (&v.queue_cores, &v.cores) {
            (Some(q), _) => (true, q.iter().map(idx).collect()),
            (None, Some(c)) => (false, c.iter().map(idx).collect()),
            (None, None) => (false, (0..self.reactor.cores.len()).collect()),
        }
    }

    /// The management socket's path, if it is enabled.
    pub fn management_socket(&self) -> Option<PathBuf> {
        let p = &self.management.socket;
        (!p.as_os_str().is_empty()).then(|| self.resolve(p))
    }

    /// A path from the file, relative ones taken under `state_dir`.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.state_dir.join(p)
        }
    }
}
