//! The split virtqueue, as the device sees it. Everything read from guest
//! memory is untrusted: indices are reduced modulo the queue size, every
//! address is translated with bounds checks, descriptor chains are bounded
//! in length (which also ends loops), and an indirect table may not nest.
//!
//! Alignment: the rings must be aligned as the virtio spec says (descriptor
//! table 16, avail ring 2, used ring 4 bytes), checked when the queue is
//! built, so their fields are read with aligned volatile accesses. An
//! indirect table's address is whatever the guest wrote: descriptors are
//! read as 16 bytes and decoded, never as wider unaligned loads.

use std::sync::atomic::{fence, Ordering};

use crate::memory::{FrontendAddress, GuestAddress, MemTable};

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One guest buffer, translated: `len` bytes at `ptr`, valid while the
/// memory table it was translated through lives. Made only by
/// [`SplitQueue::chain`].
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub(crate) ptr: *mut u8,
    pub(crate) len: u32,
    pub(crate) writable: bool,
    /// Its guest-physical address (for the dirty log).
    pub(crate) gpa: u64,
}

impl Seg {
    pub fn len(&self) -> u32 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn writable(&self) -> bool {
        self.writable
    }
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

/// Why a ring cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("queue size {0} is not a power of two")]
    Size(u16),
    #[error("{ring} at {addr:#x} is not aligned to {align} bytes")]
    Misaligned {
        ring: &'static str,
        addr: u64,
        align: u64,
    },
    /// Aligned as the frontend sees it, but not where the region is
    /// mapped here: a region whose mmap offset is not a multiple of the
    /// ring's alignment (no real frontend sends one).
    #[error("{ring} at {addr:#x} is not aligned to {align} bytes where its region is mapped (its mmap offset)")]
    MisalignedMapping {
        ring: &'static str,
        addr: u64,
        align: u64,
    },
    #[error("{ring} at {addr:#x} ({len} bytes) is outside the memory table")]
    Outside {
        ring: &'static str,
        addr: u64,
        len: u64,
    },
}

