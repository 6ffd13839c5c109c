//! The allocation worker: one thread per qcow2 bdev that does everything
//! which changes the image's metadata, so the reactors never block on it.
//!
//! Jobs arrive in batches. Per batch, for each write to an unallocated
//! cluster it (1) takes a cluster at the end of the file and writes its
//! refcount (a new refcount block is written and synced before the
//! refcount-table entry that names it), (2) writes the whole cluster: base
//! contents (or zeroes) with the write's data on top, and zero-filled L2
//! tables it needs; then (3) one `fdatasync` for the batch, (4) the L2
//! entries, then the L1 entries of new L2 tables, (5) publishes the new
//! mappings to the reactors and replies. A crash can leak clusters (refcount
//! without a mapping) but never maps a guest cluster to unwritten data.
//! Jobs run one after another, so two writes to one unallocated cluster are
//! safe: the second finds the first's cluster.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use io_uring::IoUring;

use super::format::{COPIED, ZERO_FLAG};
use super::{Shared, ZERO};
use crate::sys;
use crate::types::{BdevChannel, BdevRef, IoKind, Op, Submitter};

/// A request's iovecs, handed to the worker. They stay valid until the
/// worker replies (the channel keeps the sub-operation slot until then).
pub(super) struct IovPtr {
    pub ptr: *const libc::iovec,
    pub cnt: usize,
}

// SAFETY: the pointed-to iovecs and buffers are owned by the request, which
// is not completed (so not reused) until the worker's reply is received.
unsafe impl Send for IovPtr {}

pub(super) enum Job {
    Register {
        chan: u32,
        replies: Sender<(u32, i32)>,
        wake: Arc<OwnedFd>,
    },
    Unregister {
        chan: u32,
    },
    Rw {
        chan: u32,
        sub: u32,
        kind: RwKind,
        fua: bool,
        offset: u64,
        len: u64,
        iov: IovPtr,
    },
    /// copy-on-read: copy one guest cluster from the base into the overlay.
    Populate {
        cluster: u64,
    },
}

/// What a [`Job::Rw`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RwKind {
    Read,
    Write,
    /// Write-zeroes, or (`discard`) a discard: whole clusters become zero
    /// clusters or have their data punched out; a discard leaves partial
    /// clusters it does not own as they are.
    Zero {
        discard: bool,
    },
}

/// The worker's view of the image metadata (it alone changes it).
pub(super) struct Meta {
    pub file: File,
    pub read_only: bool,
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    pub rt: Vec<u64>,
    pub rt_offset: u64,
    pub next_free: u64,
    /// Version 3 or later: L2 entries may carry the zero flag.
    pub v3: bool,
}

