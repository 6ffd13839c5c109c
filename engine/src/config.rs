//! The TOML configuration, and the definitions the management API shares
//! with it.
//!
//! Parsing is strict and typed: unknown keys, wrong types and unknown
//! drivers or poll modes are refused by serde, with the key's path and
//! line. What types cannot express (cores that exist, unique names,
//! references between objects, limits) is checked by one function per
//! section, [`BdevSection::check`] and [`VhostBlkSection::check`], which
//! both the TOML and the API call: a value refused at start-up is refused
//! at run time with the same message, the key named before it (`bdev[2].size:`
//! in the file, `size:` in an API error).
//!
//! The same types describe the API's parameters (`bdev_create` takes a
//! `[[bdev]]` table's keys), serialize the running state back to TOML
//! (`config_save`, the state directory), and generate `rpc_list` and the
//! `quern ctl` subcommands through their JSON schemas.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use quern_reactor::PollMode;
pub use quern_vhost::qos::QosLimits;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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

impl ConfigError {
    /// The reason alone, without the key (for API errors that name the
    /// parameter themselves).
    pub fn reason(&self) -> String {
        match self {
            ConfigError::Invalid { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }
}

pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where Quern keeps its state and, by default, created backing files.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    pub reactor: ReactorSection,
    #[serde(default)]
    pub merge: MergeSection,
    #[serde(default)]
    pub management: ManagementSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default, rename = "bdev", skip_serializing_if = "Vec::is_empty")]
    pub bdevs: Vec<BdevSection>,
    #[serde(default, rename = "qos_group", skip_serializing_if = "Vec::is_empty")]
    pub qos_groups: Vec<QosGroupSection>,
    #[serde(default, rename = "vhost_blk", skip_serializing_if = "Vec::is_empty")]
    pub vhost_blk: Vec<VhostBlkSection>,
}

/// Measurements: latency histograms, and the Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Where to serve Prometheus metrics over HTTP: "host:port" (such as
    /// "127.0.0.1:9469") or "unix:PATH" (relative: under state_dir);
    /// absent: no endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Keep latency histograms (per device queue and operation, and per
    /// bdev); counters are kept either way. Off by default, as in SPDK and
    /// QEMU: they cost a clock reading per poll cycle that takes requests
    /// (2-3 % of IOPS at QD1 on a null device); `metrics_set_histograms`
    /// switches them at run time.
    #[serde(default)]
    pub histograms: bool,
}

/// Where the metrics endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

/// One `[[qos_group]]`: limits several devices share (QEMU's throttle
/// groups); also the parameters of `qos_group_create`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QosGroupSection {
    /// Unique group name.
    pub name: String,
    /// The limits its devices share, together.
    pub qos: QosLimits,
}

impl QosGroupSection {
    pub fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        check_name(&self.name).map_err(|r| invalid(format!("{prefix}name"), r))?;
        self.qos
            .check()
            .map_err(|r| invalid(format!("{prefix}qos"), r))
    }
}

/// The management socket (the JSON-RPC API; `quern ctl`).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ManagementSection {
    /// UNIX socket path (relative: under state_dir); empty disables it.
    #[serde(default = "default_mgmt_socket")]
    pub socket: PathBuf,
    /// A group whose members may use the socket too (mode 0660); without
    /// it the socket is the owner's alone (0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Default for ManagementSection {
    fn default() -> Self {
        ManagementSection {
            socket: default_mgmt_socket(),
            group: None,
        }
    }
}

fn default_mgmt_socket() -> PathBuf {
    PathBuf::from("quern.sock")
}

fn default_state_dir() -> PathBuf {
    std::env::temp_dir().join("quern")
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReactorSection {
    /// One reactor thread pinned to each listed core.
    pub cores: Vec<usize>,
    /// busy (never sleeps), adaptive (sleeps after idle_spin_us without
    /// work) or interrupt (sleeps whenever nothing is ready).
    #[serde(default = "default_poll_mode")]
    #[schemars(with = "PollModeName")]
    pub poll_mode: PollMode,
    /// Adaptive mode: idle time before sleeping.
    #[serde(default = "default_idle_spin")]
    pub idle_spin_us: u64,
    /// Requests one reactor keeps in flight at most (1..=65536).
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    /// Most io_uring submissions per kernel entry (0: all of a cycle's).
    #[serde(default = "default_submit_batch")]
    pub submit_batch: usize,
}

/// The poll modes, as the schema shows them (the reactor's own type has no
/// schema of its own).
#[derive(JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum PollModeName {
    Busy,
    Adaptive,
    Interrupt,
}

