//! The reactor thread and its poll loop.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use quern_bdev::IoEngine;

use crate::mailbox::{self, Doorbell, Inbox, Mailbox, Msg};
use crate::{PollMode, Poller, ReactorConfig, ReactorStats, COOKIE_BITS, COOKIE_MASK};

/// A reactor's state as messages see it.
pub struct ReactorCtx {
    pub id: usize,
    pub io: IoEngine,
    pollers: Vec<Option<Box<dyn Poller>>>,
    epoll_dirty: bool,
}

impl ReactorCtx {
    /// Register a poller; returns its slot (the high bits of its cookies).
    pub fn add_poller(&mut self, p: Box<dyn Poller>) -> usize {
        self.epoll_dirty = true;
        if let Some(i) = self.pollers.iter().position(Option::is_none) {
            self.pollers[i] = Some(p);
            i
        } else {
            self.pollers.push(Some(p));
            self.pollers.len() - 1
        }
    }

    /// Unregister a poller. The caller must first let its requests drain
    /// (see [`Poller::in_flight`]).
    pub fn remove_poller(&mut self, slot: usize) -> Option<Box<dyn Poller>> {
        self.epoll_dirty = true;
        self.pollers.get_mut(slot)?.take()
    }

    pub fn poller_in_flight(&self, slot: usize) -> usize {
        self.pollers
            .get(slot)
            .and_then(|p| p.as_ref())
            .map_or(0, |p| p.in_flight())
    }
}

/// The control plane's handle on a running reactor.
pub struct ReactorHandle {
    pub id: usize,
    pub core: Option<usize>,
    pub stats: Arc<ReactorStats>,
    bell: Arc<Doorbell>,
    new_inbox: Sender<Inbox>,
    mailbox: Mutex<Mailbox>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl ReactorHandle {
    /// A new SPSC ring to this reactor, for a sender of its own.
    pub fn mailbox(&self) -> Mailbox {
        let (mb, inbox) = Mailbox::new(self.bell.clone());
        let _ = self.new_inbox.send(inbox);
        self.bell.ring();
        mb
    }

    /// Send a message through the handle's shared mailbox (control plane).
    pub fn send(&self, msg: Msg) {
        self.mailbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(msg);
    }

    /// Run `f` on the reactor and wait for its answer (control plane only).
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut ReactorCtx) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Box::new(move |ctx| {
            let _ = tx.send(f(ctx));
        }));
        rx.recv().expect("reactor thread ended")
    }

    /// Ask the reactor to finish its in-flight I/O and exit, and wait for it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.bell.ring();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// Start a reactor thread. Fails if its io_uring cannot be created.
