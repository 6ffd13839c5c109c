//! The VMs Quern knows: those it starts from a spec and supervises
//! (`vm_create`), and QEMUs someone else started that it controls through
//! their QMP socket (`vm_attach`); their state, and their disks, inserted
//! and removed under names that never change.
//!
//! Disk names. Linux names a new virtio disk by the lowest index free in
//! the guest, and at boot in PCI order. Quern keeps, per VM, a map from
//! disk UUID to name (vda = 0, vdb = 1, ... as libvirt numbers them), and
//! holds one invariant: the indices in use in the guest are exactly the
//! map's (plus a VM's own foreign disks below them), with no hole. A
//! removed disk's name stays reserved for its UUID, held in the guest by a
//! placeholder (a 4 KiB read-only null disk, serial `quern-gap`), so the
//! next new disk cannot take it; inserting a disk whose name is held by a
//! placeholder first removes the placeholder, and the guest then gives
//! the disk exactly that name. Every disk and placeholder sits at the PCI
//! slot of its index (behind Quern's PCI bridges), so the guest's probe
//! order at the next boot gives the same names again. Devices are
//! modern-only virtio (no legacy I/O ports: a bridge's I/O window is
//! small).
//!
//! Every change to a VM is made in QEMU first, then recorded and saved
//! through the [`Store`]; a change QEMU refuses, or that the guest does
//! not complete in time, changes nothing in the map.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::names;
use crate::qmp::{Qmp, QmpError};
use crate::spec::{DiskEntry, Owner, VmRecord, VmSpec, BRIDGES, MAX_DISKS, SLOTS_PER_BRIDGE};

/// What QEMU needs of a Quern disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub device: String,
    pub uuid: String,
    pub socket: PathBuf,
    pub num_queues: u16,
    pub serial: String,
}

/// The engine's disks, as the VM layer sees them.
pub trait Disks: Send + Sync {
    fn disk(&self, device: &str) -> Result<DiskInfo, VmError>;
}

/// Where VM records are made durable (the engine's state directory).
pub trait Store: Send + Sync {
    fn save(&self) -> Result<(), VmError>;
}

/// Error kinds, which the API maps to its codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    NotFound,
    AlreadyExists,
    InUse,
    Invalid,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct VmError {
    pub code: Code,
    pub message: String,
}

impl VmError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        VmError {
            code,
            message: message.into(),
        }
    }
    fn failed(message: impl Into<String>) -> Self {
        VmError::new(Code::Failed, message)
    }
    fn invalid(key: &str, reason: impl std::fmt::Display) -> Self {
        VmError::new(Code::Invalid, format!("invalid params: {key}: {reason}"))
    }
}

fn qmp_err(vm: &str, e: QmpError) -> VmError {
    VmError::failed(format!("VM `{vm}`: {e}"))
}

/// How long ordinary QMP commands may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);
/// `device_add` of a vhost-user disk connects to and negotiates with its
/// backend first.
const DEVICE_ADD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a VM's QEMU has to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A VM's life as Quern sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    Starting,
    Running,
    Paused,
    /// QEMU exited normally (the guest powered off, or it was told to).
    ShutDown,
    /// QEMU died: killed, or a nonzero exit.
    Crashed,
    /// An attached QEMU's QMP connection is gone, or Quern cannot tell.
    Disconnected,
}

impl Run {
    fn as_str(&self) -> &'static str {
        match self {
            Run::Starting => "starting",
            Run::Running => "running",
            Run::Paused => "paused",
            Run::ShutDown => "shut down",
            Run::Crashed => "crashed",
            Run::Disconnected => "disconnected",
        }
    }
}

struct Status {
    run: Run,
    /// QEMU's exit status, or why the state is what it is.
    detail: Option<String>,
}

/// One VM at run time.
struct Vm {
    name: String,
    /// One change at a time per VM (a disk insert waits on QMP).
    op: Mutex<()>,
    qmp: Mutex<Option<Arc<Qmp>>>,
    status: Mutex<Status>,
    /// Deleted: its watcher stops.
    gone: AtomicBool,
}

impl Vm {
    fn new(name: String, run: Run) -> Arc<Vm> {
        Arc::new(Vm {
            name,
            op: Mutex::new(()),
            qmp: Mutex::new(None),
            status: Mutex::new(Status { run, detail: None }),
            gone: AtomicBool::new(false),
        })
    }

    fn qmp(&self) -> Option<Arc<Qmp>> {
        self.qmp.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn set(&self, run: Run, detail: Option<String>) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.run = run;
        s.detail = detail;
    }
    fn run(&self) -> Run {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .run
            .clone()
    }
}