/// A cluster-sized, 4 KiB-aligned buffer (O_DIRECT bases need alignment).
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("buffer layout");
        // SAFETY: a non-zero size layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation of {len} bytes failed");
        AlignedBuf { ptr, layout }
    }

    fn get(&mut self) -> &mut [u8] {
        // SAFETY: ptr owns layout.size() initialised bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Synchronous reads of the base device through its own channel on a
/// private ring.
struct BaseReader {
    ring: IoUring,
    chan: Box<dyn BdevChannel>,
    done: Vec<(u64, i32)>,
    wake: Option<RawFd>,
    /// Tag of the current read; completions under other tags are stale.
    tag: u64,
    /// The ring failed to take a read that may still be queued on it: no
    /// more reads through it (its buffer must not be reused).
    broken: bool,
}

impl BaseReader {
    fn open(base: &BdevRef) -> io::Result<Self> {
        let ring = IoUring::builder().build(8)?;
        ring.submitter().register_files_sparse(1)?;
        let chan = base.open_channel(&ring, 0)?;
        let wake = chan.wake_fd();
        Ok(BaseReader {
            ring,
            chan,
            done: Vec::with_capacity(4),
            wake,
            tag: 0,
            broken: false,
        })
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let op = Op {
            kind: IoKind::Read,
            offset,
            len: buf.len() as u64,
            iov: &iov,
            fua: false,
            drain: false,
        };
        if self.broken {
            return Err(io::Error::other(
                "the base reader's ring failed earlier; no more base reads",
            ));
        }
        // a fresh tag (never LINKED_USER_DATA): a late completion of an
        // earlier read can not pass for this one
        self.tag = self.tag.wrapping_add(1) % (1 << 62) + 1;
        let tag = self.tag;
        self.done.clear();
        let mut sub = Submitter {
            sq: self.ring.submission(),
            done: &mut self.done,
        };
        if !self.chan.submit(&op, tag, &mut sub) {
            return Err(io::Error::other("the base device refused a read"));
        }
        drop(sub);
        // from here the read may be in flight: return only on its completion
        loop {
            if let Err(e) = self.ring.submit() {
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
                    _ => {
                        // the SQE may still be queued; `buf` and `iov`
                        // live on, but this reader must never run again
                        tracing::error!("qcow2: base reader ring submit failed: {e}");
                        self.broken = true;
                        return Err(e);
                    }
                }
            }
            self.done
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            self.chan.poll(&mut self.done);
            let mine = self.done.iter().find(|&&(t, _)| t == tag).map(|&(_, r)| r);
            self.done.clear();
            if let Some(res) = mine {
                return match res {
                    r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                    r if r as usize == buf.len() => Ok(()),
                    r => Err(io::Error::other(format!(
                        "short base read at {offset}: {r} of {} bytes",
                        buf.len()
                    ))),
                };
            }
            self.wait();
        }
    }

    fn wait(&mut self) {
        let Some(w) = self.wake else {
            let _ = self.ring.submit_and_wait(1);
            return;
        };
        sys::poll_readable(&[self.ring.as_raw_fd(), w], 10);
    }
}

/// Where a channel takes its replies: a queue and the fd that wakes it.
type ReplyTo = (Sender<(u32, i32)>, Arc<OwnedFd>);

struct Reply {
    chan: u32,
    sub: u32,
    write: bool,
    res: i32,
}

pub(super) struct Worker {
    meta: Meta,
    /// The image file for guest data in mapped clusters, opened as the
    /// reactors' data I/O is: O_DIRECT when the bdev is direct. What the
    /// reactors can reach at the same time must not go through the page
    /// cache: reading or writing a mapped cluster buffered beside the
    /// reactors' O_DIRECT writes to the same page made the kernel fail to
    /// drop its cached copy after a direct write ("Page cache invalidation
    /// failure on direct I/O"); it then failed the next fsync with EIO
    /// (which failed the image: every later allocating write got EIO) and
    /// could serve or write back stale data. Metadata (header, L1, L2 and
    /// refcount tables) and the contents of clusters not yet mapped stay
    /// buffered through `meta.file`: the reactors never touch those
    /// clusters (mapped ones only after the publish has synced them), and
    /// clusters are whole pages, so no page is shared.
    data: File,
    shared: Arc<Shared>,
    base: BaseReader,
    buf: AlignedBuf,
    /// Guest cluster -> host offset, allocated in this batch, not yet published.
    pending: HashMap<u64, u64>,
    /// L1 indices whose new L2 table is not yet recorded in the L1 table.
    new_l1: Vec<usize>,
    chans: HashMap<u32, ReplyTo>,
    out: Vec<Reply>,
    fua: bool,
    /// A metadata update or sync failed: the image may not hold what the
    /// map says, so no more allocations (like QEMU marking it corrupt).
    failed: bool,
}

