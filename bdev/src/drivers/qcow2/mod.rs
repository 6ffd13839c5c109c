//! `qcow2`: a copy-on-write overlay over another bdev (the base, only ever
//! read), stored as a qcow2 v3 image that QEMU's tools can check, compare
//! and convert. It lets a VM write to a private layer over a shared image.
//!
//! Why it is split in two: reads and writes to clusters the overlay already
//! holds are the hot path and stay on the reactor (a lock-free lookup in an
//! in-memory map of every L2 entry, then I/O on the channel's private
//! io_uring); reads of unallocated clusters go to the base's channel on
//! that same ring. Anything that changes metadata (allocating a cluster on
//! a first write, copy-on-read) goes to one worker thread per bdev (see
//! [`worker`]), which serialises allocations and orders metadata writes so
//! that a crash can leak a cluster but never expose garbage.
//!
//! A full refcount table (an image made elsewhere with small clusters and
//! a small table) is replaced by a larger one at the end of the file, as
//! QEMU does.
//!
//! Discard and write-zeroes go to the worker: allocated ranges are punched
//! out of the image file (still allocated, reading as zeroes); write-zeroes
//! makes whole unallocated clusters zero clusters (v3) and copies up a
//! partly covered one with the range zeroed; a discard leaves unallocated
//! clusters alone.
//!
//! Not supported: internal snapshots, compression, encryption, external
//! data files, freeing clusters (a discard keeps the cluster allocated; the
//! punched hole gives the space back to the file system).

mod channel;
pub mod format;
mod worker;

use std::fs::{File, OpenOptions};
use std::io::{self, Error, ErrorKind};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::types::{Bdev, BdevChannel, BdevInfo, BdevRef};
use format::{decode_table, read_vec, FormatError, Header, Layout};
use worker::{Job, Meta, Worker};

/// Map value of a cluster that reads as zeroes (a v3 zero-flagged entry).
/// Host offsets are cluster aligned and never 0 or 1.
const ZERO: u64 = 1;
/// Jobs the worker's queue holds.
const JOB_QUEUE: usize = 8192;

/// How to open a qcow2 overlay.
#[derive(Clone)]
pub struct Qcow2Options {
    pub name: String,
    pub path: PathBuf,
    pub base: BdevRef,
    /// Expected virtual size; must equal the base's capacity.
    pub size: Option<u64>,
    /// Cluster size of a created image (power of two, 4 KiB..=2 MiB).
    pub cluster_size: u32,
    pub copy_on_read: bool,
    pub read_only: bool,
    /// O_DIRECT for the reactors' data I/O (falls back to buffered).
    pub direct: bool,
}

/// State the reactors and the worker share: the guest-cluster map.
pub(crate) struct Shared {
    /// Guest cluster -> host offset; 0 unallocated, [`ZERO`] reads as zeroes.
    map: Box<[AtomicU64]>,
    cluster_bits: u32,
    capacity: u64,
    /// Mappings were written since the worker's last `fdatasync`: a
    /// forced-unit-access write must then go through the worker, whose
    /// sync makes the mapping durable with the data.
    unsynced: AtomicBool,
}

pub struct Qcow2Bdev {
    info: BdevInfo,
    shared: Arc<Shared>,
    base: BdevRef,
    /// The image opened for the reactors' data I/O.
    data_file: File,
    jobs: Option<Sender<Job>>,
    worker: Option<std::thread::JoinHandle<()>>,
    next_chan: AtomicU32,
    copy_on_read: bool,
}

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidInput, msg)
}

impl Qcow2Bdev {
    pub fn open(o: &Qcow2Options) -> io::Result<Self> {
        let base_info = o.base.info().clone();
        let cap = base_info.capacity_bytes;
        if let Some(size) = o.size.filter(|&s| s != cap) {
            return Err(invalid(format!(
                "size {size} differs from the capacity {cap} of base `{}`",
                base_info.name
            )));
        }
        if !o.path.exists() {
            create(o, cap)?;
        }
        let ctx = |e: Error| Error::new(e.kind(), format!("{}: {e}", o.path.display()));
        let (meta, shared) = load(o, cap).map_err(ctx)?;
        // for the reactors' data I/O
        let (data_file, _) = super::open_data_file(&o.name, &o.path, o.read_only, o.direct)?;
        let shared = Arc::new(shared);
        let (tx, rx) = crossbeam_channel::bounded(JOB_QUEUE);
        // the worker's guest data goes the same way as the reactors'
        let worker_data = data_file.try_clone()?;
        let worker = Worker::spawn(
            &o.name,
            meta,
            worker_data,
            shared.clone(),
            o.base.clone(),
            rx,
        )?;
        let direct_align = if o.direct { 512 } else { 1 };
        Ok(Qcow2Bdev {
            info: BdevInfo {
                name: o.name.clone(),
                block_size: base_info.block_size,
                capacity_bytes: cap,
                read_only: o.read_only,
                buf_align: base_info.buf_align.max(direct_align),
                supports_discard: !o.read_only,
                supports_write_zeroes: !o.read_only,
                driver: "qcow2",
            },
            shared,
            base: o.base.clone(),
            data_file,
            jobs: Some(tx),
            worker: Some(worker),
            next_chan: AtomicU32::new(0),
            copy_on_read: o.copy_on_read && !o.read_only,
        })
    }
}