fn default_poll_mode() -> PollMode {
    PollMode::Adaptive
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

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeSection {
    /// Fuse touching requests of one poll cycle.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Largest fused request in bytes (4096..=64 MiB).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Most iovecs in a fused request (1..=1024).
    #[serde(default = "default_max_segments")]
    pub max_segments: usize,
}

fn yes() -> bool {
    true
}
fn no() -> bool {
    false
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

/// The drivers a bdev can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// A file or block device through the reactor's io_uring.
    Uring,
    /// A Ceph RBD image.
    Rbd,
    /// A copy-on-write overlay over another bdev.
    Qcow2,
    /// RAM.
    Malloc,
    /// No data: reads return whatever the buffer held, writes vanish.
    Null,
}

impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Driver::Uring => "uring",
            Driver::Rbd => "rbd",
            Driver::Qcow2 => "qcow2",
            Driver::Malloc => "malloc",
            Driver::Null => "null",
        };
        f.write_str(s)
    }
}

/// A size: bytes, or a text such as `64M`, `1G`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(t) => quern_bdev::parse_size(t),
        }
    }
}

/// One `[[bdev]]` table, and the parameters of `bdev_create`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BdevSection {
    /// Unique name.
    pub name: String,
    pub driver: Driver,
    /// uring, qcow2: the file or block device (relative: under state_dir);
    /// qcow2: the overlay image, created when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// malloc, null: the capacity; uring: the size of a file created when
    /// missing; qcow2: must equal the base's capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Size>,
    /// uring, qcow2: O_DIRECT (buffered where the filesystem refuses it).
    #[serde(default = "yes")]
    pub direct: bool,
    /// Refuse writes, discards and write-zeroes.
    #[serde(default = "no")]
    pub read_only: bool,
    /// Logical block size (default: the device's, or 512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// uring: microseconds of latency added to every request (emulates
    /// slower storage; for tests and experiments).
    #[serde(default)]
    pub delay_us: u32,
    /// rbd: the Ceph pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// rbd: the image in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// rbd: a snapshot of the image to open (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// rbd: ceph.conf of the cluster (default /etc/ceph/ceph.conf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph_conf: Option<PathBuf>,
    /// rbd: the cephx user without `client.` (default `admin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// rbd: a keyring file (default: what ceph.conf says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<PathBuf>,
    /// rbd: connect, monitor and OSD operation timeout in seconds (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
    /// qcow2: the bdev the overlay reads through to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// qcow2: cluster size of a created image (default 64K).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<Size>,
    /// qcow2: copy clusters read from the base into the overlay.
    #[serde(default = "no")]
    pub copy_on_read: bool,
}

/// What a bdev check needs to know of the others.
pub trait BdevScope {
    /// Whether a bdev of this name exists (`Some(false)`: it does, but is
    /// defined after the one being checked, which the file does not allow).
    fn bdev(&self, name: &str) -> Option<KnownBdev>;
    /// Paths are taken under it when relative.
    fn state_dir(&self) -> &Path;
}

/// A bdev another refers to: whether it comes earlier, and its capacity
/// where known without opening it.
#[derive(Clone, Copy, Debug)]
pub struct KnownBdev {
    pub earlier: bool,
    pub capacity: Option<u64>,
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

/// A path as the engine uses it: relative ones are under `state_dir`.
pub fn resolve_under(state_dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        state_dir.join(p)
    }
}

impl BdevSection {
    /// A section with every key at its default but the name and driver.
    pub fn new(name: &str, driver: Driver) -> Self {
        BdevSection {
            name: name.into(),
            driver,
            path: None,
            size: None,
            direct: true,
            read_only: false,
            block_size: None,
            delay_us: 0,
            pool: None,
            image: None,
            snapshot: None,
            ceph_conf: None,
            client_id: None,
            keyring: None,
            timeout_secs: None,
            base: None,
            cluster_size: None,
            copy_on_read: false,
        }
    }

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

    /// The capacity in bytes of a malloc or null bdev (known without
    /// opening it).
    pub fn known_capacity(&self) -> Option<u64> {
        match self.driver {
            Driver::Malloc | Driver::Null => {
                let s = self.size.as_ref()?.bytes().ok()?;
                let bs = u64::from(self.block_size.unwrap_or(512));
                Some(s - s % bs)
            }
            _ => None,
        }
    }

