//! The I/O work a reactor runs: its [`IoEngine`] and the [`IoPoller`]s
//! that feed it (virtqueues, NBD connections, test producers).
//!
//! One cycle: every poller finds new requests and submits them into the
//! engine; the engine merges and starts the batch; completions are reaped
//! and routed to the poller that submitted them by their [`Cookie`]; every
//! poller then publishes what completed (once per cycle, not per request).
//! [`ReactorIo`] is the reactor crate's [`Work`]; the reactor itself knows
//! nothing of engines or pollers.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quern_reactor::histogram::Histogram;
use quern_reactor::{ReactorGone, ReactorHandle, Work};

use crate::engine::{EngineConfig, IoEngine};
use crate::types::IoResult;

/// A poller's place on its reactor (the index of its slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PollerId(pub u16);

/// What routes a completion back to the poller that submitted the request:
/// the poller's id in the high 16 bits, the poller's own tag for the
/// request (a virtqueue head, a slot) in the low 48.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cookie(u64);

impl Cookie {
    pub const TAG_BITS: u32 = 48;
    pub const TAG_MASK: u64 = (1 << Self::TAG_BITS) - 1;

    /// The cookie of `poller`'s request `tag` (at most 48 bits).
    #[inline]
    pub fn new(poller: PollerId, tag: u64) -> Cookie {
        debug_assert!(tag <= Self::TAG_MASK, "tag {tag:#x} is wider than 48 bits");
        Cookie((u64::from(poller.0) << Self::TAG_BITS) | (tag & Self::TAG_MASK))
    }

    #[inline]
    pub fn poller(self) -> PollerId {
        PollerId((self.0 >> Self::TAG_BITS) as u16)
    }

    #[inline]
    pub fn tag(self) -> u64 {
        self.0 & Self::TAG_MASK
    }
}

/// A source of I/O polled once per cycle on one reactor.
pub trait IoPoller: Send {
    /// Find new work and submit it into `io` under cookies made with `me`;
    /// returns how much was found.
    fn poll(&mut self, io: &mut IoEngine, me: PollerId) -> usize;
    /// A request this poller submitted completed (its cookie's tag).
    fn on_complete(&mut self, tag: u64, result: IoResult);
    /// Publish what completed this cycle (once per cycle, not per request).
    /// `now` is the clock reading of the end of the cycle, taken after the
    /// first publish that needs it: 0 until then; a poller that needs the
    /// time reads the clock (`quern_reactor::clock::ticks`) into it, after
    /// publishing, and the pollers after it and [`IoEngine::end_cycle`]
    /// share that reading.
    fn end_cycle(&mut self, now: &mut u64) {
        let _ = now;
    }
    /// About to sleep: arm notifications. Return false if work showed up.
    fn prepare_sleep(&mut self) -> bool {
        true
    }
    /// Woken up: disarm notifications.
    fn after_sleep(&mut self) {}
    /// An fd that becomes readable when this poller has work.
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }
    /// Requests taken and not yet completed (submitted, or waiting to be).
    fn in_flight(&self) -> usize {
        0
    }
    /// Take no new work from now on; what is in flight still completes.
    /// The first step of removing a poller, so that draining it ends even
    /// when its source keeps offering work.
    fn quiesce(&mut self) {}
    /// The reactor failed: from now on complete new work with an error at
    /// once, without the engine.
    fn fail(&mut self) {}
    /// For a queue-like poller: where a restarted successor resumes.
    fn resume_index(&self) -> Option<u16> {
        None
    }
    /// Keep latency histograms from now on, or stop (the reactor's
    /// setting, given to each poller when it is added and when it changes).
    fn set_timing(&mut self, on: bool) {
        let _ = on;
    }
    /// Work that is waiting for time to pass (a QoS budget to refill): the
    /// reactor sleeps at most this long.
    fn wake_within_ms(&self) -> Option<u32> {
        None
    }
}

/// The engine's counters, published by the reactor once per cycle that
/// changed them, read by anyone.
#[derive(Debug, Default)]
pub struct IoStats {
    pub ios_submitted: AtomicU64,
    pub ios_completed: AtomicU64,
    pub ios_failed: AtomicU64,
    pub merge_requests_in: AtomicU64,
    pub merge_requests_out: AtomicU64,
    pub merge_bytes: AtomicU64,
    pub pollers: AtomicU64,
    /// Each attached bdev's service-time histogram on this reactor, by
    /// bdev name (control path only: changed when bdevs come and go).
    pub bdev_latency: std::sync::Mutex<Vec<(String, u16, Arc<Histogram>)>>,
}

/// A plain copy of [`IoStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStatsSnapshot {
    pub ios_submitted: u64,
    pub ios_completed: u64,
    pub ios_failed: u64,
    pub merge_requests_in: u64,
    pub merge_requests_out: u64,
    pub merge_bytes: u64,
    pub pollers: u64,
}

