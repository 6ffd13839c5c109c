//! The per-reactor qcow2 channel.
//!
//! One `Op` becomes one parent request and up to [`MAX_SEGS`] sub-operations
//! on the channel's private io_uring: reads and writes at host offsets of
//! allocated clusters, reads of the base through the base's channel (opened
//! on the private ring), and zero fills done at once. Writes that touch an
//! unallocated cluster, forced-unit-access writes while new mappings are
//! not yet synced, and requests too fragmented to split go whole to the
//! worker. Sub-operations are tagged with their slot index on the
//! private ring, never on the reactor's. `poll` enters the private ring once
//! if anything was queued, reaps it, the base and the worker's replies, and
//! reports finished parents. Everything is preallocated at open.
//!
//! Wake-up: the private ring's eventfd is also the worker's, and is the
//! channel's `wake_fd` (the reactor drains it). Over a base with its own
//! wake fd the channel hands out an epoll fd over both and drains them in
//! `poll` (one `poll(2)` per cycle, only for such bases).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, types, IoUring};

use super::worker::{scatter, IovPtr, Job, RwKind};
use super::{Shared, ZERO};
use crate::sys::{self, eventfd, Epoll};
use crate::types::{submit_to_channel, BdevChannel, BdevRef, IoKind, Op, Submitter, IOV_MAX};

/// Sub-operations (and private ring entries) per channel.
const SUBS: usize = 256;
/// Parents in flight per channel.
const PARENTS: usize = 256;
/// Pieces one request may split into on the reactor; more go to the worker.
const MAX_SEGS: usize = 64;
const NONE: u32 = u32::MAX;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Seg {
    /// Allocated: I/O at this host offset.
    Host(u64),
    Base,
    Zero,
}

struct Piece {
    seg: Seg,
    offset: u64,
    len: u64,
}

struct Parent {
    tag: u64,
    remaining: u32,
    err: i32,
    result: i32,
}

struct Sub {
    parent: u32,
    /// Bytes it must move (0 for flush).
    len: u64,
    /// Guest offset (copy-on-read of base reads).
    offset: u64,
    base_read: bool,
    iov: Vec<libc::iovec>,
}

pub(super) struct ChannelParts<'a> {
    pub id: u32,
    pub data_fd: RawFd,
    pub base: &'a BdevRef,
    pub shared: Arc<Shared>,
    pub jobs: Sender<Job>,
    pub copy_on_read: bool,
}

pub(super) struct Qcow2Channel {
    /// "Worker queue full" at a bounded rate (a guest can cause it).
    full_log: quern_reactor::ratelimit::LogLimiter,
    ring: IoUring,
    base: Box<dyn BdevChannel>,
    base_done: Vec<(u64, i32)>,
    shared: Arc<Shared>,
    jobs: Sender<Job>,
    replies: Receiver<(u32, i32)>,
    id: u32,
    wake: Arc<OwnedFd>,
    /// Epoll over `wake` and the base's own wake fd, when it has one.
    epoll: Option<(Epoll, RawFd)>,
    parents: Vec<Parent>,
    free_parents: Vec<u32>,
    subs: Vec<Sub>,
    free_subs: Vec<u32>,
    pieces: Vec<Piece>,
    sq_dirty: bool,
    copy_on_read: bool,
    /// Sub-operations the worker holds (it reads their iovecs).
    at_worker: u32,
    /// Base reads the base refused (no room); resubmitted by `poll`.
    retry: Vec<u32>,
}

