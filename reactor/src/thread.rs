//! The reactor thread and its poll loop.

use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::mailbox::{self, Doorbell, Inbox, Mailbox, Msg};
use crate::sys::{self, Epoll};
use crate::{PollMode, ReactorConfig, ReactorGone, ReactorStats, Work};

/// The control plane's handle on a running reactor.
pub struct ReactorHandle<W> {
    pub id: usize,
    pub core: Option<usize>,
    pub stats: Arc<ReactorStats>,
    bell: Arc<Doorbell>,
    new_inbox: Sender<Inbox<W>>,
    mailbox: Mutex<Mailbox<W>>,
    stop: Arc<AtomicBool>,
    /// How long a stopping reactor waits for its work's in-flight requests.
    drain_limit: Arc<Mutex<Duration>>,
    alive: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<String>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl<W: Work> ReactorHandle<W> {
    /// A new SPSC ring to this reactor, for a sender of its own.
    pub fn mailbox(&self) -> Mailbox<W> {
        let (mb, inbox) = Mailbox::new(self.bell.clone(), self.alive.clone());
        let _ = self.new_inbox.send(inbox);
        self.bell.ring();
        mb
    }

    /// Send a message through the handle's shared mailbox (control plane).
    pub fn send(&self, msg: Msg<W>) -> Result<(), ReactorGone> {
        self.mailbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(msg)
    }

    /// Run `f` on the reactor and wait for its answer (control plane only).
    /// Fails if the reactor has stopped, or if `f` panicked there.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut W) -> R + Send + 'static,
    ) -> Result<R, ReactorGone> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Box::new(move |w| {
            let _ = tx.send(f(w));
        }))?;
        rx.recv().map_err(|_| ReactorGone)
    }

    /// Why the reactor failed (a cycle panicked), if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the reactor thread still runs.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Ask the reactor to finish its in-flight work and exit, waiting at
    /// most `drain` for that work, and wait for the thread.
    pub fn stop_within(&self, drain: Duration) {
        *self.drain_limit.lock().unwrap_or_else(|e| e.into_inner()) = drain;
        self.stop.store(true, Ordering::Release);
        self.bell.ring();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }

    /// [`ReactorHandle::stop_within`] with no bound on the drain.
    pub fn stop(&self) {
        self.stop_within(Duration::MAX);
    }
}

