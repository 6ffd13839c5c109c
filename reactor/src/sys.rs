//! Every kernel interface the reactor uses, in one place: eventfds, epoll
//! and CPU pinning; and the listening UNIX sockets every server in Quern
//! binds (devices, the management API, the metrics endpoint). Nothing
//! above this module builds a raw syscall.

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

/// The file of a listening UNIX socket this process serves: wakes the
/// socket's accept loop without going through the path, and removes the
/// file only while the path still names it (never another process's
/// socket that took the path since).
#[derive(Debug)]
pub struct BoundSocket {
    path: std::path::PathBuf,
    id: Option<SocketId>,
    /// A second handle on the listening socket.
    wake: std::os::unix::net::UnixListener,
}

impl BoundSocket {
    /// `listener` listens at `path` now (bound there, or renamed there).
    pub fn new(
        path: &std::path::Path,
        listener: &std::os::unix::net::UnixListener,
    ) -> io::Result<BoundSocket> {
        Ok(BoundSocket {
            path: path.to_path_buf(),
            id: SocketId::of(path),
            wake: listener.try_clone()?,
        })
    }

    /// Wake every `accept` blocked on the socket: they fail with EINVAL.
    pub fn wake(&self) {
        wake_listener(&self.wake);
    }

    /// Remove the socket file, if the path still names it.
    pub fn remove(&self) {
        if let Some(id) = self.id {
            id.remove_if_ours(&self.path);
        }
    }
}

/// A UNIX socket path this process bound, told apart from whatever may
/// later take the same path (another process's socket, a new file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SocketId {
    dev: u64,
    ino: u64,
    /// (an inode number can be reused once the path is unlinked)
    ctime: (i64, i64),
}

impl SocketId {
    /// The identity of what is at `path` now, if anything.
    fn of(path: &std::path::Path) -> Option<SocketId> {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path).ok().map(|m| SocketId {
            dev: m.dev(),
            ino: m.ino(),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// Remove `path` if it is still the socket this id names: never
    /// another process's socket that took the path since.
    fn remove_if_ours(self, path: &std::path::Path) {
        if SocketId::of(path) == Some(self) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Make `path` free for a new listening socket. Nothing there: fine. A
/// socket nobody listens on (left by a process that died): removed. A
/// socket another process serves (a second Quern with the same
/// configuration): refused, as is anything that is not a socket, which
/// is never removed (a path mistyped onto a disk image must not delete
/// it).
pub fn claim_socket_path(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            ),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is served by another process (another quern with the same configuration?)",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("{}: cannot tell whether it is in use: {e}", path.display()),
        )),
    }
}

/// Wake every `accept` blocked on `listener` (a second handle on the
/// socket, from `try_clone`): they fail with EINVAL. It does not depend on
/// the socket's path, which may be gone or belong to someone else by now.
fn wake_listener(listener: &std::os::unix::net::UnixListener) {
    // SAFETY: shutdown on a socket fd we own; the result is not needed
    // (a socket already shut down stays so).
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn a_socket_path_is_claimed_only_from_nothing_or_a_dead_socket() {
        let dir = std::env::temp_dir().join(format!("quern-sys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.sock");
        // nothing there
        claim_socket_path(&p).unwrap();
        // a live socket: refused, and left alone
        let live = UnixListener::bind(&p).unwrap();
        let e = claim_socket_path(&p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("served by another process"), "{e}");
        assert!(p.exists());
        // the same socket once its listener is gone: stale, removed
        drop(live);
        claim_socket_path(&p).unwrap();
        assert!(!p.exists());
        // not a socket: refused, never removed
        std::fs::write(&p, b"a disk image").unwrap();
        let e = claim_socket_path(&p).unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"a disk image");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_listener_wakes_and_leaves_a_path_someone_else_took() {
        let dir = std::env::temp_dir().join(format!("quern-sys-wake-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.sock");
        let ours = UnixListener::bind(&p).unwrap();
        let id = SocketId::of(&p).unwrap();
        let handle = ours.try_clone().unwrap();
        let t = std::thread::spawn(move || ours.accept().map(|_| ()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        // someone else takes the path: a connection to it no longer
        // reaches our accept
        std::fs::remove_file(&p).unwrap();
        let theirs = UnixListener::bind(&p).unwrap();
        let _ = UnixStream::connect(&p);
        wake_listener(&handle);
        let r = t.join().unwrap();
        assert!(r.is_err(), "accept woke with an error");
        // and their socket stays
        id.remove_if_ours(&p);
        assert!(p.exists());
        let theirs_id = SocketId::of(&p).unwrap();
        assert_ne!(theirs_id, id);
        theirs_id.remove_if_ours(&p);
        assert!(!p.exists());
        drop(theirs);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
