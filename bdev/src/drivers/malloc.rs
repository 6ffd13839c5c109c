//! `malloc`: a RAM disk. Its memory is an anonymous mapping, so untouched
//! blocks cost nothing and read as zeroes. Requests complete synchronously
//! inside the submitting cycle. A bad range can be injected for tests of
//! the engine's failure handling.

use std::sync::Arc;

use crate::sys::AnonMemory;
use crate::types::{Bdev, BdevChannel, BdevInfo, IoKind, Op, Submitter};

/// The disk's memory. Concurrent access from several reactors has the
/// same semantics as concurrent DMA to a real disk: it is only ever copied
/// to and from, never referenced.
struct Mem {
    map: AnonMemory,
    /// Byte range whose every access fails with EIO.
    bad: Option<(u64, u64)>,
}

pub struct MallocBdev {
    info: BdevInfo,
    mem: Arc<Mem>,
}

impl MallocBdev {
    pub fn new(
        name: &str,
        capacity_bytes: u64,
        block_size: u32,
        read_only: bool,
    ) -> std::io::Result<Self> {
        Self::with_bad_range(name, capacity_bytes, block_size, read_only, None)
    }

    pub fn with_bad_range(
        name: &str,
        capacity_bytes: u64,
        block_size: u32,
        read_only: bool,
        bad: Option<(u64, u64)>,
    ) -> std::io::Result<Self> {
        let len = (capacity_bytes - capacity_bytes % u64::from(block_size)) as usize;
        if len == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "malloc bdev size must be at least one block",
            ));
        }
        let map = AnonMemory::new(len)?;
        Ok(MallocBdev {
            info: BdevInfo {
                name: name.to_string(),
                block_size,
                capacity_bytes: len as u64,
                read_only,
                buf_align: 1,
                supports_discard: true,
                supports_write_zeroes: true,
                driver: "malloc",
            },
            mem: Arc::new(Mem { map, bad }),
        })
    }

    /// Copy out a range (tests and tools; not the I/O path).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) {
        let off = offset as usize;
        assert!(
            off + buf.len() <= self.mem.map.len(),
            "read_at past the end"
        );
        // SAFETY: bounds checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.mem.map.as_ptr().add(off),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
    }
}

struct MallocChannel {
    mem: Arc<Mem>,
}

impl BdevChannel for MallocChannel {
    fn submit(&mut self, op: &Op<'_>, tag: u64, sub: &mut Submitter<'_>) -> bool {
        let m = &self.mem;
        if let Some((b_off, b_len)) = m.bad {
            let touches =
                op.kind != IoKind::Flush && op.offset < b_off + b_len && b_off < op.offset + op.len;
            if touches {
                sub.complete(tag, -libc::EIO);
                return true;
            }
        }
        // SAFETY (all arms): the engine validated offset+len against the
        // capacity, and the iovecs are valid for the op's lifetime.
        let base = unsafe { m.map.as_ptr().add(op.offset as usize) };
        match op.kind {
            IoKind::Read | IoKind::Write => {
                let mut off = 0usize;
                for v in op.iov {
                    unsafe {
                        if op.kind == IoKind::Read {
                            std::ptr::copy_nonoverlapping(
                                base.add(off),
                                v.iov_base.cast(),
                                v.iov_len,
                            );
                        } else {
                            std::ptr::copy_nonoverlapping(
                                v.iov_base as *const u8,
                                base.add(off),
                                v.iov_len,
                            );
                        }
                    }
                    off += v.iov_len;
                }
                sub.complete(tag, op.len as i32);
            }
            IoKind::Discard | IoKind::WriteZeroes => {
                unsafe { std::ptr::write_bytes(base, 0, op.len as usize) };
                sub.complete(tag, 0);
            }
            IoKind::Flush => sub.complete(tag, 0),
        }
        true
    }
}

impl Bdev for MallocBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(
        &self,
        _ring: &io_uring::IoUring,
        _slot: u32,
    ) -> std::io::Result<Box<dyn BdevChannel>> {
        Ok(Box::new(MallocChannel {
            mem: self.mem.clone(),
        }))
    }
}
