//! A virtqueue bound to a reactor: the [`IoPoller`] that drains its avail
//! ring into the reactor's engine and completes requests on its used ring.
//! Per-queue state lives here alone (no sharing, no locks); the guest is
//! signalled at most once per cycle.
//!
//! Measurements: per operation (read, write, flush, discard and
//! write-zeroes) the queue counts requests and bytes and, unless turned
//! off, keeps a latency histogram from the moment a request is taken off
//! the avail ring to the moment its completion is published on the used
//! ring. Time is read once per cycle that has work (the TSC), not per
//! request, and published counters are plain stores once per cycle.
//!
//! QoS: with limits, a request the device's (or its group's) budget cannot
//! cover now waits here, in order, and is admitted when the budget has
//! refilled ([`crate::qos`]).

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use quern_bdev::{BdevError, Cookie, IoEngine, IoKind, IoPoller, IoRequest, IoResult, PollerId};
use quern_reactor::clock;
use quern_reactor::histogram::Histogram;
use quern_reactor::ratelimit::LogLimiter;

use crate::blk::{self, Decoded};
use crate::dirty::{DirtyLog, LogView};
use crate::inflight::InflightQueue;
use crate::memory::MemTable;
use crate::qos::{self, QueueQos};
use crate::virtq::{Chain, Seg, SplitQueue};

/// The operations measured apart.
pub const OPS: [&str; 4] = ["read", "write", "flush", "discard"];

fn op_index(kind: IoKind) -> usize {
    match kind {
        IoKind::Read => 0,
        IoKind::Write => 1,
        IoKind::Flush => 2,
        IoKind::Discard | IoKind::WriteZeroes => 3,
    }
}

/// A head's stamp: which operation it is in the low bits, when it was
/// taken (ticks, with those bits cleared: a few ns coarser) above them,
/// or 0 there when histograms are off. One word per head, written once
/// when the request is decoded and read once when it completes.
const OP_BITS: u64 = 0b111;
/// No operation recorded for a head (rejected before it became one).
const NO_OP: u64 = OP_BITS;

/// Without EVENT_IDX, a driver re-enables interrupts by clearing
/// VRING_AVAIL_F_NO_INTERRUPT and must then fence before it looks at the
/// used ring once more; one that does not (libblkio's virtio-driver 0.6.1:
/// a release store, no fence) can read the old used index while its flag
/// store is still in its store buffer, and sleep on a completion whose
/// publish saw the flag still set. So a publish that the flag suppressed
/// owes the driver a signal: paid this long after it if nothing else
/// signalled by then, or at once when the reactor goes to sleep. An extra
/// signal is harmless (the driver finds nothing new); a missed one hangs
/// the driver. EVENT_IDX needs none of this (its drivers fence).
const LATE_SIGNAL_NS: u64 = 1_000_000;

/// Empty polls before a take after which the client is taken to be
/// waiting on what it submitted alone (a shallow queue): the publish of
/// those requests pushes the lines it writes out to the shared cache
/// (CLDEMOTE), where a polling client at depth 1 reads them sooner
/// (`bench/RESULTS.md`: p50 0.05-0.09 µs lower, 5-9 % more IOPS). With the
/// ring seldom empty (a deep queue) the reactor writes the same lines
/// again at once; pushing them out at every publish cost 1 % of the IOPS
/// at depth 32, so it is not done there.
const QUIET_POLLS: u32 = 4;

/// Counters of one queue, readable from the control plane.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Reactor the queue is bound to (u64::MAX while unbound).
    pub reactor: AtomicU64,
    pub requests: AtomicU64,
    pub completed: AtomicU64,
    pub errors: AtomicU64,
    pub malformed: AtomicU64,
    pub notifies: AtomicU64,
    /// Requests found in flight after a backend restart and run again.
    pub resubmitted: AtomicU64,
    /// Requests answered UNSUPP (a kind the device does not do).
    pub unsupported: AtomicU64,
    /// Completed requests per operation ([`OPS`]).
    pub ops: [AtomicU64; 4],
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Requests taken and not yet completed, waiting on QoS included.
    pub in_flight: AtomicU64,
    /// Latency per operation, avail ring to used ring.
    pub latency: [Histogram; 4],
}

