//! virtio-blk request decoding. A chain is: a 16-byte header (type,
//! reserved, sector) that the device reads, data buffers, and a final
//! writable status byte. Header and status may share descriptors with data;
//! the decoder splits them off so the data iovecs point into guest memory.

use quern_bdev::IoKind;

use crate::virtq::Seg;

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
pub struct Request {
    pub what: Decoded,
    /// Host pointer to the status byte (None if the chain has no writable
    /// last byte: the chain is then completed with length 0).
    pub status: Option<*mut u8>,
    /// Bytes the device writes into the chain on success (reads, GET_ID,
    /// plus the status byte).
    pub written: u32,
}

fn copy_out(segs: &[Seg], mut skip: usize, dst: &mut [u8]) -> bool {
    let mut done = 0;
    for s in segs {
        let l = s.len as usize;
        if skip >= l {
            skip -= l;
            continue;
        }
        let n = (l - skip).min(dst.len() - done);
        // SAFETY: the segment was translated with its full length.
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
/// `capacity` (bytes) bounds sector ranges; `read_only` refuses writes.
pub fn decode(segs: &[Seg], iov: &mut Vec<libc::iovec>, capacity: u64, read_only: bool) -> Request {
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
    if !copy_out(segs, 0, &mut hdr) {
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
            // exactly one 16-byte segment: sector, num_sectors, flags
            let mut seg = [0u8; 16];
            if data_len != 16 || !copy_out(segs, 16, &mut seg) {
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

/// Write the serial (up to 20 bytes, NUL-padded) into the data buffers.
pub fn fill_id(iov: &[libc::iovec], serial: &[u8; ID_BYTES]) {
    let mut off = 0;
    for v in iov {
        let n = v.iov_len.min(ID_BYTES - off);
        // SAFETY: writable guest buffers of at least n bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(serial.as_ptr().add(off), v.iov_base.cast::<u8>(), n)
        };
        off += n;
        if off == ID_BYTES {
            break;
        }
    }
}