impl Qcow2Channel {
    pub fn open(p: ChannelParts<'_>) -> io::Result<Self> {
        let ring = IoUring::builder().build(SUBS as u32)?;
        ring.submitter().register_files_sparse(2)?;
        ring.submitter().register_files_update(0, &[p.data_fd])?;
        let base = p.base.open_channel(&ring, 1)?;
        let wake = Arc::new(eventfd()?);
        ring.submitter().register_eventfd(wake.as_raw_fd())?;
        let epoll = match base.wake_fd() {
            Some(bw) => {
                let ep = Epoll::new()?;
                ep.add(wake.as_raw_fd())?;
                ep.add(bw)?;
                Some((ep, bw))
            }
            None => None,
        };
        let (tx, replies) = crossbeam_channel::bounded(SUBS);
        p.jobs
            .send(Job::Register {
                chan: p.id,
                replies: tx,
                wake: wake.clone(),
            })
            .map_err(|_| io::Error::other("qcow2 worker is gone"))?;
        Ok(Qcow2Channel {
            full_log: quern_reactor::ratelimit::LogLimiter::new(),
            ring,
            base,
            base_done: Vec::with_capacity(SUBS),
            shared: p.shared,
            jobs: p.jobs,
            replies,
            id: p.id,
            wake,
            epoll,
            parents: (0..PARENTS)
                .map(|_| Parent {
                    tag: 0,
                    remaining: 0,
                    err: 0,
                    result: 0,
                })
                .collect(),
            free_parents: (0..PARENTS as u32).rev().collect(),
            subs: (0..SUBS)
                .map(|_| Sub {
                    parent: NONE,
                    len: 0,
                    offset: 0,
                    base_read: false,
                    iov: Vec::with_capacity(IOV_MAX + 1),
                })
                .collect(),
            free_subs: (0..SUBS as u32).rev().collect(),
            pieces: Vec::with_capacity(MAX_SEGS + 1),
            sq_dirty: false,
            copy_on_read: p.copy_on_read,
            at_worker: 0,
            retry: Vec::with_capacity(SUBS),
        })
    }

    /// Cut `[offset, offset+len)` into runs of one kind (host runs only
    /// while the host offsets are contiguous). Stops past `MAX_SEGS`.
    fn plan(&mut self, offset: u64, len: u64) {
        self.pieces.clear();
        let bits = self.shared.cluster_bits;
        let cs = 1u64 << bits;
        let end = offset + len;
        let mut off = offset;
        while off < end && self.pieces.len() <= MAX_SEGS {
            let in_off = off & (cs - 1);
            let n = (cs - in_off).min(end - off);
            let seg = match self.shared.map[(off >> bits) as usize].load(Ordering::Acquire) {
                0 => Seg::Base,
                ZERO => Seg::Zero,
                h => Seg::Host(h + in_off),
            };
            match self.pieces.last_mut() {
                Some(p) if joins(p, seg) => p.len += n,
                _ => self.pieces.push(Piece {
                    seg,
                    offset: off,
                    len: n,
                }),
            }
            off += n;
        }
    }

    /// Take a parent and `n` sub slots, if there is room for all of them
    /// and their ring entries.
    fn reserve(&mut self, tag: u64, n: usize, result: i32) -> Option<u32> {
        let room = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if self.free_subs.len() < n || room < n {
            return None;
        }
        let p = self.free_parents.pop()?;
        self.parents[p as usize] = Parent {
            tag,
            remaining: n as u32,
            err: 0,
            result,
        };
        Some(p)
    }

    fn new_sub(
        &mut self,
        parent: u32,
        len: u64,
        offset: u64,
        src: &[libc::iovec],
        skip: u64,
    ) -> u32 {
        let ix = self.free_subs.pop().expect("reserved");
        let s = &mut self.subs[ix as usize];
        s.parent = parent;
        s.len = len;
        s.offset = offset;
        s.base_read = false;
        s.iov.clear();
        slice_iov(src, skip as usize, len as usize, &mut s.iov);
        ix
    }

    fn push(&mut self, sqe: io_uring::squeue::Entry) {
        // Room was reserved for one SQE per sub, but a base may take two per
        // read (uring with `delay_us`): when full, hand the queue to the
        // kernel (at most SUBS subs are in flight, the CQ holds twice that).
        loop {
            // SAFETY: the SQE names buffers of a sub slot, which stays
            // reserved (and its iovecs unchanged) until the completion is
            // reaped.
            if unsafe { self.ring.submission().push(&sqe).is_ok() } {
                break;
            }
            if let Err(e) = self.ring.submit() {
                tracing::debug!("qcow2 private ring submit: {e}");
            }
        }
        self.sq_dirty = true;
    }

    fn submit_flush(&mut self, tag: u64) -> bool {
        let Some(p) = self.reserve(tag, 1, 0) else {
            return false;
        };
        let ix = self.new_sub(p, 0, 0, &[], 0);
        let sqe = opcode::Fsync::new(types::Fixed(0))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(u64::from(ix));
        self.push(sqe);
        true
    }