#[derive(Clone, Copy)]
struct Slot {
    status: *mut u8,
    written: u32,
    busy: bool,
}

/// A request waiting for the QoS budget.
#[derive(Clone, Copy)]
struct Held {
    head: u16,
    kind: IoKind,
    len: u64,
    /// When it began to wait (the QoS clock, ns).
    since_ns: u64,
}

pub struct QueuePoller {
    pub(crate) q: SplitQueue,
    mem: Arc<MemTable>,
    dev: u16,
    capacity: u64,
    read_only: bool,
    writeback: Arc<AtomicBool>,
    kick: File,
    call: File,
    slots: Vec<Slot>,
    segs: Vec<Seg>,
    iov: Vec<libc::iovec>,
    max_segs: usize,
    inflight: usize,
    serial: [u8; blk::ID_BYTES],
    stats: Arc<QueueStats>,
    /// This queue's counters, kept locally (no atomic read-modify-write per
    /// request) and published to `stats` once per cycle.
    counts: Counts,
    published: Counts,
    name: Arc<str>,
    /// Shared in-flight tracking, when the frontend set up a region.
    inflight_region: Option<InflightQueue>,
    /// Heads left in flight by a previous backend, still to run again.
    resubmit: Vec<u16>,
    resubmit_next: usize,
    /// The guest broke the avail ring: take no more requests.
    pub(crate) broken: bool,
    /// Being removed: take no new requests, let the submitted ones finish.
    quiesced: bool,
    /// The reactor failed: answer every new request with IOERR at once.
    failing: bool,
    /// Heads returned this cycle whose used entries are not yet published:
    /// the guest may not offer them again before it has seen them.
    returned: Vec<bool>,
    returned_list: Vec<u16>,
    /// Warnings a guest can cause once per request, at a bounded rate.
    log: GuestLog,
    /// Latency histograms on.
    timing: bool,
    /// Per head, its operation and when it was taken (see [`OP_BITS`]).
    stamp: Vec<u64>,
    /// The take time of the requests being decoded now, as stamped (0
    /// with histograms off).
    taking: u64,
    /// Ticks to histogram units.
    scale: clock::Scale,
    /// Without EVENT_IDX: when (TSC) to signal the driver anyway after a
    /// publish its NO_INTERRUPT flag suppressed (0: none owed). See
    /// [`LATE_SIGNAL_NS`].
    late_signal: u64,
    late_ticks: u64,
    /// Polls in a row that found the avail ring empty, and whether the
    /// last requests taken came after at least [`QUIET_POLLS`] of them:
    /// then the client is waiting on them alone, and their publish pushes
    /// its lines out to the shared cache (`SplitQueue::publish`).
    idle_polls: u32,
    quiet: bool,
    /// QoS, and the requests waiting for its budget, in order.
    qos: Option<QueueQos>,
    held: VecDeque<Held>,
    /// Whether any limit applies (taken up from `qos` once per cycle): the
    /// one test a queue without limits pays per request.
    limited: bool,
    /// Dirty logging for live migration: the device's log and whether it
    /// is on, the used ring's guest-physical address (u64::MAX: unknown),
    /// and room to walk a chain again when its request completes.
    dirty: LogView,
    used_gpa: Arc<AtomicU64>,
    log_segs: Vec<Seg>,
}

/// Warnings about what a guest sent, at a bounded rate (the counters in
/// [`QueueStats`] count every one).
#[derive(Default)]
struct GuestLog(LogLimiter);

impl GuestLog {
    fn warn(&mut self, device: &str, head: u16, what: &dyn std::fmt::Display) {
        if let Some(left_out) = self.0.allow() {
            tracing::warn!(device, head, left_out, "{what}");
        }
    }
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    requests: u64,
    completed: u64,
    errors: u64,
    malformed: u64,
    notifies: u64,
    unsupported: u64,
    ops: [u64; 4],
    bytes_read: u64,
    bytes_written: u64,
}

