//! Untrusted guest input: descriptor chains and virtio-blk requests built in
//! a fake guest memory (a memfd mapped through a real memory table).

use std::fs::File;
use std::os::fd::FromRawFd;

use quern_bdev::IoKind;

use crate::blk::{self, Decoded, Limits, LIMITS};
use crate::memory::{FrontendAddress, GuestAddress, MemTable};
use crate::virtq::{
    Chain, ChainError, RingError, Seg, SplitQueue, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};

/// `blk::decode` over segments the tests translated through a live table.
fn decode(segs: &[Seg], iov: &mut Vec<libc::iovec>, cap: u64, ro: bool) -> blk::Request {
    decode_with(segs, iov, cap, ro, &LIMITS)
}

fn decode_with(
    segs: &[Seg],
    iov: &mut Vec<libc::iovec>,
    cap: u64,
    ro: bool,
    limits: &Limits,
) -> blk::Request {
    // SAFETY: the segments come from `chain` over the guest's table, which
    // outlives them in every test.
    unsafe { blk::decode(segs, iov, cap, ro, limits) }
}

pub(crate) const MEM: u64 = 4 << 20;
pub(crate) const GPA: u64 = 0x10000;
pub(crate) const UVA: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 8;
// ring layout (guest-physical): desc table, avail, used, then buffers
const DESC: u64 = GPA;
const AVAIL: u64 = GPA + 0x1000;
pub(crate) const USED: u64 = GPA + 0x2000;
const BUF: u64 = GPA + 0x10000;

pub(crate) struct Guest {
    pub mem: std::sync::Arc<MemTable>,
}

impl Guest {
    pub fn new() -> Self {
        Guest::mapped_at(0)
    }

    /// Guest memory whose region starts `mmap_offset` bytes into its fd.
    pub fn mapped_at(mmap_offset: u64) -> Self {
        // SAFETY: memfd_create with a static name; checked below.
        let fd = unsafe { libc::memfd_create(c"quern-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fresh fd.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(MEM + mmap_offset).unwrap();
        let mem = MemTable::default()
            .with_region(
                GuestAddress(GPA),
                MEM,
                FrontendAddress(UVA),
                mmap_offset,
                &f,
            )
            .unwrap();
        Guest { mem: mem.into() }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        let p = self
            .mem
            .gpa(GuestAddress(gpa), data.len() as u64)
            .expect("inside guest memory");
        // SAFETY: translated with bounds.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self
            .mem
            .gpa(GuestAddress(gpa), len as u64)
            .expect("inside guest memory");
        let mut out = vec![0u8; len];
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), len) };
        out
    }

    pub fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(table + 16 * u64::from(i), &d);
    }

    pub fn queue(&self) -> SplitQueue {
        self.ring(QSIZE, DESC, AVAIL, USED)
            .expect("ring inside memory")
    }

    /// A queue over rings at these guest-physical addresses.
    pub fn ring(
        &self,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<SplitQueue, RingError> {
        let uva = |gpa: u64| FrontendAddress(gpa.wrapping_sub(GPA).wrapping_add(UVA));
        // SAFETY: every test keeps `self.mem` alive while it uses the queue.
        unsafe { SplitQueue::new(&self.mem, size, uva(desc), uva(avail), uva(used), 0, false) }
    }

    pub fn header(&self, gpa: u64, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write(gpa, &h);
    }
}

/// A queue poller over `q` for tests, with private eventfds.
pub(crate) fn test_poller(
    q: SplitQueue,
    mem: &std::sync::Arc<MemTable>,
    dev: u16,
    capacity: u64,
    read_only: bool,
    inflight_region: Option<crate::inflight::InflightQueue>,
) -> crate::queue::QueuePoller {
    test_poller_logged(
        q,
        mem,
        dev,
        capacity,
        read_only,
        inflight_region,
        crate::dirty::LogView::default(),
    )
}

/// [`test_poller`] with a dirty log (the used ring at [`USED`]).
pub(crate) fn test_poller_logged(
    q: SplitQueue,
    mem: &std::sync::Arc<MemTable>,
    dev: u16,
    capacity: u64,
    read_only: bool,
    inflight_region: Option<crate::inflight::InflightQueue>,
    dirty: crate::dirty::LogView,
) -> crate::queue::QueuePoller {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;
    crate::queue::QueuePoller::new(crate::queue::QueueParts {
        q,
        mem: mem.clone(),
        dev,
        capacity,
        read_only,
        writeback: Arc::new(AtomicBool::new(true)),
        kick: crate::device::new_eventfd().unwrap(),
        call: crate::device::new_eventfd().unwrap(),
        max_segs: 126,
        serial: *b"quern-test-000000000",
        stats: Arc::new(crate::queue::QueueStats::default()),
        name: "test".into(),
        inflight_region,
        resubmit: Vec::new(),
        failing: false,
        timing: true,
        qos: crate::qos::QosBinding::unlimited("test"),
        dirty,
        used_gpa: Arc::new(AtomicU64::new(USED)),
    })
}

/// One reactor cycle for a lone poller.
pub(crate) fn cycle(p: &mut crate::queue::QueuePoller, io: &mut quern_bdev::IoEngine) {
    use quern_bdev::IoPoller;
    io.begin_cycle();
    p.poll(io, quern_bdev::PollerId(0));
    io.flush();
    io.reap(|cookie, res| p.on_complete(cookie.tag(), res));
    p.end_cycle(&mut 0);
}

