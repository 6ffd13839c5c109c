//! The running engine: its reactors, and the objects it serves (bdevs,
//! vhost-user-blk devices), created and removed at start-up and at run
//! time through the same functions.
//!
//! The control path takes a lock (one change at a time); the data path
//! never does: a new bdev reaches each reactor's engine by message, a new
//! device's queues are bound to reactors when its frontend starts them.
//! Every accepted change is durable in the state directory before the call
//! returns (see [`crate::state`]); a change that cannot be made durable is
//! undone and refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use quern_bdev::drivers::{MallocBdev, NullBdev, Qcow2Bdev, Qcow2Options, UringBdev, UringOptions};
use quern_bdev::poller::{spawn_io_reactor, IoStats};
use quern_bdev::{BdevRef, EngineConfig, IoReactor, MergeConfig};
use quern_reactor::histogram::Snapshot;
use quern_reactor::ReactorConfig;
use quern_vhost::qos::{Limiter, QosBinding, QosLimits};
use quern_vhost::queue::OPS;
use quern_vhost::{DeviceConfig, DeviceHandle};
use quern_vm::{DiskInfo, VmError, VmManager};
use serde_json::{json, Value};

use crate::config::{
    resolve_under, BdevScope, BdevSection, Config, ConfigError, DeviceScope, Driver, KnownBdev,
    QosGroupSection, VhostBlkSection,
};
use crate::state::{Persisted, StateLock, StateStore, STATE_VERSION};

/// Why a management call failed: a JSON-RPC error code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: i64,
    pub message: String,
}

/// JSON-RPC 2.0's own codes, and Quern's stable application codes.
pub mod codes {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The named object does not exist.
    pub const NOT_FOUND: i64 = -32001;
    /// An object of that name (or on that socket) exists already.
    pub const ALREADY_EXISTS: i64 = -32002;
    /// The object is used by another (a device, an overlay, a frontend).
    pub const IN_USE: i64 = -32003;
    /// The engine cannot do it now (too many clients, requests in flight).
    pub const BUSY: i64 = -32004;
    /// The operation was tried and failed (a file that cannot be opened, a
    /// cluster that does not answer, a state that cannot be written).
    pub const FAILED: i64 = -32005;
}

impl ApiError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// A parameter's value refused by the checks the TOML file gets too.
    pub fn invalid(e: ConfigError) -> Self {
        ApiError::new(codes::INVALID_PARAMS, format!("invalid params: {e}"))
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    State(ConfigError),
    #[error("{what}: {message}")]
    Object { what: String, message: String },
    #[error("reactor on core {core}: {source}")]
    Reactor { core: usize, source: std::io::Error },
}

struct LiveBdev {
    section: BdevSection,
    bdev: BdevRef,
    /// The bdev's handle on each reactor's engine.
    handles: Vec<u16>,
}

struct LiveDevice {
    section: VhostBlkSection,
    handle: Arc<DeviceHandle>,
    /// Latency as of the last reset (`vhost_blk_latency` with reset): per
    /// queue and operation; the histograms themselves only grow.
    latency_base: (Instant, Vec<[Snapshot; 4]>),
}

struct LiveGroup {
    section: QosGroupSection,
    limiter: Arc<Limiter>,
}

/// The objects, under the control path's lock.
#[derive(Default)]
struct Objects {
    bdevs: Vec<LiveBdev>,
    qos_groups: Vec<LiveGroup>,
    devices: Vec<LiveDevice>,
    /// Each bdev's service time as of its last reset (`bdev_latency`).
    bdev_latency_base: HashMap<String, (Instant, Snapshot)>,
    /// Devices removed while a frontend was attached, still failing its
    /// requests until it lets go.
    retired: Vec<Arc<DeviceHandle>>,
    /// Latency histograms as switched at run time (None: as the file says).
    histograms_set: Option<bool>,
}

/// A running engine.
pub struct Engine {
    /// The engine-wide settings it started with (its objects come from
    /// the state directory once there is one).
    pub cfg: Config,
    pub reactors: Vec<Arc<IoReactor>>,
    /// Each reactor's I/O counters.
    pub io_stats: Vec<Arc<IoStats>>,
    objects: Mutex<Objects>,
    store: StateStore,
    /// This engine's hold on its state directory.
    _state_lock: StateLock,
    /// When the engine started (metrics' creation time).
    pub started: std::time::SystemTime,
    /// The VMs Quern knows.
    pub vms: Arc<VmManager>,
    link: Arc<EngineLink>,
}

/// The VM layer's view of the engine: its disks, and where to save.
struct EngineLink(std::sync::OnceLock<std::sync::Weak<Engine>>);

impl EngineLink {
    fn engine(&self) -> Result<Arc<Engine>, VmError> {
        self.0
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or_else(|| VmError::new(quern_vm::Code::Failed, "the engine is stopping"))
    }
}

impl quern_vm::Disks for EngineLink {
    fn disk(&self, device: &str) -> Result<DiskInfo, VmError> {
        let e = self.engine()?;
        let o = e.lock();
        let d = o
            .devices
            .iter()
            .find(|d| d.section.name == device)
            .ok_or_else(|| {
                VmError::new(
                    quern_vm::Code::NotFound,
                    format!("no device named `{device}`"),
                )
            })?;
        let uuid = d.section.uuid.clone().unwrap_or_default();
        Ok(DiskInfo {
            device: device.into(),
            serial: d
                .section
                .serial
                .clone()
                .unwrap_or_else(|| quern_vm::serial_of(&uuid)),
            uuid,
            socket: resolve_under(&e.cfg.state_dir, &d.section.socket),
            num_queues: d.section.num_queues,
        })
    }
}

