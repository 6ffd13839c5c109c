//! Fuzzing the guest-facing path with proptest: arbitrary descriptor tables
//! (direct and indirect), avail rings, request headers and buffer contents
//! in a fake guest memory, run through the real [`QueuePoller`](crate::queue::QueuePoller) on an
//! [`IoEngine`] with a malloc disk.
//!
//! Each case checks that nothing panics, every request Quern accepts gets
//! exactly one used entry, nothing stays in flight, and no byte of guest
//! memory changes outside the used ring and the buffers the guest marked
//! device-writable.
//!
//! CI runs the default 256 cases (`cargo test -p quern-vhost fuzz`). For a
//! longer run: `PROPTEST_CASES=100000 cargo test --release -p quern-vhost
//! fuzz`. A failure prints the minimal case; add it to
//! `fuzz_regressions` below as a named test.

use std::sync::Arc;

use proptest::prelude::*;
use quern_bdev::drivers::MallocBdev;
use quern_bdev::IoPoller;
use quern_bdev::{EngineConfig, IoEngine};

use crate::tests::{cycle, Guest, GPA, MEM};
use crate::virtq::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

const QSIZE: u16 = 16;
const DESC: u64 = GPA;
const AVAIL: u64 = GPA + 0x1000;
const USED: u64 = GPA + 0x2000;
const INDIRECT: u64 = GPA + 0x3000;
const INDIRECT_N: u16 = 8;
/// Data buffers and request headers live here.
const POOL: u64 = GPA + 0x10000;
const POOL_LEN: u64 = 0x200000;
const HEADERS: u64 = 8;
const CAPACITY: u64 = 1 << 20;

#[derive(Clone, Debug)]
struct Desc {
    addr_kind: u8,
    addr_off: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[derive(Clone, Debug)]
struct Case {
    table: Vec<Desc>,
    indirect: Vec<Desc>,
    headers: Vec<(u32, u64)>,
    avail: Vec<u16>,
    pool_seed: u64,
    read_only: bool,
    event_idx: bool,
    /// Track requests in an in-flight region (as under QEMU).
    inflight: bool,
    /// Bytes the indirect table sits past a 16-byte boundary (the guest
    /// chooses its address; nothing may read it with a wide load).
    indirect_shift: u8,
    /// The disk wants 4 KiB-aligned buffers, so misaligned requests go
    /// through bounce buffers (in pieces when larger than one).
    bounce: bool,
    /// Dirty logging on (as during a live migration).
    log: bool,
}

fn desc() -> impl Strategy<Value = Desc> {
    (
        0u8..10,
        any::<u64>(),
        prop_oneof![
            Just(16u32),
            Just(1),
            Just(512),
            Just(4096),
            0u32..70000,
            // larger than a bounce buffer: served in pieces when bounced
            Just(300_032),
            Just(1 << 20),
            any::<u32>()
        ],
        prop_oneof![
            Just(VRING_DESC_F_NEXT),
            Just(VRING_DESC_F_WRITE),
            Just(VRING_DESC_F_NEXT | VRING_DESC_F_WRITE),
            Just(0),
            Just(VRING_DESC_F_INDIRECT),
            0u16..8,
        ],
        prop_oneof![0u16..QSIZE, any::<u16>()],
    )
        .prop_map(|(addr_kind, addr_off, len, flags, next)| Desc {
            addr_kind,
            addr_off,
            len,
            flags,
            next,
        })
}

fn case() -> impl Strategy<Value = Case> {
    let header = (
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(4),
            Just(8),
            Just(11),
            Just(13),
            any::<u32>()
        ],
        prop_oneof![
            Just(0u64),
            0u64..16,
            (CAPACITY / 512 - 16)..(CAPACITY / 512 + 16),
            any::<u64>()
        ],
    );
    (
        prop::collection::vec(desc(), QSIZE as usize),
        prop::collection::vec(desc(), INDIRECT_N as usize),
        prop::collection::vec(header, HEADERS as usize),
        prop::collection::vec(prop_oneof![0u16..QSIZE, any::<u16>()], 0..40),
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        (0u8..16, any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                table,
                indirect,
                headers,
                avail,
                pool_seed,
                read_only,
                event_idx,
                inflight,
                (indirect_shift, bounce, log),
            )| Case {
                table,
                indirect,
                headers,
                avail,
                pool_seed,
                read_only,
                event_idx,
                inflight,
                indirect_shift,
                bounce,
                log,
            },
        )
}

