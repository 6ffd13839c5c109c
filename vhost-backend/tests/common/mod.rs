//! A raw vhost-user frontend for the tests: messages (with file
//! descriptors) over the socket, and a minimal virtio-blk driver over a
//! split ring in memfd guest memory, for tests that need what libblkio
//! does not offer (changing the call fd or the memory table while I/O
//! runs, malformed messages).
#![allow(dead_code)] // each test file uses its own part

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

/// Message flags: version 1, and "need reply" (REPLY_ACK).
pub const VERSION: u32 = 1;
pub const NEED_REPLY: u32 = 8;

/// Send one message with `fds` attached.
pub fn send_msg(s: &UnixStream, request: u32, flags: u32, payload: &[u8], fds: &[RawFd]) {
    let mut m = Vec::with_capacity(12 + payload.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&(VERSION | flags).to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    let mut iov = libc::iovec {
        iov_base: m.as_mut_ptr().cast(),
        iov_len: m.len(),
    };
    let space = if fds.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE is a pure computation.
        unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) as usize }
    };
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; the cmsg helpers write inside cbuf,
    // which is CMSG_SPACE bytes for the fds.
    unsafe {
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if !fds.is_empty() {
            mh.msg_control = cbuf.as_mut_ptr().cast();
            mh.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
        libc::sendmsg(s.as_raw_fd(), &mh, libc::MSG_NOSIGNAL);
    }
}

/// Read and drop whatever replies are waiting (never blocks).
pub fn drain_replies(s: &UnixStream) {
    let mut buf = [0u8; 4096];
    // SAFETY: a non-blocking receive into a local buffer; fds a reply may
    // carry are closed by the kernel as no control buffer is given.
    while unsafe {
        libc::recv(
            s.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    } > 0
    {}
}

/// Read one reply: (request, payload).
pub fn read_reply(s: &mut UnixStream) -> std::io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 12];
    s.read_exact(&mut h)?;
    let req = u32::from_le_bytes(h[0..4].try_into().unwrap());
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p)?;
    Ok((req, p))
}

/// A named memfd of `size` bytes.
pub fn memfd(name: &str, size: u64) -> File {
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create with a NUL-terminated name; checked.
    let fd = unsafe { libc::memfd_create(n.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

pub fn eventfd() -> File {
    // SAFETY: plain eventfd creation; checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    unsafe { File::from_raw_fd(fd) }
}

/// A region's bytes in a memory-table message.
pub fn region_bytes(gpa: u64, size: u64, uva: u64, off: u64) -> Vec<u8> {
    [gpa, size, uva, off]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// Guest memory shared with the device: a memfd mapped here too.
pub struct GuestMem {
    pub file: File,
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: plain shared memory, used by the driver thread alone.
unsafe impl Send for GuestMem {}

impl GuestMem {
    pub fn new(len: usize) -> GuestMem {
        let file = memfd("quern-test-guest", len as u64);
        // SAFETY: a new shared mapping of our memfd; checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        GuestMem {
            file,
            ptr: p.cast(),
            len,
        }
    }

    pub fn w16(&self, off: usize, v: u16) {
        assert!(off + 2 <= self.len);
        // SAFETY: in bounds, 2-aligned by the callers' layout.
        unsafe { std::ptr::write_volatile(self.ptr.add(off).cast::<u16>(), v.to_le()) }
    }
    pub fn r16(&self, off: usize) -> u16 {
        assert!(off + 2 <= self.len);
        // SAFETY: as above.
        u16::from_le(unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u16>()) })
    }
    pub fn r32(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.len);
        // SAFETY: as above, 4-aligned.
        u32::from_le(unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u32>()) })
    }
    pub fn write(&self, off: usize, b: &[u8]) {
        assert!(off + b.len() <= self.len);
        // SAFETY: in bounds.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(off), b.len()) }
    }
    pub fn read(&self, off: usize, n: usize) -> Vec<u8> {
        assert!(off + n <= self.len);
        let mut v = vec![0u8; n];
        // SAFETY: in bounds.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), v.as_mut_ptr(), n) }
        v
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A split ring of `size` entries at guest-physical 0 + `base` offsets:
/// descriptors, avail ring, used ring, each in its own 4 KiB page.
pub struct Ring {
    pub size: u16,
    pub desc: usize,
    pub avail: usize,
    pub used: usize,
    pub avail_idx: u16,
    pub used_seen: u16,
}

impl Ring {
    pub fn new(base: usize, size: u16) -> Ring {
        Ring {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn set_desc(&self, m: &GuestMem, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        m.write(self.desc + 16 * i as usize, &d);
    }

    /// Offer `head`.
    pub fn push(&mut self, m: &GuestMem, head: u16) {
        let slot = (self.avail_idx % self.size) as usize;
        m.w16(self.avail + 4 + 2 * slot, head);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.w16(self.avail + 2, self.avail_idx);
    }

    /// Heads the device returned since the last call.
    pub fn reap(&mut self, m: &GuestMem, out: &mut Vec<u16>) {
        let idx = m.r16(self.used + 2);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        while self.used_seen != idx {
            let slot = (self.used_seen % self.size) as usize;
            out.push(m.r32(self.used + 4 + 8 * slot) as u16);
            self.used_seen = self.used_seen.wrapping_add(1);
        }
    }
}