fn chain(g: &Guest, head: u16) -> Result<Vec<Seg>, ChainError> {
    let q = g.queue();
    let mut out = Vec::new();
    match q.chain(&g.mem, head, &mut out, 16)? {
        Chain::Complete => Ok(out),
        Chain::TooManySegments { .. } => panic!("more than 16 segments"),
    }
}

#[test]
fn ring_outside_memory_is_refused() {
    let g = Guest::new();
    assert!(matches!(
        g.ring(QSIZE, GPA + MEM - 16, AVAIL, USED),
        Err(RingError::Outside { .. })
    ));
    assert_eq!(
        g.ring(6, DESC, AVAIL, USED).err(),
        Some(RingError::Size(6)),
        "size must be a power of two"
    );
}

/// Rings at addresses the spec forbids would be read with misaligned
/// loads (undefined behaviour); they are refused with the reason.
#[test]
fn misaligned_rings_are_refused() {
    let g = Guest::new();
    for (desc, avail, used, ring) in [
        (DESC + 8, AVAIL, USED, "descriptor table"),
        (DESC, AVAIL + 1, USED, "avail ring"),
        (DESC, AVAIL, USED + 2, "used ring"),
    ] {
        match g.ring(QSIZE, desc, avail, used) {
            Err(RingError::Misaligned { ring: r, .. }) => assert_eq!(r, ring),
            other => panic!("{ring}: {:?}", other.err()),
        }
    }
}

/// Rings aligned as the frontend gives them but not where they land in
/// Quern's mapping (a region whose mmap offset is 2: no real frontend
/// sends one, the frontend fuzzer did) are refused, not accessed with
/// misaligned loads and stores (std's checks abort a debug build there).
#[test]
fn rings_misaligned_by_their_regions_mmap_offset_are_refused() {
    match Guest::mapped_at(2).ring(QSIZE, DESC, AVAIL, USED) {
        Err(e @ RingError::MisalignedMapping { ring, .. }) => {
            assert_eq!(ring, "descriptor table");
            assert!(e.to_string().contains("mmap offset"), "{e}");
        }
        other => panic!("{:?}", other.err()),
    }
}

/// An indirect table sits wherever the guest put it; its descriptors are
/// read byte-wise, so an odd address works (std's alignment checks in
/// debug builds would catch a wide load).
#[test]
fn an_indirect_table_at_an_odd_address_is_read() {
    let g = Guest::new();
    let table = GPA + 0x3001;
    g.desc(table, 0, BUF, 16, VRING_DESC_F_NEXT, 1);
    g.desc(table, 1, BUF + 16, 1, VRING_DESC_F_WRITE, 0);
    g.desc(DESC, 0, table, 32, VRING_DESC_F_INDIRECT, 0);
    let segs = chain(&g, 0).unwrap();
    assert_eq!(segs.len(), 2);
    assert_eq!((segs[0].len, segs[1].len), (16, 1));
    assert!(segs[1].writable);
}

/// A chain with more buffers than seg_max is walked to its end all the
/// same, so its status byte can carry the error.
#[test]
fn a_chain_past_the_segment_limit_keeps_its_last_buffer() {
    let g = Guest::new();
    let table = GPA + 0x4000;
    for i in 0..40u16 {
        let last = i == 39;
        g.desc(
            table,
            i,
            BUF + 512 * u64::from(i),
            if last { 1 } else { 512 },
            if last {
                VRING_DESC_F_WRITE
            } else {
                VRING_DESC_F_NEXT
            },
            i + 1,
        );
    }
    g.desc(DESC, 0, table, 40 * 16, VRING_DESC_F_INDIRECT, 0);
    let q = g.queue();
    let mut out = Vec::new();
    match q.chain(&g.mem, 0, &mut out, 8).unwrap() {
        Chain::TooManySegments { last } => {
            assert_eq!(last.len, 1);
            assert!(last.writable);
        }
        Chain::Complete => panic!("40 buffers fit in 8"),
    }
    assert_eq!(out.len(), 8);
}

#[test]
fn descriptor_loop_is_bounded() {
    let g = Guest::new();
    g.desc(DESC, 0, BUF, 16, VRING_DESC_F_NEXT, 1);
    g.desc(DESC, 1, BUF, 16, VRING_DESC_F_NEXT, 0);
    assert!(matches!(chain(&g, 0), Err(ChainError::TooLong(_))));
}

#[test]
fn bad_index_and_address_are_refused() {
    let g = Guest::new();
    g.desc(DESC, 0, BUF, 16, VRING_DESC_F_NEXT, 200);
    assert_eq!(chain(&g, 0).unwrap_err(), ChainError::BadIndex(200));
    assert_eq!(chain(&g, QSIZE).unwrap_err(), ChainError::BadIndex(QSIZE));
    g.desc(DESC, 0, GPA + MEM - 8, 16, 0, 0);
    assert!(matches!(chain(&g, 0), Err(ChainError::BadAddress { .. })));
    g.desc(DESC, 0, 0, 16, 0, 0);
    assert!(matches!(chain(&g, 0), Err(ChainError::BadAddress { .. })));
    g.desc(DESC, 0, u64::MAX - 4, 16, 0, 0);
    assert!(matches!(chain(&g, 0), Err(ChainError::BadAddress { .. })));
}