impl IoStats {
    pub fn snapshot(&self) -> IoStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoStatsSnapshot {
            ios_submitted: g(&self.ios_submitted),
            ios_completed: g(&self.ios_completed),
            ios_failed: g(&self.ios_failed),
            merge_requests_in: g(&self.merge_requests_in),
            merge_requests_out: g(&self.merge_requests_out),
            merge_bytes: g(&self.merge_bytes),
            pollers: g(&self.pollers),
        }
    }
}

/// Most pollers one reactor runs (the width of [`PollerId`]).
pub const MAX_POLLERS: usize = u16::MAX as usize + 1;

/// One reactor's I/O: its engine and pollers.
pub struct ReactorIo {
    pub id: usize,
    pub io: IoEngine,
    pollers: Vec<Option<Box<dyn IoPoller>>>,
    /// Readable when the ring posts completions (for sleeping reactors).
    ring_efd: OwnedFd,
    /// Bumped when a poller comes or goes (its wake fd with it).
    poller_generation: u64,
    stats: Arc<IoStats>,
    /// The reactor failed: every poller, also those added later, fails
    /// its new work.
    failed: bool,
    /// The clock reading the last cycle took as it published, for the
    /// next cycle if it follows at once (0: none).
    carry: u64,
}

/// The control plane's handle on a reactor running I/O.
pub type IoReactor = ReactorHandle<ReactorIo>;

impl ReactorIo {
    pub fn new(id: usize, cfg: EngineConfig, stats: Arc<IoStats>) -> std::io::Result<Self> {
        let io = IoEngine::new(cfg)?;
        let ring_efd = crate::sys::eventfd()?;
        io.ring()
            .submitter()
            .register_eventfd(ring_efd.as_raw_fd())?;
        Ok(ReactorIo {
            id,
            io,
            pollers: Vec::new(),
            ring_efd,
            poller_generation: 0,
            stats,
            carry: 0,
            failed: false,
        })
    }

    /// Register a poller; returns its id (the high bits of its cookies).
    /// Fails when the reactor already runs [`MAX_POLLERS`].
    pub fn add_poller(&mut self, mut p: Box<dyn IoPoller>) -> Result<PollerId, Box<dyn IoPoller>> {
        if self.failed {
            p.fail();
        }
        p.set_timing(self.io.timing());
        let slot = match self.pollers.iter().position(Option::is_none) {
            Some(i) => i,
            None if self.pollers.len() < MAX_POLLERS => {
                self.pollers.push(None);
                self.pollers.len() - 1
            }
            None => return Err(p),
        };
        self.pollers[slot] = Some(p);
        self.poller_generation += 1;
        self.stats.pollers.fetch_add(1, Ordering::Relaxed);
        Ok(PollerId(slot as u16))
    }

    /// Keep latency histograms (the engine's service times and every
    /// poller's) from now on, or stop.
    pub fn set_timing(&mut self, on: bool) {
        self.io.set_timing(on);
        for p in self.pollers.iter_mut().flatten() {
            p.set_timing(on);
        }
    }

    /// Unregister a poller. The caller must first let its requests drain
    /// (see [`remove_when_idle`]).
    pub fn remove_poller(&mut self, id: PollerId) -> Option<Box<dyn IoPoller>> {
        let p = self.pollers.get_mut(usize::from(id.0))?.take();
        if p.is_some() {
            self.poller_generation += 1;
            self.stats.pollers.fetch_sub(1, Ordering::Relaxed);
        }
        p
    }

    pub fn poller_in_flight(&self, id: PollerId) -> usize {
        self.pollers
            .get(usize::from(id.0))
            .and_then(|p| p.as_ref())
            .map_or(0, |p| p.in_flight())
    }

    /// Attach a bdev to this reactor's engine; its service-time histogram
    /// is published in the reactor's [`IoStats`].
    pub fn add_device(&mut self, bdev: crate::BdevRef) -> std::io::Result<u16> {
        let name = bdev.info().name.clone();
        let dev = self.io.add_device(bdev)?;
        if let Some(h) = self.io.device_latency(dev) {
            self.stats
                .bdev_latency
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((name, dev, h));
        }
        Ok(dev)
    }

