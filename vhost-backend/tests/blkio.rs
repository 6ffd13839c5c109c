//! vhost-user-blk devices against a real vhost-user client: libblkio's
//! `virtio-blk-vhost-user` driver (the `blkio` crate).

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use quern_bdev::drivers::{MallocBdev, Qcow2Bdev, Qcow2Options};
use quern_bdev::poller::{spawn_io_reactor, IoStats};
use quern_bdev::{BdevRef, EngineConfig, IoReactor};
use quern_reactor::{PollMode, ReactorConfig};
use quern_vhost::{serve, DeviceConfig, DeviceHandle, QueueBinding};

struct Served {
    reactors: Vec<Arc<IoReactor>>,
    io_stats: Vec<Arc<IoStats>>,
    dev: DeviceHandle,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.dev.stop();
        for r in &self.reactors {
            r.stop();
        }
    }
}

fn start(bdev: BdevRef, queues: u16, read_only: bool, mode: PollMode) -> Served {
    start_with(bdev, queues, read_only, mode, true)
}

fn start_with(
    bdev: BdevRef,
    queues: u16,
    read_only: bool,
    mode: PollMode,
    event_idx: bool,
) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vub.sock");
    let (reactors, io_stats): (Vec<_>, Vec<_>) = (0..2)
        .map(|id| {
            spawn_io_reactor(
                ReactorConfig {
                    id,
                    core: Some(id % quern_reactor::available_cores().len()),
                    mode,
                    idle_spin: Duration::from_micros(200),
                },
                EngineConfig::default(),
            )
            .unwrap()
        })
        .unzip();
    let handles: Vec<u16> = reactors
        .iter()
        .map(|r| {
            let b = bdev.clone();
            r.call(move |w| w.io.add_device(b).unwrap()).unwrap()
        })
        .collect();
    let cfg = DeviceConfig {
        name: "vd0".into(),
        socket: socket.clone(),
        num_queues: queues,
        queue_size: 256,
        read_only,
        serial: "quern-test-serial".into(),
        binding: QueueBinding::RoundRobin(vec![0, 1]),
        timing: true,
        event_idx,
        qos: quern_vhost::qos::QosBinding::unlimited("test"),
    };
    let dev = serve(cfg, bdev, reactors.clone(), handles).unwrap();
    Served {
        reactors,
        io_stats,
        dev,
        _dir: dir,
        socket,
    }
}

struct Client {
    b: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

fn connect(socket: &Path, queues: i32, read_only: bool) -> Client {
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", socket.to_str().unwrap()).unwrap();
    if read_only {
        b.set_bool("read-only", true).unwrap();
    }
    b.connect().unwrap();
    b.set_i32("num-queues", queues).unwrap();
    let out = b.start().unwrap();
    let region = b.alloc_mem_region(4 << 20).unwrap();
    b.map_mem_region(&region).unwrap();
    Client {
        b,
        queues: out.queues,
        region,
    }
}

impl Client {
    #[allow(clippy::mut_from_ref)] // the region is memory shared with the device
    fn buf(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.region.len);
        // SAFETY: inside the region we allocated; tests use disjoint ranges.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }

    fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        let mut got = Vec::new();
        while got.len() < n {
            let mut t = Duration::from_secs(10);
            let k = self.queues[q]
                .do_io(&mut comps[got.len()..], 1, Some(&mut t), None)
                .unwrap();
            assert!(k > 0, "timed out waiting for completions");
            for c in &comps[got.len()..got.len() + k] {
                // SAFETY: do_io initialised the first k entries.
                let c = unsafe { c.assume_init_read() };
                got.push((c.user_data, c.ret));
            }
        }
        got
    }
}

fn malloc(size: u64) -> BdevRef {
    Arc::new(MallocBdev::new("m", size, 512, false).unwrap())
}

