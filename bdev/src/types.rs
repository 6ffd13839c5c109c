//! The types every driver and producer shares.

use std::fmt;
use std::sync::Arc;

/// The largest number of iovecs the kernel takes in one readv/writev.
pub const IOV_MAX: usize = 1024;

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum IoKind {
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
    WriteZeroes = 4,
}

impl IoKind {
    /// Whether this kind changes the device's contents.
    pub fn modifies(self) -> bool {
        matches!(self, IoKind::Write | IoKind::Discard | IoKind::WriteZeroes)
    }

    /// Whether this kind moves data through iovecs.
    pub fn has_data(self) -> bool {
        matches!(self, IoKind::Read | IoKind::Write)
    }

    /// Whether the merge stage treats this kind as a barrier.
    pub fn is_barrier(self) -> bool {
        matches!(self, IoKind::Flush | IoKind::Discard | IoKind::WriteZeroes)
    }
}

impl fmt::Display for IoKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Discard => "discard",
            IoKind::WriteZeroes => "write-zeroes",
        };
        f.write_str(s)
    }
}

/// Why a request was refused or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BdevError {
    #[error("range {offset}+{len} bytes is past the device capacity of {capacity} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("offset {offset} or length {len} is not a multiple of the block size {block_size}")]
    Misaligned {
        offset: u64,
        len: u64,
        block_size: u32,
    },
    #[error("{kind} refused: the device is read-only")]
    ReadOnly { kind: IoKind },
    #[error("{kind} is not supported by this device")]
    Unsupported { kind: IoKind },
    #[error("request has {segments} segments, more than the limit of {max}")]
    TooManySegments { segments: usize, max: usize },
    #[error("request of {len} bytes is larger than the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("I/O error (errno {0})")]
    Io(i32),
    #[error("short transfer: {done} of {len} bytes")]
    Short { done: u64, len: u64 },
    #[error("no free request slot")]
    Busy,
    #[error("unknown device handle {0}")]
    NoDevice(u16),
}

/// Result of one request: bytes transferred, or why it failed.
pub type IoResult = Result<u32, BdevError>;

/// Static facts about a block device.
#[derive(Clone, Debug)]
pub struct BdevInfo {
    pub name: String,
    /// Logical block size in bytes (offsets and lengths are multiples of it).
    pub block_size: u32,
    pub capacity_bytes: u64,
    pub read_only: bool,
    /// Memory alignment the driver needs for data buffers (1 = none). The
    /// engine bounces requests whose buffers are not aligned to it.
    pub buf_align: u32,
    pub supports_discard: bool,
    pub supports_write_zeroes: bool,
    /// The driver's own name (`uring`, `malloc`, ...), for statistics.
    pub driver: &'static str,
}

/// The tag of submission entries whose completions no request waits for:
/// entries linked before a request's own (an injected delay's timeout, a
/// write-zeroes' fallocate before its sync), which post a completion only
/// on failure, and the request's own entry carries the outcome. The engine
/// skips completions with this tag.
pub const UNROUTED_TAG: u64 = u64::MAX;

/// One operation as a channel executes it. The iovecs, and the memory they
/// name, stay valid until the channel reports the completion of its tag
/// (the engine's contract with its producers, see `IoEngine::submit`).
#[derive(Debug)]
pub struct Op<'a> {
    pub kind: IoKind,
    pub offset: u64,
    pub len: u64,
    pub iov: &'a [libc::iovec],
    /// Force unit access: the data is durable when the op completes.
    pub fua: bool,
    /// Start only after everything submitted before has completed.
    pub drain: bool,
}

/// Where a channel puts work: the reactor's io_uring, or (for drivers that
/// complete at once or have their own completion source) a completion list.
pub struct Submitter<'a> {
    pub(crate) sq: io_uring::squeue::SubmissionQueue<'a>,
    pub(crate) done: &'a mut Vec<(u64, i32)>,
}

/// Let `chan` start `op` under `tag` on `ring` (synchronous completions go
/// to `done`). Returns whether the channel took the op, and whether it
/// queued SQEs that still need an `io_uring_enter`.
pub(crate) fn submit_to_channel(
    chan: &mut dyn BdevChannel,
    op: &Op<'_>,
    tag: u64,
    ring: &mut io_uring::IoUring,
    done: &mut Vec<(u64, i32)>,
) -> (bool, bool) {
    let mut sub = Submitter {
        sq: ring.submission(),
        done,
    };
    let before = sub.sq.len();
    let ok = chan.submit(op, tag, &mut sub);
    (ok, sub.sq.len() != before)
}