impl quern_vm::Store for EngineLink {
    fn save(&self) -> Result<(), VmError> {
        let e = self.engine()?;
        let o = e.lock();
        e.persist(&o)
            .map_err(|err| VmError::new(quern_vm::Code::Failed, err.message))
    }
}

/// How the engine starts.
#[derive(Clone, Copy, Debug, Default)]
pub struct StartOptions {
    /// Forget the state directory's objects and start from the file's.
    pub reset_state: bool,
}

/// How long a stopping engine lets each device's requests finish.
pub const STOP_DRAIN: Duration = Duration::from_secs(2);

impl Engine {
    /// Start reactors, then the objects: the state directory's if it has
    /// any (and `reset_state` is not set), the file's otherwise. Nothing
    /// runs half-configured: a failure stops what started and names the
    /// object.
    pub fn start(cfg: &Config, opts: StartOptions) -> Result<Arc<Engine>, StartError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| StartError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let state_lock =
            StateLock::acquire(&cfg.state_dir).map_err(|source| StartError::StateDir {
                path: cfg.state_dir.clone(),
                source,
            })?;
        let store = StateStore::new(&cfg.state_dir);
        if opts.reset_state {
            store.remove().map_err(|source| StartError::StateDir {
                path: store.path(),
                source,
            })?;
        }
        let kept = store.load().map_err(StartError::State)?;
        let (bdevs, groups, devices, vms, from) = match &kept {
            Some(p) => (
                p.bdevs.clone(),
                p.qos_groups.clone(),
                p.vhost_blk.clone(),
                p.vms.clone(),
                store.path(),
            ),
            None => (
                cfg.bdevs.clone(),
                cfg.qos_groups.clone(),
                cfg.vhost_blk.clone(),
                Vec::new(),
                PathBuf::from("the configuration file"),
            ),
        };
        // a device of the file without a UUID was given one when it was
        // first created: not a difference
        let same_devices = cfg.vhost_blk.len() == devices.len()
            && cfg.vhost_blk.iter().zip(&devices).all(|(f, s)| {
                let mut s = s.clone();
                if f.uuid.is_none() {
                    s.uuid = None;
                }
                *f == s
            });
        if kept.is_some() && (cfg.bdevs != bdevs || !same_devices || cfg.qos_groups != groups) {
            tracing::info!(state = %store.path().display(), "bdevs and devices come from the state directory; the configuration file's differ and are not used (--reset-state starts from them)");
        }
        let histograms_set = kept.as_ref().and_then(|p| p.histograms);
        let histograms = histograms_set.unwrap_or(cfg.metrics.histograms);
        if histograms != cfg.metrics.histograms {
            tracing::info!(state = %store.path().display(), histograms, "latency histograms as last switched at run time (metrics_set_histograms), not as the configuration file says");
        }
        let reactors = spawn_reactors(cfg, histograms)?;
        let link = Arc::new(EngineLink(std::sync::OnceLock::new()));
        let vm_manager = VmManager::new(&cfg.state_dir, link.clone());
        let engine = Arc::new(Engine {
            cfg: cfg.clone(),
            reactors: reactors.iter().map(|(r, _)| r.clone()).collect(),
            io_stats: reactors.into_iter().map(|(_, s)| s).collect(),
            objects: Mutex::new(Objects {
                histograms_set,
                ..Objects::default()
            }),
            store,
            _state_lock: state_lock,
            started: std::time::SystemTime::now(),
            vms: vm_manager,
            link,
        });
        let _ = engine.link.0.set(Arc::downgrade(&engine));
        let store: std::sync::Weak<dyn quern_vm::Store> = Arc::downgrade(&engine.link) as _;
        engine.vms.set_store(store);
        let fail = |what: String, e: ApiError| {
            engine.stop_within(STOP_DRAIN);
            StartError::Object {
                what: format!("{}: {what}", from.display()),
                message: e.message,
            }
        };
        for (i, b) in bdevs.into_iter().enumerate() {
            let name = b.name.clone();
            if let Err(e) = engine.create_bdev(b, false) {
                return Err(fail(format!("bdev[{i}] `{name}`"), e));
            }
        }
        for (i, g) in groups.into_iter().enumerate() {
            let name = g.name.clone();
            if let Err(e) = engine.create_qos_group(g, false) {
                return Err(fail(format!("qos_group[{i}] `{name}`"), e));
            }
        }
        for (i, d) in devices.into_iter().enumerate() {
            let name = d.name.clone();
            if let Err(e) = engine.create_device(d, false) {
                return Err(fail(format!("vhost_blk[{i}] `{name}`"), e));
            }
        }
        // the VMs: reconnected where their QEMU still runs
        engine.vms.restore(vms);
        // the first start records the file's objects
        if let Err(e) = engine.persist(&engine.lock()) {
            return Err(fail("state".into(), e));
        }
        Ok(engine)
    }

    fn lock(&self) -> MutexGuard<'_, Objects> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, o: &Objects) -> Result<(), ApiError> {
        let p = Persisted {
            version: STATE_VERSION,
            histograms: o.histograms_set,
            bdevs: o.bdevs.iter().map(|b| b.section.clone()).collect(),
            qos_groups: o.qos_groups.iter().map(|g| g.section.clone()).collect(),
            vhost_blk: o.devices.iter().map(|d| d.section.clone()).collect(),
            vms: self.vms.records(),
        };
        self.store.save(&p).map_err(|e| {
            ApiError::new(
                codes::FAILED,
                format!(
                    "cannot write the state ({}): {e}",
                    self.store.path().display()
                ),
            )
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }

    /// Whether latency histograms are kept now.
    fn histograms(&self, o: &Objects) -> bool {
        o.histograms_set.unwrap_or(self.cfg.metrics.histograms)
    }

    /// Whether latency histograms are kept now (the metrics endpoint).
    pub fn histograms_on(&self) -> bool {
        self.histograms(&self.lock())
    }

    /// Switch the latency histograms (every device queue's and every
    /// bdev's) on or off (`metrics_set_histograms`), on every reactor, and
    /// keep the choice in the state directory: it outlives a restart, and
    /// wins over the file's `[metrics] histograms` until `--reset-state`.
    /// What they hold stays; while off they do not grow.
    pub fn metrics_set_histograms(&self, on: bool) -> Result<Value, ApiError> {
        let mut o = self.lock();
        let was = self.histograms(&o);
        let before = o.histograms_set;
        o.histograms_set = Some(on);
        if let Err(e) = self.persist(&o) {
            o.histograms_set = before;
            return Err(e);
        }
        let mut gone = Vec::new();
        for (i, r) in self.reactors.iter().enumerate() {
            if r.call(move |w| w.set_timing(on)).is_err() {
                gone.push(i);
            }
        }
        if !gone.is_empty() {
            tracing::warn!(reactors = ?gone, "histograms not switched on reactors that have stopped");
        }
        tracing::info!(histograms = on, "latency histograms switched");
        Ok(json!({"histograms": on, "was": was}))
    }

    /// Create a bdev (`bdev_create`): checked as a `[[bdev]]` table is,
    /// opened, attached to every reactor, and made durable.
    pub fn bdev_create(&self, b: BdevSection) -> Result<Value, ApiError> {
        self.create_bdev(b, true)
    }

    fn create_bdev(&self, b: BdevSection, durable: bool) -> Result<Value, ApiError> {
        let mut o = self.lock();
        if o.bdevs.iter().any(|x| x.section.name == b.name) {
            return Err(ApiError::new(
                codes::ALREADY_EXISTS,
                format!("a bdev named `{}` exists already", b.name),
            ));
        }
        b.check(
            "",
            &LiveScope {
                o: &o,
                engine: self,
            },
        )
        .map_err(ApiError::invalid)?;
        let bdev = open_bdev(&self.cfg.state_dir, &b, &o.bdevs)
            .map_err(|e| ApiError::new(codes::FAILED, format!("bdev `{}`: {e}", b.name)))?;
        let handles = self
            .attach(&bdev)
            .map_err(|e| ApiError::new(codes::FAILED, format!("bdev `{}`: {e}", b.name)))?;
        let i = bdev.info();
        tracing::info!(bdev = %i.name, driver = i.driver, capacity = i.capacity_bytes, block_size = i.block_size, read_only = i.read_only, "bdev ready");
        let info = bdev_json(&b, &bdev);
        o.bdevs.push(LiveBdev {
            section: b,
            bdev,
            handles,
        });
        if durable {
            if let Err(e) = self.persist(&o) {
                if let Some(x) = o.bdevs.pop() {
                    self.detach(&x.handles);
                }
                return Err(e);
            }
        }
        Ok(info)
    }

    /// Attach a bdev to every reactor's engine; on failure, detach it from
    /// those it reached.
    fn attach(&self, bdev: &BdevRef) -> std::io::Result<Vec<u16>> {
        let mut handles = Vec::new();
        for r in &self.reactors {
            let b = bdev.clone();
            match r
                .call(move |w| w.add_device(b))
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.detach(&handles);
                    return Err(e);
                }
            }
        }
        Ok(handles)
    }

    fn detach(&self, handles: &[u16]) {
        for (r, &h) in self.reactors.iter().zip(handles) {
            if let Err(e) = r.call(move |w| w.remove_device(h)) {
                tracing::warn!(reactor = r.id, "detaching a bdev: {e}");
            }
        }
    }

    /// Delete a bdev (`bdev_delete`): refused while a device or an overlay
    /// uses it, naming the user.
    pub fn bdev_delete(&self, name: &str) -> Result<Value, ApiError> {
        let mut o = self.lock();
        let Some(i) = o.bdevs.iter().position(|b| b.section.name == name) else {
            return Err(not_found("bdev", name));
        };
        if let Some(d) = o.devices.iter().find(|d| d.section.bdev == name) {
            return Err(ApiError::new(
                codes::IN_USE,
                format!("bdev `{name}` is used by device `{}`", d.section.name),
            ));
        }
        if let Some(b) = o
            .bdevs
            .iter()
            .find(|b| b.section.base.as_deref() == Some(name))
        {
            return Err(ApiError::new(
                codes::IN_USE,
                format!("bdev `{name}` is the base of overlay `{}`", b.section.name),
            ));
        }
        let gone = o.bdevs.remove(i);
        if let Err(e) = self.persist(&o) {
            o.bdevs.insert(i, gone);
            return Err(e);
        }
        // no device serves it, so nothing of it is in flight
        self.detach(&gone.handles);
        drop(gone);
        o.bdev_latency_base.remove(name);
        tracing::info!(bdev = name, "bdev deleted");
        Ok(json!({"deleted": name}))
    }

    /// Create a vhost-user-blk device (`vhost_blk_create`).
    pub fn vhost_blk_create(&self, d: VhostBlkSection) -> Result<Value, ApiError> {
        self.create_device(d, true)
    }

    fn create_device(&self, mut d: VhostBlkSection, durable: bool) -> Result<Value, ApiError> {
        let mut o = self.lock();
        o.retired.retain(|h| !h.finished());
        if o.devices.iter().any(|x| x.section.name == d.name) {
            return Err(ApiError::new(
                codes::ALREADY_EXISTS,
                format!("a device named `{}` exists already", d.name),
            ));
        }
        d.check(
            "",
            &LiveScope {
                o: &o,
                engine: self,
            },
        )
        .map_err(ApiError::invalid)?;
        match &d.uuid {
            Some(u) => {
                if let Some(x) = o.devices.iter().find(|x| {
                    x.section
                        .uuid
                        .as_deref()
                        .is_some_and(|v| v.eq_ignore_ascii_case(u))
                }) {
                    return Err(ApiError::new(
                        codes::ALREADY_EXISTS,
                        format!("uuid {u} is device `{}`'s", x.section.name),
                    ));
                }
            }
            None => d.uuid = Some(uuid::Uuid::new_v4().to_string()),
        }
        let b = o
            .bdevs
            .iter()
            .find(|b| b.section.name == d.bdev)
            .ok_or_else(|| not_found("bdev", &d.bdev))?;
        let group = match &d.qos_group {
            Some(g) => Some(group_of(&o, g)?.limiter.clone()),
            None => None,
        };
        let cfg = DeviceConfig {
            name: d.name.clone(),
            socket: resolve_under(&self.cfg.state_dir, &d.socket),
            num_queues: d.num_queues,
            queue_size: d.queue_size,
            read_only: d.read_only,
            serial: d
                .serial
                .clone()
                .unwrap_or_else(|| quern_vm::serial_of(d.uuid.as_deref().unwrap_or_default())),
            binding: d.binding(&self.cfg.reactor.cores),
            timing: self.histograms(&o),
            event_idx: d.event_idx,
            qos: QosBinding::new(Limiter::new(&d.name, d.qos.unwrap_or_default()), group),
        };
        let handle = quern_vhost::serve(
            cfg,
            b.bdev.clone(),
            self.reactors.clone(),
            b.handles.clone(),
        )
        .map_err(|e| ApiError::new(codes::FAILED, format!("device `{}`: {e}", d.name)))?;
        let info = json!({"name": d.name, "uuid": d.uuid, "socket": resolve_under(&self.cfg.state_dir, &d.socket)});
        let base = latency_now(&handle);
        o.devices.push(LiveDevice {
            section: d,
            handle: Arc::new(handle),
            latency_base: (Instant::now(), base),
        });
        if durable {
            if let Err(e) = self.persist(&o) {
                if let Some(x) = o.devices.pop() {
                    x.handle.stop();
                }
                return Err(e);
            }
        }
        Ok(info)
    }

    /// Delete a device (`vhost_blk_delete`). With a frontend attached it is
    /// refused unless `force`: then the device is retired (every request
    /// fails with an I/O error until the frontend lets go, see
    /// [`DeviceHandle::retire`]) and its name and socket are free at once.
    pub fn vhost_blk_delete(&self, name: &str, force: bool) -> Result<Value, ApiError> {
        let mut o = self.lock();
        o.retired.retain(|h| !h.finished());
        let Some(i) = o.devices.iter().position(|d| d.section.name == name) else {
            return Err(not_found("device", name));
        };
        if let Some((vm, true)) = self.vms.user_of(name) {
            if !force {
                return Err(ApiError::new(
                    codes::IN_USE,
                    format!("device `{name}` is a disk of VM `{vm}` (vm_disk_remove it first, or force: true fails its requests from now on)"),
                ));
            }
        }
        let connected = o.devices[i].handle.connected();
        if connected && !force {
            return Err(ApiError::new(
                codes::IN_USE,
                format!("device `{name}` has a frontend attached (force: true fails its requests from now on and frees the device)"),
            ));
        }
        let gone = o.devices.remove(i);
        if let Err(e) = self.persist(&o) {
            o.devices.insert(i, gone);
            return Err(e);
        }
        if connected {
            gone.handle.retire();
            o.retired.push(gone.handle);
        } else {
            gone.handle.stop();
        }
        tracing::info!(device = name, forced = connected, "device deleted");
        Ok(json!({"deleted": name, "frontend_was_attached": connected}))
    }

    /// Set a device's own QoS limits (`vhost_blk_set_qos`); all zero
    /// clears them. Effective at once on every queue, and durable.
    pub fn vhost_blk_set_qos(&self, name: &str, qos: QosLimits) -> Result<Value, ApiError> {
        qos.check().map_err(|r| {
            ApiError::new(codes::INVALID_PARAMS, format!("invalid params: qos: {r}"))
        })?;
        let mut o = self.lock();
        let i = device_index(&o, name)?;
        let kept = (!qos.is_unlimited()).then_some(qos);
        let old = std::mem::replace(&mut o.devices[i].section.qos, kept);
        if let Err(e) = self.persist(&o) {
            o.devices[i].section.qos = old;
            return Err(e);
        }
        o.devices[i].handle.qos.own().set(qos);
        tracing::info!(device = name, ?qos, "device QoS set");
        Ok(json!({"name": name, "qos": qos}))
    }

    /// Put a device in a QoS group, move it to another, or take it out
    /// (`group` absent) (`vhost_blk_set_qos_group`).
    pub fn vhost_blk_set_qos_group(
        &self,
        name: &str,
        group: Option<String>,
    ) -> Result<Value, ApiError> {
        let mut o = self.lock();
        let i = device_index(&o, name)?;
        let limiter = match &group {
            Some(g) => Some(group_of(&o, g)?.limiter.clone()),
            None => None,
        };
        let old = std::mem::replace(&mut o.devices[i].section.qos_group, group.clone());
        if let Err(e) = self.persist(&o) {
            o.devices[i].section.qos_group = old;
            return Err(e);
        }
        o.devices[i].handle.qos.set_group(limiter);
        tracing::info!(device = name, group = ?group, "device QoS group set");
        Ok(json!({"name": name, "qos_group": group}))
    }

    /// Create a QoS group (`qos_group_create`).
    pub fn qos_group_create(&self, g: QosGroupSection) -> Result<Value, ApiError> {
        self.create_qos_group(g, true)
    }

    fn create_qos_group(&self, g: QosGroupSection, durable: bool) -> Result<Value, ApiError> {
        let mut o = self.lock();
        if o.qos_groups.iter().any(|x| x.section.name == g.name) {
            return Err(ApiError::new(
                codes::ALREADY_EXISTS,
                format!("a qos_group named `{}` exists already", g.name),
            ));
        }
        g.check("").map_err(ApiError::invalid)?;
        let limiter = Limiter::new(&g.name, g.qos);
        let info = json!({"name": g.name, "qos": g.qos});
        o.qos_groups.push(LiveGroup {
            section: g,
            limiter,
        });
        if durable {
            if let Err(e) = self.persist(&o) {
                o.qos_groups.pop();
                return Err(e);
            }
        }
        Ok(info)
    }

    /// Change a QoS group's limits (`qos_group_set`).
    pub fn qos_group_set(&self, g: QosGroupSection) -> Result<Value, ApiError> {
        g.check("").map_err(ApiError::invalid)?;
        let mut o = self.lock();
        let i = o
            .qos_groups
            .iter()
            .position(|x| x.section.name == g.name)
            .ok_or_else(|| not_found("qos_group", &g.name))?;
        let old = std::mem::replace(&mut o.qos_groups[i].section.qos, g.qos);
        if let Err(e) = self.persist(&o) {
            o.qos_groups[i].section.qos = old;
            return Err(e);
        }
        o.qos_groups[i].limiter.set(g.qos);
        tracing::info!(group = %g.name, qos = ?g.qos, "QoS group set");
        Ok(json!({"name": g.name, "qos": g.qos}))
    }

    /// Delete a QoS group no device is in (`qos_group_delete`).
    pub fn qos_group_delete(&self, name: &str) -> Result<Value, ApiError> {
        let mut o = self.lock();
        let i = o
            .qos_groups
            .iter()
            .position(|x| x.section.name == name)
            .ok_or_else(|| not_found("qos_group", name))?;
        if let Some(d) = o
            .devices
            .iter()
            .find(|d| d.section.qos_group.as_deref() == Some(name))
        {
            return Err(ApiError::new(
                codes::IN_USE,
                format!("qos_group `{name}` has device `{}`", d.section.name),
            ));
        }
        let gone = o.qos_groups.remove(i);
        if let Err(e) = self.persist(&o) {
            o.qos_groups.insert(i, gone);
            return Err(e);
        }
        Ok(json!({"deleted": name}))
    }

    pub fn qos_group_list(&self) -> Value {
        let o = self.lock();
        Value::Array(
            o.qos_groups
                .iter()
                .map(|g| {
                    let devices: Vec<&str> = o
                        .devices
                        .iter()
                        .filter(|d| d.section.qos_group.as_deref() == Some(&g.section.name))
                        .map(|d| d.section.name.as_str())
                        .collect();
                    json!({
                        "name": g.section.name,
                        "qos": g.section.qos,
                        "devices": devices,
                        "throttled_requests": g.limiter.throttled.load(Ordering::Relaxed),
                        "throttled_seconds": g.limiter.throttled_ns.load(Ordering::Relaxed) as f64 / 1e9,
                    })
                })
                .collect(),
        )
    }

    /// A device's latency per queue and operation, from the avail ring to
    /// the used ring, since it was created or last reset
    /// (`vhost_blk_latency`); `reset` starts a new interval after reading.
    pub fn vhost_blk_latency(&self, name: &str, reset: bool) -> Result<Value, ApiError> {
        let mut o = self.lock();
        let i = device_index(&o, name)?;
        let d = &mut o.devices[i];
        let now = latency_now(&d.handle);
        let (since, base) = &d.latency_base;
        let mut total: [Snapshot; 4] = Default::default();
        let queues: Vec<Value> = now
            .iter()
            .enumerate()
            .map(|(q, ops)| {
                let mut per_op = serde_json::Map::new();
                for (k, op) in OPS.iter().enumerate() {
                    let s = match base.get(q) {
                        Some(b) => ops[k].since(&b[k]),
                        None => ops[k].clone(),
                    };
                    total[k].add(&s);
                    per_op.insert(op.to_string(), latency_json(&s));
                }
                json!({"queue": q, "ops": per_op})
            })
            .collect();
        let mut all = Snapshot::default();
        let mut total_json = serde_json::Map::new();
        for (k, op) in OPS.iter().enumerate() {
            all.add(&total[k]);
            total_json.insert(op.to_string(), latency_json(&total[k]));
        }
        total_json.insert("all".into(), latency_json(&all));
        let out = json!({
            "name": name,
            "histograms": self.cfg.metrics.histograms,
            "interval_seconds": since.elapsed().as_secs_f64(),
            "unit": "microseconds",
            "queues": queues,
            "device": total_json,
        });
        if reset {
            d.latency_base = (Instant::now(), now);
        }
        Ok(out)
    }

    /// Each bdev's own service time, over every reactor, since it was
    /// created or last reset (`bdev_latency`; `name` absent: every bdev).
    pub fn bdev_latency(&self, name: Option<&str>, reset: bool) -> Result<Value, ApiError> {
        let mut o = self.lock();
        if let Some(n) = name {
            if !o.bdevs.iter().any(|b| b.section.name == n) {
                return Err(not_found("bdev", n));
            }
        }
        let names: Vec<String> = o
            .bdevs
            .iter()
            .map(|b| b.section.name.clone())
            .filter(|b| name.is_none_or(|n| n == b))
            .collect();
        let mut out = Vec::new();
        for b in names {
            let now = self.bdev_histogram(&b);
            let (since, base) = o
                .bdev_latency_base
                .get(&b)
                .cloned()
                .unwrap_or_else(|| (self.started_instant(), Snapshot::default()));
            let s = now.since(&base);
            let mut v = latency_json(&s);
            v["name"] = json!(b);
            v["interval_seconds"] = json!(since.elapsed().as_secs_f64());
            out.push(v);
            if reset {
                o.bdev_latency_base.insert(b, (Instant::now(), now));
            }
        }
        Ok(json!({"unit": "microseconds", "histograms": self.cfg.metrics.histograms, "bdevs": out}))
    }

    /// A bdev's service-time histogram merged over the reactors.
    pub fn bdev_histogram(&self, name: &str) -> Snapshot {
        let mut s = Snapshot::default();
        for io in &self.io_stats {
            let l = io.bdev_latency.lock().unwrap_or_else(|e| e.into_inner());
            for (n, _, h) in l.iter() {
                if n == name {
                    s.add(&h.snapshot());
                }
            }
        }
        s
    }

    fn started_instant(&self) -> Instant {
        let age = self.started.elapsed().unwrap_or_default();
        Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
    }

    /// The QoS groups (for metrics).
    pub fn qos_groups(&self) -> Vec<Arc<Limiter>> {
        self.lock()
            .qos_groups
            .iter()
            .map(|g| g.limiter.clone())
            .collect()
    }

    /// The bdevs' names (for metrics).
    pub fn bdev_names(&self) -> Vec<String> {
        self.lock()
            .bdevs
            .iter()
            .map(|b| b.section.name.clone())
            .collect()
    }

    pub fn bdev_list(&self) -> Value {
        let o = self.lock();
        Value::Array(
            o.bdevs
                .iter()
                .map(|b| bdev_json(&b.section, &b.bdev))
                .collect(),
        )
    }

    pub fn vhost_blk_list(&self) -> Value {
        let o = self.lock();
        Value::Array(
            o.devices
                .iter()
                .map(|d| device_json(&self.cfg.state_dir, &d.section, &d.handle))
                .collect(),
        )
    }

    pub fn reactor_list(&self) -> Value {
        Value::Array(
            self.reactors
                .iter()
                .zip(&self.io_stats)
                .map(|(r, io)| {
                    let s = r.stats.snapshot();
                    let i = io.snapshot();
                    json!({
                        "id": r.id,
                        "core": r.core,
                        "failed": r.failure(),
                        "cycles": s.cycles,
                        "busy_ns": s.busy_ns,
                        "idle_ns": s.idle_ns,
                        "sleeps": s.sleeps,
                        "pollers": i.pollers,
                        "ios_submitted": i.ios_submitted,
                        "ios_completed": i.ios_completed,
                        "ios_failed": i.ios_failed,
                        "merge_requests_in": i.merge_requests_in,
                        "merge_requests_out": i.merge_requests_out,
                        "merge_bytes": i.merge_bytes,
                    })
                })
                .collect(),
        )
    }

    /// Everything, for `stats`; with `buckets`, each queue's latency
    /// histogram too (all operations, non-empty buckets as
    /// `[index, count]`, for `quern ctl top`).
    pub fn stats(&self, buckets: bool) -> Value {
        let mut devices = self.vhost_blk_list();
        if buckets {
            let o = self.lock();
            for d in devices.as_array_mut().into_iter().flatten() {
                let Some(live) = o
                    .devices
                    .iter()
                    .find(|x| d["name"] == x.section.name.as_str())
                else {
                    continue;
                };
                for (q, st) in d["queues"]
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                    .zip(&live.handle.queues)
                {
                    let mut all = Snapshot::default();
                    for h in &st.latency {
                        all.add(&h.snapshot());
                    }
                    let b: Vec<Value> = all
                        .counts
                        .iter()
                        .enumerate()
                        .filter(|(_, &c)| c > 0)
                        .map(|(i, &c)| json!([i, c]))
                        .collect();
                    q["latency_buckets"] = Value::Array(b);
                }
            }
        }
        let histograms = self.histograms(&self.lock());
        json!({
            "histograms": histograms,
            "reactors": self.reactor_list(),
            "bdevs": self.bdev_list(),
            "qos_groups": self.qos_group_list(),
            "devices": devices,
        })
    }

    /// The whole current state as a configuration file `quern --config`
    /// accepts (`config_save`).
    pub fn config_save(&self) -> String {
        let o = self.lock();
        let mut c = self.cfg.clone();
        c.metrics.histograms = self.histograms(&o);
        c.bdevs = o.bdevs.iter().map(|b| b.section.clone()).collect();
        c.qos_groups = o.qos_groups.iter().map(|g| g.section.clone()).collect();
        c.vhost_blk = o.devices.iter().map(|d| d.section.clone()).collect();
        c.to_toml()
    }

    /// The devices (for the statistics a stopping engine logs).
    pub fn devices(&self) -> Vec<(String, Arc<DeviceHandle>)> {
        self.lock()
            .devices
            .iter()
            .map(|d| (d.section.name.clone(), d.handle.clone()))
            .collect()
    }

    /// Stop serving: every device stops taking requests and lets those in
    /// flight finish for at most `drain` (what remains stays recorded in
    /// its frontend's in-flight region, for the next Quern to resubmit),
    /// then the reactors stop.
    pub fn stop_within(&self, drain: Duration) {
        let (devices, retired): (Vec<_>, Vec<_>) = {
            let o = self.lock();
            (
                o.devices.iter().map(|d| d.handle.clone()).collect(),
                o.retired.clone(),
            )
        };
        // every device at once: each waits at most `drain`
        std::thread::scope(|s| {
            for d in devices.iter().chain(&retired) {
                s.spawn(move || d.stop_within(drain));
            }
        });
        for r in &self.reactors {
            r.stop_within(drain);
        }
    }

    /// [`Engine::stop_within`] with a bound of [`STOP_DRAIN`].
    pub fn stop(&self) {
        self.stop_within(STOP_DRAIN);
    }
}

