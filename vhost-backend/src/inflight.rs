//! In-flight request tracking in a region shared with the frontend
//! (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, split rings).
//!
//! The frontend (QEMU) keeps the region's fd across backend restarts. Each
//! queue has a header and one 16-byte state per descriptor head:
//!
//! ```text
//! queue: features u64 | version u16 | desc_num u16 | last_batch_head u16 | used_idx u16
//! desc[i]: inflight u8 | pad[5] | next u16 | counter u64
//! ```
//!
//! A head is marked in flight (with a submission counter) when it is taken
//! off the avail ring, before it executes. Completions of one cycle are
//! chained through `next` from `last_batch_head`; after the used index is
//! published their marks are cleared and `used_idx` is updated. A backend
//! killed at any point can therefore tell, on restart, which heads never
//! completed (marked, and not in a batch the used ring already shows) and
//! resubmit them in submission order. The layout and protocol are the
//! vhost-user specification's ("Inflight I/O tracking").
//!
//! The region is writable by the frontend too, so everything read from it is
//! checked: head indices are bounded by the queue size, flags compared to 1.

use std::fs::File;
use std::sync::Arc;

const HEADER_BYTES: usize = 16;
const DESC_BYTES: usize = 16;
const ALIGN: usize = 64;
/// The region version this backend writes.
pub const INFLIGHT_VERSION: u16 = 1;

/// Bytes one queue's part of the region takes (as libvhost-user and QEMU
/// size it).
pub fn queue_region_bytes(queue_size: u16) -> usize {
    (DESC_BYTES * queue_size as usize + 2).div_ceil(ALIGN) * ALIGN
}

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("in-flight region for {num_queues} queues of {queue_size}: queue size must be a power of two up to 32768 and there must be 1..={max_queues} queues")]
    BadGeometry {
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
    },
    #[error("in-flight region of {got} bytes is smaller than the {need} bytes its geometry needs")]
    TooSmall { got: u64, need: u64 },
    #[error("in-flight region: {0}")]
    Os(#[from] std::io::Error),
}

/// The whole shared region, mapped.
pub struct InflightRegion {
    ptr: *mut u8,
    /// Unmapped when the region goes (queues hold an `Arc` of it).
    _map: crate::sys::SharedMapping,
    pub num_queues: u16,
    pub queue_size: u16,
}

// SAFETY: the mapping lives until drop; each queue's part is written by the
// one reactor running that queue, the control plane touches a part only
// while its queue is stopped.
unsafe impl Send for InflightRegion {}
unsafe impl Sync for InflightRegion {}

fn check_geometry(num_queues: u16, queue_size: u16, max_queues: u16) -> Result<u64, InflightError> {
    if num_queues == 0
        || num_queues > max_queues
        || queue_size == 0
        || !queue_size.is_power_of_two()
        || queue_size > 32768
    {
        return Err(InflightError::BadGeometry {
            num_queues,
            queue_size,
            max_queues,
        });
    }
    Ok(queue_region_bytes(queue_size) as u64 * u64::from(num_queues))
}

/// A new zeroed region for GET_INFLIGHT_FD: its fd and size.
pub fn create(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
) -> Result<(File, u64), InflightError> {
    let size = check_geometry(num_queues, queue_size, max_queues)?;
    // a new memfd reads as zeroes: version 0, nothing in flight; its size
    // is sealed, so a frontend cannot shrink it under a reactor's mapping
    let f = crate::sys::sealed_memfd(c"quern-inflight", size)?;
    Ok((f, size))
}

impl InflightRegion {
    /// Map the region the frontend hands over with SET_INFLIGHT_FD.
    pub fn map(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
    ) -> Result<Self, InflightError> {
        let need = check_geometry(num_queues, queue_size, max_queues)?;
        if mmap_size < need {
            return Err(InflightError::TooSmall {
                got: mmap_size,
                need,
            });
        }
        let file_len = file.metadata()?.len();
        if mmap_offset.checked_add(need).is_none_or(|e| e > file_len) {
            return Err(InflightError::TooSmall {
                got: file_len.saturating_sub(mmap_offset),
                need,
            });
        }
        let map = crate::sys::SharedMapping::new(file, need, mmap_offset)?;
        Ok(InflightRegion {
            ptr: map.as_ptr(),
            _map: map,
            num_queues,
            queue_size,
        })
    }

    /// Queue `index`'s tracker, for a vring of `vring_size` descriptors.
    /// None if the region does not cover that queue or ring.
    pub fn queue(self: &Arc<Self>, index: usize, vring_size: u16) -> Option<InflightQueue> {
        if index >= self.num_queues as usize || vring_size > self.queue_size {
            return None;
        }
        let off = index * queue_region_bytes(self.queue_size);
        Some(InflightQueue {
            // SAFETY: off + region bytes <= len by construction.
            base: unsafe { self.ptr.add(off) },
            size: vring_size,
            counter: 1,
            _region: self.clone(),
        })
    }
}

/// One queue's in-flight state, owned by the reactor running the queue.
pub struct InflightQueue {
    base: *mut u8,
    size: u16,
    counter: u64,
    _region: Arc<InflightRegion>,
}

