//! The per-reactor I/O executor.
//!
//! One `IoEngine` belongs to one reactor thread. It owns that reactor's
//! io_uring, a preallocated table of request slots and of operation slots,
//! the merge stage and a pool of aligned bounce buffers.
//!
//! A cycle: producers call [`IoEngine::submit`] for each request; the reactor
//! calls [`IoEngine::flush`], which plans the batch (merge stage), starts the
//! operations and enters the kernel once; then [`IoEngine::reap`], which reads
//! completions off the completion ring (no syscall), splits each operation's
//! result back to its requests and re-runs a failed fused operation piece by
//! piece so that only the requests touching the bad range fail.
//!
//! Ordering: operations that the planner marks `drain` wait in `pending`
//! until everything started before them has completed (including the
//! piecewise retries of a failed fused operation), so merging and retries
//! never reorder conflicting requests.

use std::alloc::{self, Layout};
use std::collections::VecDeque;
use std::os::fd::RawFd;

use std::sync::Arc;

use io_uring::IoUring;
use quern_reactor::clock;
use quern_reactor::histogram::Histogram;

use crate::merge::{MergeConfig, MergeInput, MergePlanner, MergeStats, MergedGroup};
use crate::poller::Cookie;
use crate::types::{
    submit_to_channel, validate, BdevChannel, BdevError, BdevInfo, BdevRef, IoKind, IoResult, Op,
    IOV_MAX, UNROUTED_TAG,
};

const NONE: u32 = u32::MAX;

/// Sizing of one engine.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Requests that may be in flight at once on this reactor.
    pub max_requests: usize,
    /// Segments one request may carry.
    pub max_request_segments: usize,
    /// io_uring submission queue entries.
    pub ring_entries: u32,
    /// Aligned bounce buffers for O_DIRECT requests whose guest buffers are
    /// not aligned; each is `max(merge.max_bytes, 128 KiB)` bytes. They are
    /// allocated at start and never grow: a larger request is served
    /// through one buffer in pieces.
    pub bounce_buffers: usize,
    pub merge: MergeConfig,
    /// Most submission entries handed to the kernel by one `io_uring_enter`
    /// (0: everything queued, once per cycle). A cycle with more queued
    /// enters again for each further group (an operation's linked entries,
    /// such as an injected delay's timer, are never split). Small groups
    /// keep a virtual disk busy: 32 reads dispatched together go to the
    /// host as one plugged batch and tend to come back together, so the
    /// queue runs in waves (see bench/RESULTS.md, "Fourth session").
    pub submit_batch: usize,
    /// Keep a service-time histogram per device (from an operation's start
    /// to its completion being reaped).
    pub timing: bool,
}

/// `EngineConfig::submit_batch` unless configured: on this project's test
/// machine's virtual disk, groups of 2-4 gave 10-20% more 4k random-read
/// IOPS at QD32 than one enter per cycle, at one enter per 4 requests.
pub const DEFAULT_SUBMIT_BATCH: usize = 4;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_requests: 1024,
            max_request_segments: 256,
            ring_entries: 512,
            bounce_buffers: 8,
            merge: MergeConfig::default(),
            submit_batch: DEFAULT_SUBMIT_BATCH,
            timing: true,
        }
    }
}

/// One request as a producer hands it in. `iov` is copied into the slot; the
/// buffers it points to must stay valid until the request completes (the
/// contract of [`IoEngine::submit`]).
#[derive(Debug)]
pub struct IoRequest<'a> {
    pub dev: u16,
    pub kind: IoKind,
    pub offset: u64,
    /// Bytes; for reads and writes it must equal the iovecs' total.
    pub len: u64,
    pub iov: &'a [libc::iovec],
    pub fua: bool,
    /// Returned with the completion; the engine does not interpret it.
    pub cookie: Cookie,
}

/// Counters since start.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineStats {
    pub requests_submitted: u64,
    pub requests_completed: u64,
    pub requests_failed: u64,
    pub ops_started: u64,
    pub bounced_ops: u64,
    pub split_retries: u64,
    pub ring_enters: u64,
    /// Bounced operations larger than a bounce buffer, served in pieces.
    bounced_in_pieces: u64,
}

