//! A data-path rig for benchmarks (`feature = "harness"`): one queue
//! poller over a ring in a fake guest memory (a memfd through a real
//! memory table), a null bdev on an engine, and the guest's side played in
//! the same thread: heads put on the avail ring, completions taken off the
//! used ring and offered again. No client thread and no other process, so
//! what a feature costs per request (latency histograms, QoS accounting,
//! dirty logging) can be told apart from a machine whose speed drifts: the
//! variants run in short alternating slices.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quern_bdev::drivers::NullBdev;
use quern_bdev::{BdevRef, EngineConfig, IoEngine, IoPoller, PollerId};

use crate::dirty::{DirtyLog, LogView};
use crate::memory::{FrontendAddress, GuestAddress, MemTable};
use crate::qos::{Limiter, QosBinding, QosLimits};
use crate::queue::{QueueParts, QueuePoller, QueueStats};
use crate::virtq::{SplitQueue, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

const GPA: u64 = 0x10_0000;
const MEM: u64 = 16 << 20;
const UVA: u64 = 0x7e00_0000_0000;
const QSIZE: u16 = 256;
const DESC: u64 = GPA;
const AVAIL: u64 = GPA + 0x1000;
const USED: u64 = GPA + 0x2000;
const HDRS: u64 = GPA + 0x4000;
const DATA: u64 = GPA + 0x10_0000;

/// What is on for a rig.
#[derive(Clone, Copy, Debug, Default)]
pub struct Features {
    /// Latency histograms (queue and bdev).
    pub histograms: bool,
    /// A QoS limit that never binds: every request is accounted.
    pub qos: bool,
    /// Dirty logging on (as during a live migration).
    pub dirty_log: bool,
}

/// One queue and its engine, and the guest driving them.
pub struct Rig {
    mem: Arc<MemTable>,
    poller: QueuePoller,
    io: IoEngine,
    /// Guest side: the next avail index, and the used index seen.
    avail: u16,
    used_seen: u16,
    _log: Option<Arc<DirtyLog>>,
}

fn write(mem: &MemTable, gpa: u64, data: &[u8]) {
    let p = mem
        .gpa(GuestAddress(gpa), data.len() as u64)
        .expect("inside");
    // SAFETY: translated with bounds.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
}

fn read16(mem: &MemTable, gpa: u64) -> u16 {
    let p = mem.gpa(GuestAddress(gpa), 2).expect("inside");
    // SAFETY: translated, 2-byte aligned by layout.
    u16::from_le(unsafe { std::ptr::read_volatile(p.cast::<u16>()) })
}

fn read32(mem: &MemTable, gpa: u64) -> u32 {
    let p = mem.gpa(GuestAddress(gpa), 4).expect("inside");
    // SAFETY: as above, 4-byte aligned.
    u32::from_le(unsafe { std::ptr::read_volatile(p.cast::<u32>()) })
}

impl Rig {
    /// A rig with `depth` requests of 4 KiB reads (1..=85: three
    /// descriptors each), features as given.
    pub fn new(depth: u16, f: Features) -> std::io::Result<Rig> {
        let depth = depth.clamp(1, QSIZE / 3);
        // SAFETY: memfd_create with a static name; checked.
        let fd = unsafe { libc::memfd_create(c"quern-rig".as_ptr(), 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM)?;
        let mem = Arc::new(
            MemTable::default()
                .with_region(GuestAddress(GPA), MEM, FrontendAddress(UVA), 0, &file)
                .map_err(std::io::Error::other)?,
        );
        // request i: header, 4 KiB data, status; reads of block i
        for i in 0..depth {
            let (d0, d1, d2) = (3 * i, 3 * i + 1, 3 * i + 2);
            let hdr = HDRS + 32 * u64::from(i);
            let mut h = [0u8; 16];
            h[8..16].copy_from_slice(&(u64::from(i) * 8).to_le_bytes());
            write(&mem, hdr, &h);
            let desc = |n: u16, addr: u64, len: u32, flags: u16, next: u16| {
                let mut d = [0u8; 16];
                d[0..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..16].copy_from_slice(&next.to_le_bytes());
                write(&mem, DESC + 16 * u64::from(n), &d);
            };
            desc(d0, hdr, 16, VRING_DESC_F_NEXT, d1);
            desc(
                d1,
                DATA + 4096 * u64::from(i),
                4096,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                d2,
            );
            desc(d2, hdr + 16, 1, VRING_DESC_F_WRITE, 0);
        }
        let uva = |g: u64| FrontendAddress(g - GPA + UVA);
        // SAFETY: the rig keeps `mem` alive beside the queue.
        let q = unsafe { SplitQueue::new(&mem, QSIZE, uva(DESC), uva(AVAIL), uva(USED), 0, true) }
            .map_err(std::io::Error::other)?;
        let mut io = IoEngine::new(EngineConfig {
            timing: f.histograms,
            ..EngineConfig::default()
        })?;
        let bdev: BdevRef = Arc::new(NullBdev::new("null", 1 << 30, 512, false));
        let dev = io.add_device(bdev)?;
        let log = f.dirty_log.then(|| {
            let bytes = (GPA + MEM) / 4096 / 8 + 1;
            let lf = crate::sys::sealed_memfd(c"rig-log", bytes).expect("memfd");
            Arc::new(DirtyLog::map(&lf, bytes, 0).expect("log"))
        });
        let qos = if f.qos {
            QosBinding::new(
                Limiter::new(
                    "rig",
                    QosLimits {
                        iops: 100_000_000,
                        bps: 1 << 40,
                        ..QosLimits::default()
                    },
                ),
                None,
            )
        } else {
            QosBinding::unlimited("rig")
        };
        let poller = QueuePoller::new(QueueParts {
            q,
            mem: mem.clone(),
            dev,
            capacity: 1 << 30,
            read_only: false,
            writeback: Arc::new(AtomicBool::new(true)),
            kick: crate::device::new_eventfd()?,
            call: crate::device::new_eventfd()?,
            max_segs: 126,
            serial: *b"quern-rig-0000000000",
            stats: Arc::new(QueueStats::default()),
            name: "rig".into(),
            inflight_region: None,
            resubmit: Vec::new(),
            failing: false,
            timing: f.histograms,
            qos,
            dirty: LogView {
                log: log.clone(),
                on: Arc::new(AtomicBool::new(log.is_some())),
            },
            used_gpa: Arc::new(AtomicU64::new(USED)),
        });
        let mut rig = Rig {
            mem,
            poller,
            io,
            avail: 0,
            used_seen: 0,
            _log: log,
        };
        for i in 0..depth {
            rig.offer(3 * i);
        }
        rig.publish_avail();
        Ok(rig)
    }

    fn offer(&mut self, head: u16) {
        let slot = self.avail % QSIZE;
        write(
            &self.mem,
            AVAIL + 4 + 2 * u64::from(slot),
            &head.to_le_bytes(),
        );
        self.avail = self.avail.wrapping_add(1);
    }

    fn publish_avail(&mut self) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        write(&self.mem, AVAIL + 2, &self.avail.to_le_bytes());
        // used_event: interrupt after every entry (as a guest that waits)
        write(
            &self.mem,
            AVAIL + 4 + 2 * u64::from(QSIZE),
            &self.used_seen.to_le_bytes(),
        );
    }

    /// Run until `n` requests have completed; the time it took.
    pub fn run(&mut self, n: u64) -> Duration {
        let t0 = Instant::now();
        let mut done = 0u64;
        // as a reactor does (`ReactorIo::cycle`): a cycle starts with the
        // last one's reading
        let mut carry = 0;
        while done < n {
            self.io.begin_cycle_at(carry);
            self.poller.poll(&mut self.io, PollerId(0));
            self.io.flush();
            let p = &mut self.poller;
            self.io.reap(|c, r| p.on_complete(c.tag(), r));
            let mut now = 0;
            self.poller.end_cycle(&mut now);
            self.io.end_cycle(&mut now);
            carry = now;
            // the guest: take completions, offer the heads again
            let used = read16(&self.mem, USED + 2);
            while self.used_seen != used {
                let slot = self.used_seen % QSIZE;
                let head = read32(&self.mem, USED + 4 + 8 * u64::from(slot)) as u16;
                self.used_seen = self.used_seen.wrapping_add(1);
                self.offer(head);
                done += 1;
            }
            self.publish_avail();
        }
        t0.elapsed()
    }
}