/// Write a new, empty image whose backing file is the base.
fn create(o: &Qcow2Options, cap: u64) -> io::Result<()> {
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(4096..=2 << 20).contains(&cs) {
        return Err(invalid(format!(
            "cluster_size {cs} is not a power of two in 4096..=2M"
        )));
    }
    if o.read_only {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "{} does not exist and the bdev is read-only",
                o.path.display()
            ),
        ));
    }
    let backing = o.base.backing_spec();
    if backing.is_none() {
        tracing::warn!(bdev = %o.name, "base has no file QEMU can open; the image names no backing file");
    }
    let img = Layout::new(cap, cs.trailing_zeros())?.image(backing.as_deref())?;
    let f = super::create_new_file(&o.path)?;
    f.write_all_at(&img, 0)?;
    f.sync_all()?;
    tracing::info!(bdev = %o.name, path = %o.path.display(), "created qcow2 overlay");
    Ok(())
}

/// Parse and check the header, read the refcount table and every L2 table.
fn load(o: &Qcow2Options, cap: u64) -> io::Result<(Meta, Shared)> {
    let file = OpenOptions::new()
        .read(true)
        .write(!o.read_only)
        .open(&o.path)?;
    let file_len = file.metadata()?.len();
    let head = read_vec(&file, 0, file_len.min(2 << 20) as usize)?;
    let h = Header::parse(&head, file_len)?;
    if h.size != cap {
        return Err(invalid(format!(
            "virtual size {} differs from the base's capacity {cap}",
            h.size
        )));
    }
    let cs = h.cluster_size();
    if cs < u64::from(o.base.info().block_size) {
        return Err(invalid(format!(
            "cluster size {cs} is smaller than the base's block size"
        )));
    }
    if h.backing_format.as_deref().is_some_and(|f| f != "raw") {
        tracing::warn!(bdev = %o.name, format = ?h.backing_format, "backing format is not raw; reading the base as raw");
    }
    if !o.read_only && h.autoclear_features != 0 {
        // features we do not maintain must be cleared by a writer
        file.write_all_at(&0u64.to_be_bytes(), 88)?;
    }
    let rt_raw = read_vec(
        &file,
        h.refcount_table_offset,
        (u64::from(h.refcount_table_clusters) * cs) as usize,
    )?;
    let rt: Vec<u64> = decode_table(&rt_raw).collect();
    // every metadata cluster, to refuse tables that overlap each other and
    // data clusters inside metadata
    let mut meta_clusters = Clusters::new(cs);
    meta_clusters.add("header", 0, cs)?;
    meta_clusters.add("L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8)?;
    meta_clusters.add(
        "refcount table",
        h.refcount_table_offset,
        rt_raw.len() as u64,
    )?;
    for &e in &rt {
        if e != 0 {
            // reserved bits 0..9 set fail the alignment check, high bits EOF
            check_cluster("refcount block", e, cs, cs, file_len)?;
            meta_clusters.add("refcount block", e, cs)?;
        }
    }
    let (l1, map) = load_map(&file, &h, file_len, &mut meta_clusters)?;
    let meta = Meta {
        file,
        read_only: o.read_only,
        l1,
        l1_offset: h.l1_table_offset,
        rt,
        rt_offset: h.refcount_table_offset,
        next_free: file_len.next_multiple_of(cs),
        v3: h.version >= 3,
    };
    let shared = Shared {
        map,
        cluster_bits: h.cluster_bits,
        capacity: cap,
        unsynced: AtomicBool::new(false),
    };
    Ok((meta, shared))
}

/// Host clusters in use as metadata, by cluster index.
struct Clusters {
    cs: u64,
    set: std::collections::HashMap<u64, &'static str>,
}

impl Clusters {
    fn new(cs: u64) -> Self {
        Clusters {
            cs,
            set: std::collections::HashMap::new(),
        }
    }

    /// Record `[offset, offset+len)` (cluster aligned) as `what`; refused
    /// when it shares a cluster with metadata recorded before.
    fn add(&mut self, what: &'static str, offset: u64, len: u64) -> Result<(), FormatError> {
        let first = offset / self.cs;
        for c in first..first + len.div_ceil(self.cs).max(1) {
            if let Some(other) = self.set.insert(c, what) {
                return Err(FormatError::Overlap {
                    what,
                    offset: c * self.cs,
                    other,
                });
            }
        }
        Ok(())
    }

    fn get(&self, offset: u64) -> Option<&'static str> {
        self.set.get(&(offset / self.cs)).copied()
    }
}

