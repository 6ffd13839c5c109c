//! A hostile frontend: semi-valid vhost-user message sequences sent to a
//! real device (its real protocol handler, real reactors), over a real
//! socket, with real memfds for guest memory: handshakes with random
//! feature bits, memory tables and ADD_MEM_REG/REM_MEM_REG of random
//! geometry, vrings with random sizes, addresses and bases, kicks over
//! random ring contents, config reads and writes at random offsets,
//! in-flight fds of random geometry, unknown messages.
//!
//! After each connection closes, the process must hold nothing of it: no
//! mapping of its memfds (`/proc/self/maps`), no extra file descriptor or
//! thread, no poller on a reactor, and the device must still serve a
//! well-behaved client (libblkio).
//!
//! CI runs a bounded number of cases; for a long run:
//! `PROPTEST_CASES=5000 cargo test --release -p quern-vhost --test frontend_fuzz`.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use quern_bdev::drivers::MallocBdev;
use quern_bdev::poller::{spawn_io_reactor, IoStats};
use quern_bdev::{BdevRef, EngineConfig, IoReactor};
use quern_reactor::{PollMode, ReactorConfig};
use quern_vhost::{serve, DeviceConfig, DeviceHandle, QueueBinding};

const MEMFD_NAME: &str = "quern-fuzz-guest";

/// One message of the sequence, with what it needs.
#[derive(Clone, Debug)]
enum Msg {
    GetFeatures,
    SetFeatures(u64),
    SetOwner,
    ResetOwner,
    GetProtocolFeatures,
    SetProtocolFeatures(u64),
    /// Regions: (gpa, size, uva, mmap_offset, file size).
    SetMemTable(Vec<(u64, u64, u64, u64, u64)>),
    AddMemReg(u64, u64, u64, u64, u64),
    RemMemReg(u64, u64),
    SetVringNum(u32, u32),
    /// index, desc, used, avail (offsets into the first region, or raw).
    SetVringAddr(u32, u64, u64, u64, bool),
    SetVringBase(u32, u32),
    GetVringBase(u32),
    SetVringKick(u32, bool),
    SetVringCall(u32, bool),
    SetVringEnable(u32, u32),
    Kick,
    GetConfig(u32, u32),
    SetConfig(u32, Vec<u8>),
    GetInflightFd(u16, u16),
    SetInflightFd(u64, u64, u16, u16, u64),
    GetQueueNum,
    GetMaxMemSlots,
    /// An unknown or unsupported request with random payload.
    Other(u32, Vec<u8>),
}

const UVA0: u64 = 0x7f00_0000_0000;

fn region() -> impl Strategy<Value = (u64, u64, u64, u64, u64)> {
    let size = prop_oneof![
        Just(1u64 << 20),
        Just(4u64 << 20),
        Just(64 << 10),
        Just(1u64 << 32), // a sparse 4 GiB memfd
        1u64..(8 << 20),
        Just(0),
    ];
    let gpa = prop_oneof![Just(0u64), Just(1 << 30), any::<u64>(), 0u64..(1 << 32)];
    let off = prop_oneof![Just(0u64), Just(4096), 0u64..(1 << 20), any::<u64>()];
    (gpa, size, off, prop_oneof![Just(0u64), 0u64..(1 << 20)]).prop_map(
        |(gpa, size, off, extra)| {
            let file = size
                .saturating_add(off.min(1 << 22))
                .saturating_add(extra)
                .min(1 << 33);
            (gpa, size, UVA0 + (gpa & 0xffff_ffff), off, file)
        },
    )
}