/// A walked chain: its segments (at most the limit given), and when the
/// chain had more, the last one (whose last byte is the status byte).
#[derive(Debug)]
pub enum Chain {
    Complete,
    TooManySegments { last: Seg },
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

/// Push the cache line at `p` out of this core's private caches into the
/// shared one (CLDEMOTE, a hint: where the processor lacks it, the
/// encoding is a NOP; it cannot fault).
#[inline(always)]
fn demote_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: CLDEMOTE neither faults nor changes anything a program can
    // observe; it only moves a cache line.
    unsafe {
        std::arch::asm!("cldemote [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A ring field (little-endian u16).
///
/// # Safety
/// `p` is 2-byte aligned and inside a translated ring (the queue checked
/// both at construction).
#[inline]
unsafe fn rd16(p: *const u8) -> u16 {
    // SAFETY: the caller's contract.
    u16::from_le(unsafe { std::ptr::read_volatile(p.cast::<u16>()) })
}

/// # Safety
/// As [`rd16`].
#[inline]
unsafe fn wr16(p: *mut u8, v: u16) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::write_volatile(p.cast::<u16>(), v.to_le()) }
}

/// Read descriptor `i` of `table`: (addr, len, flags, next). The table may
/// sit at any address (an indirect one is the guest's choice), so the 16
/// bytes are read as bytes (alignment 1) and decoded little-endian.
///
/// # Safety
/// `table` is valid for reads of `16 * (i + 1)` bytes.
#[inline]
pub(crate) unsafe fn read_desc(table: *const u8, i: u16) -> (u64, u32, u16, u16) {
    // SAFETY: the caller's contract.
    let p = unsafe { table.add(16 * i as usize) };
    if (p as usize).is_multiple_of(8) {
        // the usual case (the ring's own table is 16-byte aligned, checked
        // when it was set): two aligned 8-byte loads. A volatile [u8; 16]
        // load is sixteen byte loads.
        // SAFETY: 8-byte aligned and inside the table (the contract).
        let (a, b) = unsafe {
            (
                std::ptr::read_volatile(p.cast::<u64>()),
                std::ptr::read_volatile(p.add(8).cast::<u64>()),
            )
        };
        let b = u64::from_le(b);
        return (
            u64::from_le(a),
            b as u32,
            (b >> 32) as u16,
            (b >> 48) as u16,
        );
    }
    // SAFETY: as above; [u8; 16] needs no alignment.
    let d: [u8; 16] = unsafe { std::ptr::read_volatile(p.cast::<[u8; 16]>()) };
    let f = |a: usize, b: usize| -> &[u8] { &d[a..b] };
    (
        u64::from_le_bytes(f(0, 8).try_into().unwrap_or([0; 8])),
        u32::from_le_bytes(f(8, 12).try_into().unwrap_or([0; 4])),
        u16::from_le_bytes(f(12, 14).try_into().unwrap_or([0; 2])),
        u16::from_le_bytes(f(14, 16).try_into().unwrap_or([0; 2])),
    )
}

impl SplitQueue {
    /// Translate the ring addresses (frontend virtual addresses), checking
    /// their alignment and that they lie in guest memory.
    ///
    /// # Safety
    /// `mem` must stay alive (mapped) as long as the queue is used: the
    /// queue keeps host pointers into it. (The queue poller holds the
    /// table's `Arc` beside the queue.)
    pub unsafe fn new(
        mem: &MemTable,
        size: u16,
        desc: FrontendAddress,
        avail: FrontendAddress,
        used: FrontendAddress,
        base: u16,
        event_idx: bool,
    ) -> Result<Self, RingError> {
        if size == 0 || !size.is_power_of_two() {
            return Err(RingError::Size(size));
        }
        let n = u64::from(size);
        let ring = |ring: &'static str, a: FrontendAddress, len: u64, align: u64| {
            if !a.0.is_multiple_of(align) {
                return Err(RingError::Misaligned {
                    ring,
                    addr: a.0,
                    align,
                });
            }
            let p = mem.uva(a, len).ok_or(RingError::Outside {
                ring,
                addr: a.0,
                len,
            })?;
            // the accesses are to the host pointer: its alignment is what
            // counts (a region mapped at an odd offset shifts it)
            if !(p as u64).is_multiple_of(align) {
                return Err(RingError::MisalignedMapping {
                    ring,
                    addr: a.0,
                    align,
                });
            }
            Ok(p)
        };
        let desc = ring("descriptor table", desc, 16 * n, 16)?;
        let avail = ring("avail ring", avail, 6 + 2 * n, 2)?;
        let used = ring("used ring", used, 6 + 8 * n, 4)?;
        Ok(SplitQueue {
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
        unsafe { rd16(self.used.add(2)) }
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
        let v = unsafe { rd16(self.avail.add(2)) };
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
        let head = unsafe { rd16(self.avail.add(4 + 2 * slot)) };
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
            *h = unsafe { rd16(self.avail.add(4 + 2 * slot)) } & (self.size - 1);
            // SAFETY: *h < size: inside the descriptor table.
            prefetch(unsafe { self.desc.add(16 * *h as usize) });
        }
        for &h in &heads[..n] {
            // SAFETY: h < size: inside the descriptor table.
            let (addr, _len, flags, next) = unsafe { read_desc(self.desc, h) };
            if let Some(p) = mem.gpa(GuestAddress(addr), 1) {
                prefetch(p);
            }
            if flags & VRING_DESC_F_NEXT != 0 && next < self.size {
                // SAFETY: next < size.
                prefetch(unsafe { self.desc.add(16 * next as usize) });
            }
        }
    }

    /// Descriptor `i` of the ring's own table, if `i` is inside it:
    /// (addr, len, flags, next).
    #[inline(always)]
    pub(crate) fn desc(&self, i: u16) -> Option<(u64, u32, u16, u16)> {
        // SAFETY: i < size: inside the descriptor table (bounded at
        // construction).
        (i < self.size).then(|| unsafe { read_desc(self.desc, i) })
    }

