//! The split virtqueue, as the device sees it. Everything read from guest
//! memory is untrusted: indices are reduced modulo the queue size, every
//! address is translated with bounds checks, descriptor chains are bounded
//! in length (which also ends loops), and an indirect table may not nest.

use std::sync::atomic::{fence, Ordering};

use crate::memory::MemTable;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One guest buffer, translated.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub ptr: *mut u8,
    pub len: u32,
    pub writable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor index {0} out of range")]
    BadIndex(u16),
    #[error("descriptor address {addr:#x}+{len} is outside guest memory")]
    BadAddress { addr: u64, len: u32 },
    #[error("descriptor chain longer than {0} (loop?)")]
    TooLong(usize),
    #[error("nested or malformed indirect descriptor table")]
    BadIndirect,
}

/// Host pointers to one split ring. Built by the control plane from the
/// frontend's addresses; used only by the reactor that owns the queue.
pub struct SplitQueue {
    size: u16,
    desc: *const u8,
    avail: *mut u8,
    used: *mut u8,
    pub last_avail: u16,
    pub used_idx: u16,
    /// Used index last published to the guest (for EVENT_IDX).
    signalled_used: u16,
    pub event_idx: bool,
}

// SAFETY: the pointers refer to guest memory kept mapped by the queue's
// owner (the poller holds the memory table); one thread uses the queue.
unsafe impl Send for SplitQueue {}

/// A cache hint; never faults, whatever the address.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint and cannot fault.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[inline]
fn rd16(p: *const u8) -> u16 {
    // SAFETY: callers pass pointers inside the translated ring areas.
    unsafe { std::ptr::read_volatile(p.cast::<u16>()) }
}
#[inline]
fn wr16(p: *mut u8, v: u16) {
    // SAFETY: as above.
    unsafe { std::ptr::write_volatile(p.cast::<u16>(), v) }
}