    fn submit_to_worker(&mut self, op: &Op<'_>, tag: u64) -> bool {
        let kind = match op.kind {
            IoKind::Read => RwKind::Read,
            IoKind::Write => RwKind::Write,
            IoKind::WriteZeroes => RwKind::Zero { discard: false },
            IoKind::Discard => RwKind::Zero { discard: true },
            IoKind::Flush => unreachable!("flushes go to the ring"),
        };
        let data = op.kind.has_data();
        let Some(p) = self.reserve(tag, 1, if data { op.len as i32 } else { 0 }) else {
            return false;
        };
        // a zeroing op moves no bytes: its sub expects a result of 0
        let ix = if data {
            self.new_sub(p, op.len, op.offset, op.iov, 0)
        } else {
            self.new_sub(p, 0, op.offset, &[], 0)
        };
        let s = &self.subs[ix as usize];
        let job = Job::Rw {
            chan: self.id,
            sub: ix,
            kind,
            fua: op.fua,
            offset: op.offset,
            len: op.len,
            iov: IovPtr {
                ptr: s.iov.as_ptr(),
                cnt: s.iov.len(),
            },
        };
        if self.jobs.try_send(job).is_ok() {
            self.at_worker += 1;
        } else {
            if let Some(left_out) = self.full_log.allow() {
                tracing::warn!(left_out, "qcow2: worker queue full or gone");
            }
            // reported by the next poll
            self.base_done.push((u64::from(ix), -libc::EAGAIN));
        }
        true
    }

    /// Split a read, or a write to allocated clusters only, over the ring.
    fn submit_split(&mut self, op: &Op<'_>, tag: u64, sub: &mut Submitter<'_>) -> bool {
        let zero_pieces = self.pieces.iter().filter(|p| p.seg == Seg::Zero).count();
        let n = self.pieces.len() - zero_pieces;
        let Some(p) = self.reserve(tag, n, op.len as i32) else {
            return false;
        };
        let write = op.kind == IoKind::Write;
        for i in 0..self.pieces.len() {
            let Piece { seg, offset, len } = self.pieces[i];
            let skip = offset - op.offset;
            if seg == Seg::Zero {
                zero_iov(op.iov, skip as usize, len as usize);
                continue;
            }
            let ix = self.new_sub(p, len, offset, op.iov, skip);
            match seg {
                Seg::Host(h) => self.push_host(ix, h, write, op.fua),
                _ => self.submit_base(ix),
            }
        }
        if n == 0 {
            self.free_parents.push(p);
            sub.complete(tag, op.len as i32);
        }
        true
    }

    fn push_host(&mut self, ix: u32, host: u64, write: bool, fua: bool) {
        let s = &self.subs[ix as usize];
        let (ptr, cnt) = (s.iov.as_ptr(), s.iov.len() as u32);
        let fd = types::Fixed(0);
        let sqe = if write {
            opcode::Writev::new(fd, ptr, cnt)
                .offset(host)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build()
        } else {
            opcode::Readv::new(fd, ptr, cnt).offset(host).build()
        };
        self.push(sqe.user_data(u64::from(ix)));
    }

    fn submit_base(&mut self, ix: u32) {
        if !self.try_submit_base(ix) {
            // no room: make some by entering the kernel, then try once more
            if self.sq_dirty && self.ring.submit().is_ok() {
                self.sq_dirty = false;
            }
            if !self.try_submit_base(ix) {
                // still refused: "retry later", from `poll`
                self.retry.push(ix);
            }
        }
    }

    fn try_submit_base(&mut self, ix: u32) -> bool {
        let s = &mut self.subs[ix as usize];
        s.base_read = true;
        let op = Op {
            kind: IoKind::Read,
            offset: s.offset,
            len: s.len,
            iov: &s.iov,
            fua: false,
            drain: false,
        };
        let (ok, pushed) = submit_to_channel(
            self.base.as_mut(),
            &op,
            u64::from(ix),
            &mut self.ring,
            &mut self.base_done,
        );
        self.sq_dirty |= pushed;
        ok
    }

