//! Every kernel interface the vhost-user devices use, in one place: shared
//! mappings of the frontend's memory files, memfds for the in-flight
//! region, eventfds and fd flags. Nothing above this module builds a raw
//! syscall.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

pub use quern_bdev::sys::{eventfd, eventfd_signal};

/// A shared read-write mapping of (part of) a file, unmapped on drop, so
/// that no error path can leave one behind.
#[derive(Debug)]
pub struct SharedMapping {
    base: *mut u8,
    len: usize,
}

// SAFETY: plain shared memory owned by this value until drop; what is
// stored in it is the users' business (guest memory, the in-flight region).
unsafe impl Send for SharedMapping {}
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Map `len` bytes of `file` from `offset` (MAP_NORESERVE: guest memory
    /// is reserved by its owner).
    pub fn new(file: &File, len: u64, offset: u64) -> io::Result<Self> {
        let (Ok(len), Ok(off)) = (usize::try_from(len), libc::off_t::try_from(offset)) else {
            return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
        };
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a new shared mapping of the caller's fd; checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                off,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMapping {
            base: base.cast(),
            len,
        })
    }

    /// A second mapping of the same pages (the file may be closed by now:
    /// mremap with old_size 0 duplicates a shared mapping).
    pub fn duplicate(&self) -> io::Result<Self> {
        // SAFETY: mremap(old, 0, len, MREMAP_MAYMOVE) on our shared mapping
        // makes a new mapping of the same pages; checked.
        let base = unsafe { libc::mremap(self.base.cast(), 0, self.len, libc::MREMAP_MAYMOVE) };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMapping {
            base: base.cast(),
            len: self.len,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, made with this length.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// A new memfd of `size` zero bytes whose size is sealed (a frontend
/// cannot shrink it under a mapping, which would end in SIGBUS).
pub fn sealed_memfd(name: &std::ffi::CStr, size: u64) -> io::Result<File> {
    // SAFETY: memfd_create with a NUL-terminated name; checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size)?;
    // SAFETY: fcntl on our own memfd.
    let r = unsafe {
        libc::fcntl(
            f.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// Make `fd` non-blocking (a failure leaves it as it was).
pub fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a caller's open fd.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
}
