//! `uring`: a regular file or a block device driven through the reactor's
//! io_uring. O_DIRECT by default (the engine bounces requests whose buffers
//! are not aligned for it); the file is registered with each reactor's ring
//! so SQEs name it by index. Flush is `fdatasync`, a forced-unit-access write
//! is `RWF_DSYNC`, discard punches a hole, write-zeroes zeroes a range.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use io_uring::{opcode, types};

use crate::types::{Bdev, BdevChannel, BdevInfo, IoKind, Op, Submitter, UNROUTED_TAG};

/// How to open a uring bdev.
#[derive(Clone, Debug)]
pub struct UringOptions {
    pub name: String,
    pub path: PathBuf,
    /// Create the file with this size when it does not exist.
    pub create_size: Option<u64>,
    pub direct: bool,
    pub read_only: bool,
    /// Logical block size; by default the device's (block devices) or 512.
    pub block_size: Option<u32>,
    /// Added latency per request in microseconds (0: none), to emulate
    /// slower storage: every operation waits on a linked io_uring timeout
    /// first. For tests and experiments.
    pub delay_us: u32,
}

impl UringOptions {
    /// `name` on the file at `path`, which must exist: O_DIRECT,
    /// read-write, the device's block size, no added latency (change the
    /// rest with struct update syntax).
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        UringOptions {
            name: name.into(),
            path: path.into(),
            create_size: None,
            direct: true,
            read_only: false,
            block_size: None,
            delay_us: 0,
        }
    }
}

pub struct UringBdev {
    info: BdevInfo,
    file: File,
    direct: bool,
    path: PathBuf,
    delay_us: u32,
}

impl UringBdev {
    pub fn open(o: &UringOptions) -> std::io::Result<Self> {
        use std::io::{Error, ErrorKind};
        let exists = o.path.exists();
        if !exists {
            match o.create_size {
                Some(size) if !o.read_only => {
                    let f = super::create_new_file(&o.path)?;
                    f.set_len(size)?;
                    tracing::info!(bdev = %o.name, path = %o.path.display(), size, "created backing file");
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "{} does not exist (give `size` to create it)",
                            o.path.display()
                        ),
                    ))
                }
            }
        }
        let (file, direct) = super::open_data_file(&o.name, &o.path, o.read_only, o.direct)?;
        let meta = file.metadata()?;
        let (capacity, dev_bs) = if meta.file_type().is_block_device() {
            crate::sys::block_device_geometry(file.as_raw_fd())?
        } else if meta.is_file() {
            (meta.len(), 512)
        } else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{} is neither a file nor a block device", o.path.display()),
            ));
        };
        let block_size = o.block_size.unwrap_or(dev_bs);
        if !block_size.is_power_of_two() || block_size < 512 || block_size < dev_bs {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "block size {block_size} is invalid for {} (device block size {dev_bs})",
                    o.path.display()
                ),
            ));
        }
        let capacity_bytes = capacity - capacity % u64::from(block_size);
        if capacity_bytes == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{} is smaller than one block", o.path.display()),
            ));
        }
        Ok(UringBdev {
            info: BdevInfo {
                name: o.name.clone(),
                block_size,
                capacity_bytes,
                read_only: o.read_only,
                buf_align: if direct { dev_bs.max(512) } else { 1 },
                supports_discard: true,
                supports_write_zeroes: true,
                driver: "uring",
            },
            file,
            direct,
            path: std::fs::canonicalize(&o.path).unwrap_or_else(|_| o.path.clone()),
            delay_us: o.delay_us,
        })
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

struct UringChannel {
    slot: types::Fixed,
    /// The injected latency; boxed so the address the SQEs carry stays put
    /// until the kernel reads it at submission.
    delay: Option<Box<types::Timespec>>,
}

impl BdevChannel for UringChannel {
    fn submit(&mut self, op: &Op<'_>, tag: u64, sub: &mut Submitter<'_>) -> bool {
        // fallocate has no RWF_DSYNC: a forced-unit-access write of zeroes
        // is the fallocate linked to an fdatasync that carries the tag
        let sync_after = op.fua && op.kind == IoKind::WriteZeroes;
        let need = 1 + usize::from(self.delay.is_some()) + usize::from(sync_after);
        if sub.sq_room() < need {
            return false;
        }
        if let Some(ts) = &self.delay {
            // a timer linked before the op: ETIME counts as success so the
            // link holds, and a successful timer posts no completion
            let t = opcode::Timeout::new(&**ts)
                .flags(types::TimeoutFlags::ETIME_SUCCESS)
                .build()
                .flags(io_uring::squeue::Flags::IO_LINK | io_uring::squeue::Flags::SKIP_SUCCESS)
                .user_data(UNROUTED_TAG);
            // SAFETY: the timespec is boxed in the channel, which outlives
            // every entry it queued (the engine drains before closing it).
            unsafe { sub.push_sqe(&t) };
        }
        let fd = self.slot;
        let sqe = match op.kind {
            IoKind::Read => opcode::Readv::new(fd, op.iov.as_ptr(), op.iov.len() as u32)
                .offset(op.offset)
                .build(),
            IoKind::Write => opcode::Writev::new(fd, op.iov.as_ptr(), op.iov.len() as u32)
                .offset(op.offset)
                .rw_flags(if op.fua { libc::RWF_DSYNC } else { 0 })
                .build(),
            IoKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoKind::Discard => opcode::Fallocate::new(fd, op.len)
                .offset(op.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoKind::WriteZeroes => opcode::Fallocate::new(fd, op.len)
                .offset(op.offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        if sync_after {
            // a failed fallocate posts its own (ignored) completion and
            // cancels the sync, which fails the request with ECANCELED
            // SAFETY: a fallocate names no memory.
            unsafe {
                sub.push_sqe(
                    &sqe.flags(
                        io_uring::squeue::Flags::IO_LINK | io_uring::squeue::Flags::SKIP_SUCCESS,
                    )
                    .user_data(UNROUTED_TAG),
                )
            };
            let sync = opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            // SAFETY: an fsync names no memory.
            return unsafe { sub.push_sqe(&sync.user_data(tag)) };
        }
        // SAFETY: Op's contract: the iovec array and the buffers it names
        // stay valid until this tag's completion is reaped.
        unsafe { sub.push_sqe(&sqe.user_data(tag)) }
    }
}

impl Bdev for UringBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn backing_spec(&self) -> Option<String> {
        Some(self.path.display().to_string())
    }

    fn open_channel(
        &self,
        ring: &io_uring::IoUring,
        slot: u32,
    ) -> std::io::Result<Box<dyn BdevChannel>> {
        ring.submitter()
            .register_files_update(slot, &[self.file.as_raw_fd()])?;
        let delay = (self.delay_us > 0).then(|| {
            Box::new(
                types::Timespec::new()
                    .nsec(self.delay_us % 1_000_000 * 1000)
                    .sec(u64::from(self.delay_us / 1_000_000)),
            )
        });
        Ok(Box::new(UringChannel {
            slot: types::Fixed(slot),
            delay,
        }))
    }
}
