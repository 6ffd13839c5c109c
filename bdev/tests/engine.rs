//! The engine and its drivers, driven directly: round trips, refusals,
//! bouncing, failure splitting, and the merge equivalence property.

mod common;
use common::{ck, Put};

use std::sync::Arc;

use proptest::prelude::*;
use quern_bdev::drivers::{MallocBdev, NullBdev, UringBdev, UringOptions};
use quern_bdev::{
    BdevError, BdevRef, EngineConfig, IoEngine, IoKind, IoRequest, IoResult, MergeConfig,
};

fn engine(merge: bool) -> IoEngine {
    let cfg = EngineConfig {
        merge: MergeConfig {
            enabled: merge,
            max_bytes: 64 << 10,
            max_segments: 32,
        },
        max_requests: 256,
        ring_entries: 64,
        ..EngineConfig::default()
    };
    IoEngine::new(cfg).expect("io_uring")
}

fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

/// A 4 KiB-aligned buffer (for O_DIRECT without bouncing).
struct Aligned {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Self {
        let mut v = vec![fill; len + 4096];
        let off = v.as_mut_ptr().align_offset(4096);
        Aligned { v, off, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

fn one(
    e: &mut IoEngine,
    dev: u16,
    kind: IoKind,
    offset: u64,
    bufs: &mut [libc::iovec],
    len: u64,
) -> IoResult {
    let r = IoRequest {
        dev,
        kind,
        offset,
        len,
        iov: bufs,
        fua: false,
        cookie: ck(7),
    };
    e.put(&r)?;
    let mut out = None;
    e.run_until_idle(|c, res| {
        assert_eq!(c.tag(), 7);
        out = Some(res)
    });
    out.expect("completion")
}

fn temp_uring(direct: bool, size: u64) -> (tempfile::TempDir, BdevRef) {
    // /var/tmp is disk-backed where /tmp may be tmpfs (no O_DIRECT there)
    let dir = tempfile::Builder::new()
        .prefix("quern-bdev")
        .tempdir_in("/var/tmp")
        .unwrap();
    let b = UringBdev::open(&UringOptions {
        create_size: Some(size),
        direct,
        ..UringOptions::new("u", dir.path().join("disk.img"))
    })
    .unwrap();
    (dir, Arc::new(b))
}

#[test]
fn malloc_round_trip_and_zeroing() {
    let mut e = engine(true);
    let d = e
        .add_device(Arc::new(MallocBdev::new("m", 1 << 20, 512, false).unwrap()))
        .unwrap();
    let mut w = vec![0xabu8; 8192];
    assert_eq!(
        one(&mut e, d, IoKind::Write, 4096, &mut [iov(&mut w)], 8192),
        Ok(8192)
    );
    let mut r = vec![0u8; 8192];
    assert_eq!(
        one(&mut e, d, IoKind::Read, 4096, &mut [iov(&mut r)], 8192),
        Ok(8192)
    );
    assert_eq!(r, w);
    assert_eq!(
        one(&mut e, d, IoKind::WriteZeroes, 4096, &mut [], 4096),
        Ok(0)
    );
    assert_eq!(one(&mut e, d, IoKind::Discard, 8192, &mut [], 4096), Ok(0));
    assert_eq!(one(&mut e, d, IoKind::Flush, 0, &mut [], 0), Ok(0));
    assert_eq!(
        one(&mut e, d, IoKind::Read, 4096, &mut [iov(&mut r)], 8192),
        Ok(8192)
    );
    assert!(r.iter().all(|&b| b == 0));
}

#[test]
fn null_completes_without_touching_data() {
    let mut e = engine(true);
    let d = e
        .add_device(Arc::new(NullBdev::new("n", 1 << 30, 512, false)))
        .unwrap();
    let mut r = vec![0x5au8; 4096];
    assert_eq!(
        one(&mut e, d, IoKind::Read, 0, &mut [iov(&mut r)], 4096),
        Ok(4096)
    );
    assert!(r.iter().all(|&b| b == 0x5a));
}

#[test]
fn refusals_are_typed() {
    let mut e = engine(true);
    let rw = e
        .add_device(Arc::new(MallocBdev::new("m", 1 << 20, 512, false).unwrap()))
        .unwrap();
    let ro = e
        .add_device(Arc::new(MallocBdev::new("r", 1 << 20, 512, true).unwrap()))
        .unwrap();
    let mut b = vec![0u8; 4096];
    let mut v = [iov(&mut b)];
    assert!(matches!(
        one(&mut e, rw, IoKind::Read, 1 << 20, &mut v, 4096),
        Err(BdevError::OutOfRange { .. })
    ));
    assert!(matches!(
        one(&mut e, rw, IoKind::Read, 100, &mut v, 4096),
        Err(BdevError::Misaligned { .. })
    ));
    assert_eq!(
        one(&mut e, ro, IoKind::Write, 0, &mut v, 4096),
        Err(BdevError::ReadOnly {
            kind: IoKind::Write
        })
    );
    assert_eq!(
        one(&mut e, ro, IoKind::Discard, 0, &mut [], 4096),
        Err(BdevError::ReadOnly {
            kind: IoKind::Discard
        })
    );
    assert_eq!(one(&mut e, ro, IoKind::Read, 0, &mut v, 4096), Ok(4096));
    assert_eq!(
        one(&mut e, 9, IoKind::Read, 0, &mut v, 4096),
        Err(BdevError::NoDevice(9))
    );
    // length must match the buffers
    assert!(matches!(
        one(&mut e, rw, IoKind::Read, 0, &mut v, 8192),
        Err(BdevError::Short { .. })
    ));
}

#[test]
fn uring_direct_round_trip_discard_and_zeroes() {
    let (_dir, b) = temp_uring(true, 4 << 20);
    let mut e = engine(true);
    let d = e.add_device(b).unwrap();
    let mut w = Aligned::new(16384, 0x11);
    assert_eq!(
        one(&mut e, d, IoKind::Write, 8192, &mut [iov(w.buf())], 16384),
        Ok(16384)
    );
    assert_eq!(one(&mut e, d, IoKind::Flush, 0, &mut [], 0), Ok(0));
    let mut r = Aligned::new(16384, 0);
    assert_eq!(
        one(&mut e, d, IoKind::Read, 8192, &mut [iov(r.buf())], 16384),
        Ok(16384)
    );
    assert!(r.buf().iter().all(|&x| x == 0x11));
    assert_eq!(one(&mut e, d, IoKind::Discard, 8192, &mut [], 4096), Ok(0));
    assert_eq!(
        one(&mut e, d, IoKind::WriteZeroes, 12288, &mut [], 4096),
        Ok(0)
    );
    assert_eq!(
        one(&mut e, d, IoKind::Read, 8192, &mut [iov(r.buf())], 16384),
        Ok(16384)
    );
    assert!(r.buf()[..8192].iter().all(|&x| x == 0));
    assert!(r.buf()[8192..].iter().all(|&x| x == 0x11));
    // forced unit access (a writethrough device): fallocate linked to a sync
    e.put(&IoRequest {
        dev: d,
        kind: IoKind::WriteZeroes,
        offset: 16384,
        len: 4096,
        iov: &[],
        fua: true,
        cookie: ck(9),
    })
    .unwrap();
    let mut out = Vec::new();
    e.run_until_idle(|c, res| out.push((c, res)));
    assert_eq!(out, vec![(ck(9), Ok(0))]);
    assert_eq!(
        one(&mut e, d, IoKind::Read, 8192, &mut [iov(r.buf())], 16384),
        Ok(16384)
    );
    assert!(r.buf()[..12288].iter().all(|&x| x == 0));
    assert!(r.buf()[12288..].iter().all(|&x| x == 0x11));
    assert_eq!(e.stats().bounced_ops, 0);
}

#[test]
fn uring_bounces_misaligned_buffers() {
    let (_dir, b) = temp_uring(true, 1 << 20);
    let mut e = engine(true);
    let d = e.add_device(b.clone()).unwrap();
    let direct = b.info().buf_align > 1;
    // buffers at an odd address: O_DIRECT cannot take them as they are
    let mut raw = vec![0u8; 4096 + 1];
    for (i, x) in raw.iter_mut().enumerate() {
        *x = (i % 251) as u8;
    }
    let want = raw[1..].to_vec();
    assert_eq!(
        one(&mut e, d, IoKind::Write, 0, &mut [iov(&mut raw[1..])], 4096),
        Ok(4096)
    );
    let mut back = vec![0u8; 4096 + 3];
    assert_eq!(
        one(&mut e, d, IoKind::Read, 0, &mut [iov(&mut back[3..])], 4096),
        Ok(4096)
    );
    assert_eq!(&back[3..], &want[..]);
    if direct {
        assert_eq!(e.stats().bounced_ops, 2);
    }
}

/// A misaligned request larger than a bounce buffer used to replace a pool
/// buffer with one of its size on the reactor, for good (and panic if that
/// allocation failed). It is served through one buffer in pieces now; the
/// pool never grows.
#[test]
fn a_misaligned_request_larger_than_a_bounce_buffer_is_served_in_pieces() {
    let (_dir, b) = temp_uring(true, 8 << 20);
    if b.info().buf_align <= 1 {
        eprintln!("no O_DIRECT here: nothing bounces");
        return;
    }
    // bounce buffers are 128 KiB (merge.max_bytes is 64 KiB); one of them
    let mut e = IoEngine::new(EngineConfig {
        bounce_buffers: 1,
        merge: MergeConfig {
            enabled: true,
            max_bytes: 64 << 10,
            max_segments: 32,
        },
        ..EngineConfig::default()
    })
    .unwrap();
    let d = e.add_device(b).unwrap();
    let len = (3 << 20) + 4096; // 3 MiB + 4 KiB: 25 pieces
    let mut raw = vec![0u8; len + 1];
    for (i, x) in raw.iter_mut().enumerate() {
        *x = (i * 7 % 253) as u8;
    }
    let want = raw[1..].to_vec();
    assert_eq!(
        one(
            &mut e,
            d,
            IoKind::Write,
            4096,
            &mut [iov(&mut raw[1..])],
            len as u64
        ),
        Ok(len as u32)
    );
    // read back in two misaligned iovecs whose boundary is not a piece's
    let mut back = vec![0u8; len + 8];
    let (a, rest) = back.split_at_mut(100_003);
    let mut v = [iov(&mut a[3..]), iov(&mut rest[..len - 100_000])];
    assert_eq!(
        one(&mut e, d, IoKind::Read, 4096, &mut v, len as u64),
        Ok(len as u32)
    );
    let mut got = back[3..100_003].to_vec();
    got.extend_from_slice(&back[100_003..100_003 + len - 100_000]);
    assert!(got == want, "data differs after a read in pieces");
    let st = e.stats();
    assert_eq!(st.bounced_ops, 2);
    assert_eq!(st.bounced_in_pieces(), 2);
    // and a second request gets the (still one) buffer back
    assert_eq!(
        one(
            &mut e,
            d,
            IoKind::Read,
            0,
            &mut [iov(&mut back[1..4097])],
            4096
        ),
        Ok(4096)
    );
}

#[test]
fn missing_file_without_size_is_refused() {
    let err = UringBdev::open(&UringOptions::new("x", "/nonexistent/quern/x.img"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

/// Three consecutive writes fuse into one op; the middle one touches a bad
/// range, so the fused op fails and is re-run piecewise: only it fails.
#[test]
fn failed_fused_request_fails_only_the_bad_piece() {
    let mut e = engine(true);
    let m = Arc::new(
        MallocBdev::with_bad_range("m", 1 << 20, 512, false, Some((4096 + 512, 512))).unwrap(),
    );
    let d = e.add_device(m.clone()).unwrap();
    let mut bufs: Vec<Vec<u8>> = (0..3).map(|i| vec![i as u8 + 1; 4096]).collect();
    let iovs: Vec<libc::iovec> = bufs.iter_mut().map(|b| iov(b)).collect();
    for (i, v) in iovs.iter().enumerate() {
        let r = IoRequest {
            dev: d,
            kind: IoKind::Write,
            offset: i as u64 * 4096,
            len: 4096,
            iov: std::slice::from_ref(v),
            fua: false,
            cookie: ck(i as u64),
        };
        e.put(&r).unwrap();
    }
    let mut res = vec![None; 3];
    e.run_until_idle(|c, r| res[c.tag() as usize] = Some(r));
    assert_eq!(
        res,
        vec![
            Some(Ok(4096)),
            Some(Err(BdevError::Io(libc::EIO))),
            Some(Ok(4096))
        ]
    );
    assert_eq!(e.merge_stats().merged_ops, 1);
    assert_eq!(e.stats().split_retries, 1);
    let mut got = vec![0u8; 4096];
    m.read_at(8192, &mut got);
    assert!(got.iter().all(|&x| x == 3));
}

#[test]
fn merging_fuses_a_sequential_batch() {
    let mut e = engine(true);
    let d = e
        .add_device(Arc::new(MallocBdev::new("m", 1 << 20, 512, false).unwrap()))
        .unwrap();
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; 4096]).collect();
    let iovs: Vec<libc::iovec> = bufs.iter_mut().map(|b| iov(b)).collect();
    for (i, v) in iovs.iter().enumerate().rev() {
        let r = IoRequest {
            dev: d,
            kind: IoKind::Read,
            offset: i as u64 * 4096,
            len: 4096,
            iov: std::slice::from_ref(v),
            fua: false,
            cookie: ck(i as u64),
        };
        e.put(&r).unwrap();
    }
    let mut n = 0;
    e.run_until_idle(|_, r| {
        assert_eq!(r, Ok(4096));
        n += 1
    });
    assert_eq!(n, 8);
    let s = e.merge_stats();
    assert_eq!((s.requests_in, s.requests_out, s.bytes), (8, 1, 32768));
}

/// `submit_batch` caps the entries one kernel entry hands over: ten
/// scattered reads in one cycle enter three times at 4 each, once with no
/// cap; every read completes with its own data either way.
#[test]
fn submit_batch_splits_a_cycle_into_enters() {
    for (cap, enters) in [(4, 3), (1, 10), (0, 1)] {
        let (_dir, b) = temp_uring(false, 1 << 20);
        let mut e = IoEngine::new(EngineConfig {
            merge: MergeConfig {
                enabled: false,
                ..MergeConfig::default()
            },
            max_requests: 64,
            ring_entries: 64,
            submit_batch: cap,
            ..EngineConfig::default()
        })
        .unwrap();
        let d = e.add_device(b).unwrap();
        // a distinct byte per 4 KiB block, written one at a time
        for i in 0..10u64 {
            let mut w = vec![i as u8 + 1; 4096];
            let mut v = [iov(&mut w)];
            assert_eq!(
                one(&mut e, d, IoKind::Write, i * 8192, &mut v, 4096),
                Ok(4096)
            );
        }
        let before = e.stats().ring_enters;
        let mut bufs: Vec<Vec<u8>> = (0..10).map(|_| vec![0u8; 4096]).collect();
        let iovs: Vec<libc::iovec> = bufs.iter_mut().map(|b| iov(b)).collect();
        for (i, v) in iovs.iter().enumerate() {
            e.put(&IoRequest {
                dev: d,
                kind: IoKind::Read,
                offset: i as u64 * 8192,
                len: 4096,
                iov: std::slice::from_ref(v),
                fua: false,
                cookie: ck(i as u64),
            })
            .unwrap();
        }
        e.flush();
        assert_eq!(e.stats().ring_enters - before, enters, "submit_batch {cap}");
        let mut n = 0;
        e.run_until_idle(|_, r| {
            assert_eq!(r, Ok(4096));
            n += 1
        });
        assert_eq!(n, 10);
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8 + 1), "read {i}");
        }
    }
}

// ---- the property: merging changes nothing a client can see ----

#[derive(Clone, Debug)]
struct Req {
    kind: IoKind,
    block: u64,
    blocks: u64,
    segs: usize,
    fill: u8,
}

const BLOCKS: u64 = 64;
const BS: u64 = 512;

fn req_strategy() -> impl Strategy<Value = Req> {
    let kind = prop_oneof![
        8 => Just(IoKind::Write),
        8 => Just(IoKind::Read),
        1 => Just(IoKind::Flush),
        1 => Just(IoKind::Discard),
        1 => Just(IoKind::WriteZeroes),
    ];
    (kind, 0..BLOCKS, 1..9u64, 1..4usize, any::<u8>()).prop_map(
        |(kind, block, blocks, segs, fill)| Req {
            kind,
            block,
            blocks,
            segs,
            fill,
        },
    )
}

/// Run one batch; return per-request results, the data each read returned,
/// and the device contents after.
fn run_batch(
    dev: BdevRef,
    merge: bool,
    batch: &[Req],
    aligned: bool,
) -> (Vec<IoResult>, Vec<Vec<u8>>, Vec<u8>) {
    let mut e = engine(merge);
    let d = e.add_device(dev).unwrap();
    // every request's buffer, split into `segs` iovecs
    let mut store: Vec<Aligned> = batch
        .iter()
        .map(|r| {
            Aligned::new(
                (r.blocks * BS) as usize,
                if r.kind == IoKind::Write { r.fill } else { 0 },
            )
        })
        .collect();
    let mut iovs: Vec<Vec<libc::iovec>> = Vec::new();
    for (r, a) in batch.iter().zip(store.iter_mut()) {
        let buf = a.buf();
        let n = buf.len();
        let segs = if aligned {
            r.segs.min((n / BS as usize).max(1))
        } else {
            r.segs.min(n)
        };
        let unit = if aligned {
            (n / BS as usize / segs) * BS as usize
        } else {
            n / segs
        };
        let mut v = Vec::new();
        let mut off = 0;
        for s in 0..segs {
            let len = if s + 1 == segs { n - off } else { unit };
            v.push(iov(&mut buf[off..off + len]));
            off += len;
        }
        iovs.push(v);
    }
    let mut results: Vec<Option<IoResult>> = vec![None; batch.len()];
    for (i, r) in batch.iter().enumerate() {
        let (offset, len) = if r.kind == IoKind::Flush {
            (0, 0)
        } else {
            (r.block * BS, r.blocks * BS)
        };
        let data: &[libc::iovec] = if r.kind.has_data() { &iovs[i] } else { &[] };
        let req = IoRequest {
            dev: d,
            kind: r.kind,
            offset,
            len,
            iov: data,
            fua: false,
            cookie: ck(i as u64),
        };
        if let Err(err) = e.put(&req) {
            results[i] = Some(Err(err));
        }
    }
    e.run_until_idle(|c, res| results[c.tag() as usize] = Some(res));
    let reads = batch
        .iter()
        .zip(store.iter_mut())
        .map(|(r, a)| {
            if r.kind == IoKind::Read {
                a.buf().to_vec()
            } else {
                Vec::new()
            }
        })
        .collect();
    // contents: read the device back block by block through a fresh,
    // unmerged engine (an injected bad block reads as a marker)
    let mut e2 = engine(false);
    let d2 = e2.add_device(e.device_arc(d)).unwrap();
    let mut all = Aligned::new(((BLOCKS + 8) * BS) as usize, 0);
    for (blk, chunk) in all.buf().chunks_mut(BS as usize).enumerate() {
        let v = [iov(chunk)];
        let off = blk as u64 * BS;
        e2.put(&IoRequest {
            dev: d2,
            kind: IoKind::Read,
            offset: off,
            len: BS,
            iov: &v,
            fua: false,
            cookie: ck(0),
        })
        .unwrap();
        let mut failed = false;
        e2.run_until_idle(|_, r| failed = r.is_err());
        if failed {
            chunk.fill(0xee);
        }
    }
    (
        results
            .into_iter()
            .map(|r| r.expect("every request completes"))
            .collect(),
        reads,
        all.buf().to_vec(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn merging_is_invisible_on_malloc(batch in proptest::collection::vec(req_strategy(), 1..48), bad in proptest::option::of(0..BLOCKS)) {
        let cap = (BLOCKS + 8) * BS;
        let bad = bad.map(|b| (b * BS, BS));
        let a = Arc::new(MallocBdev::with_bad_range("a", cap, 512, false, bad).unwrap());
        let b = Arc::new(MallocBdev::with_bad_range("b", cap, 512, false, bad).unwrap());
        let plain = run_batch(a, false, &batch, false);
        let merged = run_batch(b, true, &batch, false);
        prop_assert_eq!(&plain.0, &merged.0);
        prop_assert_eq!(&plain.1, &merged.1);
        prop_assert!(plain.2 == merged.2, "device contents differ");
    }

    #[test]
    fn merging_is_invisible_on_uring(batch in proptest::collection::vec(req_strategy(), 1..32)) {
        let cap = (BLOCKS + 8) * BS;
        let (_da, a) = temp_uring(true, cap);
        let (_db, b) = temp_uring(true, cap);
        let plain = run_batch(a, false, &batch, true);
        let merged = run_batch(b, true, &batch, true);
        prop_assert_eq!(&plain.0, &merged.0);
        prop_assert_eq!(&plain.1, &merged.1);
        prop_assert!(plain.2 == merged.2, "device contents differ");
    }
}

/// A 1 MiB O_DIRECT uring bdev that delays every operation by `delay_us`.
fn slow_uring(delay_us: u32) -> (tempfile::TempDir, UringBdev) {
    let dir = tempfile::Builder::new()
        .prefix("quern-bdev")
        .tempdir_in("/var/tmp")
        .unwrap();
    let b = UringBdev::open(&UringOptions {
        create_size: Some(1 << 20),
        delay_us,
        ..UringOptions::new("slow", dir.path().join("disk.img"))
    })
    .unwrap();
    (dir, b)
}

#[test]
fn injected_delay_holds_each_request_and_keeps_data() {
    let (_dir, b) = slow_uring(30_000);
    let mut e = engine(true);
    let d = e.add_device(Arc::new(b)).unwrap();
    let mut w = vec![0x3cu8; 4096];
    let t0 = std::time::Instant::now();
    assert_eq!(
        one(&mut e, d, IoKind::Write, 8192, &mut [iov(&mut w)], 4096),
        Ok(4096)
    );
    let mut r = vec![0u8; 4096];
    assert_eq!(
        one(&mut e, d, IoKind::Read, 8192, &mut [iov(&mut r)], 4096),
        Ok(4096)
    );
    assert!(t0.elapsed() >= std::time::Duration::from_millis(60));
    assert_eq!(r, w);
}

/// Service-time histograms switched on while an operation is in flight:
/// that operation, which has no start time, is not recorded (it would
/// otherwise count from tick 0 and land in the top bucket); the next one
/// is, with its real time (the device's 20 ms delay).
#[test]
fn timing_switched_on_mid_flight_records_only_what_started_after() {
    let (_dir, b) = slow_uring(20_000);
    let mut e = IoEngine::new(EngineConfig {
        timing: false,
        ..EngineConfig::default()
    })
    .expect("io_uring");
    let d = e.add_device(Arc::new(b)).unwrap();
    let hist = e.device_latency(d).unwrap();
    let mut r = Aligned::new(4096, 0);
    let read = |e: &mut IoEngine, r: &mut Aligned, switch_on: bool| {
        e.put(&IoRequest {
            dev: d,
            kind: IoKind::Read,
            offset: 0,
            len: 4096,
            iov: &[iov(r.buf())],
            fua: false,
            cookie: ck(1),
        })
        .unwrap();
        e.flush();
        assert_eq!(e.in_flight(), 1);
        if switch_on {
            e.set_timing(true);
        }
        let mut done = 0;
        e.run_until_idle(|_, res| {
            assert_eq!(res, Ok(4096));
            done += 1
        });
        e.end_cycle(&mut 0);
        assert_eq!(done, 1);
    };
    read(&mut e, &mut r, true);
    assert!(e.timing());
    assert_eq!(hist.snapshot().count(), 0, "{:?}", hist.snapshot().max());
    read(&mut e, &mut r, false);
    let s = hist.snapshot();
    assert_eq!(s.count(), 1);
    let max = s.max().unwrap();
    assert!((0.019..0.1).contains(&max), "{max} s");
}