impl Counts {
    fn load(st: &QueueStats) -> Self {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            requests: g(&st.requests),
            completed: g(&st.completed),
            errors: g(&st.errors),
            malformed: g(&st.malformed),
            notifies: g(&st.notifies),
            unsupported: g(&st.unsupported),
            ops: std::array::from_fn(|i| g(&st.ops[i])),
            bytes_read: g(&st.bytes_read),
            bytes_written: g(&st.bytes_written),
        }
    }

    /// Plain stores: only the queue's reactor writes these.
    fn store(&self, st: &QueueStats) {
        let s = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        s(&st.requests, self.requests);
        s(&st.completed, self.completed);
        s(&st.errors, self.errors);
        s(&st.malformed, self.malformed);
        s(&st.notifies, self.notifies);
        s(&st.unsupported, self.unsupported);
        for (a, v) in st.ops.iter().zip(self.ops) {
            s(a, v);
        }
        s(&st.bytes_read, self.bytes_read);
        s(&st.bytes_written, self.bytes_written);
    }
}

// SAFETY: raw pointers into guest memory kept mapped by `mem`; the poller
// moves to its reactor once and is used there alone.
unsafe impl Send for QueuePoller {}

pub(crate) struct QueueParts {
    pub q: SplitQueue,
    pub mem: Arc<MemTable>,
    pub dev: u16,
    pub capacity: u64,
    pub read_only: bool,
    pub writeback: Arc<AtomicBool>,
    pub kick: File,
    pub call: File,
    pub max_segs: usize,
    pub serial: [u8; blk::ID_BYTES],
    pub stats: Arc<QueueStats>,
    pub name: Arc<str>,
    pub inflight_region: Option<InflightQueue>,
    pub resubmit: Vec<u16>,
    /// Start failing every request (a device removed with its frontend
    /// still attached).
    pub failing: bool,
    /// Keep latency histograms.
    pub timing: bool,
    /// The device's QoS limiters (its own, its group's).
    pub qos: Arc<qos::QosBinding>,
    /// Dirty logging: the device's log, and the used ring's
    /// guest-physical address for it.
    pub dirty: LogView,
    pub used_gpa: Arc<AtomicU64>,
}

impl QueuePoller {
    pub(crate) fn new(p: QueueParts) -> Self {
        // The reactor drains the kick eventfd after epoll reports it; the
        // frontend may have drained it first (libblkio does), and a blocking
        // read would then stall the whole reactor.
        crate::sys::set_nonblocking(p.kick.as_raw_fd());
        let size = p.q.size() as usize;
        // a restarted queue carries on from its predecessor's counts
        let start = Counts::load(&p.stats);
        if !p.resubmit.is_empty() {
            p.stats
                .resubmitted
                .fetch_add(p.resubmit.len() as u64, Ordering::Relaxed);
            tracing::info!(device = %p.name, heads = ?p.resubmit, "resubmitting requests left in flight by the previous backend");
        }
        let mut q = p.q;
        q.set_notification(false);
        // Completions a previous backend (or this one, before a restart of
        // the queue) published while the frontend was not listening for its
        // interrupts are on the used ring, but the guest may never have been
        // told: a backend stopped with SIGTERM drains its requests as QEMU
        // tears the connection down, and their interrupt goes nowhere. With
        // all its requests completed but unseen, the guest sends nothing
        // new and waits for ever. One interrupt at start costs a spurious
        // wake-up at worst.
        crate::sys::eventfd_signal(p.call.as_raw_fd());
        let mut poller = QueuePoller {
            q,
            mem: p.mem,
            dev: p.dev,
            capacity: p.capacity,
            read_only: p.read_only,
            writeback: p.writeback,
            kick: p.kick,
            call: p.call,
            slots: vec![
                Slot {
                    status: std::ptr::null_mut(),
                    written: 0,
                    busy: false
                };
                size
            ],
            segs: Vec::with_capacity(p.max_segs + 2),
            iov: Vec::with_capacity(p.max_segs + 2),
            max_segs: p.max_segs + 2,
            inflight: 0,
            serial: p.serial,
            stats: p.stats,
            counts: start,
            published: start,
            name: p.name,
            inflight_region: p.inflight_region,
            resubmit: p.resubmit,
            resubmit_next: 0,
            broken: false,
            quiesced: false,
            failing: p.failing,
            returned: vec![false; size],
            returned_list: Vec::with_capacity(size),
            log: GuestLog::default(),
            timing: p.timing,
            stamp: vec![NO_OP; size],
            taking: 0,
            scale: clock::scale(),
            late_signal: 0,
            late_ticks: (LATE_SIGNAL_NS as f64 / clock::scale().ns_per_tick.max(1e-3)) as u64,
            idle_polls: 0,
            quiet: false,
            qos: Some(QueueQos::new(p.qos)),
            held: VecDeque::with_capacity(size),
            limited: false,
            dirty: p.dirty,
            used_gpa: p.used_gpa,
            log_segs: Vec::with_capacity(size),
        };
        // the notification field was written above: logged if need be
        poller.set_notification(false);
        poller
    }