fn addr_of(c: &Case, d: &Desc) -> u64 {
    // Only indirect descriptors point at the indirect table: a device write
    // (a status byte) into a descriptor table would change the chains the
    // case describes under the harness' feet.
    match d.addr_kind {
        7 if d.flags & VRING_DESC_F_INDIRECT == 0 => POOL + d.addr_off % POOL_LEN,
        0..=3 => POOL + (d.addr_off % POOL_LEN) / 512 * 512,
        4 => POOL + d.addr_off % POOL_LEN,
        5 | 6 => POOL + (d.addr_off % HEADERS) * 0x1000,
        7 => indirect(c),
        8 => GPA + MEM - (d.addr_off % 64),
        _ => d.addr_off,
    }
}

fn indirect(c: &Case) -> u64 {
    INDIRECT + u64::from(c.indirect_shift)
}

/// Byte ranges (guest-physical) the device may write for this case.
fn writable(c: &Case) -> Vec<(u64, u64)> {
    let mut w = vec![(USED, USED + 6 + 8 * u64::from(QSIZE))];
    for d in c.table.iter().chain(&c.indirect) {
        if d.flags & VRING_DESC_F_WRITE != 0 {
            let a = addr_of(c, d);
            w.push((a, a.saturating_add(u64::from(d.len))));
        }
    }
    w
}

fn lay_out(g: &Guest, c: &Case) {
    let mut x = c.pool_seed | 1;
    let pool: Vec<u8> = (0..POOL_LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    g.write(POOL, &pool);
    for (i, &(ty, sector)) in c.headers.iter().enumerate() {
        g.header(POOL + i as u64 * 0x1000, ty, sector);
    }
    for (i, d) in c.table.iter().enumerate() {
        g.desc(DESC, i as u16, addr_of(c, d), d.len, d.flags, d.next);
    }
    for (i, d) in c.indirect.iter().enumerate() {
        let len = if d.flags & VRING_DESC_F_INDIRECT != 0 {
            u32::from(INDIRECT_N) * 16
        } else {
            d.len
        };
        g.desc(
            indirect(c),
            i as u16,
            addr_of(c, d),
            len,
            d.flags,
            d.next % 10,
        );
    }
    // indirect descriptors in the main table point at the whole table
    for (i, d) in c.table.iter().enumerate() {
        if d.flags & VRING_DESC_F_INDIRECT != 0 && d.addr_kind == 7 {
            g.desc(
                DESC,
                i as u16,
                indirect(c),
                u32::from(INDIRECT_N) * 16,
                d.flags,
                d.next,
            );
        }
    }
    let mut avail = vec![0u8; 4 + 2 * QSIZE as usize + 2];
    for (i, &h) in c.avail.iter().take(QSIZE as usize).enumerate() {
        avail[4 + 2 * i..6 + 2 * i].copy_from_slice(&h.to_le_bytes());
    }
    let n = c.avail.len().min(QSIZE as usize) as u16;
    avail[2..4].copy_from_slice(&n.to_le_bytes());
    g.write(AVAIL, &avail);
}

fn run(c: &Case) {
    let g = Guest::new();
    lay_out(&g, c);
    let before = g.read(GPA, MEM as usize);
    let mut q = g
        .ring(QSIZE, DESC, AVAIL, USED)
        .expect("ring inside memory");
    q.event_idx = c.event_idx;
    // small merges, so bounce buffers are their 128 KiB minimum and large
    // misaligned requests are served in pieces
    let cfg = EngineConfig {
        merge: quern_bdev::MergeConfig {
            max_bytes: 4096,
            ..Default::default()
        },
        bounce_buffers: 2,
        ..EngineConfig::default()
    };
    let mut io = IoEngine::new(cfg).unwrap();
    let ram: quern_bdev::BdevRef = Arc::new(MallocBdev::new("m", CAPACITY, 512, false).unwrap());
    let bdev: quern_bdev::BdevRef = if c.bounce {
        // a RAM disk that asks for 4 KiB-aligned buffers, as an O_DIRECT
        // file does, so the engine bounces what is not aligned
        let info = quern_bdev::BdevInfo {
            buf_align: 4096,
            ..ram.info().clone()
        };
        Arc::new(crate::tests::WithInfo(ram, info))
    } else {
        ram
    };
    let dev = io.add_device(bdev).unwrap();
    let region = c.inflight.then(|| {
        let (f, size) = crate::inflight::create(1, QSIZE, 1).unwrap();
        Arc::new(crate::inflight::InflightRegion::map(&f, size, 0, 1, QSIZE, 1).unwrap())
    });
    let tracker = region.as_ref().map(|r| {
        let mut q = r.queue(0, QSIZE).unwrap();
        assert_eq!(q.recover(0), None, "a fresh region");
        q
    });
    let dirty = crate::dirty::LogView {
        log: Some(Arc::new({
            let bytes = (GPA + MEM) / 4096 / 8 + 1;
            let f = crate::sys::sealed_memfd(c"fuzz-log", bytes).unwrap();
            crate::dirty::DirtyLog::map(&f, bytes, 0).unwrap()
        })),
        on: Arc::new(std::sync::atomic::AtomicBool::new(c.log)),
    };
    let mut p = crate::tests::test_poller_logged(
        q,
        &g.mem,
        dev,
        CAPACITY,
        c.read_only,
        tracker,
        dirty.clone(),
    );
    for _ in 0..100 {
        cycle(&mut p, &mut io);
        if p.in_flight() == 0 && p.q.last_avail == p.q.avail_idx() {
            break;
        }
    }
    assert_eq!(p.in_flight(), 0, "requests left in flight");
    assert_eq!(io.in_flight(), 0, "engine requests left in flight");
    let popped = c.avail.len().min(QSIZE as usize) as u16;
    if !p.broken {
        assert_eq!(p.q.last_avail, popped, "every avail entry was taken");
    }
    // every used entry names a head the guest offered
    let used = g.read(USED, 4 + 8 * QSIZE as usize);
    let used_idx = u16::from_le_bytes([used[2], used[3]]);
    assert!(used_idx <= popped);
    for i in 0..used_idx as usize {
        let id = u32::from_le_bytes(used[4 + 8 * i..8 + 8 * i].try_into().unwrap());
        assert!(id < u32::from(QSIZE), "used entry {i} names head {id}");
        assert!(c
            .avail
            .iter()
            .take(QSIZE as usize)
            .any(|&h| u32::from(h) == id));
    }
    // the in-flight region agrees: nothing marked, its used index is the
    // ring's, so a restart now would resubmit nothing and resume exactly
    // after the entries taken
    if let Some(r) = &region {
        let mut again = r.queue(0, QSIZE).unwrap();
        assert_eq!(
            again.recover(used_idx),
            Some(vec![]),
            "in-flight marks left behind"
        );
        if !p.broken {
            assert_eq!(
                used_idx, p.q.last_avail,
                "every taken entry is on the used ring"
            );
        }
    }
    // nothing written outside what the guest allowed
    let after = g.read(GPA, MEM as usize);
    let allowed = writable(c);
    let log = dirty.log.as_ref().unwrap();
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if a != b {
            let gpa = GPA + i as u64;
            assert!(
                allowed.iter().any(|&(s, e)| gpa >= s && gpa < e),
                "byte at {gpa:#x} changed ({a:#x} -> {b:#x}) outside device-writable buffers"
            );
            // logging on: every page written is marked
            assert!(
                !c.log || log.is_marked(gpa / 4096),
                "byte at {gpa:#x} changed but its page is not in the dirty log"
            );
        }
    }
    // and only pages the device may write (its buffers, the used ring)
    // are; with logging off, none
    let used_ring = (USED, USED + 6 + 8 * u64::from(QSIZE));
    for page in 0..(GPA + MEM) / 4096 {
        if log.is_marked(page) {
            assert!(c.log, "page {page} marked with logging off");
            let (s, e) = (page * 4096, page * 4096 + 4096);
            assert!(
                allowed
                    .iter()
                    .chain(std::iter::once(&used_ring))
                    .any(|&(a, b)| a < e && b > s),
                "page {page} marked but the device may write nothing in it"
            );
        }
    }
}