    /// Everything a bdev must satisfy that its types do not say. `prefix`
    /// comes before each key in messages (`bdev[2].` in the file).
    pub fn check(&self, prefix: &str, scope: &dyn BdevScope) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}{k}");
        check_name(&self.name).map_err(|r| invalid(key("name"), r))?;
        let size = match &self.size {
            Some(s) => Some(s.bytes().map_err(|e| invalid(key("size"), e))?),
            None => None,
        };
        if let Some(bs) = self.block_size {
            if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
                return Err(invalid(
                    key("block_size"),
                    format!("{bs} is not a power of two in 512..=65536"),
                ));
            }
        }
        if self.delay_us > 0 && self.driver != Driver::Uring {
            return Err(invalid(
                key("delay_us"),
                format!("only the uring driver takes delay_us, not {}", self.driver),
            ));
        }
        if self.delay_us > 10_000_000 {
            return Err(invalid(key("delay_us"), "at most 10000000 (10 s)"));
        }
        if self.driver != Driver::Rbd {
            if let Some(k) = self.rbd_keys_set().next() {
                return Err(invalid(
                    key(k),
                    format!(
                        "only the rbd driver takes `{k}` (driver is {})",
                        self.driver
                    ),
                ));
            }
        }
        if self.driver != Driver::Qcow2 {
            let given = [
                ("base", self.base.is_some()),
                ("cluster_size", self.cluster_size.is_some()),
                ("copy_on_read", self.copy_on_read),
            ];
            if let Some((k, _)) = given.iter().find(|(_, g)| *g) {
                return Err(invalid(key(k), "only the qcow2 driver takes this key"));
            }
        }
        match self.driver {
            Driver::Rbd => self.check_rbd(&key, scope),
            Driver::Malloc | Driver::Null => {
                if self.path.is_some() {
                    return Err(invalid(
                        key("path"),
                        format!("the {} driver takes no path", self.driver),
                    ));
                }
                match size {
                    None => Err(invalid(
                        key("size"),
                        format!("the {} driver needs a size", self.driver),
                    )),
                    Some(s) if s < u64::from(self.block_size.unwrap_or(512)) => {
                        Err(invalid(key("size"), "must be at least one block"))
                    }
                    _ => Ok(()),
                }
            }
            Driver::Uring => {
                let Some(p) = &self.path else {
                    return Err(invalid(key("path"), "the uring driver needs a path"));
                };
                let full = resolve_under(scope.state_dir(), p);
                if !full.exists() && size.is_none() {
                    return Err(invalid(
                        key("path"),
                        format!(
                            "{} does not exist (give `size` to have it created)",
                            full.display()
                        ),
                    ));
                }
                if !full.exists() && self.read_only {
                    return Err(invalid(
                        key("path"),
                        format!(
                            "{} does not exist and the bdev is read-only",
                            full.display()
                        ),
                    ));
                }
                Ok(())
            }
            Driver::Qcow2 => self.check_qcow2(&key, size, scope),
        }
    }

    fn check_rbd(
        &self,
        key: &dyn Fn(&str) -> String,
        scope: &dyn BdevScope,
    ) -> Result<(), ConfigError> {
        if !cfg!(feature = "rbd") {
            return Err(invalid(
                key("driver"),
                "this quern was built without the rbd feature",
            ));
        }
        for (k, v) in [("path", self.path.is_some()), ("size", self.size.is_some())] {
            if v {
                return Err(invalid(key(k), format!("the rbd driver takes no {k}")));
            }
        }
        for (k, v) in [
            ("pool", &self.pool),
            ("image", &self.image),
            ("snapshot", &self.snapshot),
            ("client_id", &self.client_id),
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
        if self
            .image
            .as_deref()
            .is_some_and(|i| i.contains('@') || i.contains('/'))
        {
            return Err(invalid(
                key("image"),
                "must not contain `@` or `/` (give the snapshot as `snapshot`)",
            ));
        }
        if let Some(t) = self.timeout_secs {
            if !(1..=3600).contains(&t) {
                return Err(invalid(
                    key("timeout_secs"),
                    format!("{t} is outside 1..=3600"),
                ));
            }
        }
        for (k, p) in [("ceph_conf", &self.ceph_conf), ("keyring", &self.keyring)] {
            if let Some(p) = p {
                let full = resolve_under(scope.state_dir(), p);
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
    fn check_qcow2(
        &self,
        key: &dyn Fn(&str) -> String,
        size: Option<u64>,
        scope: &dyn BdevScope,
    ) -> Result<(), ConfigError> {
        if self.copy_on_read && self.read_only {
            return Err(invalid(
                key("copy_on_read"),
                "needs a writable overlay (read_only is set)",
            ));
        }
        let Some(p) = &self.path else {
            return Err(invalid(key("path"), "the qcow2 driver needs a path"));
        };
        let full = resolve_under(scope.state_dir(), p);
        if !full.exists() && self.read_only {
            return Err(invalid(
                key("path"),
                format!(
                    "{} does not exist and the bdev is read-only",
                    full.display()
                ),
            ));
        }
        if self.block_size.is_some() {
            return Err(invalid(
                key("block_size"),
                "a qcow2 overlay takes its block size from its base",
            ));
        }
        let Some(base) = &self.base else {
            return Err(invalid(key("base"), "the qcow2 driver needs a base bdev"));
        };
        if *base == self.name {
            return Err(invalid(
                key("base"),
                format!("`{base}` is this bdev itself"),
            ));
        }
        let b = match scope.bdev(base) {
            Some(b) if b.earlier => b,
            Some(_) => {
                return Err(invalid(
                    key("base"),
                    format!(
                    "`{base}` is defined after this bdev (bdevs open in file order; move it up)"
                ),
                ))
            }
            None => return Err(invalid(key("base"), format!("`{base}` is not a bdev"))),
        };
        if let Some(cs) = &self.cluster_size {
            let v = cs.bytes().map_err(|e| invalid(key("cluster_size"), e))?;
            if !v.is_power_of_two() || !(4096..=2 << 20).contains(&v) {
                return Err(invalid(
                    key("cluster_size"),
                    format!("{v} is not a power of two in 4K..=2M"),
                ));
            }
        }
        if let (Some(want), Some(have)) = (size, b.capacity) {
            if want != have {
                return Err(invalid(
                    key("size"),
                    format!("{want} differs from the size {have} of base `{base}`"),
                ));
            }
        }
        Ok(())
    }
}

/// Names of bdevs and devices: what a shell, a path and a TOML key take
/// without quoting.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 64 {
        return Err(format!("`{name}` is longer than 64 bytes"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "`{}` contains {c:?}; use letters, digits, `-`, `_` and `.`",
            name.escape_debug()
        ));
    }
    Ok(())
}

/// One `[[vhost_blk]]` table, and the parameters of `vhost_blk_create`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VhostBlkSection {
    /// Unique device name.
    pub name: String,
    /// The bdev it serves.
    pub bdev: String,
    /// UNIX socket QEMU connects to (relative: under state_dir).
    pub socket: PathBuf,
    /// Queues offered (1..=64); the frontend may use fewer.
    #[serde(default = "one")]
    pub num_queues: u16,
    /// Largest virtqueue size a frontend may set (a power of two up to 32768).
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Round-robin binding: queue i runs on the reactor of cores[i % len]
    /// (default: every reactor core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<Vec<usize>>,
    /// Explicit binding: queue i runs on the reactor of queue_cores[i].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_cores: Option<Vec<usize>>,
    /// Offer VIRTIO_BLK_F_RO and fail writes.
    #[serde(default = "no")]
    pub read_only: bool,
    /// Offer VIRTIO_RING_F_EVENT_IDX (exact kick and interrupt
    /// suppression, for guests that sleep); false saves a polling client
    /// (a DPDK or SPDK initiator, libblkio polling) a fence per submission.
    #[serde(default = "yes")]
    pub event_idx: bool,
    /// The disk's identity, kept for ever (generated at creation when
    /// absent); a VM's map names disks by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Serial number the guest reads (GET_ID), at most 20 bytes; default
    /// the UUID's first 20 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The device's own QoS limits (absent or 0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<QosLimits>,
    /// A [[qos_group]] whose limits it shares with the group's other devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos_group: Option<String>,
}