impl EngineStats {
    pub fn bounced_in_pieces(&self) -> u64 {
        self.bounced_in_pieces
    }
}

struct ReqSlot {
    busy: bool,
    cookie: Cookie,
    dev: u16,
    kind: IoKind,
    offset: u64,
    len: u64,
    fua: bool,
    iov: Vec<libc::iovec>,
    /// Next request of the same operation.
    next: u32,
}

struct OpSlot {
    /// Started and not yet finished (a completion for an op that is not
    /// is a bug: asserted).
    started: bool,
    first_req: u32,
    count: u32,
    dev: u16,
    kind: IoKind,
    offset: u64,
    len: u64,
    fua: bool,
    drain: bool,
    iov: Vec<libc::iovec>,
    bounce: u32,
    /// The one iovec naming the bounce buffer while `bounce` is set; it lives
    /// here because the kernel reads it after `start_op` returns.
    bounce_iov: [libc::iovec; 1],
    /// A bounced operation larger than its buffer runs in pieces: bytes
    /// `[piece_start, piece_start + bounce_iov.iov_len)` are in flight.
    piece_start: u64,
    /// When it started (ticks), for the device's service time.
    t0: u64,
}

struct BounceBuf {
    ptr: *mut u8,
    len: usize,
    layout: Layout,
}

impl Drop for BounceBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with this layout in `BounceBuf::new`.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

impl BounceBuf {
    fn new(len: usize) -> std::io::Result<Self> {
        let layout = Layout::from_size_align(len.max(4096), 4096)
            .map_err(|e| std::io::Error::other(format!("bounce buffer of {len} bytes: {e}")))?;
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(std::io::Error::other(format!(
                "cannot allocate a bounce buffer of {len} bytes"
            )));
        }
        Ok(BounceBuf { ptr, len, layout })
    }
}

struct Device {
    info: BdevInfo,
    chan: Box<dyn BdevChannel>,
    _bdev: BdevRef,
    /// Service time of its operations on this engine.
    latency: Arc<Histogram>,
}

/// The per-reactor executor. See the module documentation.
pub struct IoEngine {
    ring: IoUring,
    cfg: EngineConfig,
    devs: Vec<Option<Device>>,
    /// Bumped when a device comes or goes (its wake fd with it).
    device_generation: u64,
    reqs: Vec<ReqSlot>,
    free_reqs: Vec<u32>,
    ops: Vec<OpSlot>,
    free_ops: Vec<u32>,
    batch: Vec<u32>,
    batch_inputs: Vec<MergeInput>,
    planner: MergePlanner,
    /// Operations planned but not yet started, in order.
    pending: VecDeque<u32>,
    /// Operations started and not yet reaped.
    inflight_ops: usize,
    bounce: Vec<BounceBuf>,
    free_bounce: Vec<u32>,
    done: Vec<(u64, i32)>,
    /// The kernel refused the last enter (EBUSY/EAGAIN): no more enters
    /// in this cycle's `kick`; `flush` tries once more.
    sq_blocked: bool,
    stats: EngineStats,
    /// The clock reading of the current start or reap pass.
    now_ticks: u64,
    /// Ticks to histogram units.
    scale: clock::Scale,
    /// Completions of one reap pass waiting to be recorded: device, start
    /// time, how many.
    lat_run: (u16, u64, u64),
    /// Runs of completed operations waiting for their service time to be
    /// recorded after the cycle's completions are published (device, start
    /// time, how many): neither the clock reading that ends them nor the
    /// recording is in the guest's way. Preallocated; full, a run is
    /// recorded at once.
    lat_done: Vec<(u16, u64, u64)>,
    /// The reactor cycle's clock reading (0: not read yet this cycle):
    /// pollers, the start of operations and QoS share one reading.
    cycle_ticks: u64,
}

/// Record `n` operations of device `dev` that took `ticks` each.
#[inline]
fn record_latency(devs: &[Option<Device>], scale: clock::Scale, (dev, ticks, n): (u16, u64, u64)) {
    if let Some(Some(d)) = devs.get(dev as usize) {
        d.latency.record_n(scale.units(ticks), n);
    }
}

