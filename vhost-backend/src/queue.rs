//! A virtqueue bound to a reactor: the [`Poller`] that drains its avail
//! ring into the reactor's engine and completes requests on its used ring.
//! Per-queue state lives here alone (no sharing, no locks); the guest is
//! signalled at most once per cycle.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use quern_bdev::{BdevError, IoEngine, IoKind, IoRequest, IoResult};
use quern_reactor::Poller;

use crate::blk::{self, Decoded};
use crate::inflight::InflightQueue;
use crate::memory::MemTable;
use crate::virtq::{Seg, SplitQueue};

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
}

#[derive(Clone, Copy)]
struct Slot {
    status: *mut u8,
    written: u32,
    busy: bool,
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
    /// Heads returned this cycle whose used entries are not yet published:
    /// the guest may not offer them again before it has seen them.
    returned: Vec<bool>,
    returned_list: Vec<u16>,
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    requests: u64,
    completed: u64,
    errors: u64,
    malformed: u64,
    notifies: u64,
}

impl Counts {
    fn load(st: &QueueStats) -> Self {
        Counts {
            requests: st.requests.load(Ordering::Relaxed),
            completed: st.completed.load(Ordering::Relaxed),
            errors: st.errors.load(Ordering::Relaxed),
            malformed: st.malformed.load(Ordering::Relaxed),
            notifies: st.notifies.load(Ordering::Relaxed),
        }
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
}

impl QueuePoller {
    pub(crate) fn new(p: QueueParts) -> Self {
        // The reactor drains the kick eventfd after epoll reports it; the
        // frontend may have drained it first (libblkio does), and a blocking
        // read would then stall the whole reactor.
        // SAFETY: fcntl on an fd we own; failure leaves it as it was.
        unsafe {
            let fd = p.kick.as_raw_fd();
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
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
        QueuePoller {
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
            returned: vec![false; size],
            returned_list: Vec::with_capacity(size),
        }
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
        if st != blk::VIRTIO_BLK_S_OK {
            self.counts.errors += 1;
        }
    }

    fn handle(&mut self, io: &mut IoEngine, base: u64, head: u16) {
        if let Err(e) = self.q.chain(&self.mem, head, &mut self.segs, self.max_segs) {
            self.counts.malformed += 1;
            tracing::warn!(device = %self.name, head, "malformed descriptor chain: {e}");
            // no trustworthy status byte: return the head with nothing written
            self.return_head(head, 0);
            return;
        }
        let req = blk::decode(&self.segs, &mut self.iov, self.capacity, self.read_only);
        match req.what {
            Decoded::Reject(st) => {
                if req.status.is_none() {
                    self.counts.malformed += 1;
                }
                self.finish(head, req.status, st, 1)
            }
            Decoded::GetId => {
                blk::fill_id(&self.iov, &self.serial);
                self.finish(head, req.status, blk::VIRTIO_BLK_S_OK, req.written)
            }
            Decoded::Io { kind, offset, len } => {
                // writethrough: a write, and a write of zeroes, is durable
                // when it completes
                let fua = matches!(kind, IoKind::Write | IoKind::WriteZeroes)
                    && !self.writeback.load(Ordering::Relaxed);
                let r = IoRequest {
                    dev: self.dev,
                    kind,
                    offset,
                    len,
                    iov: &self.iov,
                    fua,
                    cookie: base | u64::from(head),
                };
                match io.submit(&r) {
                    Ok(()) => {
                        self.slots[head as usize] = Slot {
                            status: req.status.expect("decoded I/O has a status"),
                            written: req.written,
                            busy: true,
                        };
                        self.inflight += 1;
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

    fn signal(&mut self) {
        let one: u64 = 1;
        // SAFETY: an 8-byte write to the call eventfd.
        unsafe { libc::write(self.call.as_raw_fd(), (&one as *const u64).cast(), 8) };
        self.counts.notifies += 1;
    }
}

impl Poller for QueuePoller {
    fn poll(&mut self, io: &mut IoEngine, base: u64) -> usize {
        let mut n = 0;
        if self.broken {
            return 0;
        }
        // requests a killed predecessor left unfinished go first, in the
        // order they were submitted
        while self.resubmit_next < self.resubmit.len() && io.free_slots() > 0 {
            let head = self.resubmit[self.resubmit_next];
            self.resubmit_next += 1;
            n += 1;
            if !self.slots[head as usize].busy {
                self.handle(io, base, head);
            }
        }
        if self.resubmit_next < self.resubmit.len() {
            self.counts.requests += n as u64;
            return n;
        }
        let avail = self.q.avail_idx();
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
                tracing::warn!(device = %self.name, head, "invalid or in-flight head on the avail ring");
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
            self.handle(io, base, head);
        }
        self.counts.requests += n as u64;
        n
    }

    fn on_complete(&mut self, cookie: u64, result: IoResult) {
        let head = cookie as u16;
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
    }

    fn end_cycle(&mut self) {
        // statistics before the used ring, so a client that sees its
        // completion sees it counted
        let c = self.counts;
        if c != self.published {
            let st = &self.stats;
            st.requests.store(c.requests, Ordering::Relaxed);
            st.completed.store(c.completed, Ordering::Relaxed);
            st.errors.store(c.errors, Ordering::Relaxed);
            st.malformed.store(c.malformed, Ordering::Relaxed);
            st.notifies.store(c.notifies, Ordering::Relaxed);
            self.published = c;
        }
        if self.q.publish() {
            self.signal();
        }
        if let Some(r) = &mut self.inflight_region {
            r.published(self.q.used_idx);
        }
        for h in self.returned_list.drain(..) {
            self.returned[h as usize] = false;
        }
    }

    fn prepare_sleep(&mut self) -> bool {
        if self.broken {
            return true;
        }
        if self.resubmit_next < self.resubmit.len() {
            return false;
        }
        self.q.set_notification(true);
        self.q.avail_idx() == self.q.last_avail
    }

    fn after_sleep(&mut self) {
        self.q.set_notification(false);
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.kick.as_raw_fd())
    }

    fn in_flight(&self) -> usize {
        self.inflight + (self.resubmit.len() - self.resubmit_next)
    }

    fn resume_index(&self) -> Option<u16> {
        Some(self.q.last_avail)
    }
}