impl Worker {
    /// Start the worker thread; fails if the base cannot be opened for it.
    pub fn spawn(
        name: &str,
        meta: Meta,
        data: File,
        shared: Arc<Shared>,
        base: BdevRef,
        rx: Receiver<Job>,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        let (tx, started) = std::sync::mpsc::channel();
        let cs = 1usize << shared.cluster_bits;
        let h = std::thread::Builder::new()
            .name(format!("qcow2-{name}"))
            .spawn(move || {
                let base = match BaseReader::open(&base) {
                    Ok(b) => b,
                    Err(e) => return drop(tx.send(Err(e))),
                };
                let _ = tx.send(Ok(()));
                let w = Worker {
                    meta,
                    data,
                    shared,
                    base,
                    buf: AlignedBuf::new(cs),
                    pending: HashMap::new(),
                    new_l1: Vec::new(),
                    chans: HashMap::new(),
                    out: Vec::with_capacity(64),
                    fua: false,
                    failed: false,
                };
                w.run(rx)
            })?;
        started
            .recv()
            .map_err(|_| io::Error::other("qcow2 worker died at start"))??;
        Ok(h)
    }

    fn run(mut self, rx: Receiver<Job>) {
        let mut batch = Vec::with_capacity(64);
        while let Ok(j) = rx.recv() {
            batch.push(j);
            while batch.len() < 64 {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            for j in batch.drain(..) {
                self.handle(j);
            }
            self.commit();
        }
    }

    fn handle(&mut self, j: Job) {
        match j {
            Job::Register {
                chan,
                replies,
                wake,
            } => {
                self.chans.insert(chan, (replies, wake));
            }
            Job::Unregister { chan } => {
                self.chans.remove(&chan);
            }
            Job::Rw {
                chan,
                sub,
                kind,
                fua,
                offset,
                len,
                iov,
            } => {
                // SAFETY: see `IovPtr`: valid until we reply.
                let iov = unsafe { std::slice::from_raw_parts(iov.ptr, iov.cnt) };
                let r = match kind {
                    RwKind::Write => {
                        self.fua |= fua;
                        self.write(offset, len, iov)
                    }
                    RwKind::Read => self.read(offset, len, iov),
                    RwKind::Zero { discard } => {
                        self.fua |= fua;
                        self.zero(offset, len, discard)
                    }
                };
                let res = match r {
                    // a zeroing op carries no data: its sub counts 0 bytes
                    Ok(()) if matches!(kind, RwKind::Zero { .. }) => 0,
                    Ok(()) => len as i32,
                    Err(e) => {
                        tracing::warn!("qcow2: {kind:?} at {offset}+{len}: {e}");
                        -e.raw_os_error().unwrap_or(libc::EIO)
                    }
                };
                let write = kind != RwKind::Read;
                self.out.push(Reply {
                    chan,
                    sub,
                    write,
                    res,
                });
            }
            Job::Populate { cluster } => {
                if let Err(e) = self.populate(cluster) {
                    tracing::warn!("qcow2: copy-on-read of cluster {cluster}: {e}");
                }
            }
        }
    }

    fn cs(&self) -> u64 {
        1 << self.shared.cluster_bits
    }

    /// The map value of a guest cluster, this batch's pending one first.
    fn value(&self, g: u64) -> u64 {
        match self.pending.get(&g) {
            Some(&v) => v,
            None => self.shared.map[g as usize].load(Ordering::Acquire),
        }
    }

    /// The host offset of a guest cluster, if allocated (or pending).
    fn lookup(&self, g: u64) -> Option<u64> {
        let v = self.value(g);
        (v > ZERO).then_some(v)
    }

    /// Does the guest cluster read as zeroes without a host cluster?
    fn is_zero(&self, g: u64) -> bool {
        self.value(g) == ZERO
    }

    /// Walk `[offset, offset+len)` cluster by cluster: (guest cluster,
    /// offset in the cluster, length, byte position in the request).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64, usize)> {
        let cs = self.cs();
        let bits = self.shared.cluster_bits;
        let end = offset + len;
        let mut off = offset;
        std::iter::from_fn(move || {
            if off >= end {
                return None;
            }
            let in_off = off & (cs - 1);
            let n = (cs - in_off).min(end - off);
            let p = (off >> bits, in_off, n, (off - offset) as usize);
            off += n;
            Some(p)
        })
    }