    /// Walk the chain at `head` into `out` (cleared first), at most
    /// `max_segs` buffers. A chain with more is walked to its end all the
    /// same (bounded by its table's size), so its status byte can be
    /// answered: `Chain::TooManySegments` carries its last buffer.
    pub fn chain(
        &self,
        mem: &MemTable,
        head: u16,
        out: &mut Vec<Seg>,
        max_segs: usize,
    ) -> Result<Chain, ChainError> {
        out.clear();
        if head >= self.size {
            return Err(ChainError::BadIndex(head));
        }
        let (mut table, mut tsize, mut i) = (self.desc, self.size, head);
        let mut indirect = false;
        let mut steps = 0usize;
        // a chain visits each descriptor of a table at most once, plus the
        // indirect descriptor that leads to the second table
        let mut limit = self.size as usize;
        let mut extra: Option<Seg> = None;
        loop {
            steps += 1;
            if steps > limit {
                return Err(ChainError::TooLong(limit));
            }
            // SAFETY: i < tsize, the size of `table` (the ring's, bounded
            // at construction, or an indirect table translated with its
            // full length).
            let (addr, len, flags, next) = unsafe { read_desc(table, i) };
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
                    .gpa(GuestAddress(addr), u64::from(len))
                    .ok_or(ChainError::BadAddress { addr, len })?;
                tsize = (len / 16) as u16;
                i = 0;
                indirect = true;
                steps = 0;
                limit = tsize as usize;
                continue;
            }
            if len > 0 {
                let ptr = mem
                    .gpa(GuestAddress(addr), u64::from(len))
                    .ok_or(ChainError::BadAddress { addr, len })?;
                let seg = Seg {
                    ptr,
                    len,
                    writable: flags & VRING_DESC_F_WRITE != 0,
                    gpa: addr,
                };
                if out.len() < max_segs {
                    out.push(seg);
                } else {
                    extra = Some(seg);
                }
            }
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(match extra {
                    None => Chain::Complete,
                    Some(last) => Chain::TooManySegments { last },
                });
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
            std::ptr::write_volatile(e.cast::<u32>(), u32::from(head).to_le());
            std::ptr::write_volatile(e.add(4).cast::<u32>(), len.to_le());
        }
        self.used_idx = self.used_idx.wrapping_add(1);
    }

    /// The used-ring entries pushed and not yet published: the first slot
    /// and how many (for the dirty log).
    pub fn unpublished(&self) -> (usize, usize) {
        (
            self.slot(self.signalled_used),
            self.used_idx.wrapping_sub(self.signalled_used) as usize,
        )
    }

    /// Byte offsets in the used ring of: the index, entry `slot`, and the
    /// avail_event field (or the flags, without EVENT_IDX).
    pub fn used_offsets(&self, slot: usize) -> (u64, u64, u64) {
        let ev = if self.event_idx {
            4 + 8 * u64::from(self.size)
        } else {
            0
        };
        (2, 4 + 8 * slot as u64, ev)
    }

    /// Make pushed entries visible; returns whether the guest wants an
    /// interrupt for them. With `clock`, the clock is read into it (if it
    /// holds 0) once the used index is stored, before the fence that
    /// follows: the reading is the moment the entries are on the used
    /// ring, and it is taken while the fence waits for the stores.
    ///
    /// With `demote`, the lines just written (the index, the last entry)
    /// are pushed out of this core's caches to the shared one, so that a
    /// client polling the used index finds them there on its next read
    /// instead of fetching them from this core: worth it when the client
    /// waits on exactly this publish (see `queue::QUIET_POLLS`).
    pub fn publish(&mut self, clock: Option<&mut u64>, demote: bool) -> bool {
        if self.used_idx == self.signalled_used {
            return false;
        }
        fence(Ordering::Release);
        // SAFETY: used+2 is the used index.
        unsafe { wr16(self.used.add(2), self.used_idx) };
        if demote {
            demote_line(self.used.wrapping_add(2));
            let last = self.slot(self.used_idx.wrapping_sub(1));
            demote_line(self.used.wrapping_add(4 + 8 * last));
        }
        if let Some(c) = clock {
            quern_reactor::clock::ticks_once(c);
        }
        fence(Ordering::SeqCst);
        let old = self.signalled_used;
        self.signalled_used = self.used_idx;
        if self.event_idx {
            // used_event lives after the avail ring's entries
            // SAFETY: 4 + 2*size < 6 + 2*size.
            let ev = unsafe { rd16(self.avail.add(4 + 2 * self.size as usize)) };
            self.used_idx.wrapping_sub(ev).wrapping_sub(1) < self.used_idx.wrapping_sub(old)
        } else {
            // SAFETY: avail flags at offset 0.
            (unsafe { rd16(self.avail) } & VRING_AVAIL_F_NO_INTERRUPT) == 0
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
            unsafe { wr16(self.used.add(4 + 8 * self.size as usize), ev) };
        } else {
            // SAFETY: used flags at offset 0.
            unsafe { wr16(self.used, if on { 0 } else { VRING_USED_F_NO_NOTIFY }) };
        }
        fence(Ordering::SeqCst);
    }
}