    /// Resubmit base reads the base refused; stops at the first refusal.
    fn retry_base(&mut self) {
        while let Some(&ix) = self.retry.first() {
            let before = self.retry.len();
            self.retry.remove(0);
            self.submit_base(ix);
            if self.retry.len() == before {
                // refused again (pushed back at the end): keep the order
                let last = self.retry.pop().expect("just pushed");
                self.retry.insert(0, last);
                break;
            }
        }
    }

    /// Submit what is queued and reap the ring, the base and the worker.
    fn reap(&mut self, done: &mut Vec<(u64, i32)>) {
        if self.sq_dirty {
            match self.ring.submit() {
                Ok(_) => self.sq_dirty = false,
                Err(e) => tracing::debug!("qcow2 private ring submit: {e}"),
            }
        }
        self.drain_wake();
        loop {
            let mut cq = self.ring.completion();
            cq.sync();
            let Some(c) = cq.next() else { break };
            drop(cq);
            // only our slot indices are ours: the base may put other
            // entries on the ring (e.g. uring's LINKED_USER_DATA timers)
            let ix = c.user_data();
            if ix < SUBS as u64 && self.subs[ix as usize].parent != NONE {
                self.finish(ix as u32, c.result(), done);
            }
        }
        self.base.poll(&mut self.base_done);
        while let Some((ix, res)) = self.base_done.pop() {
            if ix < SUBS as u64 && self.subs[ix as usize].parent != NONE {
                self.finish(ix as u32, res, done);
            }
        }
        while let Ok((ix, res)) = self.replies.try_recv() {
            self.at_worker -= 1;
            self.finish(ix, res, done);
        }
        if !self.retry.is_empty() {
            self.retry_base();
            if self.sq_dirty && self.ring.submit().is_ok() {
                self.sq_dirty = false;
            }
            if !self.retry.is_empty() {
                // keep the reactor from sleeping on work only we can restart
                super::worker::signal(self.wake.as_raw_fd());
            }
        }
    }

    /// One sub-operation ended; report its parent when it was the last.
    fn finish(&mut self, ix: u32, res: i32, done: &mut Vec<(u64, i32)>) {
        let s = &mut self.subs[ix as usize];
        let r = if res < 0 {
            res
        } else if res as u64 != s.len {
            -libc::EIO
        } else {
            0
        };
        if r == 0 && s.base_read && self.copy_on_read {
            populate(&self.jobs, &self.shared, s.offset, s.len);
        }
        let p = std::mem::replace(&mut s.parent, NONE);
        self.free_subs.push(ix);
        let par = &mut self.parents[p as usize];
        par.remaining -= 1;
        if r < 0 && par.err == 0 {
            par.err = r;
        }
        if par.remaining == 0 {
            done.push((par.tag, if par.err < 0 { par.err } else { par.result }));
            self.free_parents.push(p);
        }
    }

    /// With an epoll wake fd, nothing else drains the fds under it: read
    /// the readable ones (checked first, the base's fd may be blocking).
    fn drain_wake(&mut self) {
        let Some((_, bw)) = self.epoll else { return };
        let fds = [self.wake.as_raw_fd(), bw];
        let ready = sys::poll_readable(&fds, 0);
        for (i, &fd) in fds.iter().enumerate() {
            if ready & (1 << i) != 0 {
                sys::eventfd_drain(fd);
            }
        }
    }
}

fn joins(p: &Piece, seg: Seg) -> bool {
    match (p.seg, seg) {
        (Seg::Host(a), Seg::Host(b)) => a + p.len == b,
        (a, b) => a == b,
    }
}

/// Ask the worker to copy the clusters wholly inside a base read.
fn populate(jobs: &Sender<Job>, shared: &Shared, offset: u64, len: u64) {
    let bits = shared.cluster_bits;
    let first = offset.div_ceil(1 << bits);
    let end = (offset + len) >> bits;
    let last_partial = (offset + len) == shared.capacity;
    let end = if last_partial {
        (offset + len).div_ceil(1 << bits)
    } else {
        end
    };
    for g in first..end {
        // best effort: a full queue just skips the copy
        if shared.map[g as usize].load(Ordering::Relaxed) == 0 && jobs.len() < super::JOB_QUEUE / 2
        {
            let _ = jobs.try_send(Job::Populate { cluster: g });
        }
    }
}