    fn write(&mut self, offset: u64, len: u64, iov: &[libc::iovec]) -> io::Result<()> {
        if self.meta.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let cs = self.cs();
        for (g, in_off, n, pos) in self.pieces(offset, len).collect::<Vec<_>>() {
            let (n_us, in_us) = (n as usize, in_off as usize);
            if let Some(host) = self.lookup(g) {
                let buf = &mut self.buf.get()[..n_us];
                gather(iov, pos, buf);
                self.data.write_all_at(buf, host + in_off)?;
                continue;
            }
            if self.failed {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            if n != cs {
                self.fill_cluster(g)?;
            }
            gather(iov, pos, &mut self.buf.get()[in_us..in_us + n_us]);
            self.place_buffered(g)?;
        }
        Ok(())
    }

    /// Write-zeroes or discard `[offset, offset+len)`, cluster by cluster:
    /// - a zero cluster stays one;
    /// - on an allocated cluster the range is punched out of the image file
    ///   (it reads as zeroes; the cluster stays allocated, so no refcount
    ///   changes and `qemu-img check` stays clean);
    /// - a discard leaves unallocated clusters alone (the virtio spec lets
    ///   discarded data read as anything);
    /// - write-zeroes makes a whole unallocated cluster a zero cluster (v3:
    ///   one L2 entry, no data) and copies up any other with the range
    ///   zeroed, as a write of zeroes would.
    fn zero(&mut self, offset: u64, len: u64, discard: bool) -> io::Result<()> {
        if self.meta.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let cs = self.cs();
        let cap = self.shared.capacity;
        for (g, in_off, n, _) in self.pieces(offset, len).collect::<Vec<_>>() {
            if self.is_zero(g) {
                continue;
            }
            if let Some(host) = self.lookup(g) {
                self.punch(host + in_off, n)?;
                continue;
            }
            if discard {
                // nothing of the overlay's to give back; the guest may see
                // the base's data (a whole-disk discard by mkfs or fstrim
                // then costs no metadata)
                continue;
            }
            // both ways on from here allocate: not on a failed image
            if self.failed {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            // the last cluster of an image whose size is not a multiple of
            // the cluster size is whole when the range reaches the end
            let whole = in_off == 0 && (n == cs || g * cs + n == cap);
            if whole && self.meta.v3 {
                self.ensure_l2(g)?;
                self.pending.insert(g, ZERO);
                continue;
            }
            if whole {
                self.buf.get().fill(0);
            } else {
                self.fill_cluster(g)?;
                self.buf.get()[in_off as usize..(in_off + n) as usize].fill(0);
            }
            self.place_buffered(g)?;
        }
        Ok(())
    }

    /// Make `[off, off+len)` of the image file read as zeroes: punch a hole,
    /// or write zeroes where the file system cannot punch.
    fn punch(&mut self, off: u64, len: u64) -> io::Result<()> {
        let fd = self.meta.file.as_raw_fd();
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match sys::fallocate(fd, mode, off, len) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() != Some(libc::EOPNOTSUPP) => return Err(e),
            Err(_) => {}
        }
        let zr = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if sys::fallocate(fd, zr, off, len).is_ok() {
            return Ok(());
        }
        let buf = self.buf.get();
        buf.fill(0);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64);
            self.data.write_all_at(&buf[..n as usize], off + done)?;
            done += n;
        }
        Ok(())
    }

    fn read(&mut self, offset: u64, len: u64, iov: &[libc::iovec]) -> io::Result<()> {
        for (g, in_off, n, pos) in self.pieces(offset, len).collect::<Vec<_>>() {
            let host = self.lookup(g);
            let zero = self.is_zero(g);
            let buf = &mut self.buf.get()[..n as usize];
            match host {
                Some(host) => self.data.read_exact_at(buf, host + in_off)?,
                None if zero => buf.fill(0),
                None => self.base.read(offset + pos as u64, buf)?,
            }
            scatter(buf, iov, pos);
        }
        Ok(())
    }

    fn populate(&mut self, g: u64) -> io::Result<()> {
        if self.meta.read_only || self.failed || self.lookup(g).is_some() || self.is_zero(g) {
            return Ok(());
        }
        self.fill_cluster(g)?;
        self.place_buffered(g)
    }

    /// The buffer becomes the cluster's current contents: zeroes for a zero
    /// cluster, else the base's (zero past the base's end).
    fn fill_cluster(&mut self, g: u64) -> io::Result<()> {
        let cs = self.cs();
        let start = g * cs;
        let avail = self.shared.capacity.saturating_sub(start).min(cs) as usize;
        let zero = self.is_zero(g);
        let buf = self.buf.get();
        if zero {
            buf.fill(0);
            return Ok(());
        }
        buf[avail..].fill(0);
        self.base.read(start, &mut buf[..avail])
    }

    /// Allocate a cluster for guest cluster `g` and write the buffer to it.
    fn place_buffered(&mut self, g: u64) -> io::Result<()> {
        self.ensure_l2(g)?;
        let host = self.alloc_cluster()?;
        // buffered: nobody else can reach a cluster before it is mapped,
        // and the publish syncs it before mapping it
        self.meta.file.write_all_at(self.buf.get(), host)?;
        self.pending.insert(g, host);
        Ok(())
    }

    fn ensure_l2(&mut self, g: u64) -> io::Result<()> {
        let i = (g >> (self.shared.cluster_bits - 3)) as usize;
        if self.meta.l1[i] != 0 {
            return Ok(());
        }
        let t = self.alloc_cluster()?;
        let zeros = vec![0u8; self.cs() as usize];
        self.meta.file.write_all_at(&zeros, t)?;
        self.meta.l1[i] = t;
        self.new_l1.push(i);
        Ok(())
    }

    /// Take the cluster at the end of the file and set its refcount to 1.
    fn alloc_cluster(&mut self) -> io::Result<u64> {
        let cs = self.cs();
        let per_block = cs / 2;
        loop {
            let off = self.meta.next_free;
            let idx = off / cs;
            let r = (idx / per_block) as usize;
            if r >= self.meta.rt.len() {
                self.grow_refcount_table(r)?;
                continue; // next_free is now past the new table
            }
            self.meta.next_free += cs;
            let entry = 2 * (idx % per_block);
            if self.meta.rt[r] != 0 {
                self.meta
                    .file
                    .write_all_at(&1u16.to_be_bytes(), self.meta.rt[r] + entry)?;
                return Ok(off);
            }
            // a new refcount block at `off`, counting itself
            let mut block = vec![0u8; cs as usize];
            block[entry as usize..entry as usize + 2].copy_from_slice(&1u16.to_be_bytes());
            self.meta.file.write_all_at(&block, off)?;
            self.meta.file.sync_data()?;
            self.meta
                .file
                .write_all_at(&off.to_be_bytes(), self.meta.rt_offset + 8 * r as u64)?;
            self.meta.rt[r] = off;
        }
    }

    /// Replace the refcount table with a larger one covering refcount
    /// block `need`, as QEMU does: the new table and the refcount blocks
    /// its own clusters need go at the end of the file, describing
    /// themselves; they are written and synced before the header points at
    /// them (a crash before that leaks them, nothing more), and the old
    /// table's clusters are then freed.
    fn grow_refcount_table(&mut self, need: usize) -> io::Result<()> {
        let cs = self.cs();
        let per_block = cs / 2;
        let old_n = self.meta.rt.len();
        let start = self.meta.next_free / cs;
        let lo = start / per_block;
        // `need` is the block of the next free cluster, past the old
        // table: every refcount block from `lo` on is new
        debug_assert!(need as u64 == lo && need >= old_n);
        // QEMU (and our own header check) refuse larger tables: an image
        // with one would open nowhere
        let max_entries = (super::format::MAX_REFTABLE_BYTES / 8) as usize;
        let full = |need: usize| {
            io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "refcount block {need} is past the largest refcount table a qcow2 image may have ({max_entries} entries)"
                ),
            )
        };
        let mut n2 = (need + 1).max(old_n * 2).min(max_entries);
        let (t, b) = loop {
            if need >= n2 {
                return Err(full(need));
            }
            let t = (n2 as u64 * 8).div_ceil(cs);
            // the table's clusters hold this many entries: use them all
            n2 = (t * cs / 8) as usize;
            // b new blocks right after the table, as many as it takes to
            // count the table and themselves (a fixed point: b only grows)
            let mut b = 0;
            loop {
                let nb = (start + t + b - 1) / per_block - lo + 1;
                if nb == b {
                    break;
                }
                b = nb;
            }
            if (((start + t + b - 1) / per_block) as usize) < n2 {
                break (t, b);
            }
            if n2 >= max_entries {
                return Err(full((start + t + b - 1) as usize / per_block as usize));
            }
            n2 = (n2 * 2).min(max_entries);
        };
        let t32 = u32::try_from(t).map_err(|_| full(need))?;
        let end = start + t + b;
        let mut rt = self.meta.rt.clone();
        rt.resize(n2, 0);
        let f = &self.meta.file;
        for (k, r) in (lo..lo + b).enumerate() {
            let off = (start + t + k as u64) * cs;
            let mut block = vec![0u8; cs as usize];
            for idx in (r * per_block).max(start)..((r + 1) * per_block).min(end) {
                let e = (2 * (idx % per_block)) as usize;
                block[e..e + 2].copy_from_slice(&1u16.to_be_bytes());
            }
            f.write_all_at(&block, off)?;
            rt[r as usize] = off;
        }
        let mut table = vec![0u8; (t * cs) as usize];
        for (i, &e) in rt.iter().enumerate() {
            table[8 * i..8 * i + 8].copy_from_slice(&e.to_be_bytes());
        }
        f.write_all_at(&table, start * cs)?;
        f.sync_data()?;
        // refcount_table_offset and refcount_table_clusters, side by side
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&(start * cs).to_be_bytes());
        hdr[8..].copy_from_slice(&t32.to_be_bytes());
        f.write_all_at(&hdr, 48)?;
        f.sync_data()?;
        // the new table is the image's now
        let old_offset = std::mem::replace(&mut self.meta.rt_offset, start * cs);
        self.meta.next_free = end * cs;
        tracing::info!(
            old_entries = old_n,
            new_entries = n2,
            table_offset = start * cs,
            "qcow2: refcount table grown"
        );
        // The old table's clusters are free. Failing (or crashing) here
        // only leaks them, which `qemu-img check -r leaks` repairs.
        let old_first = old_offset / cs;
        let old_clusters = (old_n as u64 * 8).div_ceil(cs);
        for idx in old_first..old_first + old_clusters {
            let blk = rt[(idx / per_block) as usize];
            if blk != 0 {
                if let Err(e) = f.write_all_at(&0u16.to_be_bytes(), blk + 2 * (idx % per_block)) {
                    tracing::warn!("qcow2: freeing the old refcount table: {e}; its clusters leak");
                    break;
                }
            }
        }
        self.meta.rt = rt;
        Ok(())
    }

    /// End of a batch: make the new clusters durable, then map them, then
    /// reply to every request of the batch.
    fn commit(&mut self) {
        let mut r = Ok(());
        if !self.pending.is_empty() || !self.new_l1.is_empty() {
            r = self.publish();
        }
        if r.is_ok() && self.fua {
            r = self.meta.file.sync_data();
            if r.is_ok() {
                self.shared.unsynced.store(false, Ordering::Release);
            }
        }
        self.fua = false;
        if let Err(e) = &r {
            if !self.failed {
                tracing::error!(
                    "qcow2: metadata update or sync failed: {e}; the image is now \
                     failed: this batch's writes and every later allocating write \
                     fail with EIO (check the image with `qemu-img check` after)"
                );
            }
            self.failed = true;
        }
        let err = r.err().map(|_| -libc::EIO);
        let mut woken: Vec<u32> = Vec::new();
        for rep in self.out.drain(..) {
            let res = match err {
                Some(e) if rep.write && rep.res >= 0 => e,
                _ => rep.res,
            };
            if let Some((tx, _)) = self.chans.get(&rep.chan) {
                let _ = tx.send((rep.sub, res));
                if !woken.contains(&rep.chan) {
                    woken.push(rep.chan);
                }
            }
        }
        for c in woken {
            if let Some((_, wake)) = self.chans.get(&c) {
                signal(wake.as_raw_fd());
            }
        }
    }

    /// Sync the batch's clusters, then write their L2 and L1 entries and
    /// publish the mappings. On an error nothing of the batch is published
    /// (its clusters leak) and the L1 entries not written are forgotten.
    fn publish(&mut self) -> io::Result<()> {
        let r = self.write_mappings();
        if r.is_err() {
            self.pending.clear();
            for i in self.new_l1.drain(..) {
                self.meta.l1[i] = 0;
            }
            return r;
        }
        // before the mappings appear, so a reader of one sees the flag
        self.shared.unsynced.store(true, Ordering::Release);
        for (g, host) in self.pending.drain() {
            self.shared.map[g as usize].store(host, Ordering::Release);
        }
        Ok(())
    }

    /// The on-disk part of `publish`; leaves in `new_l1` the L1 entries it
    /// has not written.
    fn write_mappings(&mut self) -> io::Result<()> {
        let f = &self.meta.file;
        f.sync_data()?;
        let mask = (1u64 << (self.shared.cluster_bits - 3)) - 1;
        let shift = self.shared.cluster_bits - 3;
        // in guest order, one write per run of neighbouring entries of one
        // L2 table (a large write-zeroes or sequential fill maps thousands)
        let mut entries: Vec<(u64, u64)> = self.pending.iter().map(|(&g, &h)| (g, h)).collect();
        entries.sort_unstable();
        let mut run: Vec<u8> = Vec::new();
        let mut i = 0;
        while i < entries.len() {
            let first = entries[i].0;
            run.clear();
            while let Some(&(g, host)) = entries.get(i) {
                if g != first + (run.len() / 8) as u64 || g >> shift != first >> shift {
                    break;
                }
                let e = if host == ZERO {
                    ZERO_FLAG
                } else {
                    host | COPIED
                };
                run.extend_from_slice(&e.to_be_bytes());
                i += 1;
            }
            let table = self.meta.l1[(first >> shift) as usize];
            f.write_all_at(&run, table + 8 * (first & mask))?;
        }
        while let Some(&i) = self.new_l1.last() {
            let e = self.meta.l1[i] | COPIED;
            f.write_all_at(&e.to_be_bytes(), self.meta.l1_offset + 8 * i as u64)?;
            self.new_l1.pop();
        }
        Ok(())
    }
}