/// A VM layer error as an API error.
pub fn vm_error(e: VmError) -> ApiError {
    use quern_vm::Code;
    let code = match e.code {
        Code::NotFound => codes::NOT_FOUND,
        Code::AlreadyExists => codes::ALREADY_EXISTS,
        Code::InUse => codes::IN_USE,
        Code::Invalid => codes::INVALID_PARAMS,
        Code::Failed => codes::FAILED,
    };
    ApiError::new(code, e.message)
}

fn device_index(o: &Objects, name: &str) -> Result<usize, ApiError> {
    o.devices
        .iter()
        .position(|d| d.section.name == name)
        .ok_or_else(|| not_found("device", name))
}

fn group_of<'a>(o: &'a Objects, name: &str) -> Result<&'a LiveGroup, ApiError> {
    o.qos_groups
        .iter()
        .find(|g| g.section.name == name)
        .ok_or_else(|| not_found("qos_group", name))
}

/// Every queue's latency histograms now, per operation.
fn latency_now(h: &DeviceHandle) -> Vec<[Snapshot; 4]> {
    h.queues
        .iter()
        .map(|q| std::array::from_fn(|k| q.latency[k].snapshot()))
        .collect()
}

/// Counts and percentiles of a histogram, in microseconds.
pub fn latency_json(s: &Snapshot) -> Value {
    let us = |v: Option<f64>| v.map(|x| (x * 1e7).round() / 10.0);
    let n = s.count();
    json!({
        "count": n,
        "mean": (n > 0).then(|| (s.sum_secs() / n as f64 * 1e7).round() / 10.0),
        "p50": us(s.quantile(0.5)),
        "p90": us(s.quantile(0.9)),
        "p99": us(s.quantile(0.99)),
        "p99_9": us(s.quantile(0.999)),
        "max": us(s.max()),
    })
}