    /// Put `head` on the used ring (published at the end of the cycle) and
    /// into the in-flight region's batch, whatever became of the request.
    fn return_head(&mut self, head: u16, len: u32) {
        if let Some(r) = self.returned.get_mut(head as usize) {
            if !*r {
                *r = true;
                self.returned_list.push(head);
            }
        }
        self.q.push_used(head, len);
        if let Some(r) = &mut self.inflight_region {
            r.completed(head);
        }
    }

    fn finish(&mut self, head: u16, status: Option<*mut u8>, st: u8, written: u32) {
        if let Some(p) = status {
            // SAFETY: the status byte was translated and is writable.
            unsafe { std::ptr::write_volatile(p, st) };
        }
        if self.dirty.log.is_some() {
            self.log_request(head);
        }
        let len = if status.is_some() {
            if st == blk::VIRTIO_BLK_S_OK {
                written
            } else {
                1
            }
        } else {
            0
        };
        self.return_head(head, len);
        if st == blk::VIRTIO_BLK_S_UNSUPP {
            self.counts.unsupported += 1;
        } else if st != blk::VIRTIO_BLK_S_OK {
            self.counts.errors += 1;
        }
    }

    /// While logging is on: mark every page the request's device-writable
    /// buffers cover (its data, a serial, its status byte), walking its
    /// chain again (the guest may not change it while it is in flight).
    #[cold]
    fn log_request(&mut self, head: u16) {
        let Some(log) = self.dirty.active() else {
            return;
        };
        if self
            .q
            .chain(&self.mem, head, &mut self.log_segs, usize::MAX)
            .is_ok()
        {
            for s in self.log_segs.iter().filter(|s| s.writable) {
                log.mark(s.gpa, u64::from(s.len));
            }
        }
        self.log_segs.clear();
    }

    /// While logging is on: mark the used ring's pages this cycle wrote
    /// (its new entries and its index), before they are published.
    #[cold]
    fn log_used(&self, log: &DirtyLog) {
        let base = self.used_gpa.load(Ordering::Relaxed);
        if base == u64::MAX {
            return;
        }
        let (first, n) = self.q.unpublished();
        let size = self.q.size() as usize;
        for k in 0..n {
            let (_, e, _) = self.q.used_offsets((first + k) % size);
            log.mark(base + e, 8);
        }
        let (idx, _, _) = self.q.used_offsets(0);
        log.mark(base + idx, 2);
    }

    /// Ask for kicks or not; the field written is in the used ring.
    fn set_notification(&mut self, on: bool) {
        self.q.set_notification(on);
        if let Some(log) = self.dirty.active() {
            let base = self.used_gpa.load(Ordering::Relaxed);
            if base != u64::MAX {
                let (_, _, ev) = self.q.used_offsets(0);
                log.mark(base + ev, 2);
            }
        }
    }

    fn handle(&mut self, io: &mut IoEngine, me: PollerId, head: u16, gate: Gate) {
        let fast = blk::decode_fast(
            &self.q,
            &self.mem,
            head,
            &mut self.iov,
            self.capacity,
            self.read_only,
            &blk::LIMITS,
        );
        let req = match fast {
            Some(req) => {
                #[cfg(debug_assertions)]
                self.check_fast(head, &req);
                req
            }
            None => match self.decode_slow(head) {
                Some(req) => req,
                None => return,
            },
        };
        self.handle_decoded(io, me, head, gate, req);
    }

