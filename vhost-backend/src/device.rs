//! A vhost-user-blk device: its socket, its control thread and the
//! vhost-user protocol handler.
//!
//! The handler keeps the memory table and each vring's setup. A vring starts
//! when it has a kick fd and is enabled; then it is bound to a reactor (the
//! device's binding policy, by queue index) and a [`QueuePoller`] is sent
//! there. GET_VRING_BASE, SET_VRING_ENABLE(0), a memory-table change, a
//! reset or a disconnect stop it again: the reactor lets its in-flight
//! requests complete, removes the poller and reports the last avail index.

use std::fs::File;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quern_bdev::poller::{remove_when_idle, RemoveError};
use quern_bdev::{BdevRef, IoReactor, PollerId};
use quern_reactor::sys::{claim_socket_path, BoundSocket};
use vhost::vhost_user::message::*;
use vhost::vhost_user::{
    Backend, BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;

use crate::blk::{self, ID_BYTES};
use crate::dirty::{DirtyLog, LogView};
use crate::inflight::{self, InflightRegion};
use crate::memory::{FrontendAddress, GuestAddress, MemTable};
use crate::qos::QosBinding;
use crate::queue::{QueueParts, QueuePoller, QueueStats};
use crate::virtq::SplitQueue;

const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
const VIRTIO_BLK_F_CONFIG_WCE: u64 = 1 << 11;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

const MAX_MEM_SLOTS: u64 = crate::memory::MAX_REGIONS as u64;
const MAX_QUEUE_SIZE: u32 = 32768;
/// Offset of `writeback` in virtio_blk_config.
const CONFIG_WRITEBACK: u32 = 32;
const CONFIG_LEN: usize = 60;

/// Which reactor runs queue i.
#[derive(Clone, Debug)]
pub enum QueueBinding {
    /// Queue i on `reactors[i % len]`.
    RoundRobin(Vec<usize>),
    /// Queue i on `list[i]` (must cover every queue).
    Explicit(Vec<usize>),
}

impl QueueBinding {
    pub fn reactor_for(&self, queue: usize) -> usize {
        match self {
            QueueBinding::RoundRobin(r) => r[queue % r.len()],
            QueueBinding::Explicit(l) => l[queue.min(l.len() - 1)],
        }
    }
}

#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub name: String,
    pub socket: PathBuf,
    pub num_queues: u16,
    pub queue_size: u16,
    pub read_only: bool,
    pub serial: String,
    pub binding: QueueBinding,
    /// Keep per-queue latency histograms.
    pub timing: bool,
    /// Offer VIRTIO_RING_F_EVENT_IDX. Guests that sleep for completions
    /// want it (exact kick and interrupt suppression); a polling client
    /// does not need it and pays a fence per submission for it.
    pub event_idx: bool,
    /// The device's QoS limiters: its own (maybe unlimited) and its
    /// group's; both may change while it runs.
    pub qos: Arc<QosBinding>,
}

/// The control plane's view of a served device.
pub struct DeviceHandle {
    pub name: String,
    pub queues: Vec<Arc<QueueStats>>,
    /// Its QoS limiters: its own (set at run time with [`Limiter::set`])
    /// and its group's ([`QosBinding::set_group`]).
    /// [`Limiter::set`]: crate::qos::Limiter::set
    pub qos: Arc<QosBinding>,
    pub connections: Arc<AtomicU64>,
    shutdown: Arc<AtomicBool>,
    /// The frontend's connection while one is open (a second handle on
    /// the socket, to end it from outside the control thread).
    conn: Arc<Mutex<Option<UnixStream>>>,
    /// How long stopping a queue waits for its requests, in ms.
    drain_ms: Arc<AtomicU64>,
    /// The socket file this device listens on.
    socket: BoundSocket,
    dev: Arc<Mutex<BlkDevice>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How long stopping a queue waits for its in-flight requests by default
/// (a frontend's GET_VRING_BASE, a memory-table change, a disconnect).
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);