fn not_found(kind: &str, name: &str) -> ApiError {
    ApiError::new(codes::NOT_FOUND, format!("no {kind} named `{name}`"))
}

fn bdev_json(s: &BdevSection, b: &BdevRef) -> Value {
    let i = b.info();
    json!({
        "name": s.name,
        "driver": i.driver,
        "capacity_bytes": i.capacity_bytes,
        "block_size": i.block_size,
        "read_only": i.read_only,
        "base": s.base,
    })
}

fn device_json(state_dir: &Path, s: &VhostBlkSection, h: &DeviceHandle) -> Value {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let queues: Vec<Value> = h
        .queues
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let r = load(&q.reactor);
            let ops: serde_json::Map<String, Value> = OPS
                .iter()
                .zip(&q.ops)
                .map(|(op, n)| (op.to_string(), json!(load(n))))
                .collect();
            json!({
                "queue": i,
                // the reactor the queue is bound to; null while the
                // frontend has not started it
                "reactor": (r != u64::MAX).then_some(r),
                "requests": load(&q.requests),
                "completed": load(&q.completed),
                "ops": ops,
                "bytes_read": load(&q.bytes_read),
                "bytes_written": load(&q.bytes_written),
                "in_flight": load(&q.in_flight),
                "errors": load(&q.errors),
                "malformed": load(&q.malformed),
                "unsupported": load(&q.unsupported),
                "notifies": load(&q.notifies),
                "resubmitted": load(&q.resubmitted),
            })
        })
        .collect();
    let own = h.qos.own();
    let uuid = s.uuid.clone().unwrap_or_default();
    json!({
        "name": s.name,
        "uuid": uuid,
        "serial": s.serial.clone().unwrap_or_else(|| quern_vm::serial_of(&uuid)),
        "bdev": s.bdev,
        "socket": resolve_under(state_dir, &s.socket),
        "num_queues": s.num_queues,
        "read_only": s.read_only,
        "connected": h.connected(),
        "connections": load(&h.connections),
        "qos": s.qos.unwrap_or_default(),
        "qos_group": s.qos_group,
        "throttled_requests": load(&own.throttled),
        "throttled_seconds": load(&own.throttled_ns) as f64 / 1e9,
        "queues": queues,
    })
}