// SAFETY: see InflightRegion; moved to the queue's reactor with its poller.
unsafe impl Send for InflightQueue {}

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
/// The link that ends a batch's chain: no head has this index.
const NO_BATCH: u16 = u16::MAX;

impl InflightQueue {
    #[inline]
    fn rd16(&self, off: usize) -> u16 {
        // SAFETY: offsets are inside this queue's part (header or desc[< size]).
        unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u16>()) }
    }
    #[inline]
    fn wr16(&self, off: usize, v: u16) {
        // SAFETY: as rd16.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u16>(), v) }
    }
    #[inline]
    fn desc(&self, head: u16) -> *mut u8 {
        debug_assert!(head < self.size);
        // SAFETY: head < size <= the region's queue size.
        unsafe { self.base.add(HEADER_BYTES + DESC_BYTES * head as usize) }
    }
    fn is_inflight(&self, head: u16) -> bool {
        // SAFETY: desc() is in bounds.
        unsafe { std::ptr::read_volatile(self.desc(head)) == 1 }
    }
    fn set_inflight(&self, head: u16, on: bool) {
        // SAFETY: desc() is in bounds.
        unsafe { std::ptr::write_volatile(self.desc(head), u8::from(on)) }
    }
    fn counter_of(&self, head: u16) -> u64 {
        // SAFETY: desc()+8 is the 8-byte counter, in bounds.
        unsafe { std::ptr::read_volatile(self.desc(head).add(8).cast::<u64>()) }
    }

    /// `head` was taken off the avail ring and is about to execute.
    #[inline]
    pub fn begin(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        let d = self.desc(head);
        // SAFETY: desc()+8 is the 8-byte counter, in bounds.
        unsafe { std::ptr::write_volatile(d.add(8).cast::<u64>(), self.counter) };
        self.counter = self.counter.wrapping_add(1);
        self.set_inflight(head, true);
    }

    /// `head` was put on the used ring (not yet published).
    #[inline]
    pub fn completed(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        // SAFETY: desc()+6 is the 2-byte next link, in bounds.
        unsafe {
            std::ptr::write_volatile(
                self.desc(head).add(6).cast::<u16>(),
                self.rd16(OFF_LAST_BATCH_HEAD),
            )
        };
        self.wr16(OFF_LAST_BATCH_HEAD, head);
    }

    /// The used index `used_idx` is now visible to the guest: clear the
    /// marks of the batch it covers.
    #[inline]
    pub fn published(&mut self, used_idx: u16) {
        let old = self.rd16(OFF_USED_IDX);
        if old == used_idx {
            return;
        }
        self.clear_batch(used_idx.wrapping_sub(old));
        self.wr16(OFF_USED_IDX, used_idx);
    }

    /// Clear the marks of the last `n` completed heads. The chain ends at
    /// the head completed first after the previous clearing (its link is
    /// [`NO_BATCH`]), so even a guest that moves its used index by more
    /// than one batch cannot make this reach heads in flight again.
    ///
    /// Each step is safe to repeat after a crash at any point: the marks
    /// go first, then the chain's end, and the caller records the used
    /// index last, so a restart walks the same batch again.
    fn clear_batch(&mut self, n: u16) {
        let mut head = self.rd16(OFF_LAST_BATCH_HEAD);
        for _ in 0..n.min(self.size) {
            if head >= self.size {
                break; // the batch's end, or a link the frontend scribbled over
            }
            self.set_inflight(head, false);
            // SAFETY: desc()+6 is the next link, in bounds.
            head = unsafe { std::ptr::read_volatile(self.desc(head).add(6).cast::<u16>()) };
        }
        self.wr16(OFF_LAST_BATCH_HEAD, NO_BATCH);
    }

    /// Bring the region in line with the guest's used ring at queue start.
    /// Returns None for a fresh region (nothing was ever in flight: use the
    /// frontend's vring base), else the heads to resubmit in submission
    /// order; the avail ring then resumes at `used_ring_idx + heads.len()`.
    pub fn recover(&mut self, used_ring_idx: u16) -> Option<Vec<u16>> {
        if self.rd16(OFF_VERSION) == 0 {
            // SAFETY: the whole part is ours to initialise.
            unsafe {
                std::ptr::write_bytes(self.base, 0, HEADER_BYTES + DESC_BYTES * self.size as usize)
            };
            self.wr16(OFF_VERSION, INFLIGHT_VERSION);
            self.wr16(OFF_DESC_NUM, self.size);
            self.wr16(OFF_LAST_BATCH_HEAD, NO_BATCH);
            self.wr16(OFF_USED_IDX, used_ring_idx);
            return None;
        }
        // a batch published to the guest but not yet cleared here
        let recorded = self.rd16(OFF_USED_IDX);
        if recorded != used_ring_idx {
            self.clear_batch(used_ring_idx.wrapping_sub(recorded));
            self.wr16(OFF_USED_IDX, used_ring_idx);
        }
        // Whatever the chain held (a batch completed but never published,
        // or a region from a build without the end marker), every head
        // still marked is resubmitted below: the next batch starts afresh.
        self.wr16(OFF_LAST_BATCH_HEAD, NO_BATCH);
        let mut heads: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.is_inflight(h))
            .map(|h| (self.counter_of(h), h))
            .collect();
        heads.sort_unstable();
        self.counter = heads.last().map_or(1, |&(c, _)| c.wrapping_add(1));
        Some(heads.into_iter().map(|(_, h)| h).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(nq: u16, qs: u16) -> Arc<InflightRegion> {
        let (f, size) = create(nq, qs, 8).unwrap();
        Arc::new(InflightRegion::map(&f, size, 0, nq, qs, 8).unwrap())
    }

    #[test]
    fn sizes_match_the_frontends() {
        assert_eq!(queue_region_bytes(128), 2112);
        assert_eq!(queue_region_bytes(256), 4160);
        assert!(create(0, 128, 8).is_err());
        assert!(create(2, 100, 8).is_err());
        assert!(create(9, 128, 8).is_err());
    }

    #[test]
    fn a_fresh_region_has_nothing_to_resubmit() {
        let r = region(2, 8);
        let mut q = r.queue(1, 8).unwrap();
        assert_eq!(q.recover(5), None);
        // after initialisation it is a known, empty region
        let mut q = r.queue(1, 8).unwrap();
        assert_eq!(q.recover(5), Some(vec![]));
    }

    #[test]
    fn unfinished_heads_come_back_in_submission_order() {
        let r = region(1, 8);
        let mut q = r.queue(0, 8).unwrap();
        assert_eq!(q.recover(0), None);
        for h in [3, 1, 6, 2] {
            q.begin(h);
        }
        // 1 completes and is published; 6 completes but the crash comes
        // before the used index reaches the guest
        q.completed(1);
        q.published(1);
        q.completed(6);
        let mut again = r.queue(0, 8).unwrap();
        assert_eq!(again.recover(1), Some(vec![3, 6, 2]));
        // new submissions are numbered after the recovered ones
        again.begin(5);
        assert!(again.counter_of(5) > again.counter_of(2));
    }

    #[test]
    fn a_published_batch_not_yet_cleared_is_not_resubmitted() {
        let r = region(1, 8);
        let mut q = r.queue(0, 8).unwrap();
        q.recover(10);
        for h in [0, 1, 2, 3] {
            q.begin(h);
        }
        q.completed(2);
        q.completed(0);
        // the guest saw used idx 12 (two entries), then the backend died
        let mut again = r.queue(0, 8).unwrap();
        assert_eq!(again.recover(12), Some(vec![1, 3]));
    }

    /// The guest owns its used index. One moved further than the batch the
    /// backend had completed must not clear the marks of requests begun
    /// after the previous batch was published (head 1 reused here).
    #[test]
    fn a_used_index_moved_past_the_batch_clears_only_that_batch() {
        let r = region(1, 8);
        let mut q = r.queue(0, 8).unwrap();
        q.recover(0);
        for h in [1, 2] {
            q.begin(h);
        }
        q.completed(1);
        q.completed(2);
        q.published(2);
        q.begin(1);
        q.begin(5);
        q.completed(5);
        // the backend dies with 5 on the used ring unpublished; the guest
        // claims three more entries instead of one
        let mut again = r.queue(0, 8).unwrap();
        assert_eq!(again.recover(5), Some(vec![1]));
        // and backwards: no completed head is reachable any more
        again.begin(3);
        let mut third = r.queue(0, 8).unwrap();
        assert_eq!(third.recover(1), Some(vec![1, 3]));
    }

    /// A crash after a completion but before its publication leaves the
    /// chain naming that head; it is resubmitted, and after the restart a
    /// guest that over-advances its used index still cannot clear it.
    #[test]
    fn recovery_starts_a_fresh_chain() {
        let r = region(1, 8);
        let mut q = r.queue(0, 8).unwrap();
        q.recover(0);
        q.begin(4);
        q.begin(6);
        q.completed(4);
        let mut again = r.queue(0, 8).unwrap();
        assert_eq!(again.recover(0), Some(vec![4, 6]));
        // after the restart: 6 completes first; the guest claims two
        again.completed(6);
        let mut third = r.queue(0, 8).unwrap();
        assert_eq!(third.recover(2), Some(vec![4]));
    }

    #[test]
    fn scribbled_links_and_flags_stay_in_bounds() {
        let r = region(1, 4);
        let mut q = r.queue(0, 4).unwrap();
        q.recover(0);
        // the frontend writes garbage over the whole part
        // SAFETY: test-only write inside the mapping.
        unsafe { std::ptr::write_bytes(q.base, 0xff, HEADER_BYTES + DESC_BYTES * 4) };
        let mut again = r.queue(0, 4).unwrap();
        let heads = again.recover(3).unwrap();
        assert!(heads.iter().all(|&h| h < 4));
        assert!(r.queue(0, 8).is_none(), "vring larger than the region");
        assert!(r.queue(1, 4).is_none(), "queue past the region");
    }
}