impl DeviceHandle {
    /// Stop accepting, end the current connection (its queues stop taking
    /// requests and drain for at most `drain`; what is still in flight
    /// then stays recorded in the frontend's in-flight region), remove the
    /// socket. Returns once the control thread has ended.
    pub fn stop_within(&self, drain: Duration) {
        self.drain_ms.store(
            drain.as_millis().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
        {
            let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            // the control thread checks this under the same lock before it
            // keeps a connection, so either it sees the flag or we see it
            self.shutdown.store(true, Ordering::Release);
            if let Some(c) = conn.as_ref() {
                // the control thread's recvmsg returns: a disconnect
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        // wake the accept(), whatever its path names now
        self.socket.wake();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        self.socket.remove();
    }

    /// [`DeviceHandle::stop_within`] the default drain limit.
    pub fn stop(&self) {
        self.stop_within(DRAIN_LIMIT);
    }

    /// Whether a frontend is connected now.
    pub fn connected(&self) -> bool {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Take the device away while a frontend may still be attached: it
    /// stops listening (the socket file goes, so its path is free again),
    /// and from now on every request fails with VIRTIO_BLK_S_IOERR (those
    /// in flight finish). The connection stays until the frontend closes it
    /// (QEMU: `device_del`), so the guest sees its disk fail rather than
    /// hang, as it would if the socket simply closed. See
    /// [`DeviceHandle::finished`].
    pub fn retire(&self) {
        {
            let mut d = self.dev.lock().unwrap_or_else(|e| e.into_inner());
            d.failing.store(true, Ordering::Release);
            d.fail_running();
        }
        {
            let _conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            self.shutdown.store(true, Ordering::Release);
        }
        // wake an accept() (the thread leaves when the connection, if any,
        // has ended)
        self.socket.wake();
        self.socket.remove();
        tracing::info!(device = %self.name, connected = self.connected(), "device retired: its requests fail until the frontend lets go");
    }

    /// Whether the device's control thread has ended (a retired device
    /// whose frontend has let go).
    pub fn finished(&self) -> bool {
        self.thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|t| t.is_finished())
    }

    /// End the current frontend connection, if any (the device keeps
    /// listening; its queues stop and drain as on any disconnect).
    pub fn disconnect(&self) {
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

struct Vring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
    /// (reactor index, poller id) while running.
    running: Option<(usize, PollerId)>,
    /// The used ring's guest-physical address for the dirty log (from
    /// SET_VRING_ADDR's log address; u64::MAX: not given), shared with
    /// the running queue so a new one reaches it at once.
    log_addr: Arc<AtomicU64>,
}

impl Default for Vring {
    fn default() -> Self {
        Vring {
            size: 0,
            desc: 0,
            avail: 0,
            used: 0,
            base: 0,
            kick: None,
            call: None,
            enabled: false,
            running: None,
            log_addr: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }
}

struct BlkDevice {
    cfg: DeviceConfig,
    bdev: BdevRef,
    reactors: Vec<Arc<IoReactor>>,
    /// The bdev's handle on each reactor's engine.
    dev_handles: Vec<u16>,
    acked_features: u64,
    mem: Arc<MemTable>,
    vrings: Vec<Vring>,
    writeback: Arc<AtomicBool>,
    stats: Vec<Arc<QueueStats>>,
    serial: [u8; ID_BYTES],
    name: Arc<str>,
    /// The frontend's in-flight region (SET_INFLIGHT_FD), kept across
    /// backend restarts by the frontend.
    inflight: Option<Arc<InflightRegion>>,
    /// How long stopping a queue waits for its requests, in ms.
    drain_ms: Arc<AtomicU64>,
    /// Pollers that did not drain in time: quiesced and still registered
    /// (their requests, and the guest memory they name, still in flight);
    /// removed when they have drained.
    stuck: Vec<(usize, PollerId)>,
    /// Retired: every request fails (see [`DeviceHandle::retire`]).
    failing: Arc<AtomicBool>,
    /// The dirty log (SET_LOG_BASE) and whether LOG_ALL is on.
    dirty: LogView,
}

fn vu_err(msg: &'static str) -> VuError {
    VuError::InvalidOperation(msg)
}

impl BlkDevice {
    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_TOPOLOGY
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_CONFIG_WCE
            | VIRTIO_BLK_F_MQ
            | VIRTIO_RING_F_INDIRECT_DESC
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.cfg.event_idx {
            f |= VIRTIO_RING_F_EVENT_IDX;
        }
        // offer only what the bdev does: a guest then never sends a request
        // it would have to see refused; discard and write-zeroes are writes
        let info = self.bdev.info();
        if self.cfg.read_only || info.read_only {
            f |= VIRTIO_BLK_F_RO;
            return f;
        }
        if info.supports_discard {
            f |= VIRTIO_BLK_F_DISCARD;
        }
        if info.supports_write_zeroes {
            f |= VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let info = self.bdev.info();
        let mut c = [0u8; CONFIG_LEN];
        let put32 = |c: &mut [u8; CONFIG_LEN], off: usize, v: u32| {
            c[off..off + 4].copy_from_slice(&v.to_le_bytes())
        };
        c[0..8].copy_from_slice(&(info.capacity_bytes / 512).to_le_bytes());
        let l = &blk::LIMITS;
        put32(&mut c, 8, l.size_max);
        put32(&mut c, 12, l.seg_max);
        put32(&mut c, 20, info.block_size);
        // topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
        c[24] = 0;
        c[25] = 0;
        c[26..28].copy_from_slice(&1u16.to_le_bytes());
        put32(&mut c, 28, 0);
        c[32] = u8::from(self.writeback.load(Ordering::Relaxed));
        c[34..36].copy_from_slice(&self.cfg.num_queues.to_le_bytes());
        put32(&mut c, 36, l.max_discard_sectors);
        put32(&mut c, 40, l.max_discard_seg);
        put32(&mut c, 44, info.block_size / 512); // discard_sector_alignment
        put32(&mut c, 48, l.max_write_zeroes_sectors);
        put32(&mut c, 52, l.max_write_zeroes_seg);
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    fn check_index(&self, index: u32) -> VuResult<usize> {
        let i = index as usize;
        if i < self.vrings.len() {
            Ok(i)
        } else {
            Err(VuError::InvalidParam)
        }
    }

    fn try_start(&mut self, i: usize) -> VuResult<()> {
        let v = &self.vrings[i];
        if v.running.is_some() || !v.enabled || v.kick.is_none() || v.size == 0 {
            return Ok(());
        }
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        // SAFETY: the poller built below holds `self.mem` beside the queue
        // for as long as it uses it.
        let q = unsafe {
            SplitQueue::new(
                &self.mem,
                v.size,
                FrontendAddress(v.desc),
                FrontendAddress(v.avail),
                FrontendAddress(v.used),
                v.base,
                event_idx,
            )
        };
        let mut q = match q {
            Ok(q) => q,
            Err(e) => {
                tracing::warn!(device = %self.name, queue = i, "refused vring: {e}");
                return Err(vu_err("vring refused: misaligned or outside guest memory"));
            }
        };
        let mut inflight_region = None;
        let mut resubmit = Vec::new();
        if let Some(region) = &self.inflight {
            let mut iq = region
                .queue(i, v.size)
                .ok_or(vu_err("the in-flight region does not cover this vring"))?;
            let used = q.used_ring_idx();
            if let Some(heads) = iq.recover(used) {
                let next_avail = used.wrapping_add(heads.len() as u16);
                if next_avail != v.base {
                    tracing::info!(device = %self.name, queue = i, used, in_flight = heads.len(), frontend_base = v.base, "resuming from the in-flight region");
                }
                q.resume_at(next_avail, used);
                resubmit = heads;
            }
            inflight_region = Some(iq);
        }
        let kick = v
            .kick
            .as_ref()
            .expect("checked")
            .try_clone()
            .map_err(VuError::SocketError)?;
        let call = match &v.call {
            Some(c) => c.try_clone().map_err(VuError::SocketError)?,
            // no call fd yet: signal into a private eventfd nobody reads
            None => new_eventfd().map_err(VuError::SocketError)?,
        };
        let r = self.cfg.binding.reactor_for(i).min(self.reactors.len() - 1);
        let poller = QueuePoller::new(QueueParts {
            q,
            mem: self.mem.clone(),
            dev: self.dev_handles[r],
            capacity: self.bdev.info().capacity_bytes,
            read_only: self.cfg.read_only || self.bdev.info().read_only,
            writeback: self.writeback.clone(),
            kick,
            call,
            max_segs: blk::LIMITS.seg_max as usize,
            serial: self.serial,
            stats: self.stats[i].clone(),
            name: self.name.clone(),
            inflight_region,
            resubmit,
            failing: self.failing.load(Ordering::Acquire),
            timing: self.cfg.timing,
            qos: self.cfg.qos.clone(),
            dirty: self.dirty.clone(),
            used_gpa: {
                let a = self.vrings[i].log_addr.clone();
                // without a log address from the frontend: the used ring's
                // own guest-physical address
                if a.load(Ordering::Relaxed) == u64::MAX {
                    if let Some(g) = self.mem.uva_to_gpa(FrontendAddress(self.vrings[i].used)) {
                        a.store(g.0, Ordering::Relaxed);
                    }
                }
                a
            },
        });
        let id = match self.reactors[r].call(move |w| w.add_poller(Box::new(poller))) {
            Ok(Ok(id)) => id,
            Ok(Err(_)) => return Err(vu_err("the reactor runs too many queues")),
            Err(_) => return Err(vu_err("the queue's reactor has stopped")),
        };
        self.stats[i].reactor.store(r as u64, Ordering::Relaxed);
        self.vrings[i].running = Some((r, id));
        tracing::info!(device = %self.name, queue = i, reactor = r, core = ?self.reactors[r].core, size = self.vrings[i].size, "queue bound to reactor");
        Ok(())
    }

    /// Stop a running queue: it takes no new requests, and its requests
    /// in flight finish (for at most the drain limit). Its next start
    /// resumes at the returned index.
    fn stop(&mut self, i: usize) -> u16 {
        self.retry_stuck();
        if let Some((r, id)) = self.vrings[i].running.take() {
            let limit = Duration::from_millis(self.drain_ms.load(Ordering::Relaxed));
            match remove_when_idle(&self.reactors[r], id, limit) {
                Ok(Some(p)) => {
                    self.vrings[i].base = p.resume_index().unwrap_or(self.vrings[i].base);
                }
                Ok(None) => {}
                Err(RemoveError::Busy { in_flight, waited }) => {
                    tracing::error!(device = %self.name, queue = i, in_flight, "queue stopped with requests still in flight after {waited:?}; they stay recorded in the in-flight region");
                    self.stuck.push((r, id));
                }
                Err(RemoveError::Gone(e)) => {
                    tracing::warn!(device = %self.name, queue = i, "queue stop: {e}");
                }
            }
            self.stats[i].reactor.store(u64::MAX, Ordering::Relaxed);
            tracing::info!(device = %self.name, queue = i, base = self.vrings[i].base, "queue stopped");
        }
        self.vrings[i].base
    }

    /// Have every running queue fail its requests from now on.
    fn fail_running(&mut self) {
        for v in &self.vrings {
            if let Some((r, id)) = v.running {
                if self.reactors[r].call(move |w| w.fail_poller(id)).is_err() {
                    tracing::warn!(device = %self.name, "a queue's reactor has stopped");
                }
            }
        }
    }

    /// Remove the pollers that had not drained, if they have by now.
    fn retry_stuck(&mut self) {
        self.stuck.retain(|&(r, id)| {
            !matches!(
                remove_when_idle(&self.reactors[r], id, Duration::ZERO),
                Ok(_) | Err(RemoveError::Gone(_))
            )
        });
    }

    fn stop_all(&mut self) -> Vec<usize> {
        let running: Vec<usize> = (0..self.vrings.len())
            .filter(|&i| self.vrings[i].running.is_some())
            .collect();
        for &i in &running {
            self.stop(i);
        }
        running
    }

    fn set_mem(&mut self, mem: MemTable) -> VuResult<()> {
        let running = self.stop_all();
        self.mem = Arc::new(mem);
        for i in running {
            self.try_start(i)?;
        }
        Ok(())
    }

    /// Back to the state of a new connection.
    fn disconnect(&mut self) {
        self.stop_all();
        self.mem = Arc::new(MemTable::default());
        for v in &mut self.vrings {
            *v = Vring::default();
        }
        self.acked_features = 0;
        self.writeback.store(true, Ordering::Relaxed);
        self.inflight = None;
        self.dirty.on.store(false, Ordering::Release);
        self.dirty.log = None;
    }
}

pub(crate) fn new_eventfd() -> std::io::Result<File> {
    quern_bdev::sys::eventfd().map(File::from)
}

impl VhostUserBackendReqHandlerMut for BlkDevice {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        self.disconnect();
        Ok(())
    }
    fn reset_device(&mut self) -> VuResult<()> {
        self.disconnect();
        Ok(())
    }
    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.features())
    }
    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.features() != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        // live migration starts and ends here: the queues see it at once
        let log = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if self.dirty.on.swap(log, Ordering::AcqRel) != log {
            tracing::info!(device = %self.name, logging = log, has_log = self.dirty.log.is_some(), "dirty page logging {}", if log { "on" } else { "off" });
        }
        // without protocol features, rings start enabled
        let enabled = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0;
        for v in &mut self.vrings {
            if v.running.is_none() {
                v.enabled = enabled;
            }
        }
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() != files.len() {
            return Err(VuError::InvalidParam);
        }
        let mut t = MemTable::default();
        for (r, f) in ctx.iter().zip(&files) {
            t = t
                .with_region(
                    GuestAddress(r.guest_phys_addr),
                    r.memory_size,
                    FrontendAddress(r.user_addr),
                    r.mmap_offset,
                    f,
                )
                .map_err(|e| {
                    tracing::warn!(device = %self.name, "SET_MEM_TABLE: {e}");
                    VuError::InvalidParam
                })?;
        }
        self.set_mem(t)?;
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let i = self.check_index(index)?;
        if num == 0
            || num > MAX_QUEUE_SIZE.min(u32::from(self.cfg.queue_size))
            || !num.is_power_of_two()
        {
            tracing::warn!(device = %self.name, queue = i, num, max = self.cfg.queue_size, "refused queue size");
            return Err(VuError::InvalidParam);
        }
        self.vrings[i].size = num as u16;
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VuResult<()> {
        let i = self.check_index(index)?;
        let v = &mut self.vrings[i];
        (v.desc, v.used, v.avail) = (descriptor, used, available);
        // the frontend sends it again, ring running, when logging starts
        // (with the flag) and ends (without); without it the next start
        // works the address out from the memory table (new rings, new
        // addresses)
        let a = if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG) {
            log
        } else {
            u64::MAX
        };
        v.log_addr.store(a, Ordering::Relaxed);
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let i = self.check_index(index)?;
        self.vrings[i].base = base as u16;
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let i = self.check_index(index)?;
        let base = self.stop(i);
        self.vrings[i].kick = None;
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = self.check_index(u32::from(index))?;
        self.stop(i);
        self.vrings[i].kick = fd;
        self.try_start(i)
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = self.check_index(u32::from(index))?;
        let restart = self.vrings[i].running.is_some();
        if restart {
            self.stop(i);
        }
        self.vrings[i].call = fd;
        if restart {
            self.try_start(i)?;
        }
        Ok(())
    }
    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.check_index(u32::from(index))?;
        Ok(())
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD)
    }
    fn set_protocol_features(&mut self, _features: u64) -> VuResult<()> {
        Ok(())
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.cfg.num_queues))
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let i = self.check_index(index)?;
        self.vrings[i].enabled = enable;
        if enable {
            self.try_start(i)
        } else {
            self.stop(i);
            Ok(())
        }
    }
    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let c = self.config_space();
        let (o, s) = (offset as usize, size as usize);
        if o.checked_add(s).is_none_or(|e| e > c.len()) {
            return Err(VuError::InvalidParam);
        }
        Ok(c[o..o + s].to_vec())
    }
    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // only the writeback byte is writable
        if offset != CONFIG_WRITEBACK || buf.len() != 1 {
            return Err(VuError::InvalidParam);
        }
        self.writeback.store(buf[0] != 0, Ordering::Relaxed);
        tracing::info!(device = %self.name, writeback = buf[0] != 0, "write cache mode set");
        Ok(())
    }
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(vu_err("not a GPU device"))
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(vu_err("shared objects are not supported"))
    }
    fn get_inflight_fd(&mut self, req: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let (file, size) = inflight::create(req.num_queues, req.queue_size, self.cfg.num_queues)
            .map_err(|e| {
                tracing::warn!(device = %self.name, "GET_INFLIGHT_FD: {e}");
                VuError::InvalidParam
            })?;
        tracing::debug!(device = %self.name, queues = req.num_queues, queue_size = req.queue_size, size, "in-flight region created");
        Ok((
            VhostUserInflight {
                mmap_size: size,
                mmap_offset: 0,
                num_queues: req.num_queues,
                queue_size: req.queue_size,
            },
            file,
        ))
    }
    fn set_inflight_fd(&mut self, req: &VhostUserInflight, file: File) -> VuResult<()> {
        let region = InflightRegion::map(
            &file,
            req.mmap_size,
            req.mmap_offset,
            req.num_queues,
            req.queue_size,
            self.cfg.num_queues,
        )
        .map_err(|e| {
            tracing::warn!(device = %self.name, "SET_INFLIGHT_FD: {e}");
            VuError::InvalidParam
        })?;
        tracing::info!(device = %self.name, queues = req.num_queues, queue_size = req.queue_size, "in-flight tracking on");
        self.inflight = Some(Arc::new(region));
        Ok(())
    }
    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }
    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if self.mem.regions().len() as u64 >= MAX_MEM_SLOTS {
            return Err(VuError::InvalidParam);
        }
        let t = self
            .mem
            .with_region(
                GuestAddress(region.guest_phys_addr),
                region.memory_size,
                FrontendAddress(region.user_addr),
                region.mmap_offset,
                &fd,
            )
            .map_err(|e| {
                tracing::warn!(device = %self.name, "ADD_MEM_REG: {e}");
                VuError::InvalidParam
            })?;
        self.set_mem(t)?;
        Ok(None)
    }
    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let t = self
            .mem
            .without_region(GuestAddress(region.guest_phys_addr))
            .map_err(|_| VuError::InvalidParam)?;
        self.set_mem(t)
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(vu_err("device state transfer is not supported"))
    }
    fn check_device_state(&mut self) -> VuResult<()> {
        Err(vu_err("device state transfer is not supported"))
    }
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(vu_err("no shared memory regions"))
    }
    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        let map = DirtyLog::map(&file, log.mmap_size, log.mmap_offset).map_err(|e| {
            tracing::warn!(device = %self.name, size = log.mmap_size, offset = log.mmap_offset, "SET_LOG_BASE: {e}");
            VuError::InvalidParam
        })?;
        tracing::info!(device = %self.name, bytes = log.mmap_size, covers = map.covers(), "dirty log mapped");
        // the queues take the new log across a stop and start (no reactor
        // marks into a log being replaced)
        let running = self.stop_all();
        self.dirty.log = Some(Arc::new(map));
        for i in running {
            self.try_start(i)?;
        }
        Ok(())
    }
    fn set_backend_req_fd(&mut self, _backend: Backend) {}
}