fn one() -> u16 {
    1
}
fn default_queue_size() -> u16 {
    256
}

/// What a device check needs to know of the rest of the engine.
pub trait DeviceScope {
    fn has_bdev(&self, name: &str) -> bool;
    /// The reactor cores.
    fn cores(&self) -> &[usize];
    /// Sockets other devices and the management API listen on (resolved).
    fn socket_in_use(&self, path: &Path) -> Option<String>;
    fn state_dir(&self) -> &Path;
    fn has_qos_group(&self, name: &str) -> bool;
}

impl VhostBlkSection {
    /// Everything a device must satisfy that its types do not say.
    pub fn check(&self, prefix: &str, scope: &dyn DeviceScope) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}{k}");
        check_name(&self.name).map_err(|r| invalid(key("name"), r))?;
        if !scope.has_bdev(&self.bdev) {
            return Err(invalid(
                key("bdev"),
                format!("no bdev named `{}`", self.bdev),
            ));
        }
        if self.socket.as_os_str().is_empty() {
            return Err(invalid(key("socket"), "must not be empty"));
        }
        let sock = resolve_under(scope.state_dir(), &self.socket);
        if let Some(user) = scope.socket_in_use(&sock) {
            return Err(invalid(
                key("socket"),
                format!("{} is used by {user}", self.socket.display()),
            ));
        }
        if self.num_queues == 0 || self.num_queues > 64 {
            return Err(invalid(
                key("num_queues"),
                format!("{} is outside 1..=64", self.num_queues),
            ));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > 32768 {
            return Err(invalid(
                key("queue_size"),
                format!("{} is not a power of two up to 32768", self.queue_size),
            ));
        }
        if self.serial.as_ref().is_some_and(|s| s.len() > 20) {
            return Err(invalid(key("serial"), "is longer than 20 bytes"));
        }
        if let Some(u) = &self.uuid {
            uuid::Uuid::parse_str(u)
                .map_err(|e| invalid(key("uuid"), format!("`{u}` is not a UUID: {e}")))?;
        }
        if self.cores.is_some() && self.queue_cores.is_some() {
            return Err(invalid(
                key("queue_cores"),
                "give either cores or queue_cores, not both",
            ));
        }
        for (k, list) in [("cores", &self.cores), ("queue_cores", &self.queue_cores)] {
            if let Some(list) = list {
                if list.is_empty() {
                    return Err(invalid(key(k), "must not be empty"));
                }
                if let Some(c) = list.iter().find(|c| !scope.cores().contains(c)) {
                    return Err(invalid(
                        key(k),
                        format!(
                            "core {c} has no reactor (reactor.cores = {:?})",
                            scope.cores()
                        ),
                    ));
                }
            }
        }
        if let Some(q) = &self.queue_cores {
            if q.len() != self.num_queues as usize {
                return Err(invalid(
                    key("queue_cores"),
                    format!("lists {} cores for {} queues", q.len(), self.num_queues),
                ));
            }
        }
        if let Some(q) = &self.qos {
            q.check().map_err(|r| invalid(key("qos"), r))?;
        }
        if let Some(g) = &self.qos_group {
            if !scope.has_qos_group(g) {
                return Err(invalid(
                    key("qos_group"),
                    format!("no qos_group named `{g}`"),
                ));
            }
        }
        Ok(())
    }

    /// Reactor indices the device's queues bind to among `cores` (the
    /// reactor cores, in order): round robin, or one per queue (explicit).
    /// Only for a checked section (every core listed has a reactor).
    pub fn binding(&self, cores: &[usize]) -> quern_vhost::QueueBinding {
        let idx = |c: &usize| cores.iter().position(|x| x == c).unwrap_or(0);
        match (&self.queue_cores, &self.cores) {
            (Some(q), _) => quern_vhost::QueueBinding::Explicit(q.iter().map(idx).collect()),
            (None, Some(c)) => quern_vhost::QueueBinding::RoundRobin(c.iter().map(idx).collect()),
            (None, None) => quern_vhost::QueueBinding::RoundRobin((0..cores.len()).collect()),
        }
    }
}

