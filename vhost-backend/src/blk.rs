//! virtio-blk request decoding. A chain is: a 16-byte header (type,
//! reserved, sector) that the device reads, data buffers, and a final
//! writable status byte. Header and status may share descriptors with data;
//! the decoder splits them off so the data iovecs point into guest memory.

use quern_bdev::IoKind;

use crate::memory::{GuestAddress, MemTable};
use crate::virtq::{
    read_desc, Seg, SplitQueue, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const SECTOR: u64 = 512;
pub const ID_BYTES: usize = 20;

/// What a device advertises in its configuration space, and enforces on
/// every request it decodes (one definition for both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Data segments per request (seg_max).
    pub seg_max: u32,
    /// Bytes per data segment (size_max).
    pub size_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

/// Quern's limits: Linux's default seg_max for virtio-blk (126, so a
/// request with its header and status fits a 128-entry indirect table),
/// 1 MiB segments, discard and write-zeroes of at most 4 GiB - 512 bytes
/// (the largest multiple of the sector size a u32 of bytes holds) in one
/// segment, as QEMU and most backends do.
pub const LIMITS: Limits = Limits {
    seg_max: 126,
    size_max: 1 << 20,
    max_discard_sectors: u32::MAX / 512,
    max_discard_seg: 1,
    max_write_zeroes_sectors: u32::MAX / 512,
    max_write_zeroes_seg: 1,
};

/// What a chain asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Io {
        kind: IoKind,
        offset: u64,
        len: u64,
    },
    GetId,
    /// Answer with this status without touching the device.
    Reject(u8),
}

/// A decoded chain: the request, its data iovecs and where its status goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub what: Decoded,
    /// Host pointer to the status byte (None if the chain has no writable
    /// last byte: the chain is then completed with length 0).
    pub status: Option<*mut u8>,
    /// Bytes the device writes into the chain on success (reads, GET_ID,
    /// plus the status byte).
    pub written: u32,
}

/// # Safety
/// As [`decode`].
unsafe fn copy_out(segs: &[Seg], mut skip: usize, dst: &mut [u8]) -> bool {
    let mut done = 0;
    for s in segs {
        let l = s.len as usize;
        if skip >= l {
            skip -= l;
            continue;
        }
        let n = (l - skip).min(dst.len() - done);
        // SAFETY: the segment is valid for its length (the caller's
        // contract); a copy, never a reference to guest memory.
        unsafe { std::ptr::copy_nonoverlapping(s.ptr.add(skip), dst.as_mut_ptr().add(done), n) };
        done += n;
        skip = 0;
        if done == dst.len() {
            return true;
        }
    }
    false
}