#[test]
fn over_long_chain_is_refused() {
    let g = Guest::new();
    for i in 0..QSIZE {
        g.desc(DESC, i, BUF, 16, VRING_DESC_F_NEXT, (i + 1) % QSIZE);
    }
    let q = g.queue();
    let mut out = Vec::new();
    // a loop through the whole ring: refused, whatever the segment limit
    assert!(matches!(
        q.chain(&g.mem, 0, &mut out, 3),
        Err(ChainError::TooLong(_))
    ));
}

#[test]
fn indirect_tables_work_and_may_not_nest() {
    let g = Guest::new();
    let table = GPA + 0x3000;
    g.desc(table, 0, BUF, 16, VRING_DESC_F_NEXT, 1);
    g.desc(table, 1, BUF + 16, 1, VRING_DESC_F_WRITE, 0);
    g.desc(DESC, 0, table, 32, VRING_DESC_F_INDIRECT, 0);
    let segs = chain(&g, 0).unwrap();
    assert_eq!(segs.len(), 2);
    assert!(segs[1].writable);
    // an indirect descriptor inside an indirect table
    g.desc(table, 1, table, 32, VRING_DESC_F_INDIRECT, 0);
    assert_eq!(chain(&g, 0).unwrap_err(), ChainError::BadIndirect);
    // a table whose length is not a multiple of 16
    g.desc(DESC, 0, table, 20, VRING_DESC_F_INDIRECT, 0);
    assert_eq!(chain(&g, 0).unwrap_err(), ChainError::BadIndirect);
}

/// Build header | data | status at BUF as separate descriptors and decode.
fn request(
    g: &Guest,
    ty: u32,
    sector: u64,
    data_len: u32,
    data_writable: bool,
    cap: u64,
    ro: bool,
) -> (blk::Request, Vec<libc::iovec>) {
    g.header(BUF, ty, sector);
    let wflag = if data_writable { VRING_DESC_F_WRITE } else { 0 };
    g.desc(DESC, 0, BUF, 16, VRING_DESC_F_NEXT, 1);
    g.desc(
        DESC,
        1,
        BUF + 0x1000,
        data_len,
        VRING_DESC_F_NEXT | wflag,
        2,
    );
    g.desc(DESC, 2, BUF + 0x100, 1, VRING_DESC_F_WRITE, 0);
    let segs = chain(g, 0).unwrap();
    let mut iov = Vec::new();
    let r = decode(&segs, &mut iov, cap, ro);
    (r, iov)
}

#[test]
fn good_read_points_into_guest_memory() {
    let g = Guest::new();
    let (r, iov) = request(&g, blk::VIRTIO_BLK_T_IN, 8, 4096, true, 1 << 20, false);
    assert_eq!(
        r.what,
        Decoded::Io {
            kind: IoKind::Read,
            offset: 4096,
            len: 4096
        }
    );
    assert_eq!(r.written, 4097);
    assert_eq!(iov.len(), 1);
    assert_eq!(
        iov[0].iov_base as usize,
        g.mem.gpa(GuestAddress(BUF + 0x1000), 1).unwrap() as usize
    );
}

#[test]
fn header_split_across_descriptors_and_status_sharing_data() {
    let g = Guest::new();
    g.header(BUF, blk::VIRTIO_BLK_T_IN, 0);
    // 10 + 6 header bytes, then 512 data bytes and the status in one buffer
    g.desc(DESC, 0, BUF, 10, VRING_DESC_F_NEXT, 1);
    g.desc(DESC, 1, BUF + 10, 6, VRING_DESC_F_NEXT, 2);
    g.desc(DESC, 2, BUF + 0x1000, 513, VRING_DESC_F_WRITE, 0);
    let segs = chain(&g, 0).unwrap();
    let mut iov = Vec::new();
    let r = decode(&segs, &mut iov, 1 << 20, false);
    assert_eq!(
        r.what,
        Decoded::Io {
            kind: IoKind::Read,
            offset: 0,
            len: 512
        }
    );
    assert_eq!(iov.len(), 1);
    assert_eq!(
        r.status.unwrap() as usize,
        g.mem.gpa(GuestAddress(BUF + 0x1000 + 512), 1).unwrap() as usize
    );
}

#[test]
fn bad_requests_get_the_right_status() {
    let g = Guest::new();
    let rej = |r: blk::Request| match r.what {
        Decoded::Reject(s) => s,
        other => panic!("accepted: {other:?}"),
    };
    // past capacity
    assert_eq!(
        rej(request(&g, blk::VIRTIO_BLK_T_IN, 2048, 4096, true, 1 << 20, false).0),
        blk::VIRTIO_BLK_S_IOERR
    );
    // sector * 512 overflows
    assert_eq!(
        rej(request(
            &g,
            blk::VIRTIO_BLK_T_IN,
            u64::MAX / 2,
            512,
            true,
            1 << 20,
            false
        )
        .0),
        blk::VIRTIO_BLK_S_IOERR
    );
    // write to a read-only disk
    assert_eq!(
        rej(request(&g, blk::VIRTIO_BLK_T_OUT, 0, 512, false, 1 << 20, true).0),
        blk::VIRTIO_BLK_S_IOERR
    );
    // read into a buffer the device may not write
    assert_eq!(
        rej(request(&g, blk::VIRTIO_BLK_T_IN, 0, 512, false, 1 << 20, false).0),
        blk::VIRTIO_BLK_S_IOERR
    );
    // data not a multiple of the sector
    assert_eq!(
        rej(request(&g, blk::VIRTIO_BLK_T_OUT, 0, 100, false, 1 << 20, false).0),
        blk::VIRTIO_BLK_S_IOERR
    );
    // unknown type
    assert_eq!(
        rej(request(&g, 99, 0, 512, false, 1 << 20, false).0),
        blk::VIRTIO_BLK_S_UNSUPP
    );
}