#[test]
fn patterns_round_trip_on_two_queues_with_mixed_sizes() {
    let s = start(malloc(64 << 20), 2, false, PollMode::Adaptive);
    let mut c = connect(&s.socket, 2, false);
    assert_eq!(c.b.get_u64("capacity").unwrap(), 64 << 20);
    let sizes = [512usize, 4096, 65536, 8192, 1024, 131072];
    let mut off = 0u64;
    let mut plan = Vec::new();
    for (i, &sz) in sizes.iter().enumerate() {
        let q = i % 2;
        let boff = i * 262144;
        for (k, x) in c.buf(boff, sz).iter_mut().enumerate() {
            *x = (k as u8).wrapping_mul(31).wrapping_add(i as u8 * 7 + 1);
        }
        let p = c.buf(boff, sz).as_mut_ptr();
        c.queues[q].write(off, p, sz, i, ReqFlags::empty());
        plan.push((q, off, sz, boff));
        off += sz as u64 + 4096;
    }
    for q in 0..2 {
        for (_, r) in c.wait(q, 3) {
            assert_eq!(r, 0);
        }
    }
    c.queues[0].flush(100, ReqFlags::empty());
    assert_eq!(c.wait(0, 1), vec![(100, 0)]);
    for (i, &(q, off, sz, boff)) in plan.iter().enumerate() {
        let rb = 2 << 20;
        c.buf(rb, sz).fill(0);
        let p = c.buf(rb, sz).as_mut_ptr();
        c.queues[1 - q].read(off, p, sz, i, ReqFlags::empty());
        assert_eq!(c.wait(1 - q, 1), vec![(i, 0)]);
        assert!(
            c.buf(rb, sz) == c.buf(boff, sz),
            "request {i} read back different data"
        );
    }
    // both queues really ran, on two different reactors
    let q0 = &s.dev.queues[0];
    let q1 = &s.dev.queues[1];
    assert!(q0.completed.load(Ordering::Relaxed) > 0 && q1.completed.load(Ordering::Relaxed) > 0);
    assert_ne!(
        q0.reactor.load(Ordering::Relaxed),
        q1.reactor.load(Ordering::Relaxed)
    );
}

/// A device that does not offer EVENT_IDX (`event_idx = false`, for
/// polling clients): the client falls back to the ring flags, and a client
/// that sleeps for its completions still gets woken for every batch (the
/// device signals through the call fd when the flags allow), in interrupt
/// mode too, with every block read back as written.
#[test]
fn without_event_idx_requests_and_interrupts_still_flow() {
    for mode in [PollMode::Busy, PollMode::Interrupt] {
        let s = start_with(malloc(16 << 20), 2, false, mode, false);
        let mut c = connect(&s.socket, 2, false);
        for round in 0..50u64 {
            for q in 0..2 {
                for k in 0..8usize {
                    let slot = q * 8 + k;
                    let b = c.buf(slot * 4096, 4096);
                    b.fill((round as u8) ^ (slot as u8));
                    let p = b.as_mut_ptr();
                    let off = ((round * 16 + slot as u64) % 4096) * 4096;
                    c.queues[q].write(off, p, 4096, slot, ReqFlags::empty());
                }
            }
            for q in 0..2 {
                assert!(c.wait(q, 8).iter().all(|&(_, r)| r == 0));
            }
            for q in 0..2 {
                for k in 0..8usize {
                    let slot = q * 8 + k;
                    let rb = (1 << 20) + slot * 4096;
                    c.buf(rb, 4096).fill(0xee);
                    let p = c.buf(rb, 4096).as_mut_ptr();
                    let off = ((round * 16 + slot as u64) % 4096) * 4096;
                    c.queues[1 - q].read(off, p, 4096, slot, ReqFlags::empty());
                }
            }
            for q in 0..2 {
                assert!(c.wait(q, 8).iter().all(|&(_, r)| r == 0));
            }
            for slot in 0..16usize {
                let want = (round as u8) ^ (slot as u8);
                assert!(
                    c.buf((1 << 20) + slot * 4096, 4096)
                        .iter()
                        .all(|&x| x == want),
                    "{mode:?} round {round} slot {slot}"
                );
            }
        }
        // the queues publish their counters once per cycle
        let t0 = std::time::Instant::now();
        while s
            .dev
            .queues
            .iter()
            .any(|q| q.completed.load(Ordering::Relaxed) < 800)
            && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        for q in &s.dev.queues {
            assert_eq!(q.completed.load(Ordering::Relaxed), 800, "{mode:?}");
            assert!(
                q.notifies.load(Ordering::Relaxed) > 0,
                "{mode:?}: no call signalled"
            );
        }
    }
}