/// Decode `segs` into a request, filling `iov` with the data buffers.
/// `capacity` (bytes) bounds sector ranges; `read_only` refuses writes;
/// `limits` are those the device advertised: breaking one is an I/O
/// error, or UNSUPP for more discard/write-zeroes segments than offered
/// (as QEMU answers).
///
/// # Safety
/// Every segment must be valid for reads and, where writable, writes of
/// its length: translated through a memory table that is still mapped.
pub unsafe fn decode(
    segs: &[Seg],
    iov: &mut Vec<libc::iovec>,
    capacity: u64,
    read_only: bool,
    limits: &Limits,
) -> Request {
    iov.clear();
    let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    // the status byte: last byte of the last buffer, which must be writable
    let status = match segs.last() {
        Some(l) if l.writable && l.len >= 1 => {
            // SAFETY: len >= 1.
            Some(unsafe { l.ptr.add(l.len as usize - 1) })
        }
        _ => None,
    };
    let reject = |st: u8| Request {
        what: Decoded::Reject(st),
        status,
        written: 1,
    };
    if status.is_none() || total < 17 {
        return reject(VIRTIO_BLK_S_IOERR);
    }
    let mut hdr = [0u8; 16];
    // SAFETY: the caller's contract.
    if !unsafe { copy_out(segs, 0, &mut hdr) } {
        return reject(VIRTIO_BLK_S_IOERR);
    }
    let ty = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    // data: bytes 16 .. total-1, as iovecs into guest memory
    let data_len = total - 17;
    let mut pos = 0u64;
    let mut data_writable = true;
    let mut data_readable = true;
    for s in segs {
        let (start, end) = (pos, pos + u64::from(s.len));
        pos = end;
        let (a, b) = (start.max(16), end.min(total - 1));
        if a >= b {
            continue;
        }
        if s.writable {
            data_readable = false;
        } else {
            data_writable = false;
        }
        if b - a > u64::from(limits.size_max) || iov.len() == limits.seg_max as usize {
            // a segment larger than size_max, or more than seg_max of them
            iov.clear();
            return reject(VIRTIO_BLK_S_IOERR);
        }
        // SAFETY: a-start < s.len.
        iov.push(libc::iovec {
            iov_base: unsafe { s.ptr.add((a - start) as usize) }.cast(),
            iov_len: (b - a) as usize,
        });
    }
    let io = |kind: IoKind, offset: u64, len: u64| Decoded::Io { kind, offset, len };
    let (what, written) = match ty {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = ty == VIRTIO_BLK_T_OUT;
            if (write && !data_readable)
                || (!write && !data_writable)
                || !data_len.is_multiple_of(SECTOR)
            {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            if write && read_only {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            let Some(offset) = sector.checked_mul(SECTOR) else {
                return reject(VIRTIO_BLK_S_IOERR);
            };
            if offset.checked_add(data_len).is_none_or(|e| e > capacity) {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            let kind = if write { IoKind::Write } else { IoKind::Read };
            (
                io(kind, offset, data_len),
                if write { 1 } else { data_len as u32 + 1 },
            )
        }
        VIRTIO_BLK_T_FLUSH => (io(IoKind::Flush, 0, 0), 1),
        VIRTIO_BLK_T_GET_ID => {
            if !data_writable || data_len == 0 {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            (Decoded::GetId, data_len.min(ID_BYTES as u64) as u32 + 1)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            // 16-byte segments: sector, num_sectors, flags; we offer one
            let discard = ty == VIRTIO_BLK_T_DISCARD;
            let max_seg = if discard {
                limits.max_discard_seg
            } else {
                limits.max_write_zeroes_seg
            };
            if data_len == 0 || !data_len.is_multiple_of(16) || !data_readable {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            if data_len / 16 > u64::from(max_seg) {
                return reject(VIRTIO_BLK_S_UNSUPP);
            }
            let mut seg = [0u8; 16];
            // SAFETY: the caller's contract.
            if !unsafe { copy_out(segs, 16, &mut seg) } {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            if read_only {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            let s = u64::from_le_bytes(seg[0..8].try_into().expect("8"));
            let n = u64::from(u32::from_le_bytes(seg[8..12].try_into().expect("4")));
            let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4"));
            let unmap_ok = ty == VIRTIO_BLK_T_WRITE_ZEROES;
            if flags & !u32::from(unmap_ok) != 0 {
                return reject(VIRTIO_BLK_S_UNSUPP);
            }
            let max_sectors = if discard {
                limits.max_discard_sectors
            } else {
                limits.max_write_zeroes_sectors
            };
            if n > u64::from(max_sectors) {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            let (Some(off), Some(len)) = (s.checked_mul(SECTOR), n.checked_mul(SECTOR)) else {
                return reject(VIRTIO_BLK_S_IOERR);
            };
            if off.checked_add(len).is_none_or(|e| e > capacity) {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            let kind = if ty == VIRTIO_BLK_T_DISCARD {
                IoKind::Discard
            } else {
                IoKind::WriteZeroes
            };
            iov.clear();
            (io(kind, off, len), 1)
        }
        _ => return reject(VIRTIO_BLK_S_UNSUPP),
    };
    Request {
        what,
        status,
        written,
    }
}

/// The common request in one pass over its descriptors: a read or a write
/// whose chain is a 16-byte device-readable header, data buffers all of
/// the one direction the operation needs, and a 1-byte status buffer,
/// directly in the ring's table or in one indirect table, every limit
/// kept and every address inside guest memory. The iovecs go straight
/// into `iov`.
///
/// `None` for anything else, with nothing answered: the general path
/// ([`SplitQueue::chain`] and [`decode`]) then walks the chain again and
/// gives it its precise answer. Whatever this accepts, the general path
/// decodes to the same request (checked in debug builds on every request
/// and by the ring fuzzer), so it is a shortcut, never a second set of
/// rules.
#[inline]
pub fn decode_fast(
    q: &SplitQueue,
    mem: &MemTable,
    head: u16,
    iov: &mut Vec<libc::iovec>,
    capacity: u64,
    read_only: bool,
    limits: &Limits,
) -> Option<Request> {
    let (mut addr, mut len, mut flags, mut next) = q.desc(head)?;
    // the table the chain continues in, and its size
    let (mut table, mut tsize): (*const u8, u16) = (std::ptr::null(), 0);
    if flags & VRING_DESC_F_INDIRECT != 0 {
        if flags & VRING_DESC_F_NEXT != 0 || len == 0 || len % 16 != 0 || len / 16 > 65535 {
            return None;
        }
        table = mem.gpa(GuestAddress(addr), u64::from(len))?;
        tsize = (len / 16) as u16;
        // SAFETY: the table was translated with its whole length.
        (addr, len, flags, next) = unsafe { read_desc(table, 0) };
        if flags & VRING_DESC_F_INDIRECT != 0 {
            return None;
        }
    }
    // the header: 16 bytes the device reads
    if len != 16 || flags & (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) != VRING_DESC_F_NEXT {
        return None;
    }
    let hdr = mem.gpa(GuestAddress(addr), 16)?;
    let mut h = [0u8; 16];
    // SAFETY: 16 translated bytes; a copy, never a reference to guest memory.
    unsafe { std::ptr::copy_nonoverlapping(hdr, h.as_mut_ptr(), 16) };
    let ty = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    let write = match ty {
        VIRTIO_BLK_T_IN => false,
        VIRTIO_BLK_T_OUT => true,
        _ => return None,
    };
    if write && read_only {
        return None;
    }
    // data buffers the device writes for a read, reads for a write
    let data_flags = if write { 0 } else { VRING_DESC_F_WRITE };
    let bound = if table.is_null() { q.size() } else { tsize };
    iov.clear();
    let mut data_len = 0u64;
    // each descriptor of a table at most once: a longer chain loops
    for _ in 0..bound {
        if next >= bound {
            return None;
        }
        (addr, len, flags, next) = if table.is_null() {
            q.desc(next)?
        } else {
            // SAFETY: next < tsize, inside the translated table.
            unsafe { read_desc(table, next) }
        };
        if flags & VRING_DESC_F_NEXT == 0 {
            // the status byte
            if len != 1
                || flags & (VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT) != VRING_DESC_F_WRITE
            {
                return None;
            }
            let status = mem.gpa(GuestAddress(addr), 1)?;
            if data_len == 0 || !data_len.is_multiple_of(SECTOR) {
                return None;
            }
            let offset = sector.checked_mul(SECTOR)?;
            if offset.checked_add(data_len).is_none_or(|e| e > capacity) {
                return None;
            }
            let kind = if write { IoKind::Write } else { IoKind::Read };
            return Some(Request {
                what: Decoded::Io {
                    kind,
                    offset,
                    len: data_len,
                },
                status: Some(status),
                written: if write { 1 } else { data_len as u32 + 1 },
            });
        }
        if flags & (VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT) != data_flags
            || len == 0
            || len > limits.size_max
            || iov.len() == limits.seg_max as usize
        {
            return None;
        }
        let p = mem.gpa(GuestAddress(addr), u64::from(len))?;
        iov.push(libc::iovec {
            iov_base: p.cast(),
            iov_len: len as usize,
        });
        data_len += u64::from(len);
    }
    None
}

/// Write the serial (up to 20 bytes, NUL-padded) into the data buffers.
///
/// # Safety
/// Every iovec is valid for writes of its length (a writable guest
/// buffer, translated through a memory table that is still mapped).
pub unsafe fn fill_id(iov: &[libc::iovec], serial: &[u8; ID_BYTES]) {
    let mut off = 0;
    for v in iov {
        let n = v.iov_len.min(ID_BYTES - off);
        // SAFETY: the caller's contract; n <= iov_len.
        unsafe {
            std::ptr::copy_nonoverlapping(serial.as_ptr().add(off), v.iov_base.cast::<u8>(), n)
        };
        off += n;
        if off == ID_BYTES {
            break;
        }
    }
}