pub fn spawn_reactor(cfg: ReactorConfig) -> std::io::Result<Arc<ReactorHandle>> {
    let bell = Arc::new(Doorbell::new()?);
    let (new_inbox_tx, new_inbox_rx) = crossbeam_channel::unbounded();
    let stats = Arc::new(ReactorStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (mb, first_inbox) = Mailbox::new(bell.clone());
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let thread = {
        let (bell, stats, stop, cfg) = (bell.clone(), stats.clone(), stop.clone(), cfg.clone());
        std::thread::Builder::new()
            .name(format!("reactor{}", cfg.id))
            .spawn(move || {
                if let Some(core) = cfg.core {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                        tracing::warn!(reactor = cfg.id, core, "could not pin reactor to its core");
                    }
                }
                let io = match IoEngine::new(cfg.engine) {
                    Ok(io) => io,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut r =
                    match Reactor::new(cfg, io, bell, stats, stop, new_inbox_rx, first_inbox) {
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
        thread: Mutex::new(Some(thread)),
    }))
}

/// Poll cycles between clock reads under load.
const CLOCK_EVERY: u32 = 32;
/// Poll cycles between clock reads while idle (the sleep decision).
const IDLE_CLOCK_EVERY: u32 = 4;
/// Poll cycles between checks for new senders (rare: a new mailbox).
const INBOX_EVERY: u32 = 64;

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

struct Reactor {
    cfg: ReactorConfig,
    ctx: ReactorCtx,
    bell: Arc<Doorbell>,
    ring_efd: Doorbell,
    stats: Arc<ReactorStats>,
    stop: Arc<AtomicBool>,
    new_inbox: Receiver<Inbox>,
    inboxes: Vec<Inbox>,
    epfd: RawFd,
    /// The wake fds the epoll set is meant to hold (and the only ones
    /// `sleep` reads).
    watched: Vec<RawFd>,
    /// The last rebuild could not add every source (it is retried at each
    /// sleep; the failure is logged once).
    epoll_retrying: bool,
    /// The engine's device generation the epoll set was built for.
    device_generation: u64,
}

impl Drop for Reactor {
    fn drop(&mut self) {
        // SAFETY: epfd is ours.
        unsafe { libc::close(self.epfd) };
    }
}

impl Reactor {
    fn new(
        cfg: ReactorConfig,
        io: IoEngine,
        bell: Arc<Doorbell>,
        stats: Arc<ReactorStats>,
        stop: Arc<AtomicBool>,
        new_inbox: Receiver<Inbox>,
        first: Inbox,
    ) -> std::io::Result<Self> {
        let ring_efd = Doorbell::new()?;
        io.ring().submitter().register_eventfd(ring_efd.fd())?;
        // SAFETY: creates a new epoll instance.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let r = Reactor {
            ctx: ReactorCtx {
                id: cfg.id,
                io,
                pollers: Vec::new(),
                epoll_dirty: true,
            },
            cfg,
            bell,
            ring_efd,
            stats,
            stop,
            new_inbox,
            inboxes: vec![first],
            epfd,
            watched: Vec::new(),
            epoll_retrying: false,
            device_generation: u64::MAX,
        };
        Ok(r)
    }

    fn run(&mut self) {
        let mut clock = CycleClock::new(&self.stats);
        let mut last_work = clock.mark;
        let mut stopping = false;
        let mut n: u32 = 0;
        loop {
            let work = self.cycle(n.is_multiple_of(INBOX_EVERY));
            n = n.wrapping_add(1);
            clock.count(work > 0);
            if !stopping && self.stop.load(Ordering::Acquire) {
                stopping = true;
            }
            if stopping && self.ctx.io.in_flight() == 0 {
                break;
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
            let (now, worked) = clock.read(&self.stats);
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
                clock.slept(&self.stats);
                // new senders may have registered while we slept
                n = 0;
            }
        }
        clock.read(&self.stats);
        tracing::info!(reactor = self.cfg.id, "reactor stopped");
    }

    /// One poll cycle; returns the amount of work it found.
    fn cycle(&mut self, check_new_senders: bool) -> usize {
        let mut work = 0;
        if check_new_senders {
            while let Ok(inbox) = self.new_inbox.try_recv() {
                self.inboxes.push(inbox);
            }
        }
        for inbox in &mut self.inboxes {
            work += mailbox::drain(inbox, &mut self.ctx);
        }
        let ReactorCtx { io, pollers, .. } = &mut self.ctx;
        let before = io.stats();
        for (slot, p) in pollers.iter_mut().enumerate() {
            if let Some(p) = p {
                work += p.poll(io, (slot as u64) << COOKIE_BITS);
            }
        }
        io.flush();
        let done = io.reap(|cookie, res| {
            if let Some(Some(p)) = pollers.get_mut((cookie >> COOKIE_BITS) as usize) {
                p.on_complete(cookie & COOKIE_MASK, res);
            }
        });
        let after = io.stats();
        let st = &self.stats;
        if after.requests_submitted != before.requests_submitted || done > 0 {
            st.ios_submitted
                .store(after.requests_submitted, Ordering::Relaxed);
            st.ios_completed
                .store(after.requests_completed, Ordering::Relaxed);
            let m = io.merge_stats();
            st.merge_requests_in.store(m.requests_in, Ordering::Relaxed);
            st.merge_requests_out
                .store(m.requests_out, Ordering::Relaxed);
            st.merge_bytes.store(m.bytes, Ordering::Relaxed);
        }
        // statistics first, so a client that sees its completion sees them too
        for p in pollers.iter_mut().flatten() {
            p.end_cycle();
        }
        work += done;
        // In-flight I/O counts as work for the spin decision (a completion
        // is usually microseconds away), except in interrupt mode, which
        // sleeps on the ring's and the devices' completion fds instead:
        // the mode for slow backends (RBD) that share the machine's cores.
        work + usize::from(io.in_flight() > 0 && self.cfg.mode != PollMode::Interrupt)
    }

    /// Bring the epoll set up to date with the current wake sources.
    ///
    /// The set is rebuilt from a fresh epoll instance rather than edited:
    /// an epoll registration belongs to the open file, not the fd number,
    /// so one made through a poller's fd outlives that fd while another
    /// copy of the file stays open (the device keeps the kick file across
    /// a queue restart). EPOLL_CTL_DEL through the closed or reused number
    /// cannot reach it, and the stale entry would then report a number that
    /// may now name someone else's fd, whose count the wake-up would read
    /// and steal (a client's completion eventfd in the same process).
    fn sync_epoll(&mut self) {
        let generation = self.ctx.io.device_generation();
        if !self.ctx.epoll_dirty && generation == self.device_generation {
            return;
        }
        self.watched.clear();
        self.watched.push(self.bell.fd());
        self.watched.push(self.ring_efd.fd());
        let ReactorCtx { pollers, io, .. } = &self.ctx;
        self.watched
            .extend(pollers.iter().flatten().filter_map(|p| p.wake_fd()));
        self.watched.extend(io.device_wake_fds());
        // SAFETY: creates a new epoll instance.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            // Keep the old set (stale entries in it are filtered out in
            // `sleep` against `watched`) and the one-second timeout; try
            // again at the next sleep.
            if !self.epoll_retrying {
                tracing::warn!(
                    reactor = self.cfg.id,
                    "epoll_create1: {}; waking at least once a second",
                    std::io::Error::last_os_error()
                );
            }
            self.epoll_retrying = true;
            return;
        }
        let mut complete = true;
        for &fd in &self.watched {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: fd as u64,
            };
            // SAFETY: valid epoll fd and event struct.
            if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
                let e = std::io::Error::last_os_error();
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
        self.epoll_retrying = !complete;
        // SAFETY: the old epoll fd is ours; closing it drops every
        // registration made through it.
        unsafe { libc::close(self.epfd) };
        self.epfd = epfd;
        // a source that could not be added is tried again at the next sleep
        self.ctx.epoll_dirty = !complete;
        self.device_generation = generation;
    }

    fn sleep(&mut self) {
        self.sync_epoll();
        let mut ready = true;
        for p in self.ctx.pollers.iter_mut().flatten() {
            ready &= p.prepare_sleep();
        }
        if ready && !self.stop.load(Ordering::Acquire) {
            self.stats.sleeps.fetch_add(1, Ordering::Relaxed);
            let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
            // a timeout bounds any missed wake-up to one second
            // SAFETY: evs is a valid buffer of 16 events.
            let n =
                unsafe { libc::epoll_wait(self.epfd, evs.as_mut_ptr(), evs.len() as i32, 1000) };
            for ev in evs.iter().take(n.max(0) as usize) {
                let fd = ev.u64 as RawFd;
                if !self.watched.contains(&fd) {
                    continue; // an entry from an older set (see sync_epoll)
                }
                let mut v: u64 = 0;
                // Drain the eventfd's count. Pollers hand over non-blocking
                // fds; the poll with a zero timeout guards against one that
                // is not, so a reactor never blocks here.
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; then an 8-byte read into a u64.
                unsafe {
                    if libc::poll(&mut pfd, 1, 0) == 1 && pfd.revents & libc::POLLIN != 0 {
                        libc::read(fd, (&mut v as *mut u64).cast(), 8);
                    }
                }
            }
        }
        self.bell.clear();
        for p in self.ctx.pollers.iter_mut().flatten() {
            p.after_sleep();
        }
    }
}

/// Wait for a poller's in-flight requests to finish, then remove it.
pub fn remove_when_idle(handle: &ReactorHandle, slot: usize) -> Option<Box<dyn Poller>> {
    loop {
        let (inflight, p) = handle.call(move |ctx| {
            let n = ctx.poller_in_flight(slot);
            if n == 0 {
                (0, ctx.remove_poller(slot))
            } else {
                (n, None)
            }
        });
        if inflight == 0 {
            return p;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}