/// A TOML text into `T`, errors naming the key's path and line.
pub fn from_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<T, ConfigError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        let inner = e.into_inner();
        let line = inner
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
        let mut message = inner.message().trim().to_string();
        if at != "." && !at.is_empty() {
            message = format!("{at}: {message}");
        }
        if let Some(l) = line {
            message = format!("line {l}: {message}");
        }
        ConfigError::Parse {
            path: path.into(),
            message,
        }
    })
}

/// The checks against the rest of a file: the bdevs before one, the
/// devices and sockets already seen.
struct FileScope<'a> {
    cfg: &'a Config,
    /// Index of the bdev being checked (later bdevs are "defined after").
    upto: usize,
    sockets: Vec<(PathBuf, String)>,
}

impl BdevScope for FileScope<'_> {
    fn bdev(&self, name: &str) -> Option<KnownBdev> {
        let i = self.cfg.bdevs.iter().position(|b| b.name == name)?;
        Some(KnownBdev {
            earlier: i < self.upto,
            capacity: self.cfg.bdevs[i].known_capacity(),
        })
    }
    fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }
}

impl DeviceScope for FileScope<'_> {
    fn has_bdev(&self, name: &str) -> bool {
        self.cfg.bdevs.iter().any(|b| b.name == name)
    }
    fn cores(&self) -> &[usize] {
        &self.cfg.reactor.cores
    }
    fn socket_in_use(&self, path: &Path) -> Option<String> {
        self.sockets
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, who)| who.clone())
    }
    fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }
    fn has_qos_group(&self, name: &str) -> bool {
        self.cfg.qos_groups.iter().any(|g| g.name == name)
    }
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
        from_toml(&text, path)
    }

    /// Parse and validate a configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = from_toml(text, Path::new("<config>"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The settings that are not objects (reactors, merging, management).
    pub fn validate_engine(&self) -> Result<(), ConfigError> {
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
        if let Some(g) = &self.management.group {
            if crate::sys::group_id(g).is_none() {
                return Err(invalid("management.group", format!("no group named `{g}`")));
            }
        }
        self.metrics_listen()?;
        Ok(())
    }

    /// Where the metrics endpoint listens, if anywhere.
    pub fn metrics_listen(&self) -> Result<Option<MetricsListen>, ConfigError> {
        let Some(l) = &self.metrics.listen else {
            return Ok(None);
        };
        if let Some(p) = l.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(invalid("metrics.listen", "unix: needs a path"));
            }
            return Ok(Some(MetricsListen::Unix(self.resolve(Path::new(p)))));
        }
        use std::net::ToSocketAddrs;
        let addr = l
            .to_socket_addrs()
            .map_err(|e| {
                invalid(
                    "metrics.listen",
                    format!("`{l}` is neither host:port nor unix:PATH ({e})"),
                )
            })?
            .next()
            .ok_or_else(|| invalid("metrics.listen", format!("`{l}` resolves to no address")))?;
        Ok(Some(MetricsListen::Tcp(addr)))
    }

    /// The whole file: engine settings, then every object in order.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_engine()?;
        let mut names = HashSet::new();
        for (i, b) in self.bdevs.iter().enumerate() {
            if !names.insert(b.name.as_str()) {
                return Err(invalid(
                    format!("bdev[{i}].name"),
                    format!("`{}` is used by another bdev", b.name),
                ));
            }
            let scope = FileScope {
                cfg: self,
                upto: i,
                sockets: Vec::new(),
            };
            b.check(&format!("bdev[{i}]."), &scope)?;
        }
        let mut names = HashSet::new();
        for (i, g) in self.qos_groups.iter().enumerate() {
            if !names.insert(g.name.as_str()) {
                return Err(invalid(
                    format!("qos_group[{i}].name"),
                    format!("`{}` is used by another qos_group", g.name),
                ));
            }
            g.check(&format!("qos_group[{i}]."))?;
        }
        let mut scope = FileScope {
            cfg: self,
            upto: self.bdevs.len(),
            sockets: Vec::new(),
        };
        if let Some(m) = self.management_socket() {
            scope
                .sockets
                .push((m, "the management socket (management.socket)".into()));
        }
        let mut names = HashSet::new();
        for (i, v) in self.vhost_blk.iter().enumerate() {
            if !names.insert(v.name.as_str()) {
                return Err(invalid(
                    format!("vhost_blk[{i}].name"),
                    format!("`{}` is used by another device", v.name),
                ));
            }
            v.check(&format!("vhost_blk[{i}]."), &scope)?;
            scope
                .sockets
                .push((self.resolve(&v.socket), format!("device `{}`", v.name)));
        }
        Ok(())
    }

    /// The management socket's path, if it is enabled.
    pub fn management_socket(&self) -> Option<PathBuf> {
        let p = &self.management.socket;
        (!p.as_os_str().is_empty()).then(|| self.resolve(p))
    }

    /// A path from the file, relative ones taken under `state_dir`.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        resolve_under(&self.state_dir, p)
    }

    /// The file's text: what `config_save` answers and the state directory
    /// keeps, and what `quern --config` reads back.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot write the configuration: {e}\n"))
    }
}