/// Registered-file table size of each ring: the most devices one engine holds.
pub const MAX_DEVICES: u32 = 256;

impl IoEngine {
    pub fn new(mut cfg: EngineConfig) -> std::io::Result<Self> {
        if cfg.submit_batch == 0 {
            cfg.submit_batch = usize::MAX; // no limit: one enter per cycle
        }
        // Completions that need the task's context (task work) are not
        // pushed at the reactor with an interrupt: the kernel raises a flag
        // and the reactor enters the kernel once per cycle to run them.
        let ring = match IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(cfg.ring_entries)
        {
            Ok(r) => r,
            // kernels before 5.19
            Err(_) => IoUring::builder().build(cfg.ring_entries)?,
        };
        ring.submitter().register_files_sparse(MAX_DEVICES)?;
        let seg = cfg.max_request_segments.clamp(1, IOV_MAX);
        let op_seg = cfg.merge.max_segments.clamp(seg, IOV_MAX);
        let n = cfg.max_requests.max(1);
        let reqs = (0..n)
            .map(|_| ReqSlot {
                busy: false,
                cookie: Cookie::new(crate::poller::PollerId(0), 0),
                dev: 0,
                kind: IoKind::Read,
                offset: 0,
                len: 0,
                fua: false,
                iov: Vec::with_capacity(seg),
                next: NONE,
            })
            .collect();
        let ops = (0..n)
            .map(|_| OpSlot {
                started: false,
                first_req: NONE,
                count: 0,
                dev: 0,
                kind: IoKind::Read,
                offset: 0,
                len: 0,
                fua: false,
                drain: false,
                iov: Vec::with_capacity(op_seg),
                bounce: NONE,
                bounce_iov: [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }],
                piece_start: 0,
                t0: 0,
            })
            .collect();
        let bounce_len = (cfg.merge.max_bytes as usize).max(128 << 10);
        let bounce: Vec<BounceBuf> = (0..cfg.bounce_buffers)
            .map(|_| BounceBuf::new(bounce_len))
            .collect::<std::io::Result<_>>()?;
        Ok(IoEngine {
            ring,
            planner: MergePlanner::new(cfg.merge, n),
            devs: Vec::new(),
            device_generation: 0,
            free_reqs: (0..n as u32).rev().collect(),
            free_ops: (0..n as u32).rev().collect(),
            reqs,
            ops,
            batch: Vec::with_capacity(n),
            batch_inputs: Vec::with_capacity(n),
            pending: VecDeque::with_capacity(n),
            inflight_ops: 0,
            free_bounce: (0..bounce.len() as u32).rev().collect(),
            bounce,
            done: Vec::with_capacity(n),
            sq_blocked: false,
            stats: EngineStats::default(),
            now_ticks: 0,
            scale: clock::scale(),
            lat_run: (0, 0, 0),
            lat_done: Vec::with_capacity(n),
            cycle_ticks: 0,
            cfg,
        })
    }

    /// Attach a device; returns its handle on this engine.
    pub fn add_device(&mut self, bdev: BdevRef) -> std::io::Result<u16> {
        let slot = match self.devs.iter().position(Option::is_none) {
            Some(s) => s,
            None if self.devs.len() < MAX_DEVICES as usize => {
                self.devs.push(None);
                self.devs.len() - 1
            }
            None => return Err(std::io::Error::other("too many devices on one reactor")),
        };
        let chan = bdev.open_channel(&self.ring, slot as u32)?;
        self.devs[slot] = Some(Device {
            info: bdev.info().clone(),
            chan,
            _bdev: bdev,
            latency: Arc::new(Histogram::default()),
        });
        self.device_generation += 1;
        Ok(slot as u16)
    }

    /// Detach a device. The caller guarantees none of its requests is in flight.
    pub fn remove_device(&mut self, dev: u16) {
        if let Some(d) = self.devs.get_mut(dev as usize) {
            *d = None;
            self.device_generation += 1;
            let _ = self
                .ring
                .submitter()
                .register_files_update(u32::from(dev), &[-1]);
        }
    }

    /// The device behind a handle.
    pub fn device_arc(&self, dev: u16) -> BdevRef {
        self.devs[dev as usize]
            .as_ref()
            .expect("device handle in use")
            ._bdev
            .clone()
    }

    /// A device's service-time histogram on this engine.
    pub fn device_latency(&self, dev: u16) -> Option<Arc<Histogram>> {
        Some(self.devs.get(dev as usize)?.as_ref()?.latency.clone())
    }

    pub fn device_info(&self, dev: u16) -> Option<&BdevInfo> {
        self.devs.get(dev as usize)?.as_ref().map(|d| &d.info)
    }

    /// The eventfd-capable ring, for reactors that register a wake-up eventfd.
    pub fn ring(&self) -> &IoUring {
        &self.ring
    }

    /// Changes whenever a device is added or removed, so a reactor knows
    /// to re-read [`IoEngine::device_wake_fds`].
    pub fn device_generation(&self) -> u64 {
        self.device_generation
    }

    /// Fds of devices with their own completion source.
    pub fn device_wake_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.devs.iter().flatten().filter_map(|d| d.chan.wake_fd())
    }

    pub fn free_slots(&self) -> usize {
        self.free_reqs.len()
    }

    /// Requests accepted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.reqs.len() - self.free_reqs.len()
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Whether service-time histograms are kept.
    pub fn timing(&self) -> bool {
        self.cfg.timing
    }

    /// Keep service-time histograms from now on, or stop. Operations in
    /// flight when they are switched on have no start time and are not
    /// recorded; what was reaped before they are switched off still is.
    pub fn set_timing(&mut self, on: bool) {
        if on && !self.cfg.timing {
            for op in self.ops.iter_mut().filter(|op| op.started) {
                op.t0 = 0;
            }
        }
        self.cfg.timing = on;
    }

    pub fn merge_stats(&self) -> MergeStats {
        self.planner.stats()
    }

    pub fn merge_config(&self) -> MergeConfig {
        self.planner.config()
    }

    /// Accept one request into this cycle's batch, or refuse it at once.
    ///
    /// # Safety
    /// Every iovec of a read or write must name memory valid for writes
    /// (reads) or reads (writes) of its length until the request's
    /// completion is reported by [`IoEngine::reap`]: the engine, the kernel
    /// and the drivers copy into and out of it asynchronously. Nothing may
    /// hold a Rust reference to that memory meanwhile.
    pub unsafe fn submit(&mut self, r: &IoRequest<'_>) -> Result<(), BdevError> {
        let info = &self
            .devs
            .get(r.dev as usize)
            .and_then(Option::as_ref)
            .ok_or(BdevError::NoDevice(r.dev))?
            .info;
        validate(info, r.kind, r.offset, r.len)?;
        if r.kind.has_data() {
            let max = self.cfg.max_request_segments.min(IOV_MAX);
            if r.iov.len() > max {
                return Err(BdevError::TooManySegments {
                    segments: r.iov.len(),
                    max,
                });
            }
            let total: u64 = r.iov.iter().map(|v| v.iov_len as u64).sum();
            if total != r.len {
                return Err(BdevError::Short {
                    done: total,
                    len: r.len,
                });
            }
        }
        let ix = self.free_reqs.pop().ok_or(BdevError::Busy)?;
        let s = &mut self.reqs[ix as usize];
        // invariants at the boundary, kept in release builds (one
        // predictable branch each)
        assert!(!s.busy, "request slot {ix} taken while in use");
        s.busy = true;
        s.cookie = r.cookie;
        s.dev = r.dev;
        s.kind = r.kind;
        s.offset = r.offset;
        s.len = r.len;
        s.fua = r.fua;
        s.next = NONE;
        s.iov.clear();
        if r.kind.has_data() {
            s.iov.extend_from_slice(r.iov);
        }
        self.batch.push(ix);
        self.stats.requests_submitted += 1;
        Ok(())
    }

    /// End of a poll cycle: merge the batch, start what may start, and enter
    /// the kernel if anything was queued: once, or once per `submit_batch`
    /// entries.
    pub fn flush(&mut self) {
        self.sq_blocked = false;
        if !self.batch.is_empty() {
            self.plan_batch();
        }
        self.kick();
        self.submit_ring();
    }

    fn plan_batch(&mut self) {
        self.batch_inputs.clear();
        for &ix in &self.batch {
            let s = &self.reqs[ix as usize];
            self.batch_inputs.push(MergeInput {
                dev: s.dev,
                kind: s.kind,
                offset: s.offset,
                len: s.len,
                segments: s.iov.len() as u32,
                fua: s.fua,
            });
        }
        let (order, groups) = self.planner.plan(&self.batch_inputs);
        for g in groups {
            let op = self.free_ops.pop().expect("op slots match request slots");
            build_op(
                &mut self.ops[op as usize],
                &mut self.reqs,
                &self.batch,
                order,
                g,
            );
            self.pending.push_back(op);
        }
        self.batch.clear();
    }

    /// Record the pending run of completions with one service time.
    #[inline]
    fn flush_latency_run(&mut self) {
        let run = std::mem::take(&mut self.lat_run);
        self.defer_latency(run);
    }

    /// Keep a run of reaped operations (device, start, how many) for
    /// [`IoEngine::end_cycle`], which ends their service time.
    #[inline]
    fn defer_latency(&mut self, run: (u16, u64, u64)) {
        // (no start time: started before the histograms were switched on)
        if run.2 == 0 || run.1 == 0 {
            return;
        }
        if self.lat_done.len() < self.lat_done.capacity() {
            self.lat_done.push(run);
        } else {
            let (dev, t0, n) = run;
            let ticks = clock::ticks().wrapping_sub(t0);
            record_latency(&self.devs, self.scale, (dev, ticks, n));
        }
    }

    /// The end of a reactor cycle, after the pollers have published their
    /// completions: record the service times of the operations reaped in
    /// it, ended at `now` (read here if 0, and left there for whoever
    /// records next). Reading the clock here rather than at the reap keeps
    /// it out of the guest's way; the publish (a few stores) is counted in
    /// the device's time. (Not calling it loses nothing: the next `reap`
    /// records them first.)
    pub fn end_cycle(&mut self, now: &mut u64) {
        if self.lat_done.is_empty() {
            return;
        }
        let now = clock::ticks_once(now);
        for &(dev, t0, n) in &self.lat_done {
            record_latency(&self.devs, self.scale, (dev, now.wrapping_sub(t0), n));
        }
        self.lat_done.clear();
    }

    /// A new reactor cycle: the clock is read again when first needed.
    #[inline]
    pub fn begin_cycle(&mut self) {
        self.cycle_ticks = 0;
    }

    /// A new reactor cycle that follows the last one at once (no sleep,
    /// no message run in between): its clock reading is `reading`, the
    /// one the last cycle took as it published its completions (0: none
    /// taken, read when first needed). A busy queue then reads the clock
    /// once a cycle rather than twice; what it times starts at most one
    /// cycle's tail early.
    #[inline]
    pub fn begin_cycle_at(&mut self, reading: u64) {
        self.cycle_ticks = reading;
    }

    /// The cycle's clock reading (the TSC), read at the first call of the
    /// cycle and shared by everything after it.
    #[inline]
    pub fn clock(&mut self) -> u64 {
        clock::ticks_once(&mut self.cycle_ticks)
    }

    /// Start pending operations in order, stopping at a drain point while
    /// earlier operations are in flight, or when the ring or pool is full.
    fn kick(&mut self) {
        if self.cfg.timing && !self.pending.is_empty() {
            self.now_ticks = self.clock();
        }
        while let Some(&op) = self.pending.front() {
            if self.ops[op as usize].drain && self.inflight_ops > 0 {
                break;
            }
            if !self.start_op(op) {
                break;
            }
            self.pending.pop_front();
            // entries, not operations: a delayed or synced one pushes more
            if !self.sq_blocked && self.ring.submission().len() >= self.cfg.submit_batch {
                self.submit_ring();
            }
        }
    }

    fn start_op(&mut self, op_ix: u32) -> bool {
        let op = &mut self.ops[op_ix as usize];
        assert!(!op.started, "operation {op_ix} started twice");
        let Some(dev) = self.devs.get_mut(op.dev as usize).and_then(Option::as_mut) else {
            // the device went away under its requests: fail them
            op.started = true;
            self.done.push((u64::from(op_ix), -libc::ENODEV));
            self.inflight_ops += 1;
            return true;
        };
        let align = dev.info.buf_align.max(1) as usize;
        if op.kind.has_data() && op.bounce == NONE && !iov_aligned(&op.iov, align) {
            let Some(b) = self.free_bounce.pop() else {
                return false;
            };
            let buf = &self.bounce[b as usize];
            op.bounce = b;
            op.piece_start = 0;
            // a request larger than the buffer goes through it in pieces
            let len = (op.len as usize).min(buf.len);
            if len < op.len as usize {
                self.stats.bounced_in_pieces += 1;
            }
            op.bounce_iov[0] = libc::iovec {
                iov_base: buf.ptr.cast(),
                iov_len: len,
            };
            if op.kind == IoKind::Write {
                // SAFETY: the buffer holds `len` bytes; the request's
                // iovecs are valid for reads (submit's contract).
                unsafe { gather(&op.iov, 0, len, buf.ptr) };
            }
            self.stats.bounced_ops += 1;
        }
        let (iov, offset, len): (&[libc::iovec], u64, u64) = if op.bounce != NONE {
            (
                &op.bounce_iov,
                op.offset + op.piece_start,
                op.bounce_iov[0].iov_len as u64,
            )
        } else {
            (&op.iov, op.offset, op.len)
        };
        let o = Op {
            kind: op.kind,
            offset,
            len,
            iov,
            fua: op.fua,
            drain: op.drain,
        };
        let (ok, _) = submit_to_channel(
            dev.chan.as_mut(),
            &o,
            u64::from(op_ix),
            &mut self.ring,
            &mut self.done,
        );
        if ok {
            op.started = true;
            op.t0 = if self.cfg.timing { self.now_ticks } else { 0 };
            self.inflight_ops += 1;
            self.stats.ops_started += 1;
        } else if op.bounce != NONE && op.piece_start == 0 {
            self.free_bounce.push(op.bounce);
            op.bounce = NONE;
        }
        ok
    }

    /// Enter the kernel with what the submission queue holds, if anything
    /// (the kernel may take fewer than all: the rest go next time).
    fn submit_ring(&mut self) {
        if !self.ring.submission().is_empty() {
            self.stats.ring_enters += 1;
            if let Err(e) = self.ring.submit() {
                // EBUSY/EAGAIN: the kernel could not take them now; the SQEs
                // stay queued and the next cycle submits again
                self.sq_blocked = true;
                tracing::debug!("io_uring submit: {e}");
            }
        }
    }

    /// Collect completions and hand each finished request to `on_done`.
    /// Returns the number of requests completed.
    pub fn reap(&mut self, mut on_done: impl FnMut(Cookie, IoResult)) -> usize {
        let mut completed = 0;
        if !self.lat_done.is_empty() {
            // a caller that does not call end_cycle
            self.end_cycle(&mut 0);
        }
        if self.ring.submission().taskrun() {
            // completions are waiting for task work: one enter runs it all
            let _ = self.ring.submitter().submit();
        }
        loop {
            // CQEs are read straight from the shared ring: no syscall.
            let mut cq = self.ring.completion();
            cq.sync();
            for cqe in &mut cq {
                if cqe.user_data() != UNROUTED_TAG {
                    self.done.push((cqe.user_data(), cqe.result()));
                }
            }
            drop(cq);
            for d in self.devs.iter_mut().flatten() {
                d.chan.poll(&mut self.done);
            }
            if self.done.is_empty() {
                return completed;
            }
            // (no clock reading for the completions here: their service
            // time ends in end_cycle, after they are published)
            // index loop: finishing an op may queue retries but never grows `done`
            let mut i = 0;
            while i < self.done.len() {
                let (tag, res) = self.done[i];
                completed += self.finish_op(tag as u32, res, &mut on_done);
                i += 1;
            }
            self.flush_latency_run();
            self.done.clear();
            // drained operations may start now; synchronous drivers complete
            // inside kick, which sends us round again
            self.kick();
        }
    }

    fn finish_op(
        &mut self,
        op_ix: u32,
        res: i32,
        on_done: &mut impl FnMut(Cookie, IoResult),
    ) -> usize {
        assert!(
            self.inflight_ops > 0,
            "a completion with no operation in flight"
        );
        self.inflight_ops -= 1;
        let op = &mut self.ops[op_ix as usize];
        assert!(
            op.started,
            "a completion for operation {op_ix}, which is not in flight"
        );
        op.started = false;
        if self.cfg.timing {
            // operations of one device started together and reaped together
            // took one time: recorded once per run of them
            let key = (op.dev, op.t0);
            if key == (self.lat_run.0, self.lat_run.1) {
                self.lat_run.2 += 1;
            } else {
                let prev = std::mem::replace(&mut self.lat_run, (key.0, key.1, 1));
                self.defer_latency(prev);
            }
        }
        let op = &mut self.ops[op_ix as usize];
        let want = if op.bounce != NONE {
            op.bounce_iov[0].iov_len as u64
        } else {
            op.len
        };
        let ok = res >= 0 && (!op.kind.has_data() || i64::from(res) == want as i64);
        if op.bounce != NONE {
            let b = &self.bounce[op.bounce as usize];
            let piece = op.bounce_iov[0].iov_len;
            if ok && op.kind == IoKind::Read {
                // SAFETY: the buffer holds the piece; the request's iovecs
                // are valid for writes (submit's contract).
                unsafe { scatter(b.ptr, &op.iov, op.piece_start as usize, piece) };
            }
            let next = op.piece_start + piece as u64;
            if ok && next < op.len {
                // the next piece, through the same buffer, before anything
                // else that is pending (nothing may overtake the request)
                op.piece_start = next;
                let len = ((op.len - next) as usize).min(b.len);
                op.bounce_iov[0].iov_len = len;
                if op.kind == IoKind::Write {
                    // SAFETY: as for the first piece in `start_op`.
                    unsafe { gather(&op.iov, next as usize, len, b.ptr) };
                }
                self.pending.push_front(op_ix);
                return 0;
            }
            self.free_bounce.push(op.bounce);
            op.bounce = NONE;
        }
        if !ok && op.count > 1 {
            self.split_retry(op_ix);
            return 0;
        }
        let result: IoResult = if ok {
            Ok(0)
        } else if res < 0 {
            Err(BdevError::Io(-res))
        } else {
            Err(BdevError::Short {
                done: res as u64,
                len: want,
            })
        };
        let mut r = std::mem::replace(&mut op.first_req, NONE);
        self.free_ops.push(op_ix);
        let mut n = 0;
        while r != NONE {
            let s = &mut self.reqs[r as usize];
            assert!(s.busy, "a completion for request slot {r}, which is free");
            s.busy = false;
            let next = s.next;
            let out = result.map(|_| if s.kind.has_data() { s.len as u32 } else { 0 });
            if out.is_err() {
                self.stats.requests_failed += 1;
            }
            on_done(s.cookie, out);
            self.free_reqs.push(r);
            r = next;
            n += 1;
        }
        self.stats.requests_completed += n as u64;
        n
    }

    /// A fused operation failed: run each of its requests on its own, ahead
    /// of anything still pending, so that only the bad ones fail.
    fn split_retry(&mut self, op_ix: u32) {
        self.stats.split_retries += 1;
        let op = &self.ops[op_ix as usize];
        let (mut r, drain) = (op.first_req, op.drain);
        self.free_ops.push(op_ix);
        let mut pieces = 0;
        while r != NONE {
            let next = self.reqs[r as usize].next;
            self.reqs[r as usize].next = NONE;
            let p = self.free_ops.pop().expect("one op slot per request");
            let s = &self.reqs[r as usize];
            let o = &mut self.ops[p as usize];
            o.first_req = r;
            o.count = 1;
            o.dev = s.dev;
            o.kind = s.kind;
            o.offset = s.offset;
            o.len = s.len;
            o.fua = s.fua;
            o.drain = drain && pieces == 0;
            o.bounce = NONE;
            o.iov.clear();
            o.iov.extend_from_slice(&s.iov);
            // keep the pieces' order among themselves, ahead of later work
            self.pending.insert(pieces, p);
            pieces += 1;
            r = next;
        }
    }

    /// Drive the engine until nothing is pending or in flight (tests and
    /// shutdown). Blocks in the kernel while waiting for completions.
    pub fn run_until_idle(&mut self, mut on_done: impl FnMut(Cookie, IoResult)) {
        loop {
            self.flush();
            self.reap(&mut on_done);
            if self.pending.is_empty() && self.inflight_ops == 0 && self.batch.is_empty() {
                return;
            }
            if self.inflight_ops > 0 {
                self.wait_for_completion();
            }
        }
    }

    /// Block until a completion may be ready: in the kernel on the ring
    /// alone, or, when devices have their own completion source (librbd),
    /// in `poll` on the ring's fd and theirs (bounded, as a wake-up may have
    /// been consumed already).
    fn wait_for_completion(&mut self) {
        use std::os::fd::AsRawFd;
        let mut fds: Vec<RawFd> = self.device_wake_fds().collect();
        if fds.is_empty() {
            let _ = self.ring.submit_and_wait(1);
            return;
        }
        fds.push(self.ring.as_raw_fd());
        crate::sys::poll_readable(&fds, 10);
    }
}