impl SplitQueue {
    /// Translate the ring addresses (frontend virtual addresses).
    pub fn new(
        mem: &MemTable,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        base: u16,
        event_idx: bool,
    ) -> Option<Self> {
        if size == 0 || !size.is_power_of_two() {
            return None;
        }
        let n = u64::from(size);
        let desc = mem.uva(desc, 16 * n)?;
        let avail = mem.uva(avail, 6 + 2 * n)?;
        let used = mem.uva(used, 6 + 8 * n)?;
        Some(SplitQueue {
            size,
            desc,
            avail,
            used,
            last_avail: base,
            used_idx: base,
            signalled_used: base,
            event_idx,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Ring position of index `i`: `i % size`, as a mask (`new` accepts
    /// only powers of two), since a 16-bit division costs more than the
    /// rest of a ring access.
    #[inline(always)]
    fn slot(&self, i: u16) -> usize {
        (i & (self.size - 1)) as usize
    }

    /// The used index as the guest sees it.
    pub fn used_ring_idx(&self) -> u16 {
        // SAFETY: used+2 is the used index.
        rd16(unsafe { self.used.add(2) })
    }

    /// Resume after a backend restart: the used ring continues at
    /// `used_idx` and the avail ring at `last_avail` (heads in between are
    /// being resubmitted).
    pub fn resume_at(&mut self, last_avail: u16, used_idx: u16) {
        self.last_avail = last_avail;
        self.used_idx = used_idx;
        self.signalled_used = used_idx;
    }

    /// The guest's avail index (acquire: descriptors it covers are visible).
    #[inline]
    pub fn avail_idx(&self) -> u16 {
        // SAFETY: avail+2 is inside the translated avail ring.
        let v = rd16(unsafe { self.avail.add(2) });
        fence(Ordering::Acquire);
        v
    }

    /// Next available head, if any.
    #[inline]
    pub fn pop(&mut self, avail_idx: u16) -> Option<u16> {
        if self.last_avail == avail_idx {
            return None;
        }
        let slot = self.slot(self.last_avail);
        // SAFETY: 4 + 2*slot < 6 + 2*size.
        let head = rd16(unsafe { self.avail.add(4 + 2 * slot) });
        self.last_avail = self.last_avail.wrapping_add(1);
        Some(head)
    }

    /// Warm the cache for the next requests on the avail ring (at most
    /// `max`): first every head's descriptor, then what each of those
    /// points to (the request header, or an indirect table) and the next
    /// descriptor of its chain. The client wrote all of it moments ago on
    /// another core, so each first touch is a cache miss; issued together,
    /// the misses overlap instead of stalling one request at a time.
    /// Hints only: nothing read here is trusted or kept (a head is reduced
    /// modulo the ring size, an address must translate).
    #[inline]
    pub fn prefetch(&self, mem: &MemTable, avail_idx: u16, max: usize) {
        const MAX: usize = 32;
        let n = (avail_idx.wrapping_sub(self.last_avail) as usize)
            .min(max)
            .min(MAX);
        if n < 2 {
            return;
        }
        let mut heads = [0u16; MAX];
        for (k, h) in heads.iter_mut().enumerate().take(n) {
            let slot = self.slot(self.last_avail.wrapping_add(k as u16));
            // SAFETY: 4 + 2*slot < 6 + 2*size.
            *h = rd16(unsafe { self.avail.add(4 + 2 * slot) }) & (self.size - 1);
            // SAFETY: *h < size: inside the descriptor table.
            prefetch(unsafe { self.desc.add(16 * *h as usize) });
        }
        for &h in &heads[..n] {
            let (addr, _len, flags, next) = Self::read_desc(self.desc, h);
            if let Some(p) = mem.gpa(addr, 1) {
                prefetch(p);
            }
            if flags & VRING_DESC_F_NEXT != 0 && next < self.size {
                // SAFETY: next < size.
                prefetch(unsafe { self.desc.add(16 * next as usize) });
            }
        }
    }

    fn read_desc(table: *const u8, i: u16) -> (u64, u32, u16, u16) {
        // SAFETY: callers bound i by the table's size.
        unsafe {
            let d = table.add(16 * i as usize);
            (
                std::ptr::read_volatile(d.cast::<u64>()),
                std::ptr::read_volatile(d.add(8).cast::<u32>()),
                std::ptr::read_volatile(d.add(12).cast::<u16>()),
                std::ptr::read_volatile(d.add(14).cast::<u16>()),
            )
        }
    }

    /// Walk the chain at `head` into `out` (cleared first), at most
    /// `max_segs` buffers.
    pub fn chain(
        &self,
        mem: &MemTable,
        head: u16,
        out: &mut Vec<Seg>,
        max_segs: usize,
    ) -> Result<(), ChainError> {
        out.clear();
        if head >= self.size {
            return Err(ChainError::BadIndex(head));
        }
        let (mut table, mut tsize, mut i) = (self.desc, self.size, head);
        let mut indirect = false;
        let mut steps = 0usize;
        let limit = self.size as usize + max_segs;
        loop {
            steps += 1;
            if steps > limit {
                return Err(ChainError::TooLong(limit));
            }
            let (addr, len, flags, next) = Self::read_desc(table, i);
            if flags & VRING_DESC_F_INDIRECT != 0 {
                if indirect
                    || flags & VRING_DESC_F_NEXT != 0
                    || len == 0
                    || len % 16 != 0
                    || len / 16 > 65535
                {
                    return Err(ChainError::BadIndirect);
                }
                table = mem
                    .gpa(addr, u64::from(len))
                    .ok_or(ChainError::BadAddress { addr, len })?;
                tsize = (len / 16) as u16;
                i = 0;
                indirect = true;
                continue;
            }
            if len > 0 {
                if out.len() == max_segs {
                    return Err(ChainError::TooLong(max_segs));
                }
                let ptr = mem
                    .gpa(addr, u64::from(len))
                    .ok_or(ChainError::BadAddress { addr, len })?;
                out.push(Seg {
                    ptr,
                    len,
                    writable: flags & VRING_DESC_F_WRITE != 0,
                });
            }
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(());
            }
            if next >= tsize {
                return Err(ChainError::BadIndex(next));
            }
            i = next;
        }
    }

    /// Put a completed head on the used ring (not yet visible: see `publish`).
    #[inline]
    pub fn push_used(&mut self, head: u16, len: u32) {
        let slot = self.slot(self.used_idx);
        // SAFETY: 4 + 8*slot + 8 <= 6 + 8*size.
        unsafe {
            let e = self.used.add(4 + 8 * slot);
            std::ptr::write_volatile(e.cast::<u32>(), u32::from(head));
            std::ptr::write_volatile(e.add(4).cast::<u32>(), len);
        }
        self.used_idx = self.used_idx.wrapping_add(1);
    }

    /// Make pushed entries visible; returns whether the guest wants an
    /// interrupt for them.
    pub fn publish(&mut self) -> bool {
        if self.used_idx == self.signalled_used {
            return false;
        }
        fence(Ordering::Release);
        // SAFETY: used+2 is the used index.
        wr16(unsafe { self.used.add(2) }, self.used_idx);
        fence(Ordering::SeqCst);
        let old = self.signalled_used;
        self.signalled_used = self.used_idx;
        if self.event_idx {
            // used_event lives after the avail ring's entries
            // SAFETY: 4 + 2*size < 6 + 2*size.
            let ev = rd16(unsafe { self.avail.add(4 + 2 * self.size as usize) });
            self.used_idx.wrapping_sub(ev).wrapping_sub(1) < self.used_idx.wrapping_sub(old)
        } else {
            // SAFETY: avail flags at offset 0.
            rd16(self.avail) & VRING_AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Ask the guest to kick (true) or not to bother (false).
    pub fn set_notification(&mut self, on: bool) {
        if self.event_idx {
            let ev = if on {
                self.last_avail
            } else {
                self.last_avail.wrapping_sub(1)
            };
            // avail_event lives after the used ring's entries
            // SAFETY: 4 + 8*size < 6 + 8*size.
            wr16(unsafe { self.used.add(4 + 8 * self.size as usize) }, ev);
        } else {
            // SAFETY: used flags at offset 0.
            wr16(self.used, if on { 0 } else { VRING_USED_F_NO_NOTIFY });
        }
        fence(Ordering::SeqCst);
    }
}
