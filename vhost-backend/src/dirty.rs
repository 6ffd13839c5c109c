//! Dirty page logging for live migration (VHOST_F_LOG_ALL with the
//! LOG_SHMFD protocol feature).
//!
//! The frontend shares a bitmap (SET_LOG_BASE): one bit per 4 KiB page of
//! guest-physical memory, bit `p % 8` of byte `p / 8` for page `p`. While
//! LOG_ALL is on, every byte Quern writes into guest memory marks its page,
//! from the reactor that writes it, with an atomic OR (lock-free, and
//! correct against the frontend clearing bits as it sends pages), in the
//! same cycle as the write and before the used index that makes it visible
//! is published: a read's data (written by the kernel or a bounce copy
//! before the request completes), status bytes, GET_ID serials, used-ring
//! entries, the used index and the avail_event field.
//!
//! The mapping is replaced only while the device's queues are stopped (as
//! with a new memory table), so no reactor ever marks into an unmapped log.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use crate::sys::SharedMapping;

/// The page size the log counts in.
pub const LOG_PAGE: u64 = 4096;

/// A mapped dirty log.
#[derive(Debug)]
pub struct DirtyLog {
    map: SharedMapping,
    /// Where the bitmap starts in the mapping (the frontend's offset
    /// within its first page), and how many bytes it has.
    start: usize,
    len: usize,
}

impl DirtyLog {
    /// Map `size` bytes of `file` at `offset` (SET_LOG_BASE).
    pub fn map(file: &File, size: u64, offset: u64) -> std::io::Result<DirtyLog> {
        if size == 0 || size > 1 << 40 {
            return Err(std::io::Error::other(format!(
                "log size {size} is outside 1..=2^40"
            )));
        }
        // mmap wants a page-aligned offset
        let page = offset % LOG_PAGE;
        let map = SharedMapping::new(file, size + page, offset - page)?;
        Ok(DirtyLog {
            map,
            start: page as usize,
            len: size as usize,
        })
    }

    /// Pages covered: guest-physical memory up to this address.
    pub fn covers(&self) -> u64 {
        self.len as u64 * 8 * LOG_PAGE
    }

    fn byte(&self, i: usize) -> &AtomicU8 {
        debug_assert!(i < self.len);
        // SAFETY: i < len, inside our mapping; AtomicU8 has the layout of
        // u8 and the frontend updates the bitmap with atomics too.
        unsafe { &*self.map.as_ptr().add(self.start + i).cast::<AtomicU8>() }
    }

    /// Mark the pages of `len` bytes at guest-physical `gpa`. Pages beyond
    /// the log (memory the frontend did not size it for) are skipped.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for p in first..=last {
            let i = (p / 8) as usize;
            if i >= self.len {
                break;
            }
            let bit = 1u8 << (p % 8);
            let b = self.byte(i);
            // a page marked already costs a load, not a locked instruction
            if b.load(Ordering::Relaxed) & bit == 0 {
                b.fetch_or(bit, Ordering::Relaxed);
            }
        }
    }

    /// Whether page `p` is marked (tests).
    pub fn is_marked(&self, p: u64) -> bool {
        let i = (p / 8) as usize;
        i < self.len && self.byte(i).load(Ordering::Relaxed) & (1 << (p % 8)) != 0
    }
}

/// A device's logging, as its queues see it: the log (while one is
/// mapped) and whether LOG_ALL is on now (set by SET_FEATURES while the
/// queues run).
#[derive(Debug, Clone, Default)]
pub struct LogView {
    pub log: Option<Arc<DirtyLog>>,
    pub on: Arc<AtomicBool>,
}

impl LogView {
    /// The log to mark into now, if logging is on (one load per cycle).
    #[inline]
    pub fn active(&self) -> Option<&DirtyLog> {
        match &self.log {
            Some(l) if self.on.load(Ordering::Acquire) => Some(l),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(bytes: u64) -> DirtyLog {
        let f = crate::sys::sealed_memfd(c"log", bytes).unwrap();
        DirtyLog::map(&f, bytes, 0).unwrap()
    }

    #[test]
    fn marks_exactly_the_pages_touched() {
        let l = log(16);
        l.mark(4095, 2); // the last byte of page 0, the first of page 1
        l.mark(3 * 4096, 4096); // page 3 exactly
        l.mark(10 * 4096 + 100, 1); // inside page 10
        l.mark(20 * 4096, 0); // nothing
        let marked: Vec<u64> = (0..128).filter(|&p| l.is_marked(p)).collect();
        assert_eq!(marked, vec![0, 1, 3, 10]);
        // beyond the log: ignored, no fault
        l.mark(1 << 40, 1 << 20);
        l.mark(u64::MAX - 10, 100);
        assert_eq!(l.covers(), 16 * 8 * 4096);
    }

    #[test]
    fn an_offset_into_the_file_is_honoured() {
        let f = crate::sys::sealed_memfd(c"log2", 8192).unwrap();
        let l = DirtyLog::map(&f, 16, 4096 + 8).unwrap();
        l.mark(0, 1);
        let whole = SharedMapping::new(&f, 8192, 0).unwrap();
        // SAFETY: inside the 8 KiB mapping.
        let b = unsafe { *whole.as_ptr().add(4096 + 8) };
        assert_eq!(b, 1);
    }
}