/// The checks of a new object against the running engine's.
struct LiveScope<'a> {
    o: &'a Objects,
    engine: &'a Engine,
}

impl BdevScope for LiveScope<'_> {
    fn bdev(&self, name: &str) -> Option<KnownBdev> {
        self.o
            .bdevs
            .iter()
            .find(|b| b.section.name == name)
            .map(|b| KnownBdev {
                earlier: true,
                capacity: Some(b.bdev.info().capacity_bytes),
            })
    }
    fn state_dir(&self) -> &Path {
        &self.engine.cfg.state_dir
    }
}

impl DeviceScope for LiveScope<'_> {
    fn has_bdev(&self, name: &str) -> bool {
        self.o.bdevs.iter().any(|b| b.section.name == name)
    }
    fn cores(&self) -> &[usize] {
        &self.engine.cfg.reactor.cores
    }
    fn socket_in_use(&self, path: &Path) -> Option<String> {
        if self.engine.cfg.management_socket().as_deref() == Some(path) {
            return Some("the management socket (management.socket)".into());
        }
        self.o
            .devices
            .iter()
            .find(|d| resolve_under(&self.engine.cfg.state_dir, &d.section.socket) == path)
            .map(|d| format!("device `{}`", d.section.name))
    }
    fn state_dir(&self) -> &Path {
        &self.engine.cfg.state_dir
    }
    fn has_qos_group(&self, name: &str) -> bool {
        self.o.qos_groups.iter().any(|g| g.section.name == name)
    }
}