/// Add one to an eventfd.
pub(super) fn signal(fd: RawFd) {
    sys::eventfd_signal(fd);
}

/// Copy request bytes `[pos, pos+dst.len())` out of the iovecs.
fn gather(iov: &[libc::iovec], mut pos: usize, dst: &mut [u8]) {
    let mut done = 0;
    for v in iov {
        if done == dst.len() {
            break;
        }
        if pos >= v.iov_len {
            pos -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - pos).min(dst.len() - done);
        // SAFETY: the iovec is valid for reads of iov_len bytes (Op
        // contract) and dst has n bytes left at `done`. A copy, never a
        // reference: the guest may write the buffer meanwhile.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (v.iov_base as *const u8).add(pos),
                dst.as_mut_ptr().add(done),
                n,
            )
        };
        done += n;
        pos = 0;
    }
}

/// Copy `src` into request bytes `[pos, pos+src.len())` of the iovecs.
pub(super) fn scatter(src: &[u8], iov: &[libc::iovec], mut pos: usize) {
    let mut done = 0;
    for v in iov {
        if done == src.len() {
            break;
        }
        if pos >= v.iov_len {
            pos -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - pos).min(src.len() - done);
        // SAFETY: the iovec is valid for writes of iov_len bytes (Op
        // contract) and src has n bytes left at `done`; a copy, never a
        // reference over guest memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr().add(done),
                (v.iov_base as *mut u8).add(pos),
                n,
            )
        };
        done += n;
        pos = 0;
    }
}