impl Submitter<'_> {
    /// Queue one SQE. Returns false if the submission queue is full.
    ///
    /// # Safety
    /// Every buffer, iovec array or other memory the entry names must stay
    /// valid (and not be moved) until the entry's completion is reaped: the
    /// kernel reads and writes it asynchronously.
    pub unsafe fn push_sqe(&mut self, entry: &io_uring::squeue::Entry) -> bool {
        // SAFETY: the caller's contract, above.
        unsafe { self.sq.push(entry).is_ok() }
    }

    /// Room left in the submission queue.
    pub fn sq_room(&self) -> usize {
        self.sq.capacity() - self.sq.len()
    }

    /// Report a completion now (drivers that finish synchronously).
    /// `result` is bytes done, or a negative errno.
    pub fn complete(&mut self, tag: u64, result: i32) {
        self.done.push((tag, result));
    }
}

/// A block device.
pub trait Bdev: Send + Sync {
    fn info(&self) -> &BdevInfo;
    /// A channel for one reactor. `ring` is that reactor's io_uring; drivers
    /// that use it may register their file at index `file_slot`.
    fn open_channel(
        &self,
        ring: &io_uring::IoUring,
        file_slot: u32,
    ) -> std::io::Result<Box<dyn BdevChannel>>;

    /// How QEMU names this device's contents as a raw image (an absolute
    /// file path, or an `rbd:pool/image:conf=...` string), so a qcow2
    /// overlay over it can record it as its backing file. None if QEMU
    /// cannot open it (malloc, null).
    fn backing_spec(&self) -> Option<String> {
        None
    }
}

/// A reactor's private handle on a device.
pub trait BdevChannel {
    /// Start `op`, reporting its completion under `tag`, either through an
    /// SQE whose user_data is `tag` or through `sub.complete`. Returns false
    /// if there is no room now (the engine retries next cycle).
    fn submit(&mut self, op: &Op<'_>, tag: u64, sub: &mut Submitter<'_>) -> bool;

    /// Collect completions from a driver-owned source (e.g. librbd).
    fn poll(&mut self, _done: &mut Vec<(u64, i32)>) -> usize {
        0
    }

    /// An fd that becomes readable when `poll` has work, for sleeping reactors.
    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

pub type BdevRef = Arc<dyn Bdev>;

/// Check a request against a device's geometry and mode.
pub fn validate(info: &BdevInfo, kind: IoKind, offset: u64, len: u64) -> Result<(), BdevError> {
    if kind.modifies() && info.read_only {
        return Err(BdevError::ReadOnly { kind });
    }
    match kind {
        IoKind::Flush => return Ok(()),
        IoKind::Discard if !info.supports_discard => return Err(BdevError::Unsupported { kind }),
        IoKind::WriteZeroes if !info.supports_write_zeroes => {
            return Err(BdevError::Unsupported { kind })
        }
        _ => {}
    }
    let bs = u64::from(info.block_size);
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(BdevError::Misaligned {
            offset,
            len,
            block_size: info.block_size,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= info.capacity_bytes => Ok(()),
        _ => Err(BdevError::OutOfRange {
            offset,
            len,
            capacity: info.capacity_bytes,
        }),
    }
}

/// Parse a size such as `512`, `64K`, `1G`, `2MiB` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (expected e.g. 512, 64K, 1G)"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        other => {
            return Err(format!(
                "`{s}` has an unknown unit `{other}` (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> BdevInfo {
        BdevInfo {
            name: "d".into(),
            block_size: 512,
            capacity_bytes: 4096,
            read_only: false,
            buf_align: 1,
            supports_discard: true,
            supports_write_zeroes: true,
            driver: "test",
        }
    }

    #[test]
    fn validate_refuses_with_typed_errors() {
        let i = info();
        assert_eq!(validate(&i, IoKind::Read, 0, 4096), Ok(()));
        assert!(matches!(
            validate(&i, IoKind::Read, 512, 4096),
            Err(BdevError::OutOfRange { .. })
        ));
        assert!(matches!(
            validate(&i, IoKind::Read, u64::MAX - 511, 512),
            Err(BdevError::OutOfRange { .. })
        ));
        assert!(matches!(
            validate(&i, IoKind::Write, 100, 512),
            Err(BdevError::Misaligned { .. })
        ));
        let ro = BdevInfo {
            read_only: true,
            ..info()
        };
        assert_eq!(
            validate(&ro, IoKind::Write, 0, 512),
            Err(BdevError::ReadOnly {
                kind: IoKind::Write
            })
        );
        assert_eq!(validate(&ro, IoKind::Read, 0, 512), Ok(()));
        let nod = BdevInfo {
            supports_discard: false,
            ..info()
        };
        assert_eq!(
            validate(&nod, IoKind::Discard, 0, 512),
            Err(BdevError::Unsupported {
                kind: IoKind::Discard
            })
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert!(parse_size("1X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("abc").is_err());
    }
}