/// A reactor and its I/O counters.
type Reactor = (Arc<IoReactor>, Arc<IoStats>);

fn spawn_reactors(cfg: &Config, histograms: bool) -> Result<Vec<Reactor>, StartError> {
    let engine_cfg = EngineConfig {
        max_requests: cfg.reactor.max_requests,
        submit_batch: cfg.reactor.submit_batch,
        merge: MergeConfig {
            enabled: cfg.merge.enabled,
            max_bytes: cfg.merge.max_bytes,
            max_segments: cfg.merge.max_segments,
        },
        timing: histograms,
        ..EngineConfig::default()
    };
    // the clock's rate is measured once, here, before any reactor runs
    let _ = quern_reactor::clock::scale();
    let mut out: Vec<Reactor> = Vec::new();
    for (id, &core) in cfg.reactor.cores.iter().enumerate() {
        let rc = ReactorConfig {
            id,
            core: Some(core),
            mode: cfg.reactor.poll_mode,
            idle_spin: Duration::from_micros(cfg.reactor.idle_spin_us),
        };
        match spawn_io_reactor(rc, engine_cfg) {
            Ok(r) => out.push(r),
            Err(source) => {
                out.iter().for_each(|(r, _)| r.stop());
                return Err(StartError::Reactor { core, source });
            }
        }
    }
    Ok(out)
}