#[test]
fn discard_and_write_zeroes_clear_data() {
    let s = start(malloc(16 << 20), 1, false, PollMode::Busy);
    let mut c = connect(&s.socket, 1, false);
    c.buf(0, 65536).fill(0xcd);
    let p = c.buf(0, 65536).as_mut_ptr();
    c.queues[0].write(0, p, 65536, 1, ReqFlags::empty());
    assert_eq!(c.wait(0, 1), vec![(1, 0)]);
    c.queues[0].discard(0, 8192, 2, ReqFlags::empty());
    c.queues[0].write_zeroes(16384, 4096, 3, ReqFlags::empty());
    let mut r = c.wait(0, 2);
    r.sort();
    assert_eq!(r, vec![(2, 0), (3, 0)]);
    let p = c.buf(65536, 65536).as_mut_ptr();
    c.queues[0].read(0, p, 65536, 4, ReqFlags::empty());
    assert_eq!(c.wait(0, 1), vec![(4, 0)]);
    let back = c.buf(65536, 65536).to_vec();
    assert!(back[..8192].iter().all(|&x| x == 0));
    assert!(back[8192..16384].iter().all(|&x| x == 0xcd));
    assert!(back[16384..20480].iter().all(|&x| x == 0));
    assert!(back[20480..].iter().all(|&x| x == 0xcd));
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_data() {
    let s = start(malloc(16 << 20), 1, true, PollMode::Adaptive);
    let mut c = connect(&s.socket, 1, true);
    c.buf(0, 4096).fill(1);
    // the client refuses writes to a read-only device itself; reads work
    let p = c.buf(0, 4096).as_mut_ptr();
    c.queues[0].read(0, p, 4096, 1, ReqFlags::empty());
    assert_eq!(c.wait(0, 1), vec![(1, 0)]);
    assert!(c.buf(0, 4096).iter().all(|&x| x == 0));
}

#[test]
fn out_of_range_read_fails_and_device_keeps_serving() {
    let s = start(malloc(1 << 20), 1, false, PollMode::Adaptive);
    let mut c = connect(&s.socket, 1, false);
    let p = c.buf(0, 4096).as_mut_ptr();
    c.queues[0].read(1 << 20, p, 4096, 1, ReqFlags::empty());
    let r = c.wait(0, 1);
    assert_eq!(r.len(), 1);
    assert_ne!(r[0].1, 0, "reading past capacity must fail");
    c.queues[0].read(0, p, 4096, 2, ReqFlags::empty());
    assert_eq!(c.wait(0, 1), vec![(2, 0)]);
}

#[test]
fn reconnect_after_client_goes_away() {
    let s = start(malloc(16 << 20), 2, false, PollMode::Adaptive);
    for round in 0..3u8 {
        let mut c = connect(&s.socket, 2, false);
        c.buf(0, 4096).fill(round + 1);
        let p = c.buf(0, 4096).as_mut_ptr();
        c.queues[round as usize % 2].write(u64::from(round) * 4096, p, 4096, 1, ReqFlags::empty());
        assert_eq!(c.wait(round as usize % 2, 1), vec![(1, 0)]);
        drop(c);
    }
    let mut c = connect(&s.socket, 1, false);
    let p = c.buf(0, 3 * 4096).as_mut_ptr();
    c.queues[0].read(0, p, 3 * 4096, 9, ReqFlags::empty());
    assert_eq!(c.wait(0, 1), vec![(9, 0)]);
    let back = c.buf(0, 3 * 4096).to_vec();
    for round in 0..3 {
        assert!(back[round * 4096..(round + 1) * 4096]
            .iter()
            .all(|&x| x == round as u8 + 1));
    }
    assert!(s.dev.connections.load(Ordering::Relaxed) >= 4);
}

/// Two client threads, one per queue, under sustained load: the device's two
/// queues are bound to two reactors, and each reactor carries one queue's
/// I/O (its own completion counters grow).
#[test]
fn two_queues_run_on_two_reactors_under_load() {
    let s = start(malloc(64 << 20), 2, false, PollMode::Adaptive);
    let c = connect(&s.socket, 2, false);
    let Client { b, queues, region } = c;
    let before: Vec<u64> = s
        .io_stats
        .iter()
        .map(|r| r.snapshot().ios_completed)
        .collect();
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            let base = region.addr + qi * (1 << 20);
            std::thread::spawn(move || {
                let mut comps: Vec<MaybeUninit<Completion>> =
                    (0..16).map(|_| MaybeUninit::uninit()).collect();
                let mut done = 0usize;
                let mut inflight = 0usize;
                let mut next = 0usize;
                while done < 4000 {
                    while inflight < 16 && next < 4000 {
                        let slot = next % 16;
                        let off = ((next * 7919) % 8192) as u64 * 4096;
                        let p = (base + slot * 4096) as *mut u8;
                        if next.is_multiple_of(2) {
                            q.write(off, p, 4096, next, ReqFlags::empty());
                        } else {
                            q.read(off, p, 4096, next, ReqFlags::empty());
                        }
                        next += 1;
                        inflight += 1;
                    }
                    let mut t = Duration::from_secs(10);
                    let k = q.do_io(&mut comps, 1, Some(&mut t), None).unwrap();
                    assert!(k > 0, "queue {qi} stalled");
                    for c in &comps[..k] {
                        // SAFETY: do_io filled k entries.
                        assert_eq!(unsafe { c.assume_init_read() }.ret, 0);
                    }
                    done += k;
                    inflight -= k;
                }
                q
            })
        })
        .collect();
    let queues: Vec<Blkioq> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let q0 = s.dev.queues[0].reactor.load(Ordering::Relaxed);
    let q1 = s.dev.queues[1].reactor.load(Ordering::Relaxed);
    assert_ne!(q0, q1, "the two queues share a reactor");
    for (qi, q) in s.dev.queues.iter().enumerate() {
        assert_eq!(q.completed.load(Ordering::Relaxed), 4000, "queue {qi}");
    }
    for (ri, r) in s.io_stats.iter().enumerate() {
        let grew = r.snapshot().ios_completed - before[ri];
        assert!(grew >= 4000, "reactor {ri} completed only {grew} requests");
    }
    drop(queues);
    drop(b);
}