/// The VM layer.
pub struct VmManager {
    state_dir: PathBuf,
    disks: Arc<dyn Disks>,
    store: OnceLock<Weak<dyn Store>>,
    vms: Mutex<BTreeMap<String, Arc<Vm>>>,
    /// What is persisted; short lock, never held across QMP or a save.
    records: Mutex<BTreeMap<String, VmRecord>>,
    /// Serialises creating and deleting VMs.
    create: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VmManager {
    pub fn new(state_dir: &Path, disks: Arc<dyn Disks>) -> Arc<VmManager> {
        Arc::new(VmManager {
            state_dir: state_dir.to_path_buf(),
            disks,
            store: OnceLock::new(),
            vms: Mutex::new(BTreeMap::new()),
            records: Mutex::new(BTreeMap::new()),
            create: Mutex::new(()),
        })
    }

    /// Where changes are saved (set once, at start-up).
    pub fn set_store(&self, store: Weak<dyn Store>) {
        let _ = self.store.set(store);
    }

    fn save(&self) -> Result<(), VmError> {
        match self.store.get().and_then(Weak::upgrade) {
            Some(s) => s.save(),
            None => Ok(()),
        }
    }

    /// The records, for the state directory.
    pub fn records(&self) -> Vec<VmRecord> {
        lock(&self.records).values().cloned().collect()
    }

    fn record(&self, name: &str) -> Result<VmRecord, VmError> {
        lock(&self.records)
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(name))
    }

    fn put(&self, r: VmRecord) {
        lock(&self.records).insert(r.name.clone(), r);
    }