/// Open one bdev; `opened` holds those before it (a qcow2 base).
fn open_bdev(state_dir: &Path, b: &BdevSection, opened: &[LiveBdev]) -> std::io::Result<BdevRef> {
    let size = b
        .size
        .as_ref()
        .map(|s| s.bytes())
        .transpose()
        .map_err(std::io::Error::other)?;
    let bs = b.block_size.unwrap_or(512);
    let path = || {
        resolve_under(
            state_dir,
            b.path.as_deref().unwrap_or_else(|| Path::new("")),
        )
    };
    Ok(match b.driver {
        Driver::Malloc => Arc::new(MallocBdev::new(
            &b.name,
            size.unwrap_or(0),
            bs,
            b.read_only,
        )?),
        Driver::Null => Arc::new(NullBdev::new(&b.name, size.unwrap_or(0), bs, b.read_only)),
        Driver::Uring => Arc::new(UringBdev::open(&UringOptions {
            name: b.name.clone(),
            path: path(),
            create_size: size,
            direct: b.direct,
            read_only: b.read_only,
            block_size: b.block_size,
            delay_us: b.delay_us,
        })?),
        #[cfg(feature = "rbd")]
        Driver::Rbd => {
            use quern_bdev::drivers::{RbdBdev, RbdOptions};
            let mut o = RbdOptions::new(
                &b.name,
                b.pool.as_deref().unwrap_or_default(),
                b.image.as_deref().unwrap_or_default(),
            );
            o.snapshot = b.snapshot.clone();
            if let Some(c) = &b.ceph_conf {
                o.ceph_conf = resolve_under(state_dir, c);
            }
            if let Some(id) = &b.client_id {
                o.client_id = id.clone();
            }
            o.keyring = b.keyring.as_deref().map(|k| resolve_under(state_dir, k));
            o.read_only = b.read_only || b.snapshot.is_some();
            if let Some(t) = b.timeout_secs {
                o.timeout_secs = t;
            }
            o.block_size = b.block_size;
            Arc::new(RbdBdev::open(&o)?)
        }
        #[cfg(not(feature = "rbd"))]
        Driver::Rbd => return Err(std::io::Error::other("built without the rbd feature")),
        Driver::Qcow2 => {
            let base_name = b.base.as_deref().unwrap_or_default();
            let base = opened
                .iter()
                .find(|x| x.section.name == base_name)
                .map(|x| x.bdev.clone())
                .ok_or_else(|| std::io::Error::other(format!("base `{base_name}` is not open")))?;
            let cluster_size = match &b.cluster_size {
                Some(s) => s.bytes().map_err(std::io::Error::other)?,
                None => 64 << 10,
            };
            Arc::new(Qcow2Bdev::open(&Qcow2Options {
                name: b.name.clone(),
                path: path(),
                base,
                size,
                cluster_size: u32::try_from(cluster_size).map_err(std::io::Error::other)?,
                copy_on_read: b.copy_on_read,
                read_only: b.read_only,
                direct: b.direct,
            })?)
        }
    })
}
