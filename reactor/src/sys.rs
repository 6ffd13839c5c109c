//! Every kernel interface the reactor uses, in one place: eventfds, epoll
//! and CPU pinning. Nothing above this module builds a raw syscall.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A new non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Add one to an eventfd's count (a wake-up). A full counter (EAGAIN)
/// already means "wake up".
pub fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: an 8-byte write from a valid u64; the fd is an eventfd the
    // caller keeps open.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Drain an eventfd's count without ever blocking, even if the fd is not
/// non-blocking (a zero-timeout poll first). Returns the count read.
pub fn eventfd_drain(fd: RawFd) -> u64 {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut v: u64 = 0;
    // SAFETY: one valid pollfd; then an 8-byte read into a u64.
    unsafe {
        if libc::poll(&mut pfd, 1, 0) == 1 && pfd.revents & libc::POLLIN != 0 {
            libc::read(fd, (&mut v as *mut u64).cast(), 8);
        }
    }
    v
}

/// An epoll instance watching a set of fds for readability, each
/// reported by its number.
pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: creates a new epoll instance; checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nothing else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn add(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: valid epoll fd and event struct.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wait up to `timeout_ms` for readiness; the numbers of the fds that
    /// are ready go into `ready` (cleared first).
    pub fn wait(&self, ready: &mut Vec<RawFd>, timeout_ms: i32) {
        ready.clear();
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
        // SAFETY: evs is a valid buffer of 16 events.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                evs.as_mut_ptr(),
                evs.len() as i32,
                timeout_ms,
            )
        };
        ready.extend(evs.iter().take(n.max(0) as usize).map(|e| e.u64 as RawFd));
    }
}

/// Pin the calling thread to `core`. Returns false if the kernel refused.
pub fn pin_current_thread(core: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: core })
}

/// Cores that exist on this machine (and that this process may use).
pub fn available_cores() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

impl std::os::fd::AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