proptest! {
    #[test]
    fn fuzz_arbitrary_rings_never_break_the_queue(c in case()) {
        run(&c);
    }
}

/// Cases the fuzzer found, kept as named tests.
mod fuzz_regressions {
    use super::*;

    fn looping(n: usize) -> Vec<Desc> {
        (0..n)
            .map(|_| Desc {
                addr_kind: 0,
                addr_off: 0,
                len: 16,
                flags: VRING_DESC_F_NEXT,
                next: 0,
            })
            .collect()
    }

    /// A guest offering a head again before its (malformed) first use was
    /// published chained the head to itself in the in-flight batch list, so
    /// another head's mark was never cleared: a restart would have
    /// resubmitted a request the guest already had back. Found by
    /// `fuzz_arbitrary_rings_never_break_the_queue` with in-flight tracking.
    #[test]
    fn head_offered_twice_in_one_cycle_leaves_no_mark() {
        run(&Case {
            table: looping(QSIZE as usize),
            indirect: looping(INDIRECT_N as usize),
            headers: vec![(0, 0); HEADERS as usize],
            avail: vec![0, 15, 15],
            pool_seed: 0,
            read_only: false,
            event_idx: false,
            inflight: true,
            indirect_shift: 0,
            bounce: false,
            log: true,
        });
    }
}