/// The L1 table (host offsets of L2 tables) and the guest-cluster map.
fn load_map(
    file: &File,
    h: &Header,
    file_len: u64,
    meta: &mut Clusters,
) -> io::Result<(Vec<u64>, Box<[AtomicU64]>)> {
    let cs = h.cluster_size();
    let clusters = usize::try_from(h.size.div_ceil(cs)).map_err(|_| no_memory(h.size))?;
    let mut map = Vec::new();
    map.try_reserve_exact(clusters)
        .map_err(|_| no_memory(h.size))?;
    map.extend((0..clusters).map(|_| AtomicU64::new(0)));
    let map = map.into_boxed_slice();
    let l1_raw = read_vec(file, h.l1_table_offset, h.l1_size as usize * 8)?;
    let mut l1 = Vec::with_capacity(h.l1_size as usize);
    for e in decode_table(&l1_raw) {
        let t = e & format::OFFSET_MASK;
        l1.push(t);
        if t != 0 {
            check_cluster("L2 table", t, cs, cs, file_len)?;
            meta.add("L2 table", t, cs)?;
        }
    }
    // all metadata is known: now the data clusters can be checked against it
    for (i, &t) in l1.iter().enumerate() {
        if t == 0 {
            continue;
        }
        let l2 = read_vec(file, t, cs as usize)?;
        let first = i * h.l2_entries() as usize;
        for (j, e) in decode_table(&l2).enumerate() {
            let Some(slot) = map.get(first + j) else {
                break;
            };
            let v = l2_value(e, cs, file_len, h.version >= 3)?;
            if v > ZERO {
                if let Some(other) = meta.get(v) {
                    return Err(FormatError::Overlap {
                        what: "data cluster",
                        offset: v,
                        other,
                    }
                    .into());
                }
            }
            slot.store(v, std::sync::atomic::Ordering::Relaxed);
        }
    }
    Ok((l1, map))
}

fn no_memory(size: u64) -> Error {
    Error::new(
        ErrorKind::OutOfMemory,
        format!("no memory for the cluster map of a {size}-byte image"),
    )
}

/// The map value of one L2 entry (the zero flag exists from version 3 on).
fn l2_value(e: u64, cs: u64, file_len: u64, v3: bool) -> Result<u64, FormatError> {
    if e & format::COMPRESSED != 0 {
        return Err(FormatError::Compression);
    }
    if v3 && e & format::ZERO_FLAG != 0 {
        return Ok(ZERO);
    }
    let host = e & format::OFFSET_MASK;
    if host != 0 {
        check_cluster("data cluster", host, 1, cs, file_len)?;
    }
    Ok(host)
}

/// `offset` is cluster aligned and its first `len` bytes are in the file.
fn check_cluster(
    what: &'static str,
    offset: u64,
    len: u64,
    cs: u64,
    file_len: u64,
) -> Result<(), FormatError> {
    if !offset.is_multiple_of(cs) {
        return Err(FormatError::Misaligned { what, offset });
    }
    if offset.saturating_add(len) > file_len {
        return Err(FormatError::PastEof {
            what,
            offset,
            file_len,
        });
    }
    Ok(())
}

impl Bdev for Qcow2Bdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(
        &self,
        _ring: &io_uring::IoUring,
        _slot: u32,
    ) -> io::Result<Box<dyn BdevChannel>> {
        let jobs = self.jobs.clone().expect("worker runs while the bdev lives");
        let id = self
            .next_chan
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ch = channel::Qcow2Channel::open(channel::ChannelParts {
            id,
            data_fd: self.data_file.as_raw_fd(),
            base: &self.base,
            shared: self.shared.clone(),
            jobs,
            copy_on_read: self.copy_on_read,
        })?;
        Ok(Box::new(ch))
    }
}

impl Drop for Qcow2Bdev {
    fn drop(&mut self) {
        // the worker ends when the last job sender (ours; channels' are
        // dropped before their bdev) is gone
        self.jobs = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_flag_only_in_v3() {
        let e = format::COPIED | 0x30000 | format::ZERO_FLAG;
        assert_eq!(l2_value(e, 0x10000, 1 << 20, true).unwrap(), ZERO);
        // bit 0 is reserved in v2: the entry maps its cluster
        assert_eq!(l2_value(e, 0x10000, 1 << 20, false).unwrap(), 0x30000);
    }
}