    /// In debug builds: the general path decodes `head` to the same
    /// request as the fast one did (and the same iovecs).
    #[cfg(debug_assertions)]
    fn check_fast(&mut self, head: u16, fast: &blk::Request) {
        let mut segs = Vec::new();
        let walked = self.q.chain(&self.mem, head, &mut segs, self.max_segs);
        assert!(
            matches!(walked, Ok(Chain::Complete)),
            "fast path took head {head}, general path: {walked:?}"
        );
        let mut iov = Vec::new();
        // SAFETY: translated through `self.mem`, which is mapped.
        let slow =
            unsafe { blk::decode(&segs, &mut iov, self.capacity, self.read_only, &blk::LIMITS) };
        assert_eq!(
            &slow, fast,
            "fast and general decoding differ for head {head}"
        );
        let key = |v: &[libc::iovec]| -> Vec<(usize, usize)> {
            v.iter().map(|v| (v.iov_base as usize, v.iov_len)).collect()
        };
        assert_eq!(key(&iov), key(&self.iov), "iovecs differ for head {head}");
    }

    /// The general path: walk the chain, then decode it. `None` when the
    /// head was answered already (a malformed chain).
    fn decode_slow(&mut self, head: u16) -> Option<blk::Request> {
        match self.q.chain(&self.mem, head, &mut self.segs, self.max_segs) {
            Ok(Chain::Complete) => {}
            Ok(Chain::TooManySegments { last }) => {
                // more buffers than seg_max allows: an I/O error, answered
                // in the chain's status byte (its last byte, if writable)
                self.counts.malformed += 1;
                self.log
                    .warn(&self.name, head, &"more segments than the device's seg_max");
                let status = (last.writable() && !last.is_empty())
                    // SAFETY: len >= 1 and the segment is translated.
                    .then(|| unsafe { last.ptr.add(last.len as usize - 1) });
                self.finish(head, status, blk::VIRTIO_BLK_S_IOERR, 1);
                return None;
            }
            Err(e) => {
                self.counts.malformed += 1;
                self.log.warn(
                    &self.name,
                    head,
                    &format_args!("malformed descriptor chain: {e}"),
                );
                // no trustworthy status byte: return the head with nothing written
                self.return_head(head, 0);
                return None;
            }
        }
        // SAFETY: the segments were translated through `self.mem`, which
        // this poller keeps mapped.
        Some(unsafe {
            blk::decode(
                &self.segs,
                &mut self.iov,
                self.capacity,
                self.read_only,
                &blk::LIMITS,
            )
        })
    }