    fn vm(&self, name: &str) -> Result<Arc<Vm>, VmError> {
        lock(&self.vms)
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(name))
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("vms").join(name)
    }

    /// The VM a device is in, if any (attached or holding a reserved name).
    pub fn user_of(&self, device: &str) -> Option<(String, bool)> {
        lock(&self.records).values().find_map(|r| {
            r.disks
                .iter()
                .find(|d| d.device == device)
                .map(|d| (r.name.clone(), d.attached))
        })
    }

    /// Take up the VMs of the state directory at start-up: each one's QMP
    /// socket is tried; a VM whose QEMU is gone is shown shut down.
    pub fn restore(self: &Arc<Self>, records: Vec<VmRecord>) {
        for r in records {
            let vm = Vm::new(r.name.clone(), Run::Disconnected);
            lock(&self.vms).insert(r.name.clone(), vm.clone());
            let sock = r.qmp_socket.clone();
            let owned = r.owner == Owner::Quern;
            let alive = r.pid.is_some_and(pid_alive);
            self.put(r);
            match Qmp::connect(&sock, Duration::from_secs(2)) {
                Ok(q) => {
                    self.connected(&vm, Arc::new(q));
                }
                Err(_) if owned && !alive => vm.set(
                    Run::ShutDown,
                    Some("QEMU ended while Quern was not running (exit status unknown)".into()),
                ),
                Err(e) => vm.set(Run::Disconnected, Some(e.to_string())),
            }
        }
    }

    /// A QMP session to `vm` is up: read its state, watch its events.
    fn connected(self: &Arc<Self>, vm: &Arc<Vm>, q: Arc<Qmp>) {
        let run = match q.execute("query-status", json!({}), COMMAND_TIMEOUT) {
            Ok(v) if v["running"] == true => Run::Running,
            Ok(_) => Run::Paused,
            Err(_) => Run::Disconnected,
        };
        vm.set(run, None);
        *lock(&vm.qmp) = Some(q.clone());
        let me = Arc::downgrade(self);
        let v = vm.clone();
        let _ = std::thread::Builder::new()
            .name(format!("vm-{}", vm.name))
            .spawn(move || watch(me, v, q));
    }

    /// `vm_create`: check the spec and its disks, start QEMU, connect.
    pub fn create(self: &Arc<Self>, mut spec: VmSpec) -> Result<Value, VmError> {
        let _c = lock(&self.create);
        spec.check().map_err(|(k, r)| VmError::invalid(&k, r))?;
        if lock(&self.records).contains_key(&spec.name) {
            return Err(VmError::new(
                Code::AlreadyExists,
                format!("a VM named `{}` exists already", spec.name),
            ));
        }
        let uuid = spec
            .uuid
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        spec.uuid = Some(uuid.clone());
        let mut entries = Vec::new();
        for (i, d) in spec.disks.iter().enumerate() {
            let info = self.disks.disk(d)?;
            if let Some((vm, _)) = self.user_of(d) {
                return Err(VmError::new(
                    Code::InUse,
                    format!("device `{d}` is a disk of VM `{vm}`"),
                ));
            }
            entries.push(DiskEntry {
                uuid: info.uuid,
                name: names::index_to_name("vd", i as u32),
                device: d.clone(),
                attached: true,
            });
        }
        let dir = self.dir(&spec.name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| VmError::failed(format!("{}: {e}", dir.display())))?;
        let rec = VmRecord {
            name: spec.name.clone(),
            uuid,
            owner: Owner::Quern,
            spec: Some(spec.clone()),
            qmp_socket: dir.join("qmp.sock"),
            pid: None,
            foreign: 0,
            gaps: Vec::new(),
            disks: entries,
        };
        let vm = Vm::new(spec.name.clone(), Run::Starting);
        let rec = self.launch(&vm, rec)?;
        lock(&self.vms).insert(spec.name.clone(), vm.clone());
        self.put(rec);
        self.save()?;
        tracing::info!(vm = %spec.name, "VM created");
        self.info(&spec.name)
    }

    /// Start QEMU for an owned VM from its record; connect; returns the
    /// record with its pid.
    fn launch(self: &Arc<Self>, vm: &Arc<Vm>, mut rec: VmRecord) -> Result<VmRecord, VmError> {
        let spec = rec
            .spec
            .clone()
            .ok_or_else(|| VmError::failed("not a VM Quern runs"))?;
        let dir = self.dir(&rec.name);
        let mut infos = BTreeMap::new();
        for d in rec.disks.iter().filter(|d| d.attached) {
            infos.insert(d.index(), self.disks.disk(&d.device)?);
        }
        let args = qemu_args(&rec, &spec, &dir, &infos);
        let _ = std::fs::remove_file(&rec.qmp_socket);
        let log = dir.join("qemu.log");
        let logf = std::fs::File::create(&log)
            .map_err(|e| VmError::failed(format!("{}: {e}", log.display())))?;
        let bin = spec
            .qemu
            .clone()
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        let mut cmd = Command::new(&bin);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(
                logf.try_clone()
                    .map_err(|e| VmError::failed(e.to_string()))?,
            )
            .stderr(logf);
        // its own process group: a Ctrl-C meant for Quern does not reach it
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .map_err(|e| VmError::failed(format!("cannot start {}: {e}", bin.display())))?;
        rec.pid = Some(child.id());
        tracing::info!(vm = %rec.name, pid = child.id(), "QEMU started: {} {}", bin.display(), args.join(" "));
        // the supervisor: QEMU's exit status, whenever it comes
        let (v, name) = (vm.clone(), rec.name.clone());
        let exited = Arc::new(AtomicBool::new(false));
        let ex = exited.clone();
        let _ = std::thread::Builder::new()
            .name(format!("qemu-{name}"))
            .spawn(move || {
                let st = child.wait();
                ex.store(true, Ordering::Release);
                let (run, detail) = match st {
                    Ok(s) if s.success() => (Run::ShutDown, "QEMU exited 0".to_string()),
                    Ok(s) => match std::os::unix::process::ExitStatusExt::signal(&s) {
                        Some(sig) => (Run::Crashed, format!("QEMU killed by signal {sig}")),
                        None => (
                            Run::Crashed,
                            format!("QEMU exited {}", s.code().unwrap_or(-1)),
                        ),
                    },
                    Err(e) => (Run::Crashed, format!("waiting for QEMU: {e}")),
                };
                tracing::info!(vm = %name, "{detail}");
                v.set(run, Some(detail));
                *lock(&v.qmp) = None;
            });
        match Qmp::connect(&rec.qmp_socket, START_TIMEOUT) {
            Ok(q) => {
                self.connected(vm, Arc::new(q));
                Ok(rec)
            }
            Err(e) => {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: String = tail
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join(" / ");
                if !exited.load(Ordering::Acquire) {
                    if let Some(pid) = rec.pid {
                        // SAFETY: a process we started and have not reaped.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
                Err(VmError::failed(format!(
                    "VM `{}`: QEMU did not come up ({e}){}",
                    rec.name,
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!(": {tail}")
                    }
                )))
            }
        }
    }

    /// `vm_attach`: a QEMU started by someone else, by its QMP socket. It
    /// must have Quern's PCI bridges (`quern-br0`, ...) for disk insert;
    /// virtio disks it has already hold the lowest names.
    pub fn attach(self: &Arc<Self>, name: &str, qmp_socket: &Path) -> Result<Value, VmError> {
        let _c = lock(&self.create);
        crate::spec::check_name(name).map_err(|r| VmError::invalid("name", r))?;
        if lock(&self.records).contains_key(name) {
            return Err(VmError::new(
                Code::AlreadyExists,
                format!("a VM named `{name}` exists already"),
            ));
        }
        let q = Qmp::connect(qmp_socket, Duration::from_secs(5))
            .map_err(|e| VmError::failed(format!("vm_attach `{name}`: {e}")))?;
        let q = Arc::new(q);
        let mut foreign = 0;
        let mut bridges = 0;
        for container in ["/machine/peripheral", "/machine/peripheral-anon"] {
            let list = q
                .execute("qom-list", json!({"path": container}), COMMAND_TIMEOUT)
                .map_err(|e| qmp_err(name, e))?;
            for p in list.as_array().into_iter().flatten() {
                let (n, t) = (
                    p["name"].as_str().unwrap_or(""),
                    p["type"].as_str().unwrap_or(""),
                );
                if t == "child<pci-bridge>" && n.starts_with("quern-br") {
                    bridges += 1;
                } else if !n.starts_with("quern-")
                    && (t == "child<virtio-blk-pci>" || t == "child<vhost-user-blk-pci>")
                {
                    foreign += 1;
                }
            }
        }
        if bridges == 0 {
            return Err(VmError::failed(format!(
                "vm_attach `{name}`: QEMU has no PCI bridge quern-br0 for hot-plugged disks \
                 (start it with -device pci-bridge,id=quern-br0,chassis_nr=1,bus=pci.0,addr=0x10)"
            )));
        }
        let uuid = q
            .execute("query-uuid", json!({}), COMMAND_TIMEOUT)
            .ok()
            .and_then(|v| v["UUID"].as_str().map(String::from))
            .filter(|u| !u.is_empty() && u != "00000000-0000-0000-0000-000000000000")
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let rec = VmRecord {
            name: name.into(),
            uuid,
            owner: Owner::Attached,
            spec: None,
            qmp_socket: qmp_socket.to_path_buf(),
            pid: None,
            foreign,
            gaps: Vec::new(),
            disks: Vec::new(),
        };
        let vm = Vm::new(name.into(), Run::Starting);
        lock(&self.vms).insert(name.into(), vm.clone());
        self.put(rec);
        self.connected(&vm, q);
        self.save()?;
        tracing::info!(vm = name, foreign, bridges, "VM attached");
        self.info(name)
    }

    /// `vm_start`: start a VM Quern runs that is not running.
    pub fn start(self: &Arc<Self>, name: &str) -> Result<Value, VmError> {
        let vm = self.vm(name)?;
        let _op = lock(&vm.op);
        let rec = self.record(name)?;
        if rec.owner != Owner::Quern {
            return Err(VmError::failed(format!(
                "VM `{name}` was attached, not started by Quern: start its QEMU where it was started"
            )));
        }
        if matches!(vm.run(), Run::Running | Run::Paused | Run::Starting) {
            return Err(VmError::new(
                Code::InUse,
                format!("VM `{name}` is {}", vm.run().as_str()),
            ));
        }
        vm.set(Run::Starting, None);
        let rec = match self.launch(&vm, rec) {
            Ok(r) => r,
            Err(e) => {
                vm.set(Run::Crashed, Some(e.message.clone()));
                return Err(e);
            }
        };
        self.put(rec);
        self.save()?;
        self.info(name)
    }

    /// `vm_stop`: ask the guest to power off (ACPI) and wait up to
    /// `timeout`, or with `force` tell QEMU to quit.
    pub fn stop(&self, name: &str, force: bool, timeout: Duration) -> Result<Value, VmError> {
        let vm = self.vm(name)?;
        let _op = lock(&vm.op);
        let q = vm
            .qmp()
            .ok_or_else(|| VmError::failed(format!("VM `{name}` is {}", vm.run().as_str())))?;
        if force {
            match q.execute("quit", json!({}), COMMAND_TIMEOUT) {
                Ok(_) | Err(QmpError::Closed { .. }) => {}
                Err(e) => return Err(qmp_err(name, e)),
            }
        } else {
            q.execute("system_powerdown", json!({}), COMMAND_TIMEOUT)
                .map_err(|e| qmp_err(name, e))?;
        }
        let t0 = Instant::now();
        let limit = if force { COMMAND_TIMEOUT } else { timeout };
        while q.closed().is_none() {
            if t0.elapsed() > limit {
                return Err(VmError::failed(format!(
                    "VM `{name}`: the guest did not power off within {} s (force: true quits QEMU)",
                    limit.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // the supervisor (owned) or the watcher (attached) records how it ended
        let t0 = Instant::now();
        while matches!(vm.run(), Run::Running | Run::Paused | Run::Starting)
            && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.info(name)
    }

    /// `vm_reset`: reset the VM as its reset button would (the guest boots
    /// again with the same disks at the same PCI slots).
    pub fn reset(&self, name: &str) -> Result<Value, VmError> {
        let vm = self.vm(name)?;
        let _op = lock(&vm.op);
        let q = self.live_qmp(&vm)?;
        q.execute("system_reset", json!({}), COMMAND_TIMEOUT)
            .map_err(|e| qmp_err(name, e))?;
        self.info(name)
    }

    /// `vm_pause` / `vm_resume`: QMP stop and cont.
    pub fn pause(&self, name: &str, pause: bool) -> Result<Value, VmError> {
        let vm = self.vm(name)?;
        let _op = lock(&vm.op);
        let q = vm
            .qmp()
            .ok_or_else(|| VmError::failed(format!("VM `{name}` is {}", vm.run().as_str())))?;
        q.execute(
            if pause { "stop" } else { "cont" },
            json!({}),
            COMMAND_TIMEOUT,
        )
        .map_err(|e| qmp_err(name, e))?;
        vm.set(if pause { Run::Paused } else { Run::Running }, None);
        self.info(name)
    }

    /// `vm_delete`: forget a VM (a running one only with `force`, which
    /// quits a QEMU Quern started; an attached QEMU is left running).
    pub fn delete(&self, name: &str, force: bool) -> Result<Value, VmError> {
        let _c = lock(&self.create);
        let vm = self.vm(name)?;
        let _op = lock(&vm.op);
        let rec = self.record(name)?;
        let live = matches!(vm.run(), Run::Running | Run::Paused | Run::Starting);
        if live && rec.owner == Owner::Quern {
            if !force {
                return Err(VmError::new(
                    Code::InUse,
                    format!(
                        "VM `{name}` is {} (vm_stop first, or force: true)",
                        vm.run().as_str()
                    ),
                ));
            }
            if let Some(q) = vm.qmp() {
                let _ = q.execute("quit", json!({}), COMMAND_TIMEOUT);
            }
        }
        vm.gone.store(true, Ordering::Release);
        *lock(&vm.qmp) = None;
        lock(&self.vms).remove(name);
        let old = lock(&self.records).remove(name);
        if let Err(e) = self.save() {
            if let Some(r) = old {
                self.put(r);
            }
            return Err(e);
        }
        Ok(json!({"deleted": name}))
    }

    pub fn list(&self) -> Value {
        let names: Vec<String> = lock(&self.records).keys().cloned().collect();
        Value::Array(names.iter().filter_map(|n| self.info(n).ok()).collect())
    }

    /// One VM as `vm_list` shows it.
    pub fn info(&self, name: &str) -> Result<Value, VmError> {
        let rec = self.record(name)?;
        let vm = self.vm(name)?;
        let (run, detail) = {
            let s = lock(&vm.status);
            (s.run.as_str(), s.detail.clone())
        };
        let q = vm.qmp();
        let mut disks: Vec<&DiskEntry> = rec.disks.iter().collect();
        disks.sort_by_key(|d| d.index());
        Ok(json!({
            "name": rec.name,
            "uuid": rec.uuid,
            "owner": rec.owner,
            "state": run,
            "detail": detail,
            "pid": rec.pid,
            "qmp_socket": rec.qmp_socket,
            "console": (rec.owner == Owner::Quern).then(|| self.dir(name).join("console.sock")),
            "qemu_version": q.map(|q| format!("{}.{}.{}", q.version.0, q.version.1, q.version.2)),
            "disks": disks,
            "placeholders": rec.gaps.iter().map(|&i| names::index_to_name("vd", i)).collect::<Vec<_>>(),
            "spec": rec.spec,
        }))
    }

    /// `vm_disks`: the VM's map, by name.
    pub fn disks_of(&self, name: &str) -> Result<Value, VmError> {
        let rec = self.record(name)?;
        let mut d = rec.disks.clone();
        d.sort_by_key(|e| e.index());
        Ok(json!({
            "vm": name,
            "disks": d,
            "placeholders": rec.gaps.iter().map(|&i| names::index_to_name("vd", i)).collect::<Vec<_>>(),
            "foreign": (0..rec.foreign).map(|i| names::index_to_name("vd", i)).collect::<Vec<_>>(),
        }))
    }

    fn live_qmp(&self, vm: &Vm) -> Result<Arc<Qmp>, VmError> {
        match vm.qmp() {
            Some(q) if q.closed().is_none() => Ok(q),
            _ => Err(VmError::failed(format!(
                "VM `{}` is {}: its QEMU is not there to change",
                vm.name,
                vm.run().as_str()
            ))),
        }
    }

    /// `vm_disk_insert`: give `device` its name in `vm` (the one it has
    /// in the map, `want` for a disk that has none, or the lowest free)
    /// and hot-plug it so that the guest gives it that name. Idempotent.
    pub fn disk_insert(
        &self,
        vmname: &str,
        device: &str,
        want: Option<&str>,
    ) -> Result<Value, VmError> {
        let vm = self.vm(vmname)?;
        let _op = lock(&vm.op);
        let info = self.disks.disk(device)?;
        if let Some((other, _)) = self.user_of(device).filter(|(v, _)| v != vmname) {
            return Err(VmError::new(
                Code::InUse,
                format!("device `{device}` is a disk of VM `{other}`"),
            ));
        }
        let mut rec = self.record(vmname)?;
        let want_idx = match want {
            Some(w) => Some(
                names::name_to_index(w)
                    .map_err(|r| VmError::invalid("name", r))?
                    .1,
            ),
            None => None,
        };
        let existing = rec.disks.iter().position(|d| d.uuid == info.uuid);
        let k = match existing {
            Some(i) => {
                let e = &rec.disks[i];
                if want_idx.is_some_and(|w| w != e.index()) {
                    return Err(VmError::new(
                        Code::InUse,
                        format!(
                            "disk {} (device `{device}`) is {} in VM `{vmname}`; vm_disk_release it before giving it another name",
                            info.uuid, e.name
                        ),
                    ));
                }
                if e.attached {
                    return Ok(
                        json!({"vm": vmname, "device": device, "uuid": info.uuid, "name": e.name, "serial": info.serial, "inserted": false}),
                    );
                }
                e.index()
            }
            None => match want_idx {
                Some(w) => {
                    if w < rec.foreign {
                        return Err(VmError::new(
                            Code::InUse,
                            format!(
                                "{} is held by a disk VM `{vmname}` had before Quern attached to it",
                                names::index_to_name("vd", w)
                            ),
                        ));
                    }
                    if let Some(h) = rec.holder(w) {
                        return Err(VmError::new(
                            Code::InUse,
                            format!(
                                "{} in VM `{vmname}` is held by disk {} (device `{}`{})",
                                h.name,
                                h.uuid,
                                h.device,
                                if h.attached {
                                    ""
                                } else {
                                    ", removed, its name reserved"
                                }
                            ),
                        ));
                    }
                    w
                }
                None => rec.lowest_free(),
            },
        };
        if k >= MAX_DISKS {
            return Err(VmError::failed(format!(
                "VM `{vmname}` has no room for a disk at {} (at most {MAX_DISKS})",
                names::index_to_name("vd", k)
            )));
        }
        let q = self.live_qmp(&vm)?;
        // the guest's indices below k all in use, k itself free
        if rec.gaps.contains(&k) {
            remove_gap(&q, vmname, &mut rec, k, COMMAND_TIMEOUT)?;
        }
        for j in rec.foreign..k {
            if !rec.occupied(j) {
                add_gap(&q, vmname, &mut rec, j)?;
                self.put(rec.clone());
            }
        }
        add_disk(&q, vmname, k, &info)?;
        match existing {
            Some(i) => rec.disks[i].attached = true,
            None => rec.disks.push(DiskEntry {
                uuid: info.uuid.clone(),
                name: names::index_to_name("vd", k),
                device: device.into(),
                attached: true,
            }),
        }
        self.put(rec);
        self.save()?;
        let name = names::index_to_name("vd", k);
        tracing::info!(vm = vmname, device, uuid = %info.uuid, name = %name, "disk inserted");
        Ok(
            json!({"vm": vmname, "device": device, "uuid": info.uuid, "name": name, "serial": info.serial, "inserted": true}),
        )
    }

    /// `vm_disk_remove`: unplug `device` from `vm` once the guest lets go
    /// (DEVICE_DELETED within `timeout`); its name stays reserved, held in
    /// the guest by a placeholder. A guest that does not let go in time
    /// gets an error and nothing is freed (if it lets go later, Quern
    /// finishes the removal then).
    pub fn disk_remove(
        &self,
        vmname: &str,
        device: &str,
        timeout: Duration,
    ) -> Result<Value, VmError> {
        let vm = self.vm(vmname)?;
        let _op = lock(&vm.op);
        let mut rec = self.record(vmname)?;
        let i = entry_of(&rec, device)?;
        if !rec.disks[i].attached {
            return Err(VmError::new(
                Code::NotFound,
                format!(
                    "device `{device}` was removed from VM `{vmname}` already; its name {} is reserved",
                    rec.disks[i].name
                ),
            ));
        }
        let q = self.live_qmp(&vm)?;
        let k = rec.disks[i].index();
        let name = rec.disks[i].name.clone();
        let id = disk_id(k);
        let from = q.cursor();
        q.execute("device_del", json!({"id": id}), COMMAND_TIMEOUT)
            .map_err(|e| qmp_err(vmname, e))?;
        q.wait_event(from, &format!("DEVICE_DELETED of {id}"), |e| e.name == "DEVICE_DELETED" && e.data["device"] == id.as_str(), timeout)
            .map_err(|e| match e {
                QmpError::Timeout { .. } => VmError::failed(format!(
                    "VM `{vmname}`: the guest did not release {name} (device `{device}`) within {} s; it stays attached, nothing freed (Quern finishes the removal if the guest lets go later)",
                    timeout.as_secs()
                )),
                other => qmp_err(vmname, other),
            })?;
        finish_removal(&q, vmname, &mut rec, i)?;
        self.put(rec);
        self.save()?;
        tracing::info!(vm = vmname, device, name = %name, "disk removed; its name stays reserved");
        Ok(json!({"vm": vmname, "device": device, "name": name, "reserved": true}))
    }

    /// `vm_disk_release`: forget a removed disk's name in `vm`.
    pub fn disk_release(&self, vmname: &str, device: &str) -> Result<Value, VmError> {
        let vm = self.vm(vmname)?;
        let _op = lock(&vm.op);
        let mut rec = self.record(vmname)?;
        let i = entry_of(&rec, device)?;
        if rec.disks[i].attached {
            return Err(VmError::new(
                Code::InUse,
                format!("device `{device}` is attached to VM `{vmname}` (vm_disk_remove first)"),
            ));
        }
        let e = rec.disks.remove(i);
        // placeholders at the top of the guest's indices go too
        if let Ok(q) = self.live_qmp(&vm) {
            loop {
                let top = (0..MAX_DISKS).rev().find(|&j| rec.occupied(j));
                match top {
                    Some(t) if rec.gaps.contains(&t) && rec.holder(t).is_none() => {
                        remove_gap(&q, vmname, &mut rec, t, COMMAND_TIMEOUT)?;
                    }
                    _ => break,
                }
            }
        }
        self.put(rec);
        self.save()?;
        Ok(json!({"vm": vmname, "device": device, "released": e.name}))
    }

    /// A DEVICE_DELETED the watcher saw for a disk no removal was waiting
    /// for (a guest that let go after its removal timed out).
    fn reconcile(&self, vm: &Vm, q: &Qmp, device_id: &str) {
        let _op = lock(&vm.op);
        let Ok(mut rec) = self.record(&vm.name) else {
            return;
        };
        let Some(i) = rec
            .disks
            .iter()
            .position(|d| d.attached && disk_id(d.index()) == device_id)
        else {
            return;
        };
        match finish_removal(q, &vm.name, &mut rec, i) {
            Ok(()) => {
                tracing::info!(vm = %vm.name, device = %rec.disks[i].device, "the guest let go of a disk after its removal timed out; removal finished");
                self.put(rec);
                if let Err(e) = self.save() {
                    tracing::warn!(vm = %vm.name, "{e}");
                }
            }
            Err(e) => tracing::warn!(vm = %vm.name, "finishing a late removal: {e}"),
        }
    }
}

/// The index of `device`'s entry in a VM's map.
fn entry_of(rec: &VmRecord, device: &str) -> Result<usize, VmError> {
    rec.disks
        .iter()
        .position(|d| d.device == device)
        .ok_or_else(|| {
            VmError::new(
                Code::NotFound,
                format!("device `{device}` is not a disk of VM `{}`", rec.name),
            )
        })
}

fn not_found(name: &str) -> VmError {
    VmError::new(Code::NotFound, format!("no VM named `{name}`"))
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn disk_id(k: u32) -> String {
    format!("quern-{}", names::index_to_name("vd", k))
}
fn gap_id(k: u32) -> String {
    format!("quern-gap-{}", names::index_to_name("vd", k))
}
/// The PCI position of index `k`: behind bridge k / 30, slot 1 + k % 30.
fn pci(k: u32) -> (String, String) {
    (
        format!("quern-br{}", k / SLOTS_PER_BRIDGE),
        format!("{:#x}", 1 + k % SLOTS_PER_BRIDGE),
    )
}

fn add_gap(q: &Qmp, vm: &str, rec: &mut VmRecord, k: u32) -> Result<(), VmError> {
    let id = gap_id(k);
    let node = format!("{id}-n");
    q.execute(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": node, "size": 4096, "read-zeroes": true, "read-only": true}),
        COMMAND_TIMEOUT,
    )
    .map_err(|e| qmp_err(vm, e))?;
    let (bus, addr) = pci(k);
    if let Err(e) = q.execute(
        "device_add",
        json!({"driver": "virtio-blk-pci", "id": id, "drive": node, "serial": "quern-gap", "bus": bus, "addr": addr, "disable-legacy": "on"}),
        DEVICE_ADD_TIMEOUT,
    ) {
        let _ = q.execute("blockdev-del", json!({"node-name": node}), COMMAND_TIMEOUT);
        return Err(qmp_err(vm, e));
    }
    rec.gaps.push(k);
    rec.gaps.sort_unstable();
    Ok(())
}

fn remove_gap(
    q: &Qmp,
    vm: &str,
    rec: &mut VmRecord,
    k: u32,
    timeout: Duration,
) -> Result<(), VmError> {
    let id = gap_id(k);
    let from = q.cursor();
    q.execute("device_del", json!({"id": id}), COMMAND_TIMEOUT)
        .map_err(|e| qmp_err(vm, e))?;
    q.wait_event(
        from,
        &format!("DEVICE_DELETED of placeholder {id}"),
        |e| e.name == "DEVICE_DELETED" && e.data["device"] == id.as_str(),
        timeout,
    )
    .map_err(|e| match e {
        QmpError::Timeout { .. } => VmError::failed(format!(
            "VM `{vm}`: the guest did not release the placeholder at {} within {} s",
            names::index_to_name("vd", k),
            timeout.as_secs()
        )),
        other => qmp_err(vm, other),
    })?;
    let _ = q.execute(
        "blockdev-del",
        json!({"node-name": format!("{id}-n")}),
        COMMAND_TIMEOUT,
    );
    rec.gaps.retain(|&g| g != k);
    Ok(())
}

fn add_disk(q: &Qmp, vm: &str, k: u32, info: &DiskInfo) -> Result<(), VmError> {
    let id = disk_id(k);
    let chardev = format!("{id}-c");
    // QEMU keeps retrying a backend that restarts: 9.2 renamed the option
    let mut sock = json!({
        "addr": {"type": "unix", "data": {"path": info.socket}},
        "server": false,
    });
    if q.version >= (9, 2, 0) {
        sock["reconnect-ms"] = json!(1000);
    } else {
        sock["reconnect"] = json!(1);
    }
    q.execute(
        "chardev-add",
        json!({"id": chardev, "backend": {"type": "socket", "data": sock}}),
        COMMAND_TIMEOUT,
    )
    .map_err(|e| qmp_err(vm, e))?;
    let (bus, addr) = pci(k);
    if let Err(e) = q.execute(
        "device_add",
        json!({"driver": "vhost-user-blk-pci", "id": id, "chardev": chardev, "num-queues": info.num_queues, "bus": bus, "addr": addr, "disable-legacy": "on"}),
        DEVICE_ADD_TIMEOUT,
    ) {
        let _ = q.execute("chardev-remove", json!({"id": chardev}), COMMAND_TIMEOUT);
        return Err(qmp_err(vm, e));
    }
    Ok(())
}

/// After a disk's DEVICE_DELETED: free its chardev, hold its name with a
/// placeholder, mark it removed.
fn finish_removal(q: &Qmp, vm: &str, rec: &mut VmRecord, i: usize) -> Result<(), VmError> {
    let k = rec.disks[i].index();
    let _ = q.execute(
        "chardev-remove",
        json!({"id": format!("{}-c", disk_id(k))}),
        COMMAND_TIMEOUT,
    );
    rec.disks[i].attached = false;
    add_gap(q, vm, rec, k)
}

/// The watcher of one VM's QMP events.
fn watch(mgr: Weak<VmManager>, vm: Arc<Vm>, q: Arc<Qmp>) {
    let mut from = 0;
    loop {
        if vm.gone.load(Ordering::Acquire) {
            return;
        }
        q.wait_any(from, Duration::from_millis(500));
        for e in q.events_since(from) {
            from = e.seq + 1;
            match e.name.as_str() {
                "STOP" => vm.set(Run::Paused, None),
                "RESUME" => vm.set(Run::Running, None),
                "SHUTDOWN" => {
                    let why = e.data["reason"].as_str().unwrap_or("").to_string();
                    vm.set(Run::ShutDown, Some(format!("shutdown ({why})")));
                }
                "DEVICE_DELETED" => {
                    if let (Some(d), Some(m)) = (e.data["device"].as_str(), mgr.upgrade()) {
                        if d.starts_with("quern-vd") {
                            m.reconcile(&vm, &q, d);
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(reason) = q.closed() {
            // an owned VM's supervisor records how QEMU ended; an attached
            // one is just gone from here
            let owned = mgr
                .upgrade()
                .and_then(|m| m.record(&vm.name).ok())
                .is_some_and(|r| r.owner == Owner::Quern);
            if !owned && vm.run() != Run::ShutDown {
                vm.set(Run::Disconnected, Some(reason));
            }
            let mut cur = lock(&vm.qmp);
            if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, &q)) {
                *cur = None;
            }
            return;
        }
    }
}

/// QEMU's command line for an owned VM: its disks and placeholders at the
/// PCI slots of their indices, so the guest names them in order at boot.
fn qemu_args(
    rec: &VmRecord,
    spec: &VmSpec,
    dir: &Path,
    disks: &BTreeMap<u32, DiskInfo>,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&["-name", &format!("{},debug-threads=on", spec.name)]);
    push(&["-uuid", &rec.uuid]);
    push(&["-machine", &spec.machine]);
    for acc in &spec.accel {
        let v = if acc == "tcg" {
            "tcg,thread=multi".to_string()
        } else {
            acc.clone()
        };
        push(&["-accel", &v]);
    }
    push(&["-cpu", &spec.cpu, "-smp", &spec.vcpus.to_string()]);
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    push(&[
        "-object",
        &format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            spec.memory_mib
        ),
        "-numa",
        "node,memdev=mem",
    ]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", rec.qmp_socket.display()),
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=quern-console,path={},server=on,wait=off,logfile={},logappend=on",
            dir.join("console.sock").display(),
            dir.join("console.log").display()
        ),
        "-serial",
        "chardev:quern-console",
    ]);
    if let Some(k) = &spec.kernel {
        push(&["-kernel", &k.display().to_string()]);
    }
    if let Some(i) = &spec.initrd {
        push(&["-initrd", &i.display().to_string()]);
    }
    if let Some(ap) = &spec.append {
        push(&["-append", ap]);
    }
    for b in 0..BRIDGES {
        push(&[
            "-device",
            &format!(
                "pci-bridge,id=quern-br{b},chassis_nr={},bus=pci.0,addr={:#x}",
                b + 1,
                0x10 + b
            ),
        ]);
    }
    let boot = spec
        .boot_disk
        .as_ref()
        .and_then(|b| rec.disks.iter().find(|d| &d.device == b && d.attached))
        .map(|d| d.index());
    for (&k, info) in disks {
        let id = disk_id(k);
        let (bus, addr) = pci(k);
        push(&[
            "-chardev",
            &format!("socket,id={id}-c,path={},reconnect=1", info.socket.display()),
            "-device",
            &format!(
                "vhost-user-blk-pci,id={id},chardev={id}-c,num-queues={},bus={bus},addr={addr},disable-legacy=on{}",
                info.num_queues,
                if boot == Some(k) { ",bootindex=1" } else { "" }
            ),
        ]);
    }
    for &k in &rec.gaps {
        let id = gap_id(k);
        let (bus, addr) = pci(k);
        push(&[
            "-blockdev",
            &format!("driver=null-co,node-name={id}-n,size=4096,read-zeroes=on,read-only=on"),
            "-device",
            &format!("virtio-blk-pci,id={id},drive={id}-n,serial=quern-gap,bus={bus},addr={addr},disable-legacy=on"),
        ]);
    }
    match spec.network {
        crate::spec::Network::None => {}
        crate::spec::Network::User => push(&[
            "-netdev",
            "user,id=quern-net0",
            "-device",
            "virtio-net-pci,netdev=quern-net0",
        ]),
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_index_has_its_own_pci_slot_in_name_order() {
        let mut seen = std::collections::HashSet::new();
        let mut last = (String::new(), 0u32);
        for k in 0..MAX_DISKS {
            let (bus, addr) = pci(k);
            let slot = u32::from_str_radix(addr.trim_start_matches("0x"), 16).unwrap();
            assert!((1..=30).contains(&slot));
            assert!(seen.insert((bus.clone(), slot)));
            // bridges in order, slots in order within one: probe order
            assert!((bus.clone(), slot) > last, "{k}");
            last = (bus, slot);
        }
    }
}