impl BdevChannel for Qcow2Channel {
    fn submit(&mut self, op: &Op<'_>, tag: u64, sub: &mut Submitter<'_>) -> bool {
        match op.kind {
            IoKind::Flush => self.submit_flush(tag),
            IoKind::Read | IoKind::Write => {
                self.plan(op.offset, op.len);
                let write = op.kind == IoKind::Write;
                let to_worker = self.pieces.len() > MAX_SEGS
                    || (write && op.fua && self.shared.unsynced.load(Ordering::Acquire))
                    || (write && self.pieces.iter().any(|p| !matches!(p.seg, Seg::Host(_))));
                if to_worker {
                    self.submit_to_worker(op, tag)
                } else {
                    self.submit_split(op, tag, sub)
                }
            }
            IoKind::Discard | IoKind::WriteZeroes => self.submit_to_worker(op, tag),
        }
    }

    fn poll(&mut self, done: &mut Vec<(u64, i32)>) -> usize {
        let before = done.len();
        self.reap(done);
        done.len() - before
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(match &self.epoll {
            Some((ep, _)) => ep.as_raw_fd(),
            None => self.wake.as_raw_fd(),
        })
    }
}

impl Drop for Qcow2Channel {
    fn drop(&mut self) {
        // The worker may still use iovecs held in our sub slots (a base
        // read can block for long): wait, without a time limit, until it
        // has answered every job we sent, or is gone.
        let mut scratch = Vec::with_capacity(PARENTS);
        while self.at_worker > 0 {
            match self.replies.recv_timeout(std::time::Duration::from_secs(5)) {
                Ok((ix, res)) => {
                    self.at_worker -= 1;
                    self.finish(ix, res, &mut scratch);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        "qcow2: closing a channel waits for {} requests at the worker",
                        self.at_worker
                    );
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = self.jobs.send(Job::Unregister { chan: self.id });
        // Refused base reads were never started; everything else on the
        // private ring (or at the base) must end before the ring and the
        // slots' iovecs go away.
        for ix in self.retry.drain(..) {
            self.subs[ix as usize].parent = NONE;
            self.free_subs.push(ix);
        }
        // slots of a worker that went away without answering stay taken
        let lost = self.at_worker as usize;
        let mut waited = std::time::Instant::now();
        while self.free_subs.len() + lost < SUBS {
            scratch.clear();
            self.reap(&mut scratch);
            if self.free_subs.len() + lost >= SUBS {
                break;
            }
            if waited.elapsed() > std::time::Duration::from_secs(5) {
                tracing::warn!(
                    "qcow2: closing a channel waits for {} sub-operations",
                    SUBS - lost - self.free_subs.len()
                );
                waited = std::time::Instant::now();
            }
            let fd = match &self.epoll {
                Some((ep, _)) => ep.as_raw_fd(),
                None => self.wake.as_raw_fd(),
            };
            sys::poll_readable(&[fd], 10);
            if self.epoll.is_none() {
                sys::eventfd_drain(fd);
            }
        }
    }
}

/// `dst` = the iovecs of bytes `[skip, skip+len)` of `src`.
fn slice_iov(src: &[libc::iovec], mut skip: usize, mut len: usize, dst: &mut Vec<libc::iovec>) {
    for v in src {
        if len == 0 {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(len);
        dst.push(libc::iovec {
            // SAFETY: skip < iov_len, so the pointer stays inside the buffer.
            iov_base: unsafe { (v.iov_base as *mut u8).add(skip) }.cast(),
            iov_len: n,
        });
        len -= n;
        skip = 0;
    }
}

/// Zero bytes `[skip, skip+len)` of a request's buffers.
fn zero_iov(iov: &[libc::iovec], skip: usize, len: usize) {
    const Z: [u8; 4096] = [0; 4096];
    let mut pos = skip;
    let end = skip + len;
    while pos < end {
        let n = (end - pos).min(Z.len());
        scatter(&Z[..n], iov, pos);
        pos += n;
    }
}