fn build_op(op: &mut OpSlot, reqs: &mut [ReqSlot], batch: &[u32], order: &[u32], g: &MergedGroup) {
    op.count = g.count;
    op.dev = g.dev;
    op.kind = g.kind;
    op.offset = g.offset;
    op.len = g.len;
    op.fua = g.fua;
    op.drain = g.drain;
    op.bounce = NONE;
    op.iov.clear();
    let members = &order[g.start as usize..(g.start + g.count) as usize];
    op.first_req = batch[members[0] as usize];
    for (k, &m) in members.iter().enumerate() {
        let r = batch[m as usize];
        reqs[r as usize].next = members.get(k + 1).map_or(NONE, |&n| batch[n as usize]);
        op.iov.extend_from_slice(&reqs[r as usize].iov);
    }
}

fn iov_aligned(iov: &[libc::iovec], align: usize) -> bool {
    align <= 1
        || iov
            .iter()
            .all(|v| (v.iov_base as usize).is_multiple_of(align) && v.iov_len.is_multiple_of(align))
}

/// Copy request bytes `[skip, skip + len)` out of `iov` into `dst`.
///
/// # Safety
/// `dst` is valid for writes of `len` bytes; every iovec is valid for reads.
unsafe fn gather(iov: &[libc::iovec], mut skip: usize, len: usize, dst: *mut u8) {
    let mut done = 0;
    for v in iov {
        if done == len {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(len - done);
        // SAFETY: the caller's contract; n stays inside both.
        unsafe {
            std::ptr::copy_nonoverlapping((v.iov_base as *const u8).add(skip), dst.add(done), n)
        };
        done += n;
        skip = 0;
    }
}

/// Copy `len` bytes from `src` into request bytes `[skip, skip + len)` of `iov`.
///
/// # Safety
/// `src` is valid for reads of `len` bytes; every iovec is valid for writes.
unsafe fn scatter(src: *const u8, iov: &[libc::iovec], mut skip: usize, len: usize) {
    let mut done = 0;
    for v in iov {
        if done == len {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(len - done);
        // SAFETY: the caller's contract; n stays inside both.
        unsafe {
            std::ptr::copy_nonoverlapping(src.add(done), (v.iov_base as *mut u8).add(skip), n)
        };
        done += n;
        skip = 0;
    }
}