fn msg() -> impl Strategy<Value = Msg> {
    let q = prop_oneof![Just(0u32), Just(1), 0u32..4, any::<u32>()];
    let num = prop_oneof![Just(128u32), Just(256), Just(8), 0u32..1024, any::<u32>()];
    prop_oneof![
        Just(Msg::GetFeatures),
        prop_oneof![
            Just(0x1_7000_7e46u64 | (1 << 30)),
            Just(1 << 30),
            any::<u64>()
        ]
        .prop_map(Msg::SetFeatures),
        Just(Msg::SetOwner),
        Just(Msg::ResetOwner),
        Just(Msg::GetProtocolFeatures),
        prop_oneof![Just(0x1_0207u64), any::<u64>()].prop_map(Msg::SetProtocolFeatures),
        proptest::collection::vec(region(), 0..4).prop_map(Msg::SetMemTable),
        region().prop_map(|(a, b, c, d, e)| Msg::AddMemReg(a, b, c, d, e)),
        (
            prop_oneof![Just(0u64), Just(1 << 30), any::<u64>()],
            any::<u64>()
        )
            .prop_map(|(g, s)| Msg::RemMemReg(g, s)),
        (q.clone(), num).prop_map(|(i, n)| Msg::SetVringNum(i, n)),
        (
            q.clone(),
            0u64..(1 << 20),
            0u64..(1 << 20),
            0u64..(1 << 20),
            any::<bool>()
        )
            .prop_map(|(i, d, u, a, raw)| Msg::SetVringAddr(i, d, u, a, raw)),
        (q.clone(), any::<u32>()).prop_map(|(i, b)| Msg::SetVringBase(i, b)),
        q.clone().prop_map(Msg::GetVringBase),
        (q.clone(), any::<bool>()).prop_map(|(i, f)| Msg::SetVringKick(i, f)),
        (q.clone(), any::<bool>()).prop_map(|(i, f)| Msg::SetVringCall(i, f)),
        (q.clone(), 0u32..3).prop_map(|(i, e)| Msg::SetVringEnable(i, e)),
        Just(Msg::Kick),
        Just(Msg::Kick),
        (0u32..80, 0u32..80).prop_map(|(o, s)| Msg::GetConfig(o, s)),
        (0u32..80, proptest::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(o, b)| Msg::SetConfig(o, b)),
        (0u16..4, prop_oneof![Just(128u16), any::<u16>()])
            .prop_map(|(n, s)| Msg::GetInflightFd(n, s)),
        (
            any::<u64>(),
            0u64..8192,
            0u16..4,
            prop_oneof![Just(128u16), any::<u16>()],
            0u64..(1 << 16)
        )
            .prop_map(|(sz, off, n, qs, file)| Msg::SetInflightFd(
                sz % (1 << 20),
                off,
                n,
                qs,
                file
            )),
        Just(Msg::GetQueueNum),
        Just(Msg::GetMaxMemSlots),
        (
            prop_oneof![
                Just(6u32),
                Just(7),
                Just(14),
                Just(19),
                Just(22),
                Just(23),
                Just(34),
                Just(35),
                39u32..60,
                any::<u32>()
            ],
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(r, p)| Msg::Other(r, p)),
    ]
}

/// A raw vhost-user frontend: messages out, replies ignored (read and
/// dropped so the device never blocks on a full socket).
struct Frontend {
    s: UnixStream,
    /// Our memfds and eventfds, closed when the sequence ends.
    files: Vec<File>,
    kicks: Vec<File>,
    first_region: Option<(u64, u64)>,
}

fn memfd(size: u64) -> Option<File> {
    let name = std::ffi::CString::new(MEMFD_NAME).unwrap();
    // SAFETY: memfd_create with a NUL-terminated name; checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).ok()?;
    // random ring contents where rings may be placed
    let mut x = size | 1;
    let mut buf = vec![0u8; (size.min(1 << 20)) as usize];
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    use std::os::unix::fs::FileExt;
    let _ = f.write_all_at(&buf, 0);
    Some(f)
}

fn eventfd() -> File {
    // SAFETY: plain eventfd creation; checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    unsafe { File::from_raw_fd(fd) }
}

impl Frontend {
    fn send(&mut self, request: u32, payload: &[u8], fds: &[RawFd]) {
        common::send_msg(&self.s, request, 0, payload, fds);
        common::drain_replies(&self.s);
    }