/// Start a reactor thread running the work `make` builds on it. Fails if
/// `make` fails.
pub fn spawn_reactor<W: Work>(
    cfg: ReactorConfig,
    make: impl FnOnce() -> std::io::Result<W> + Send + 'static,
) -> std::io::Result<Arc<ReactorHandle<W>>> {
    let bell = Arc::new(Doorbell::new()?);
    let (new_inbox_tx, new_inbox_rx) = crossbeam_channel::unbounded();
    let stats = Arc::new(ReactorStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let alive = Arc::new(AtomicBool::new(true));
    let failure = Arc::new(Mutex::new(None));
    let drain_limit = Arc::new(Mutex::new(Duration::MAX));
    let (mb, first_inbox) = Mailbox::new(bell.clone(), alive.clone());
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let thread = {
        let shared = Shared {
            bell: bell.clone(),
            stats: stats.clone(),
            stop: stop.clone(),
            alive: alive.clone(),
            failure: failure.clone(),
            drain_limit: drain_limit.clone(),
        };
        let cfg = cfg.clone();
        std::thread::Builder::new()
            .name(format!("reactor{}", cfg.id))
            .spawn(move || {
                // the mailbox refuses senders once this thread is done
                let _alive = AliveGuard(shared.alive.clone());
                if let Some(core) = cfg.core {
                    if !sys::pin_current_thread(core) {
                        tracing::warn!(reactor = cfg.id, core, "could not pin reactor to its core");
                    }
                }
                let mut r = match make()
                    .and_then(|w| Reactor::new(cfg, w, shared, new_inbox_rx, first_inbox))
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                r.run();
            })?
    };
    ready_rx
        .recv()
        .map_err(|_| std::io::Error::other("reactor thread died at start"))??;
    tracing::info!(reactor = cfg.id, core = ?cfg.core, mode = %cfg.mode, "reactor started");
    Ok(Arc::new(ReactorHandle {
        id: cfg.id,
        core: cfg.core,
        stats,
        bell,
        new_inbox: new_inbox_tx,
        mailbox: Mutex::new(mb),
        stop,
        drain_limit,
        alive,
        failure,
        thread: Mutex::new(Some(thread)),
    }))
}

struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What the reactor thread shares with its handle.
struct Shared {
    bell: Arc<Doorbell>,
    stats: Arc<ReactorStats>,
    stop: Arc<AtomicBool>,
    alive: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<String>>>,
    drain_limit: Arc<Mutex<Duration>>,
}

/// Poll cycles between clock reads under load.
const CLOCK_EVERY: u32 = 32;
/// Poll cycles between clock reads while idle (the sleep decision).
const IDLE_CLOCK_EVERY: u32 = 4;
/// Poll cycles between checks for new senders (rare: a new mailbox).
const INBOX_EVERY: u32 = 64;
/// The longest sleep: bounds any missed wake-up.
const SLEEP_MAX_MS: i32 = 1000;

/// Busy/idle accounting without a clock read per cycle: cycles are counted
/// as busy or idle, and at each clock read the time since the previous read
/// is shared between busy and idle in proportion.
struct CycleClock {
    mark: Instant,
    busy_cycles: u64,
    idle_cycles: u64,
    cycles: u64,
    busy_ns: u64,
    idle_ns: u64,
}

impl CycleClock {
    fn new(st: &ReactorStats) -> Self {
        CycleClock {
            mark: Instant::now(),
            busy_cycles: 0,
            idle_cycles: 0,
            cycles: st.cycles.load(Ordering::Relaxed),
            busy_ns: st.busy_ns.load(Ordering::Relaxed),
            idle_ns: st.idle_ns.load(Ordering::Relaxed),
        }
    }

    #[inline]
    fn count(&mut self, busy: bool) {
        self.cycles += 1;
        if busy {
            self.busy_cycles += 1;
        } else {
            self.idle_cycles += 1;
        }
    }

    /// Read the clock, share the time since the last read, publish.
    /// Returns the time and whether any cycle since the last read worked.
    fn read(&mut self, st: &ReactorStats) -> (Instant, bool) {
        let now = Instant::now();
        let ns = now.duration_since(self.mark).as_nanos() as u64;
        let total = self.busy_cycles + self.idle_cycles;
        if total > 0 {
            let busy = (u128::from(ns) * u128::from(self.busy_cycles) / u128::from(total)) as u64;
            self.busy_ns += busy;
            self.idle_ns += ns - busy;
        } else {
            self.idle_ns += ns;
        }
        let worked = self.busy_cycles > 0;
        self.mark = now;
        self.busy_cycles = 0;
        self.idle_cycles = 0;
        // only this thread writes these: plain stores, no read-modify-write
        st.cycles.store(self.cycles, Ordering::Relaxed);
        st.busy_ns.store(self.busy_ns, Ordering::Relaxed);
        st.idle_ns.store(self.idle_ns, Ordering::Relaxed);
        (now, worked)
    }

    /// After a sleep: the whole sleep was idle.
    fn slept(&mut self, st: &ReactorStats) {
        self.idle_cycles += 1;
        self.read(st);
    }
}

struct Reactor<W> {
    cfg: ReactorConfig,
    work: W,
    shared: Shared,
    new_inbox: Receiver<Inbox<W>>,
    inboxes: Vec<Inbox<W>>,
    epoll: Option<Epoll>,
    /// The wake fds the epoll set is meant to hold (and the only ones
    /// `sleep` reads).
    watched: Vec<RawFd>,
    ready: Vec<RawFd>,
    /// The last rebuild could not add every source (it is retried at each
    /// sleep; the failure is logged once).
    epoll_retrying: bool,
    /// The work's wake generation the epoll set was built for.
    wake_generation: u64,
    /// Panics caught so far.
    panics: u32,
    /// When the stop was first seen.
    stopping_since: Option<Instant>,
}

impl<W: Work> Reactor<W> {
    fn new(
        cfg: ReactorConfig,
        work: W,
        shared: Shared,
        new_inbox: Receiver<Inbox<W>>,
        first: Inbox<W>,
    ) -> std::io::Result<Self> {
        Ok(Reactor {
            cfg,
            work,
            shared,
            new_inbox,
            inboxes: vec![first],
            epoll: Some(Epoll::new()?),
            watched: Vec::new(),
            ready: Vec::with_capacity(16),
            epoll_retrying: false,
            wake_generation: u64::MAX,
            panics: 0,
            stopping_since: None,
        })
    }

    /// The poll loop, restarted in failure mode after a panic.
    fn run(&mut self) {
        let mut clock = CycleClock::new(&self.shared.stats);
        loop {
            let r = catch_unwind(AssertUnwindSafe(|| {
                if self.panics < 2 {
                    self.poll_loop(&mut clock)
                } else {
                    self.inert_loop()
                }
            }));
            match r {
                Ok(()) => break,
                Err(payload) => self.failed(payload),
            }
        }
        clock.read(&self.shared.stats);
        tracing::info!(reactor = self.cfg.id, "reactor stopped");
    }

    /// A cycle panicked: say so once, and have the work fail what comes.
    fn failed(&mut self, payload: Box<dyn std::any::Any + Send>) {
        self.panics += 1;
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        self.shared.stats.failed.store(true, Ordering::Relaxed);
        let mut f = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            tracing::error!(reactor = self.cfg.id, core = ?self.cfg.core, "reactor failed: {what}; its requests fail from now on, other reactors keep serving");
            *f = Some(what);
        }
        drop(f);
        if self.panics == 1 {
            // failing mode is itself code that may panic: that sends the
            // reactor to the inert loop
            self.work.fail();
        } else if self.panics == 2 {
            tracing::error!(
                reactor = self.cfg.id,
                "reactor failed again in failing mode; it now only runs messages"
            );
        }
    }

    fn stopping(&mut self) -> bool {
        if self.stopping_since.is_none() && self.shared.stop.load(Ordering::Acquire) {
            self.stopping_since = Some(Instant::now());
        }
        self.stopping_since.is_some()
    }

    /// Whether a stopping reactor may exit: its work is done, or it has
    /// waited as long as it was allowed to.
    fn may_exit(&self) -> bool {
        let Some(since) = self.stopping_since else {
            return false;
        };
        if self.work.in_flight() == 0 {
            return true;
        }
        let limit = *self
            .shared
            .drain_limit
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if since.elapsed() >= limit {
            tracing::warn!(
                reactor = self.cfg.id,
                in_flight = self.work.in_flight(),
                "stopping with requests still in flight after {limit:?}"
            );
            return true;
        }
        false
    }

    fn poll_loop(&mut self, clock: &mut CycleClock) {
        let mut last_work = clock.mark;
        let mut n: u32 = 0;
        loop {
            let work = self.cycle(n.is_multiple_of(INBOX_EVERY));
            n = n.wrapping_add(1);
            clock.count(work > 0);
            let stopping = self.stopping();
            if stopping && self.may_exit() {
                return;
            }
            let idle = work == 0 && !stopping;
            // the clock costs more than a busy cycle's work: read it every
            // CLOCK_EVERY cycles, and when an idle reactor may go to sleep
            let read_clock = n.is_multiple_of(CLOCK_EVERY)
                || (idle
                    && match self.cfg.mode {
                        PollMode::Busy => false,
                        PollMode::Adaptive => n.is_multiple_of(IDLE_CLOCK_EVERY),
                        PollMode::Interrupt => true,
                    });
            if !read_clock {
                continue;
            }
            let (now, worked) = clock.read(&self.shared.stats);
            if worked {
                last_work = now;
            }
            let sleep = idle
                && match self.cfg.mode {
                    PollMode::Busy => false,
                    PollMode::Adaptive => now.duration_since(last_work) >= self.cfg.idle_spin,
                    PollMode::Interrupt => true,
                };
            if sleep {
                self.sleep();
                clock.slept(&self.shared.stats);
                // new senders may have registered while we slept
                n = 0;
            }
        }
    }

    /// After a panic in failing mode: run messages only (each on its own,
    /// so one bad message cannot stop the rest), sleeping on the doorbell.
    fn inert_loop(&mut self) {
        let bell = Epoll::new().and_then(|e| e.add(self.shared.bell.fd()).map(|()| e));
        loop {
            self.take_new_senders();
            for inbox in &mut self.inboxes {
                while let Some(m) = ringbuf::traits::Consumer::try_pop(inbox) {
                    let w = &mut self.work;
                    let _ = catch_unwind(AssertUnwindSafe(move || m(w)));
                }
            }
            if self.stopping() {
                return;
            }
            match &bell {
                Ok(e) => e.wait(&mut self.ready, SLEEP_MAX_MS),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
            self.shared.bell.clear();
            self.shared.stats.sleeps.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn take_new_senders(&mut self) {
        while let Ok(inbox) = self.new_inbox.try_recv() {
            self.inboxes.push(inbox);
        }
    }

    /// One poll cycle; returns the amount of work it found.
    fn cycle(&mut self, check_new_senders: bool) -> usize {
        if check_new_senders {
            self.take_new_senders();
        }
        let mut work = 0;
        for inbox in &mut self.inboxes {
            work += mailbox::drain(inbox, &mut self.work);
        }
        if work > 0 {
            self.work.clock_stale();
        }
        work += self.work.cycle();
        // In-flight work counts as work for the spin decision (a completion
        // is usually microseconds away), except in interrupt mode, which
        // sleeps on the work's completion fds instead: the mode for slow
        // backends (RBD) that share the machine's cores.
        work + usize::from(self.work.in_flight() > 0 && self.cfg.mode != PollMode::Interrupt)
    }

    /// Bring the epoll set up to date with the current wake sources.
    ///
    /// The set is rebuilt from a fresh epoll instance rather than edited:
    /// an epoll registration belongs to the open file, not the fd number,
    /// so one made through a poller's fd outlives that fd while another
    /// copy of the file stays open (a device keeps the kick file across a
    /// queue restart). EPOLL_CTL_DEL through the closed or reused number
    /// cannot reach it, and the stale entry would then report a number that
    /// may now name someone else's fd, whose count the wake-up would read
    /// and steal (a client's completion eventfd in the same process).
    fn sync_epoll(&mut self) {
        let generation = self.work.wake_generation();
        if self.epoll.is_some() && !self.epoll_retrying && generation == self.wake_generation {
            return;
        }
        self.watched.clear();
        self.watched.push(self.shared.bell.fd());
        self.work.wake_fds(&mut self.watched);
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                // Keep the old set (stale entries in it are filtered out in
                // `sleep` against `watched`) and the one-second timeout;
                // try again at the next sleep.
                if !self.epoll_retrying {
                    tracing::warn!(
                        reactor = self.cfg.id,
                        "epoll_create1: {e}; waking at least once a second"
                    );
                }
                self.epoll_retrying = true;
                return;
            }
        };
        let mut complete = true;
        for &fd in &self.watched {
            if let Err(e) = epoll.add(fd) {
                // said once, not at every retry
                if !self.epoll_retrying {
                    tracing::warn!(
                        reactor = self.cfg.id,
                        fd,
                        "epoll_ctl: {e}; waking at least once a second"
                    );
                }
                complete = false;
            }
        }
        // a source that could not be added is tried again at the next sleep
        self.epoll_retrying = !complete;
        // the old instance closes here, and every registration made through it
        self.epoll = Some(epoll);
        self.wake_generation = generation;
    }

    fn sleep(&mut self) {
        self.sync_epoll();
        let ready = self.work.prepare_sleep();
        if ready && !self.shared.stop.load(Ordering::Acquire) {
            self.shared.stats.sleeps.fetch_add(1, Ordering::Relaxed);
            let limit = self
                .work
                .sleep_limit_ms()
                .map_or(SLEEP_MAX_MS, |ms| (ms as i32).clamp(0, SLEEP_MAX_MS));
            if let Some(e) = &self.epoll {
                e.wait(&mut self.ready, limit);
            }
            for fd in &self.ready {
                if !self.watched.contains(fd) {
                    continue; // an entry from an older set (see sync_epoll)
                }
                // Drain the eventfd's count. Pollers hand over non-blocking
                // fds; the drain guards against one that is not, so a
                // reactor never blocks here.
                sys::eventfd_drain(*fd);
            }
        }
        self.shared.bell.clear();
        self.work.after_sleep();
    }
}