/// The device offers only what its bdev does. A read-only bdev makes a
/// read-only device even when the device section does not say so: libblkio
/// then refuses a writable connection itself, and the device offers no
/// discard or write-zeroes (libblkio refuses them before they reach it). A
/// qcow2 overlay offers both, and they do what they say on allocated
/// clusters (the overlay's own tests cover the rest).
#[test]
fn features_follow_the_bdev() {
    let ro: BdevRef = Arc::new(MallocBdev::new("ro", 1 << 20, 512, true).unwrap());
    let s = start(ro, 1, false, PollMode::Adaptive);
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", s.socket.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    let e = b
        .start()
        .err()
        .expect("a writable start on a read-only device");
    assert!(format!("{e:?}").contains("read-only"), "{e:?}");
    drop(b);
    let mut c = connect(&s.socket, 1, true);
    let p = c.buf(0, 4096).as_mut_ptr();
    c.queues[0].read(0, p, 4096, 1, ReqFlags::empty());
    assert_eq!(c.wait(0, 1), vec![(1, 0)]);
    c.queues[0].discard(0, 4096, 2, ReqFlags::empty());
    c.queues[0].write_zeroes(0, 4096, 3, ReqFlags::empty());
    let mut r = c.wait(0, 2);
    r.sort();
    assert_eq!(r, vec![(2, -libc::ENOTSUP), (3, -libc::ENOTSUP)]);
    drop(c);
    drop(s);

    let dir = tempfile::tempdir().unwrap();
    let ov: BdevRef = Arc::new(
        Qcow2Bdev::open(&Qcow2Options {
            name: "ov".into(),
            path: dir.path().join("ov.qcow2"),
            base: malloc(4 << 20),
            size: None,
            cluster_size: 65536,
            copy_on_read: false,
            read_only: false,
            direct: false,
        })
        .unwrap(),
    );
    let s = start(ov, 1, false, PollMode::Adaptive);
    let mut c = connect(&s.socket, 1, false);
    c.buf(0, 16384).fill(0x5a);
    let p = c.buf(0, 16384).as_mut_ptr();
    c.queues[0].write(65536, p, 16384, 1, ReqFlags::empty());
    assert_eq!(c.wait(0, 1), vec![(1, 0)]);
    c.queues[0].write_zeroes(65536 + 4096, 4096, 2, ReqFlags::empty());
    c.queues[0].discard(65536 + 12288, 4096, 3, ReqFlags::empty());
    let mut r = c.wait(0, 2);
    r.sort();
    assert_eq!(r, vec![(2, 0), (3, 0)]);
    let q = c.buf(16384, 16384).as_mut_ptr();
    c.queues[0].read(65536, q, 16384, 4, ReqFlags::empty());
    assert_eq!(c.wait(0, 1), vec![(4, 0)]);
    let got = c.buf(16384, 16384);
    for (k, want) in [0x5a, 0, 0x5a, 0].into_iter().enumerate() {
        assert!(
            got[k * 4096..(k + 1) * 4096].iter().all(|&x| x == want),
            "4 KiB block {k} is not {want:#x}"
        );
    }
}