#[test]
fn short_header_and_missing_status() {
    let g = Guest::new();
    g.desc(DESC, 0, BUF, 8, VRING_DESC_F_NEXT, 1);
    g.desc(DESC, 1, BUF + 0x100, 1, VRING_DESC_F_WRITE, 0);
    let mut iov = Vec::new();
    let r = decode(&chain(&g, 0).unwrap(), &mut iov, 1 << 20, false);
    assert_eq!(r.what, Decoded::Reject(blk::VIRTIO_BLK_S_IOERR));
    assert!(r.status.is_some());
    // last buffer read-only: no status byte to write
    g.header(BUF, blk::VIRTIO_BLK_T_IN, 0);
    g.desc(DESC, 0, BUF, 16, VRING_DESC_F_NEXT, 1);
    g.desc(DESC, 1, BUF + 0x100, 513, 0, 0);
    let r = decode(&chain(&g, 0).unwrap(), &mut iov, 1 << 20, false);
    assert!(matches!(r.what, Decoded::Reject(_)));
    assert!(r.status.is_none());
}

#[test]
fn discard_segments_are_checked() {
    let g = Guest::new();
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        g.write(BUF + 0x1000, &s);
    };
    seg(8, 16, 0);
    let (r, _) = request(&g, blk::VIRTIO_BLK_T_DISCARD, 0, 16, false, 1 << 20, false);
    assert_eq!(
        r.what,
        Decoded::Io {
            kind: IoKind::Discard,
            offset: 4096,
            len: 8192
        }
    );
    seg(8, 16, 1);
    let (r, _) = request(
        &g,
        blk::VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        16,
        false,
        1 << 20,
        false,
    );
    assert_eq!(
        r.what,
        Decoded::Io {
            kind: IoKind::WriteZeroes,
            offset: 4096,
            len: 8192
        }
    );
    // the unmap flag is not valid on discard
    let (r, _) = request(&g, blk::VIRTIO_BLK_T_DISCARD, 0, 16, false, 1 << 20, false);
    assert_eq!(r.what, Decoded::Reject(blk::VIRTIO_BLK_S_UNSUPP));
    seg(2040, 16, 0);
    let (r, _) = request(&g, blk::VIRTIO_BLK_T_DISCARD, 0, 16, false, 1 << 20, false);
    assert_eq!(r.what, Decoded::Reject(blk::VIRTIO_BLK_S_IOERR));
    // two segments: more than max_discard_seg (UNSUPP, as QEMU answers)
    let (r, _) = request(&g, blk::VIRTIO_BLK_T_DISCARD, 0, 32, false, 1 << 20, false);
    assert_eq!(r.what, Decoded::Reject(blk::VIRTIO_BLK_S_UNSUPP));
    // not a whole segment
    let (r, _) = request(&g, blk::VIRTIO_BLK_T_DISCARD, 0, 24, false, 1 << 20, false);
    assert_eq!(r.what, Decoded::Reject(blk::VIRTIO_BLK_S_IOERR));
}

/// Every limit the device advertises is enforced at decode, with the
/// status the spec and QEMU give.
#[test]
fn advertised_limits_are_enforced() {
    let g = Guest::new();
    let tight = Limits {
        seg_max: 2,
        size_max: 4096,
        max_discard_sectors: 16,
        max_discard_seg: 1,
        max_write_zeroes_sectors: 8,
        max_write_zeroes_seg: 1,
    };
    let rej = |r: blk::Request| match r.what {
        Decoded::Reject(s) => s,
        other => panic!("accepted: {other:?}"),
    };
    // a segment larger than size_max
    g.header(BUF, blk::VIRTIO_BLK_T_IN, 0);
    g.desc(DESC, 0, BUF, 16, VRING_DESC_F_NEXT, 1);
    g.desc(
        DESC,
        1,
        BUF + 0x1000,
        8192,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        2,
    );
    g.desc(DESC, 2, BUF + 0x100, 1, VRING_DESC_F_WRITE, 0);
    let mut iov = Vec::new();
    let segs = chain(&g, 0).unwrap();
    assert_eq!(
        rej(decode_with(&segs, &mut iov, 1 << 20, false, &tight)),
        blk::VIRTIO_BLK_S_IOERR
    );
    assert!(iov.is_empty());
    // within it: served
    assert!(matches!(
        decode(&segs, &mut iov, 1 << 20, false).what,
        Decoded::Io { .. }
    ));
    // more data segments than seg_max
    g.desc(
        DESC,
        1,
        BUF + 0x1000,
        512,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        2,
    );
    g.desc(
        DESC,
        2,
        BUF + 0x1200,
        512,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        3,
    );
    g.desc(
        DESC,
        3,
        BUF + 0x1400,
        512,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        4,
    );
    g.desc(DESC, 4, BUF + 0x100, 1, VRING_DESC_F_WRITE, 0);
    let segs = chain(&g, 0).unwrap();
    assert_eq!(
        rej(decode_with(&segs, &mut iov, 1 << 20, false, &tight)),
        blk::VIRTIO_BLK_S_IOERR
    );
    assert_eq!(segs.len(), 5);
    // discard and write-zeroes beyond their sector limits
    let seg = |n: u32| {
        let mut s = [0u8; 16];
        s[8..12].copy_from_slice(&n.to_le_bytes());
        g.write(BUF + 0x1000, &s);
    };
    for (ty, max) in [
        (blk::VIRTIO_BLK_T_DISCARD, 16),
        (blk::VIRTIO_BLK_T_WRITE_ZEROES, 8),
    ] {
        g.header(BUF, ty, 0);
        g.desc(DESC, 0, BUF, 16, VRING_DESC_F_NEXT, 1);
        g.desc(DESC, 1, BUF + 0x1000, 16, VRING_DESC_F_NEXT, 2);
        g.desc(DESC, 2, BUF + 0x100, 1, VRING_DESC_F_WRITE, 0);
        seg(max);
        let segs = chain(&g, 0).unwrap();
        assert!(matches!(
            decode_with(&segs, &mut iov, 1 << 20, false, &tight).what,
            Decoded::Io { .. }
        ));
        seg(max + 1);
        let segs = chain(&g, 0).unwrap();
        assert_eq!(
            rej(decode_with(&segs, &mut iov, 1 << 20, false, &tight)),
            blk::VIRTIO_BLK_S_IOERR
        );
    }
}