    fn region_bytes(gpa: u64, size: u64, uva: u64, off: u64) -> Vec<u8> {
        [gpa, size, uva, off]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    fn play(&mut self, m: &Msg) {
        let u64b = |v: u64| v.to_le_bytes().to_vec();
        let state = |i: u32, n: u32| [i.to_le_bytes(), n.to_le_bytes()].concat();
        match m {
            Msg::GetFeatures => self.send(1, &[], &[]),
            Msg::SetFeatures(f) => self.send(2, &u64b(*f), &[]),
            Msg::SetOwner => self.send(3, &[], &[]),
            Msg::ResetOwner => self.send(4, &[], &[]),
            Msg::GetProtocolFeatures => self.send(15, &[], &[]),
            Msg::SetProtocolFeatures(f) => self.send(16, &u64b(*f), &[]),
            Msg::SetMemTable(regions) => {
                let mut p = Vec::new();
                p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                let mut fds = Vec::new();
                for &(gpa, size, uva, off, file) in regions {
                    p.extend(Self::region_bytes(gpa, size, uva, off));
                    if let Some(f) = memfd(file) {
                        fds.push(f.as_raw_fd());
                        self.files.push(f);
                    }
                }
                if let Some(&(gpa, size, ..)) = regions.first() {
                    self.first_region = Some((gpa, size));
                }
                self.send(5, &p, &fds);
            }
            Msg::AddMemReg(gpa, size, uva, off, file) => {
                let mut p = u64b(0);
                p.extend(Self::region_bytes(*gpa, *size, *uva, *off));
                let f = memfd(*file);
                let fds: Vec<RawFd> = f.iter().map(|f| f.as_raw_fd()).collect();
                self.send(37, &p, &fds);
                if self.first_region.is_none() {
                    self.first_region = Some((*gpa, *size));
                }
                self.files.extend(f);
            }
            Msg::RemMemReg(gpa, size) => {
                let mut p = u64b(0);
                p.extend(Self::region_bytes(*gpa, *size, UVA0, 0));
                let f = memfd(4096);
                let fds: Vec<RawFd> = f.iter().map(|f| f.as_raw_fd()).collect();
                self.send(38, &p, &fds);
                self.files.extend(f);
            }
            Msg::SetVringNum(i, n) => self.send(8, &state(*i, *n), &[]),
            Msg::SetVringAddr(i, d, u, a, raw) => {
                // inside the first region (frontend addresses), or raw
                let (base, base_uva) = match self.first_region {
                    Some((gpa, _)) if !raw => (gpa, UVA0 + (gpa & 0xffff_ffff)),
                    _ => (0, 0),
                };
                let _ = base;
                let mut p = Vec::new();
                p.extend_from_slice(&i.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                for v in [base_uva + d, base_uva + u, base_uva + a, 0] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                self.send(9, &p, &[]);
            }
            Msg::SetVringBase(i, b) => self.send(10, &state(*i, *b), &[]),
            Msg::GetVringBase(i) => self.send(11, &state(*i, 0), &[]),
            Msg::SetVringKick(i, nofd) | Msg::SetVringCall(i, nofd) => {
                let req = if matches!(m, Msg::SetVringKick(..)) {
                    12
                } else {
                    13
                };
                if *nofd {
                    self.send(req, &u64b(u64::from(*i) | 0x100), &[]);
                } else {
                    let e = eventfd();
                    self.send(req, &u64b(u64::from(*i)), &[e.as_raw_fd()]);
                    self.kicks.push(e);
                }
            }
            Msg::SetVringEnable(i, e) => self.send(18, &state(*i, *e), &[]),
            Msg::Kick => {
                for k in &mut self.kicks {
                    let _ = k.write_all(&1u64.to_ne_bytes());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Msg::GetConfig(o, s) => {
                let mut p = [o.to_le_bytes(), s.to_le_bytes(), 0u32.to_le_bytes()].concat();
                p.resize(12 + *s as usize, 0);
                self.send(24, &p, &[]);
            }
            Msg::SetConfig(o, b) => {
                let mut p = [
                    o.to_le_bytes(),
                    (b.len() as u32).to_le_bytes(),
                    0u32.to_le_bytes(),
                ]
                .concat();
                p.extend_from_slice(b);
                self.send(25, &p, &[]);
            }
            Msg::GetInflightFd(n, s) => {
                let mut p = [u64b(0), u64b(0)].concat();
                p.extend_from_slice(&n.to_le_bytes());
                p.extend_from_slice(&s.to_le_bytes());
                self.send(31, &p, &[]);
            }
            Msg::SetInflightFd(size, off, n, s, file) => {
                let mut p = [u64b(*size), u64b(*off)].concat();
                p.extend_from_slice(&n.to_le_bytes());
                p.extend_from_slice(&s.to_le_bytes());
                let f = memfd(*file);
                let fds: Vec<RawFd> = f.iter().map(|f| f.as_raw_fd()).collect();
                self.send(32, &p, &fds);
                self.files.extend(f);
            }
            Msg::GetQueueNum => self.send(17, &[], &[]),
            Msg::GetMaxMemSlots => self.send(36, &[], &[]),
            Msg::Other(r, p) => self.send(*r, p, &[]),
        }
    }
}

struct Served {
    reactors: Vec<Arc<IoReactor>>,
    stats: Vec<Arc<IoStats>>,
    dev: DeviceHandle,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn served() -> &'static Served {
    static S: std::sync::OnceLock<Served> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fuzz.sock");
        let (reactors, stats): (Vec<_>, Vec<_>) = (0..2)
            .map(|id| {
                spawn_io_reactor(
                    ReactorConfig {
                        id,
                        core: None,
                        mode: PollMode::Adaptive,
                        idle_spin: Duration::from_micros(100),
                    },
                    EngineConfig::default(),
                )
                .unwrap()
            })
            .unzip();
        let bdev: BdevRef = Arc::new(MallocBdev::new("m", 8 << 20, 512, false).unwrap());
        let handles: Vec<u16> = reactors
            .iter()
            .map(|r| {
                let b = bdev.clone();
                r.call(move |w| w.io.add_device(b).unwrap()).unwrap()
            })
            .collect();
        let dev = serve(
            DeviceConfig {
                name: "fuzz".into(),
                socket: socket.clone(),
                num_queues: 2,
                queue_size: 256,
                read_only: false,
                serial: "fuzz".into(),
                binding: QueueBinding::RoundRobin(vec![0, 1]),
                timing: true,
                event_idx: true,
                qos: quern_vhost::qos::QosBinding::unlimited("test"),
            },
            bdev,
            reactors.clone(),
            handles,
        )
        .unwrap();
        Served {
            reactors,
            stats,
            dev,
            socket,
            _dir: dir,
        }
    })
}

/// Mappings of the fuzzer's memfds still in this process.
fn fuzz_mappings() -> Vec<String> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(MEMFD_NAME) || l.contains("quern-inflight"))
        .map(String::from)
        .collect()
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn run(seq: &[Msg]) {
    // one session at a time: the checks are about this session's leftovers
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let s = served();
    let fds_before = fd_count();
    let mut f = Frontend {
        s: UnixStream::connect(&s.socket).unwrap(),
        files: Vec::new(),
        kicks: Vec::new(),
        first_region: None,
    };
    for m in seq {
        f.play(m);
    }
    drop(f);
    // the device notices the disconnect and lets go of everything
    let t = Instant::now();
    loop {
        let pollers: u64 = s.stats.iter().map(|x| x.snapshot().pollers).sum();
        let left = fuzz_mappings();
        if !s.dev.connected() && pollers == 0 && left.is_empty() && fd_count() <= fds_before {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "after {seq:?}:\nconnected {}, pollers {pollers}, fds {} (before {fds_before}), mappings left:\n{}",
            s.dev.connected(),
            fd_count(),
            left.join("\n")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for r in &s.reactors {
        assert!(r.failure().is_none(), "a reactor failed: {:?}", r.failure());
    }
}

/// The device still serves a well-behaved client after the fuzzing.
fn still_serves(socket: &Path) {
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", socket.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", 2).unwrap();
    let mut queues = b.start().unwrap().queues;
    let region = b.alloc_mem_region(1 << 20).unwrap();
    b.map_mem_region(&region).unwrap();
    let p = region.addr as *mut u8;
    // SAFETY: inside the region we mapped.
    unsafe { std::ptr::write_bytes(p, 0x5a, 4096) };
    queues[1].write(4096, p, 4096, 1, blkio::ReqFlags::empty());
    let mut c = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
    let mut to = Duration::from_secs(10);
    assert_eq!(queues[1].do_io(&mut c, 1, Some(&mut to), None).unwrap(), 1);
    // SAFETY: do_io filled one completion.
    assert_eq!(unsafe { c[0].assume_init_read() }.ret, 0);
}

/// The features the device offers (and a few it does not).
const FEATURES: u64 = (1 << 32)
    | (1 << 30)
    | (1 << 29)
    | (1 << 28)
    | (1 << 12)
    | (1 << 11)
    | (1 << 10)
    | (1 << 9)
    | (1 << 6)
    | (1 << 2)
    | (1 << 1);
/// MQ, CONFIG, INFLIGHT_SHMFD, CONFIGURE_MEM_SLOTS.
const PROTOCOL: u64 = 0x9201;

/// A plausible session start (features, a memory table, both vrings set
/// up inside it and started) with random sizes, ring places and bases, so
/// that the random tail reaches running queues over random ring contents.
fn handshake() -> impl Strategy<Value = Vec<Msg>> {
    let ring = (
        prop_oneof![Just(128u32), Just(8), Just(256)],
        (0u64..64, 0u64..64, 0u64..64),
        prop_oneof![Just(0u32), any::<u32>()],
        any::<bool>(),
    );
    (
        prop_oneof![
            Just(FEATURES),
            Just(FEATURES & !(1 << 29)),
            any::<u64>().prop_map(|x| FEATURES | (x & (1 << 40)))
        ],
        ring.clone(),
        ring,
        any::<bool>(),
    )
        .prop_map(|(features, q0, q1, inflight)| {
            let mut v = vec![
                Msg::GetFeatures,
                Msg::SetFeatures(features),
                Msg::SetProtocolFeatures(PROTOCOL),
                Msg::SetMemTable(vec![(0, 4 << 20, UVA0, 0, 4 << 20)]),
            ];
            if inflight {
                v.push(Msg::GetInflightFd(2, 256));
            }
            for (i, (num, (d, u, a), base, call)) in [q0, q1].into_iter().enumerate() {
                let i = i as u32;
                v.extend([
                    Msg::SetVringNum(i, num),
                    // 4 KiB apart per unit: aligned, inside the 4 MiB region
                    Msg::SetVringAddr(i, d << 12, (64 + u) << 12, (128 + a) << 12, false),
                    Msg::SetVringBase(i, base % 65536),
                    Msg::SetVringKick(i, false),
                    Msg::SetVringCall(i, !call),
                    Msg::SetVringEnable(i, 1),
                ]);
            }
            v.push(Msg::Kick);
            v
        })
}

fn session() -> impl Strategy<Value = Vec<Msg>> {
    (
        proptest::option::weighted(0.7, handshake()),
        proptest::collection::vec(msg(), 0..24),
    )
        .prop_map(|(start, tail)| start.into_iter().flatten().chain(tail).collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_message_sequence_leaves_nothing_behind(seq in session()) {
        run(&seq);
    }
}

/// The fuzzer reaches running queues: requests taken off random rings.
#[test]
fn handshakes_reach_the_data_path() {
    use std::sync::atomic::Ordering::Relaxed;
    let before: u64 = served()
        .dev
        .queues
        .iter()
        .map(|q| q.requests.load(Relaxed))
        .sum();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for _ in 0..16 {
        let seq = handshake().new_tree(&mut runner).unwrap().current();
        run(&seq);
    }
    let after: u64 = served()
        .dev
        .queues
        .iter()
        .map(|q| q.requests.load(Relaxed))
        .sum();
    assert!(after > before, "no request reached a queue");
}

/// The sequences that once left guest memory mapped (a region added after
/// others, then one that could not be mapped: the duplicated mappings of
/// the others were dropped without being unmapped), and a valid session.
#[test]
fn a_failed_region_unmaps_the_copies_already_made() {
    run(&[
        Msg::SetMemTable(vec![
            (0, 4 << 20, UVA0, 0, 4 << 20),
            (1 << 30, 1 << 20, UVA0 + (1 << 30), 0, 1 << 20),
        ]),
        // an overflowing region: mapping it fails after the others were copied
        Msg::AddMemReg(2 << 30, u64::MAX - 10, UVA0 + (2 << 30), 0, 4096),
        Msg::AddMemReg(3 << 30, 1 << 20, UVA0 + (3 << 30), 1 << 40, 4096),
        Msg::RemMemReg(1 << 30, 1 << 20),
    ]);
    still_serves(&served().socket);
}

#[test]
fn the_device_serves_after_hostile_sessions() {
    run(&[
        Msg::GetFeatures,
        Msg::SetFeatures(1 << 32 | 1 << 30 | 1 << 29),
        Msg::SetMemTable(vec![(0, 4 << 20, UVA0, 0, 4 << 20)]),
        Msg::SetVringNum(0, 128),
        Msg::SetVringAddr(0, 0, 0x2000, 0x1000, false),
        Msg::SetVringBase(0, 0),
        Msg::SetVringKick(0, false),
        Msg::SetVringCall(0, false),
        Msg::Kick,
        Msg::GetInflightFd(2, 128),
        Msg::AddMemReg(1 << 30, 1 << 20, UVA0 + (1 << 30), 0, 1 << 20),
        Msg::Kick,
    ]);
    still_serves(&served().socket);
}