    /// Detach a bdev (nothing of it may be in flight).
    pub fn remove_device(&mut self, dev: u16) {
        self.io.remove_device(dev);
        self.stats
            .bdev_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, d, _)| *d != dev);
    }

    pub fn quiesce_poller(&mut self, id: PollerId) {
        if let Some(Some(p)) = self.pollers.get_mut(usize::from(id.0)) {
            p.quiesce();
        }
    }

    /// Have one poller fail its new work from now on (a device being
    /// removed while its frontend is still attached).
    pub fn fail_poller(&mut self, id: PollerId) {
        if let Some(Some(p)) = self.pollers.get_mut(usize::from(id.0)) {
            p.fail();
        }
    }

    fn publish_stats(&self) {
        let e = self.io.stats();
        let m = self.io.merge_stats();
        let st = &self.stats;
        st.ios_submitted
            .store(e.requests_submitted, Ordering::Relaxed);
        st.ios_completed
            .store(e.requests_completed, Ordering::Relaxed);
        st.ios_failed.store(e.requests_failed, Ordering::Relaxed);
        st.merge_requests_in.store(m.requests_in, Ordering::Relaxed);
        st.merge_requests_out
            .store(m.requests_out, Ordering::Relaxed);
        st.merge_bytes.store(m.bytes, Ordering::Relaxed);
    }
}

impl Work for ReactorIo {
    fn cycle(&mut self) -> usize {
        let mut work = 0;
        let ReactorIo {
            io, pollers, carry, ..
        } = self;
        io.begin_cycle_at(std::mem::take(carry));
        let submitted_before = io.stats().requests_submitted;
        for (slot, p) in pollers.iter_mut().enumerate() {
            if let Some(p) = p {
                work += p.poll(io, PollerId(slot as u16));
            }
        }
        io.flush();
        let done = io.reap(|cookie, res| {
            if let Some(Some(p)) = pollers.get_mut(usize::from(cookie.poller().0)) {
                p.on_complete(cookie.tag(), res);
            }
        });
        if done > 0 || io.stats().requests_submitted != submitted_before {
            // statistics first, so a client that sees its completion sees
            // them too
            self.publish_stats();
        }
        let mut now = 0;
        for p in self.pollers.iter_mut().flatten() {
            p.end_cycle(&mut now);
        }
        // what is recorded after the completions are out
        self.io.end_cycle(&mut now);
        // the next cycle starts with this reading, unless something runs
        // in between (`clock_stale`)
        self.carry = now;
        work + done
    }

    fn in_flight(&self) -> usize {
        self.io.in_flight()
    }

    fn prepare_sleep(&mut self) -> bool {
        let mut ready = true;
        for p in self.pollers.iter_mut().flatten() {
            ready &= p.prepare_sleep();
        }
        ready
    }

    fn after_sleep(&mut self) {
        self.carry = 0;
        for p in self.pollers.iter_mut().flatten() {
            p.after_sleep();
        }
    }

    fn clock_stale(&mut self) {
        self.carry = 0;
    }

    fn wake_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.ring_efd.as_raw_fd());
        out.extend(self.pollers.iter().flatten().filter_map(|p| p.wake_fd()));
        out.extend(self.io.device_wake_fds());
    }

    fn wake_generation(&self) -> u64 {
        // both only grow, so their sum changes whenever either does
        self.poller_generation
            .wrapping_add(self.io.device_generation())
    }

    fn sleep_limit_ms(&self) -> Option<u32> {
        self.pollers
            .iter()
            .flatten()
            .filter_map(|p| p.wake_within_ms())
            .min()
    }

    fn fail(&mut self) {
        self.failed = true;
        for p in self.pollers.iter_mut().flatten() {
            p.fail();
        }
    }
}

/// Why a poller could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("{0}")]
    Gone(#[from] ReactorGone),
    #[error("{in_flight} requests still in flight after {waited:?}")]
    Busy { in_flight: usize, waited: Duration },
}

/// Stop a poller taking new work, wait (at most `limit`) for its requests
/// to finish, then remove it. On `Busy` the poller stays registered and
/// quiesced, its requests still in flight (their memory must stay valid).
pub fn remove_when_idle(
    handle: &IoReactor,
    id: PollerId,
    limit: Duration,
) -> Result<Option<Box<dyn IoPoller>>, RemoveError> {
    handle.call(move |w| w.quiesce_poller(id))?;
    let t = Instant::now();
    loop {
        let (in_flight, p) = handle.call(move |w| {
            let n = w.poller_in_flight(id);
            if n == 0 {
                (0, w.remove_poller(id))
            } else {
                (n, None)
            }
        })?;
        if in_flight == 0 {
            return Ok(p);
        }
        if t.elapsed() >= limit {
            return Err(RemoveError::Busy {
                in_flight,
                waited: t.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Start a reactor running I/O with `engine`; returns its handle and its
/// I/O counters.
pub fn spawn_io_reactor(
    cfg: quern_reactor::ReactorConfig,
    engine: EngineConfig,
) -> std::io::Result<(Arc<IoReactor>, Arc<IoStats>)> {
    let stats = Arc::new(IoStats::default());
    let (id, st) = (cfg.id, stats.clone());
    let h = quern_reactor::spawn_reactor(cfg, move || ReactorIo::new(id, engine, st))?;
    Ok((h, stats))
}