#[test]
fn get_id_fills_the_serial() {
    let g = Guest::new();
    let (r, iov) = request(&g, blk::VIRTIO_BLK_T_GET_ID, 0, 20, true, 1 << 20, false);
    assert_eq!(r.what, Decoded::GetId);
    let mut serial = [0u8; 20];
    serial[..5].copy_from_slice(b"abc12");
    // SAFETY: iov points at writable guest memory the test keeps mapped.
    unsafe { blk::fill_id(&iov, &serial) };
    assert_eq!(&g.read(BUF + 0x1000, 20)[..], &serial[..]);
}

/// A bdev that describes itself differently (it cannot discard, it wants
/// aligned buffers ...) and does what the bdev under it does.
pub(crate) struct WithInfo(pub quern_bdev::BdevRef, pub quern_bdev::BdevInfo);

impl quern_bdev::Bdev for WithInfo {
    fn info(&self) -> &quern_bdev::BdevInfo {
        &self.1
    }
    fn open_channel(
        &self,
        ring: &io_uring::IoUring,
        slot: u32,
    ) -> std::io::Result<Box<dyn quern_bdev::BdevChannel>> {
        self.0.open_channel(ring, slot)
    }
}

/// A request kind the bdev cannot do, sent although the feature was not
/// offered (discard to a bdev without it), completes with UNSUPP through
/// the whole queue path, and the queue goes on serving.
#[test]
fn a_kind_the_bdev_lacks_completes_unsupported() {
    use std::sync::Arc;

    use quern_bdev::drivers::MallocBdev;
    use quern_bdev::IoPoller;
    use quern_bdev::{BdevInfo, BdevRef, EngineConfig, IoEngine};

    let g = Guest::new();
    // head 0: a discard of sectors 0..8; head 3: a 4 KiB read
    g.header(BUF, blk::VIRTIO_BLK_T_DISCARD, 0);
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    g.write(BUF + 0x1000, &seg);
    g.desc(DESC, 0, BUF, 16, VRING_DESC_F_NEXT, 1);
    g.desc(DESC, 1, BUF + 0x1000, 16, VRING_DESC_F_NEXT, 2);
    g.desc(DESC, 2, BUF + 0x100, 1, VRING_DESC_F_WRITE, 0);
    g.header(BUF + 0x200, blk::VIRTIO_BLK_T_IN, 0);
    g.desc(DESC, 3, BUF + 0x200, 16, VRING_DESC_F_NEXT, 4);
    g.desc(
        DESC,
        4,
        BUF + 0x2000,
        4096,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        5,
    );
    g.desc(DESC, 5, BUF + 0x101, 1, VRING_DESC_F_WRITE, 0);
    g.write(BUF + 0x100, &[0xff, 0xff]);
    // avail ring: flags, idx 2, heads 0 and 3
    g.write(AVAIL, &[0, 0, 2, 0, 0, 0, 3, 0]);

    let ram: BdevRef = Arc::new(MallocBdev::new("ram", 1 << 20, 512, false).unwrap());
    let info = BdevInfo {
        supports_discard: false,
        ..ram.info().clone()
    };
    let mut io = IoEngine::new(EngineConfig::default()).unwrap();
    let dev = io.add_device(Arc::new(WithInfo(ram, info))).unwrap();
    let mut p = test_poller(g.queue(), &g.mem, dev, 1 << 20, false, None);
    for _ in 0..10_000 {
        cycle(&mut p, &mut io);
        if p.in_flight() == 0 && g.read(USED + 2, 2) == [2, 0] {
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    assert_eq!(g.read(USED + 2, 2), [2, 0], "both requests completed");
    assert_eq!(
        g.read(BUF + 0x100, 2),
        [blk::VIRTIO_BLK_S_UNSUPP, blk::VIRTIO_BLK_S_OK]
    );
}

/// With dirty logging on, a read whose buffer straddles page boundaries
/// and a GET_ID mark exactly: the read's data pages and its status byte's
/// page, the serial's page and its status page, and the used ring's page;
/// nothing else (the request headers, read by the device, are not). With
/// LOG_ALL off, nothing.
#[test]
fn dirty_logging_marks_exactly_the_pages_written() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use quern_bdev::drivers::MallocBdev;
    use quern_bdev::{BdevRef, EngineConfig, IoEngine};

    let run = |on: bool| -> Vec<u64> {
        let g = Guest::new();
        // head 0: read 8 KiB (sectors 0..16) from 0x100 bytes before a page
        // boundary: three pages
        let data = BUF + 0x3000 - 0x100;
        g.header(BUF, blk::VIRTIO_BLK_T_IN, 0);
        g.desc(DESC, 0, BUF, 16, VRING_DESC_F_NEXT, 1);
        g.desc(
            DESC,
            1,
            data,
            8192,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            2,
        );
        g.desc(DESC, 2, BUF + 0x8000, 1, VRING_DESC_F_WRITE, 0);
        // head 3: GET_ID into page BUF+0xa000, status in BUF+0xb000
        g.header(BUF + 0x100, blk::VIRTIO_BLK_T_GET_ID, 0);
        g.desc(DESC, 3, BUF + 0x100, 16, VRING_DESC_F_NEXT, 4);
        g.desc(
            DESC,
            4,
            BUF + 0xa000,
            20,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            5,
        );
        g.desc(DESC, 5, BUF + 0xb000, 1, VRING_DESC_F_WRITE, 0);
        g.write(AVAIL, &[0, 0, 2, 0, 0, 0, 3, 0]);
        let log = {
            let bytes = (GPA + MEM) / 4096 / 8 + 1;
            let f = crate::sys::sealed_memfd(c"log", bytes).unwrap();
            Arc::new(crate::dirty::DirtyLog::map(&f, bytes, 0).unwrap())
        };
        let dirty = crate::dirty::LogView {
            log: Some(log.clone()),
            on: Arc::new(AtomicBool::new(on)),
        };
        let ram: BdevRef = Arc::new(MallocBdev::new("ram", 1 << 20, 512, false).unwrap());
        let mut io = IoEngine::new(EngineConfig::default()).unwrap();
        let dev = io.add_device(ram).unwrap();
        let mut p = test_poller_logged(g.queue(), &g.mem, dev, 1 << 20, false, None, dirty);
        for _ in 0..1000 {
            cycle(&mut p, &mut io);
            if g.read(USED + 2, 2) == [2, 0] {
                break;
            }
        }
        assert_eq!(g.read(USED + 2, 2), [2, 0], "both requests completed");
        assert_eq!(g.read(BUF + 0x8000, 1), [blk::VIRTIO_BLK_S_OK]);
        assert_eq!(g.read(BUF + 0xb000, 1), [blk::VIRTIO_BLK_S_OK]);
        (0..(GPA + MEM) / 4096)
            .filter(|&p| log.is_marked(p))
            .collect()
    };
    let page = |gpa: u64| gpa / 4096;
    let want = vec![
        page(USED),
        page(BUF + 0x2000),
        page(BUF + 0x3000),
        page(BUF + 0x4000),
        page(BUF + 0x8000),
        page(BUF + 0xa000),
        page(BUF + 0xb000),
    ];
    assert_eq!(run(true), want);
    assert_eq!(run(false), Vec::<u64>::new());
}

/// A publish asked for the clock reads it once the used index is stored
/// (the end of the requests' time, taken in the shadow of its fence), keeps
/// a reading already taken in the cycle, and reads nothing when it has
/// nothing to publish.
#[test]
fn a_publish_reads_the_clock_only_when_it_publishes() {
    let g = Guest::new();
    let mut q = g.queue();
    let mut now = 0;
    assert!(!q.publish(Some(&mut now), false));
    assert_eq!(now, 0, "nothing published: no reading");
    q.push_used(0, 1);
    let before = quern_reactor::clock::ticks();
    q.publish(Some(&mut now), false);
    let after = quern_reactor::clock::ticks();
    assert_eq!(g.read(USED + 2, 2), [1, 0], "published");
    assert!((before..=after).contains(&now), "{before} {now} {after}");
    let first = now;
    q.push_used(3, 1);
    q.publish(Some(&mut now), false);
    assert_eq!(now, first, "the cycle's reading is kept");
    q.push_used(6, 1);
    q.publish(None, true);
    assert_eq!(g.read(USED + 2, 2), [3, 0], "published without a reading");
}

/// Without EVENT_IDX, a publish that the driver's NO_INTERRUPT flag
/// suppressed owes it one signal a millisecond later (a driver that does
/// not fence after clearing the flag may be asleep on it), or at once when
/// the reactor is about to sleep; only one per suppressed stretch.
#[test]
fn a_suppressed_publish_is_signalled_late_without_event_idx() {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use quern_bdev::drivers::MallocBdev;
    use quern_bdev::{BdevRef, EngineConfig, IoEngine, IoPoller};

    let g = Guest::new();
    let read = |head: u16, buf: u64| {
        g.header(buf, blk::VIRTIO_BLK_T_IN, 0);
        g.desc(DESC, head, buf, 16, VRING_DESC_F_NEXT, head + 1);
        g.desc(
            DESC,
            head + 1,
            buf + 0x1000,
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            head + 2,
        );
        g.desc(DESC, head + 2, buf + 0x800, 1, VRING_DESC_F_WRITE, 0);
    };
    read(0, BUF);
    read(3, BUF + 0x4000);
    // the driver polls: NO_INTERRUPT set; one request (head 0) available
    g.write(AVAIL, &[1, 0, 1, 0, 0, 0, 3, 0]);
    let ram: BdevRef = Arc::new(MallocBdev::new("ram", 1 << 20, 512, false).unwrap());
    let mut io = IoEngine::new(EngineConfig::default()).unwrap();
    let dev = io.add_device(ram).unwrap();
    let mut p = test_poller(g.queue(), &g.mem, dev, 1 << 20, false, None);
    let stats = p.stats_for_test();
    let notifies = || stats.notifies.load(Ordering::Relaxed);
    for _ in 0..1000 {
        cycle(&mut p, &mut io);
        if g.read(USED + 2, 2) == [1, 0] {
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    assert_eq!(g.read(USED + 2, 2), [1, 0], "completed");
    assert_eq!(notifies(), 0, "suppressed by the flag");
    cycle(&mut p, &mut io);
    assert_eq!(notifies(), 0, "not yet owed");
    std::thread::sleep(std::time::Duration::from_millis(3));
    cycle(&mut p, &mut io);
    assert_eq!(notifies(), 1, "owed after a millisecond");
    std::thread::sleep(std::time::Duration::from_millis(3));
    cycle(&mut p, &mut io);
    assert_eq!(notifies(), 1, "one signal per suppressed publish");

    // a second suppressed completion, then the reactor goes to sleep
    g.write(AVAIL + 2, &[2, 0]);
    for _ in 0..1000 {
        cycle(&mut p, &mut io);
        if g.read(USED + 2, 2) == [2, 0] {
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    assert_eq!(g.read(USED + 2, 2), [2, 0], "completed");
    assert_eq!(notifies(), 1);
    assert!(p.prepare_sleep(), "nothing left to do");
    p.end_cycle(&mut 0);
    assert_eq!(notifies(), 2, "paid before sleeping");
}

/// One generated chain for the fast-path equivalence property: a header,
/// data buffers and a status buffer, each with lengths and flags near the
/// valid ones, directly in a 256-entry ring or in an indirect table.
#[derive(Clone, Debug)]
struct NearChain {
    indirect: bool,
    ty: u32,
    sector: u64,
    hdr: (u32, u16),
    data: Vec<(u32, u16, bool)>,
    status: (u32, u16),
    read_only: bool,
    /// A descriptor whose `next` points back to the header (a loop).
    looped: bool,
}

fn near_chain() -> impl proptest::strategy::Strategy<Value = NearChain> {
    use proptest::prelude::*;
    let w = VRING_DESC_F_WRITE;
    let flags = prop_oneof![8 => Just(0u16), 8 => Just(w), 1 => Just(VRING_DESC_F_INDIRECT)];
    let data_len = prop_oneof![
        Just(512u32),
        Just(4096),
        Just(LIMITS.size_max),
        Just(LIMITS.size_max + 512),
        Just(0),
        Just(1),
        Just(1000),
    ];
    // (len, flags, address outside guest memory)
    let seg = (data_len, flags.clone(), proptest::bool::weighted(0.02));
    let count = prop_oneof![4 => 0usize..5, 1 => 120usize..130];
    let cap_sectors = (1u64 << 30) / 512;
    let sector = prop_oneof![
        Just(0u64),
        Just(cap_sectors - 8),
        Just(cap_sectors - 1),
        Just(cap_sectors),
        Just(u64::MAX / 512 + 1),
        any::<u64>(),
    ];
    let ty = prop_oneof![8 => Just(blk::VIRTIO_BLK_T_IN), 8 => Just(blk::VIRTIO_BLK_T_OUT),
        1 => Just(blk::VIRTIO_BLK_T_FLUSH), 1 => Just(blk::VIRTIO_BLK_T_GET_ID),
        1 => Just(blk::VIRTIO_BLK_T_DISCARD), 1 => Just(99u32)];
    let hdr = (
        prop_oneof![8 => Just(16u32), 1 => Just(15), 1 => Just(17)],
        flags.clone(),
    );
    let status = (
        prop_oneof![8 => Just(1u32), 1 => Just(2), 1 => Just(0)],
        flags,
    );
    (
        any::<bool>(),
        ty,
        sector,
        hdr,
        count.prop_flat_map(move |n| proptest::collection::vec(seg.clone(), n)),
        status,
        proptest::bool::weighted(0.2),
        proptest::bool::weighted(0.05),
    )
        .prop_map(
            |(indirect, ty, sector, hdr, data, status, read_only, looped)| NearChain {
                indirect,
                ty,
                sector,
                hdr,
                data,
                status,
                read_only,
                looped,
            },
        )
}

proptest::proptest! {
    /// Whatever `decode_fast` accepts, the general path (`chain` and
    /// `decode`) decodes to the same request and iovecs; and the plain
    /// shapes it is for, it does accept.
    #[test]
    fn fast_decoding_agrees_with_the_general_path(c in near_chain()) {
        const RING: u16 = 256;
        const HDR: u64 = GPA + 0x4000;
        const TABLE: u64 = GPA + 0x5000;
        let g = Guest::new();
        g.header(HDR, c.ty, c.sector);
        let mut descs: Vec<(u64, u32, u16)> = vec![(HDR, c.hdr.0, c.hdr.1)];
        for (k, &(len, flags, outside)) in c.data.iter().enumerate() {
            let addr = if outside { GPA + MEM - 256 } else { BUF + 512 * (k as u64 % 8) };
            descs.push((addr, len, flags));
        }
        descs.push((HDR + 16, c.status.0, c.status.1));
        let n = descs.len() as u16;
        let table = if c.indirect { TABLE } else { DESC };
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = i as u16;
            let last = i + 1 == n;
            let next = if c.looped && last { 0 } else { i + 1 };
            let flags = if last && !c.looped { flags } else { flags | VRING_DESC_F_NEXT };
            g.desc(table, i, addr, len, flags, next);
        }
        let q = g.ring(RING, DESC, AVAIL, USED).unwrap();
        let head = if c.indirect {
            g.desc(DESC, 200, TABLE, 16 * u32::from(n), VRING_DESC_F_INDIRECT, 0);
            200
        } else {
            0
        };
        let cap = 1u64 << 30;
        let mut iov = Vec::new();
        let fast = blk::decode_fast(&q, &g.mem, head, &mut iov, cap, c.read_only, &LIMITS);
        let mut segs = Vec::new();
        let walked = q.chain(&g.mem, head, &mut segs, LIMITS.seg_max as usize + 2);
        let mut slow_iov = Vec::new();
        let slow = match walked {
            Ok(Chain::Complete) => Some(decode_with(&segs, &mut slow_iov, cap, c.read_only, &LIMITS)),
            _ => None,
        };
        if let Some(f) = &fast {
            proptest::prop_assert_eq!(Some(f), slow.as_ref());
            let key = |v: &[libc::iovec]| -> Vec<(usize, usize)> {
                v.iter().map(|v| (v.iov_base as usize, v.iov_len)).collect()
            };
            proptest::prop_assert_eq!(key(&iov), key(&slow_iov));
        }
        // the plain shape: the fast path must take it
        let plain = !c.looped
            && !c.data.is_empty()
            && c.hdr == (16, 0)
            && c.status == (1, VRING_DESC_F_WRITE)
            && matches!(c.ty, blk::VIRTIO_BLK_T_IN | blk::VIRTIO_BLK_T_OUT)
            && !(c.read_only && c.ty == blk::VIRTIO_BLK_T_OUT)
            && matches!(&slow, Some(r) if matches!(r.what, Decoded::Io { .. }))
            && c.data.iter().all(|&(len, flags, _)| {
                len > 0 && flags == if c.ty == blk::VIRTIO_BLK_T_IN { VRING_DESC_F_WRITE } else { 0 }
            });
        if plain {
            proptest::prop_assert!(fast.is_some(), "a plain request took the general path");
        }
    }
}

/// Latency histograms switched on while a request is in flight: that
/// request (taken with no time) is not recorded; one taken after the
/// switch is, with the device's 20 ms delay. Switched off, nothing more is.
#[test]
fn histograms_switched_at_run_time_record_only_requests_taken_while_on() {
    use std::sync::Arc;

    use quern_bdev::drivers::{UringBdev, UringOptions};
    use quern_bdev::{EngineConfig, IoEngine, IoPoller};

    let dir = tempfile::Builder::new()
        .prefix("quern-vq")
        .tempdir_in("/var/tmp")
        .unwrap();
    let slow = UringBdev::open(&UringOptions {
        create_size: Some(1 << 20),
        direct: false,
        delay_us: 20_000,
        ..UringOptions::new("slow", dir.path().join("disk.img"))
    })
    .unwrap();
    let g = Guest::new();
    let mut io = IoEngine::new(EngineConfig {
        timing: false,
        ..EngineConfig::default()
    })
    .unwrap();
    let dev = io.add_device(Arc::new(slow)).unwrap();
    let mut p = test_poller(g.queue(), &g.mem, dev, 1 << 20, false, None);
    p.set_timing(false);
    let reads = p.stats_for_test();
    // head 0: a 4 KiB read, offered as avail entry `n`
    g.header(BUF, blk::VIRTIO_BLK_T_IN, 0);
    g.desc(DESC, 0, BUF, 16, VRING_DESC_F_NEXT, 1);
    g.desc(
        DESC,
        1,
        BUF + 0x1000,
        4096,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        2,
    );
    g.desc(DESC, 2, BUF + 0x100, 1, VRING_DESC_F_WRITE, 0);
    let run = |n: u16, p: &mut crate::queue::QueuePoller, io: &mut IoEngine, on: Option<bool>| {
        g.write(AVAIL + 4 + 2 * u64::from(n % QSIZE), &[0, 0]);
        g.write(AVAIL + 2, &(n + 1).to_le_bytes());
        cycle(p, io);
        assert_eq!(p.in_flight(), 1, "the read waits for the device");
        if let Some(on) = on {
            // what a reactor does on `metrics_set_histograms`
            io.set_timing(on);
            p.set_timing(on);
        }
        for _ in 0..10_000 {
            cycle(p, io);
            if p.in_flight() == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        assert_eq!(g.read(USED + 2, 2), (n + 1).to_le_bytes(), "completed");
    };
    run(0, &mut p, &mut io, Some(true));
    let count = || reads.latency[0].snapshot().count();
    assert_eq!(count(), 0, "taken before the switch: not recorded");
    run(1, &mut p, &mut io, None);
    let s = reads.latency[0].snapshot();
    assert_eq!(s.count(), 1);
    assert!((0.019..0.1).contains(&s.max().unwrap()), "{:?}", s.max());
    run(2, &mut p, &mut io, Some(false));
    run(3, &mut p, &mut io, None);
    assert_eq!(count(), 1, "nothing recorded while off");
}
