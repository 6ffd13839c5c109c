//! Every kernel interface the bdev crate uses, in one place (the reactor's
//! eventfd and epoll helpers, and what the drivers need: readiness polls,
//! fallocate, block-device geometry, anonymous memory). Nothing above this
//! module builds a raw syscall; librbd's dynamic loading lives with its
//! bindings in `drivers/rbd/ffi.rs`.

use std::io;
use std::os::fd::RawFd;

pub use quern_reactor::sys::{eventfd, eventfd_drain, eventfd_signal, Epoll};

/// Wait up to `timeout_ms` (0: not at all) until one of `fds` is readable;
/// returns the readable ones' indices in a bit set (fds beyond 64 are
/// watched but not reported).
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> u64 {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: p is a valid array of p.len() pollfds.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if n <= 0 {
        return 0;
    }
    p.iter()
        .take(64)
        .enumerate()
        .filter(|(_, x)| x.revents & libc::POLLIN != 0)
        .fold(0, |set, (i, _)| set | 1 << i)
}

/// `fallocate(2)` on `fd`.
pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: plain syscall on a caller's fd; checked.
    if unsafe { libc::fallocate(fd, mode, off, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

/// A block device's size in bytes and logical sector size.
pub fn block_device_geometry(fd: RawFd) -> io::Result<(u64, u32)> {
    let mut size: u64 = 0;
    let mut ssz: libc::c_int = 0;
    // SAFETY: the ioctls write one u64 and one int into valid locals.
    unsafe {
        if libc::ioctl(fd, BLKGETSIZE64, &mut size) != 0
            || libc::ioctl(fd, BLKSSZGET, &mut ssz) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((size, u32::try_from(ssz).unwrap_or(512)))
}

/// Private anonymous memory, zero-filled, reserved lazily by the kernel
/// (MAP_NORESERVE), unmapped on drop.
pub struct AnonMemory {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory owned by this value until drop.
unsafe impl Send for AnonMemory {}
unsafe impl Sync for AnonMemory {}

impl AnonMemory {
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a new private anonymous mapping; checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(AnonMemory { ptr: p.cast(), len })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with this length.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