/// Serve `bdev` as a vhost-user-blk device on `cfg.socket`. `dev_handles[r]`
/// is the bdev's handle on reactor r's engine.
pub fn serve(
    cfg: DeviceConfig,
    bdev: BdevRef,
    reactors: Vec<Arc<IoReactor>>,
    dev_handles: Vec<u16>,
) -> std::io::Result<DeviceHandle> {
    if let Some(d) = cfg.socket.parent() {
        std::fs::create_dir_all(d)?;
    }
    // a socket left by a process that died is replaced; one another
    // process serves, or a file that is not a socket, is refused
    claim_socket_path(&cfg.socket)?;
    let listener = UnixListener::bind(&cfg.socket)?;
    let socket = BoundSocket::new(&cfg.socket, &listener)?;
    let mut serial = [0u8; ID_BYTES];
    let n = cfg.serial.len().min(ID_BYTES);
    serial[..n].copy_from_slice(&cfg.serial.as_bytes()[..n]);
    let stats: Vec<Arc<QueueStats>> = (0..cfg.num_queues)
        .map(|_| {
            let s = QueueStats::default();
            s.reactor.store(u64::MAX, Ordering::Relaxed);
            Arc::new(s)
        })
        .collect();
    let name: Arc<str> = cfg.name.as_str().into();
    let drain_ms = Arc::new(AtomicU64::new(DRAIN_LIMIT.as_millis() as u64));
    let dev = BlkDevice {
        failing: Arc::new(AtomicBool::new(false)),
        drain_ms: drain_ms.clone(),
        stuck: Vec::new(),
        vrings: (0..cfg.num_queues).map(|_| Vring::default()).collect(),
        bdev,
        reactors,
        dev_handles,
        acked_features: 0,
        mem: Arc::new(MemTable::default()),
        writeback: Arc::new(AtomicBool::new(true)),
        stats: stats.clone(),
        serial,
        name,
        cfg: cfg.clone(),
        inflight: None,
        dirty: LogView::default(),
    };
    let dev = Arc::new(Mutex::new(dev));
    let handle_dev = dev.clone();
    let shutdown = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(AtomicU64::new(0));
    let conn: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
    let thread = {
        let (shutdown, connections, name, socket, conn) = (
            shutdown.clone(),
            connections.clone(),
            cfg.name.clone(),
            cfg.socket.clone(),
            conn.clone(),
        );
        std::thread::Builder::new().name(format!("vhost-{}", cfg.name)).spawn(move || {
            tracing::info!(device = %name, socket = %socket.display(), "vhost-user-blk device listening");
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        if shutdown.load(Ordering::Acquire) {
                            break;
                        }
                        tracing::warn!(device = %name, "accept: {e}");
                        continue;
                    }
                };
                {
                    // under the lock `stop` takes: either it sees this
                    // connection and ends it, or we see its flag
                    let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
                    if shutdown.load(Ordering::Acquire) {
                        break;
                    }
                    match stream.try_clone() {
                        Ok(s) => *c = Some(s),
                        Err(e) => {
                            tracing::warn!(device = %name, "refusing a frontend: {e}");
                            continue;
                        }
                    }
                }
                connections.fetch_add(1, Ordering::Relaxed);
                tracing::info!(device = %name, "frontend connected");
                let mut h = BackendReqHandler::from_stream(stream, dev.clone());
                loop {
                    match h.handle_request() {
                        Ok(()) => {}
                        Err(VuError::Disconnected) | Err(VuError::PartialMessage) => {
                            tracing::info!(device = %name, "frontend disconnected");
                            break;
                        }
                        Err(e) => {
                            // a bad message answers with an error; a broken
                            // socket ends the connection
                            tracing::warn!(device = %name, "vhost-user request failed: {e}");
                            if matches!(e, VuError::SocketBroken(_) | VuError::SocketError(_) | VuError::InvalidMessage | VuError::OversizedMsg | VuError::IncorrectFds) {
                                break;
                            }
                        }
                    }
                }
                dev.lock().unwrap_or_else(|e| e.into_inner()).disconnect();
                *conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
            d.disconnect();
            d.retry_stuck();
        })?
    };
    Ok(DeviceHandle {
        name: cfg.name.clone(),
        queues: stats,
        qos: cfg.qos.clone(),
        connections,
        shutdown,
        conn,
        drain_ms,
        socket,
        dev: handle_dev,
        thread: Mutex::new(Some(thread)),
    })
}