    fn handle_decoded(
        &mut self,
        io: &mut IoEngine,
        me: PollerId,
        head: u16,
        gate: Gate,
        req: blk::Request,
    ) {
        match req.what {
            Decoded::Reject(st) => {
                if req.status.is_none() {
                    self.counts.malformed += 1;
                }
                self.finish(head, req.status, st, 1)
            }
            Decoded::GetId => {
                // SAFETY: writable guest buffers, translated through
                // `self.mem`, which this poller keeps mapped.
                unsafe { blk::fill_id(&self.iov, &self.serial) };
                self.finish(head, req.status, blk::VIRTIO_BLK_S_OK, req.written)
            }
            Decoded::Io { kind, offset, len } => {
                // writethrough: a write, and a write of zeroes, is durable
                // when it completes
                let fua = matches!(kind, IoKind::Write | IoKind::WriteZeroes)
                    && !self.writeback.load(Ordering::Relaxed);
                if self.failing {
                    self.finish(head, req.status, blk::VIRTIO_BLK_S_IOERR, 1);
                    return;
                }
                // (an admitted request keeps the stamp of its first pass:
                // when it was taken, not when it was admitted)
                if gate == Gate::Check {
                    self.stamp[head as usize] = self.taking | op_index(kind) as u64;
                    if self.limited && self.qos_holds(io, head, kind, len) {
                        return;
                    }
                }
                let r = IoRequest {
                    dev: self.dev,
                    kind,
                    offset,
                    len,
                    iov: &self.iov,
                    fua,
                    cookie: Cookie::new(me, u64::from(head)),
                };
                // SAFETY: the iovecs point into guest memory that `self.mem`
                // keeps mapped; the poller holds it until it is removed, and
                // it is removed only once nothing it submitted is in flight.
                match unsafe { io.submit(&r) } {
                    Ok(()) => {
                        self.slots[head as usize] = Slot {
                            status: req.status.expect("decoded I/O has a status"),
                            written: req.written,
                            busy: true,
                        };
                        self.inflight += 1;
                        match kind {
                            IoKind::Read => self.counts.bytes_read += len,
                            IoKind::Write => self.counts.bytes_written += len,
                            _ => {}
                        }
                    }
                    Err(e) => {
                        tracing::debug!(device = %self.name, head, "request refused: {e}");
                        // a kind the bdev lacks (discard on a qcow2 overlay,
                        // sent although the feature was not offered) is
                        // UNSUPP, as the spec says; the rest are I/O errors
                        let st = if matches!(e, BdevError::Unsupported { .. }) {
                            blk::VIRTIO_BLK_S_UNSUPP
                        } else {
                            blk::VIRTIO_BLK_S_IOERR
                        };
                        self.finish(head, req.status, st, 1)
                    }
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn stats_for_test(&self) -> Arc<QueueStats> {
        self.stats.clone()
    }

    fn signal(&mut self) {
        crate::sys::eventfd_signal(self.call.as_raw_fd());
        self.counts.notifies += 1;
    }

    /// Whether QoS holds back the request `head` (it then waits in
    /// `held`): inline, the fast check a few instructions; the rest out
    /// of line.
    #[inline(always)]
    fn qos_holds(&mut self, io: &mut IoEngine, head: u16, kind: IoKind, len: u64) -> bool {
        // in order: nothing passes what waits already
        if self.held.is_empty() && self.qos.as_mut().is_some_and(|q| q.admit_local(kind, len)) {
            return false;
        }
        self.qos_holds_slow(io, head, kind, len)
    }

    /// [`QueuePoller::qos_holds`] when the local credit does not cover the
    /// request (checked there already): a grant from the shared buckets,
    /// or a wait.
    #[cold]
    #[inline(never)]
    fn qos_holds_slow(&mut self, io: &mut IoEngine, head: u16, kind: IoKind, len: u64) -> bool {
        let since_ns = self.qos_now(io);
        if self.held.is_empty()
            && self
                .qos
                .as_mut()
                .is_some_and(|q| q.admit_slow(kind, len, since_ns))
        {
            return false;
        }
        self.held.push_back(Held {
            head,
            kind,
            len,
            since_ns,
        });
        true
    }

    /// Admit the requests waiting for QoS that the budget covers now, in
    /// order. Returns how many went.
    fn admit_held(&mut self, io: &mut IoEngine, me: PollerId) -> usize {
        if self.held.is_empty() {
            return 0;
        }
        // out for the loop (handle does not look at it for admitted ones)
        let Some(mut q) = self.qos.take() else {
            return 0;
        };
        let now = self.qos_now(io);
        if !self.failing && !q.may_retry(now) {
            // refused a moment ago and nothing granted since: not before
            // the time the buckets named
            self.qos = Some(q);
            return 0;
        }
        let mut n = 0;
        while io.free_slots() > 0 {
            let Some(&h) = self.held.front() else { break };
            if !self.failing && !q.admit_at(h.kind, h.len, now) {
                break;
            }
            q.waited(now.saturating_sub(h.since_ns));
            self.held.pop_front();
            // decoded again: the chain is the guest's, unchanged while the
            // request is in flight
            self.handle(io, me, h.head, Gate::Admitted);
            n += 1;
        }
        self.qos = Some(q);
        n
    }

    /// The take time of requests taken now, as stamped: the cycle's clock
    /// reading, which may be the last cycle's end reading
    /// (`IoEngine::begin_cycle_at`); 0 with histograms off (no clock
    /// read).
    #[inline]
    fn take_time(&self, io: &mut IoEngine) -> u64 {
        if self.timing {
            io.clock() & !OP_BITS
        } else {
            0
        }
    }

    /// Record a run of `n` requests with one stamp (one operation, taken
    /// at one time).
    #[inline]
    fn record_run(&self, (stamp, n): (u64, u64), now: u64) {
        let taken = stamp & !OP_BITS;
        if taken == 0 {
            // taken before the histograms were switched on
            return;
        }
        if let Some(hist) = self.stats.latency.get((stamp & OP_BITS) as usize) {
            hist.record_n(self.scale.units(now.wrapping_sub(taken)), n);
        }
    }

    /// The QoS clock (ns) from the cycle's clock reading: only limited
    /// queues read it at all.
    #[inline]
    fn qos_now(&self, io: &mut IoEngine) -> u64 {
        self.scale.ns(io.clock())
    }
}

/// Whether a decoded request still has to pass QoS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    Check,
    Admitted,
}

impl IoPoller for QueuePoller {
    fn poll(&mut self, io: &mut IoEngine, me: PollerId) -> usize {
        let mut n = 0;
        if self.broken {
            return 0;
        }
        if self.late_signal != 0 && io.clock() >= self.late_signal {
            self.late_signal = 0;
            self.signal();
        }
        // limits changed by the control plane (a load or two per cycle)
        if let Some(q) = &mut self.qos {
            q.refresh();
            self.limited = q.active();
        }
        // waiting requests first (also while quiesced: they are in flight);
        // they were counted when they were taken
        let admitted = self.admit_held(io, me);
        if self.quiesced {
            return admitted;
        }
        // requests a killed predecessor left unfinished go first, in the
        // order they were submitted
        while self.resubmit_next < self.resubmit.len() && io.free_slots() > 0 {
            let head = self.resubmit[self.resubmit_next];
            self.resubmit_next += 1;
            n += 1;
            if !self.slots[head as usize].busy {
                self.taking = self.take_time(io);
                self.handle(io, me, head, Gate::Check);
            }
        }
        if self.resubmit_next < self.resubmit.len() {
            self.counts.requests += n as u64;
            return n + admitted;
        }
        let avail = self.q.avail_idx();
        if avail == self.q.last_avail {
            self.idle_polls = self.idle_polls.saturating_add(1);
            self.counts.requests += n as u64;
            return n + admitted;
        }
        self.quiet = self.idle_polls >= QUIET_POLLS;
        self.idle_polls = 0;
        self.taking = self.take_time(io);
        self.q.prefetch(&self.mem, avail, io.free_slots());
        while io.free_slots() > 0 {
            let Some(head) = self.q.pop(avail) else { break };
            n += 1;
            if head >= self.q.size()
                || self.slots[head as usize].busy
                || self.returned[head as usize]
            {
                // a head out of range, one still in flight, or one returned
                // but not yet published: the guest is broken; drop the
                // entry rather than corrupt our state
                self.counts.malformed += 1;
                self.log.warn(
                    &self.name,
                    head,
                    &"invalid or in-flight head on the avail ring",
                );
                if self.inflight_region.is_some() {
                    // A dropped entry is neither on the used ring nor marked
                    // in flight, so a restart would resume the avail ring one
                    // entry early and run another request twice. Stop taking
                    // requests instead (the guest must reset the device), as
                    // libvhost-user does.
                    tracing::error!(device = %self.name, head, "queue stopped: the guest broke the avail ring; it needs a device reset");
                    self.broken = true;
                    break;
                }
                continue;
            }
            if let Some(r) = &mut self.inflight_region {
                r.begin(head);
            }
            self.handle(io, me, head, Gate::Check);
        }
        self.counts.requests += n as u64;
        n + admitted
    }

    fn on_complete(&mut self, tag: u64, result: IoResult) {
        let head = tag as u16;
        assert!(
            (head as usize) < self.slots.len() && self.slots[head as usize].busy,
            "{}: a completion for head {head}, which is not in flight",
            self.name
        );
        let s = std::mem::replace(
            &mut self.slots[head as usize],
            Slot {
                status: std::ptr::null_mut(),
                written: 0,
                busy: false,
            },
        );
        self.inflight -= 1;
        let st = if result.is_ok() {
            blk::VIRTIO_BLK_S_OK
        } else {
            blk::VIRTIO_BLK_S_IOERR
        };
        self.finish(head, Some(s.status), st, s.written);
        self.counts.completed += 1;
        let op = (self.stamp[head as usize] & OP_BITS) as usize;
        if let Some(c) = self.counts.ops.get_mut(op) {
            *c += 1;
        }
    }

    fn end_cycle(&mut self, now: &mut u64) {
        // statistics before the used ring, so a client that sees its
        // completion sees it counted
        let c = self.counts;
        if c != self.published {
            c.store(&self.stats);
            self.stats
                .in_flight
                .store((self.inflight + self.held.len()) as u64, Ordering::Relaxed);
            self.published = c;
        }
        if let Some(log) = self.dirty.active() {
            self.log_used(log);
        }
        let publishing = self.q.unpublished().1 > 0;
        // with completions to time, the clock is read inside the publish,
        // in the shadow of its fence
        let timed = self.timing && !self.returned_list.is_empty();
        if self.q.publish(timed.then_some(&mut *now), self.quiet) {
            self.signal();
            self.late_signal = 0;
        } else if publishing && !self.q.event_idx && self.late_signal == 0 {
            self.late_signal = clock::ticks_once(now) + self.late_ticks;
        }
        if let Some(r) = &mut self.inflight_region {
            r.published(self.q.used_idx);
        }
        // one pass over the cycle's completions: their heads may be taken
        // again, and, with histograms on, their latencies are recorded,
        // after the used ring is published so the recording is not in the
        // guest's way; the time is when they went on the used ring (the
        // reading the publish took as it stored the used index, shared
        // with the other pollers of the cycle)
        if timed {
            // (read in the publish; here if nothing was published)
            let now = clock::ticks_once(now);
            // requests taken in one cycle and completed in one have one
            // latency: recorded once per run of them, not once each
            let mut run: (u64, u64) = (NO_OP, 0);
            for &h in &self.returned_list {
                self.returned[h as usize] = false;
                let st = std::mem::replace(&mut self.stamp[h as usize], NO_OP);
                if st == run.0 {
                    run.1 += 1;
                    continue;
                }
                self.record_run(run, now);
                run = (st, 1);
            }
            self.record_run(run, now);
        } else {
            for &h in &self.returned_list {
                self.returned[h as usize] = false;
                self.stamp[h as usize] = NO_OP;
            }
        }
        self.returned_list.clear();
    }

    fn set_timing(&mut self, on: bool) {
        self.timing = on;
    }

    fn prepare_sleep(&mut self) -> bool {
        if self.broken || self.quiesced {
            return true;
        }
        if !self.held.is_empty() {
            // waiting on the QoS budget: the reactor wakes within a
            // millisecond (`wake_within_ms`) to try again
            return true;
        }
        if self.resubmit_next < self.resubmit.len() {
            return false;
        }
        if self.late_signal != 0 {
            // about to sleep: pay the signal owed now rather than later
            self.late_signal = 0;
            self.signal();
        }
        self.set_notification(true);
        self.q.avail_idx() == self.q.last_avail
    }

    fn after_sleep(&mut self) {
        self.set_notification(false);
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.kick.as_raw_fd())
    }

    fn in_flight(&self) -> usize {
        if self.quiesced {
            // heads left to resubmit stay marked in the in-flight region:
            // the next start finds them again
            return self.inflight + self.held.len();
        }
        self.inflight + self.held.len() + (self.resubmit.len() - self.resubmit_next)
    }

    fn wake_within_ms(&self) -> Option<u32> {
        (!self.held.is_empty()).then_some(1)
    }

    fn quiesce(&mut self) {
        self.quiesced = true;
    }

    fn fail(&mut self) {
        self.failing = true;
    }

    fn resume_index(&self) -> Option<u16> {
        Some(self.q.last_avail)
    }
}
