//! A reactor running I/O: pollers feeding a real engine, completion
//! routing by cookie, statistics, removal that drains, and failure.

mod common;
use common::Put;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quern_bdev::drivers::MallocBdev;
use quern_bdev::poller::{remove_when_idle, IoStats, RemoveError};
use quern_bdev::{
    Cookie, EngineConfig, IoEngine, IoKind, IoPoller, IoReactor, IoRequest, IoResult, PollerId,
    ReactorIo,
};
use quern_reactor::{spawn_reactor, PollMode, ReactorConfig};

/// Writes `total` 4 KiB blocks at QD 8 (`total == u64::MAX`: forever).
struct Writer {
    dev: u16,
    buf: Vec<u8>,
    next: u64,
    total: u64,
    inflight: usize,
    done: Arc<AtomicUsize>,
    quiesced: bool,
    failing: bool,
    panic_in_poll: bool,
}

impl Writer {
    fn new(dev: u16, total: u64, done: Arc<AtomicUsize>) -> Self {
        Writer {
            dev,
            buf: vec![7u8; 4096],
            next: 0,
            total,
            inflight: 0,
            done,
            quiesced: false,
            failing: false,
            panic_in_poll: false,
        }
    }
}

impl IoPoller for Writer {
    fn poll(&mut self, io: &mut IoEngine, me: PollerId) -> usize {
        if self.panic_in_poll {
            panic!("poller bug");
        }
        let mut n = 0;
        while !self.quiesced && !self.failing && self.inflight < 8 && self.next < self.total {
            let v = [libc::iovec {
                iov_base: self.buf.as_mut_ptr().cast(),
                iov_len: 4096,
            }];
            let r = IoRequest {
                dev: self.dev,
                kind: IoKind::Write,
                offset: (self.next % 2048) * 4096,
                len: 4096,
                iov: &v,
                fua: false,
                cookie: Cookie::new(me, self.next),
            };
            io.put(&r).unwrap();
            self.next += 1;
            self.inflight += 1;
            n += 1;
        }
        n
    }
    fn on_complete(&mut self, _tag: u64, result: IoResult) {
        assert_eq!(result, Ok(4096));
        self.inflight -= 1;
        self.done.fetch_add(1, Ordering::Relaxed);
    }
    fn in_flight(&self) -> usize {
        self.inflight
    }
    fn quiesce(&mut self) {
        self.quiesced = true;
    }
    fn fail(&mut self) {
        self.failing = true;
    }
}

fn reactor(mode: PollMode) -> (Arc<IoReactor>, Arc<IoStats>) {
    let st = Arc::new(IoStats::default());
    let s = st.clone();
    let r = spawn_reactor(
        ReactorConfig {
            id: 0,
            core: None,
            mode,
            idle_spin: Duration::from_micros(100),
        },
        move || ReactorIo::new(0, EngineConfig::default(), s),
    )
    .unwrap();
    (r, st)
}

fn malloc_on(r: &IoReactor) -> u16 {
    let m = Arc::new(MallocBdev::new("m", 8 << 20, 512, false).unwrap());
    r.call(move |w| w.io.add_device(m).unwrap()).unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(20), "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn run_writer(mode: PollMode) {
    let (r, st) = reactor(mode);
    let dev = malloc_on(&r);
    let done = Arc::new(AtomicUsize::new(0));
    let w = Writer::new(dev, 1000, done.clone());
    let id = r
        .call(move |w2| w2.add_poller(Box::new(w)).ok().unwrap())
        .unwrap();
    wait_until("writer stalled", || done.load(Ordering::Relaxed) == 1000);
    assert!(remove_when_idle(&r, id, Duration::from_secs(5))
        .unwrap()
        .is_some());
    let s = st.snapshot();
    assert_eq!(s.ios_submitted, 1000);
    assert_eq!(s.ios_completed, 1000);
    assert_eq!(s.pollers, 0);
    // queued concurrently at QD8 with sequential offsets: merged
    assert!(s.merge_requests_out < s.merge_requests_in, "{s:?}");
    r.stop();
}

#[test]
fn busy_reactor_runs_a_poller_to_completion() {
    run_writer(PollMode::Busy);
}

#[test]
fn adaptive_reactor_runs_a_poller_to_completion() {
    run_writer(PollMode::Adaptive);
}

/// Removing a poller whose source never runs dry used to wait for its
/// in-flight count to reach zero while it kept taking new requests (a
/// livelock under load); now it stops taking first, then drains.
#[test]
fn removing_a_busy_poller_stops_it_taking_requests_then_drains() {
    let (r, _) = reactor(PollMode::Busy);
    let dev = malloc_on(&r);
    let done = Arc::new(AtomicUsize::new(0));
    let id = r
        .call(move |w| {
            w.add_poller(Box::new(Writer::new(dev, u64::MAX, done)))
                .ok()
                .unwrap()
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    let p = remove_when_idle(&r, id, Duration::from_secs(5)).unwrap();
    assert!(p.is_some());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    r.stop();
}

/// The livelock in its simplest form: a source that always has a request
/// in flight while it may take new ones (a guest that keeps its queue
/// full, completions staggered). Removal must stop it taking new work
/// first; waiting for its in-flight count to reach zero alone never ends.
#[test]
fn removing_a_source_that_is_never_empty_ends() {
    struct NeverEmpty {
        quiesced: bool,
    }
    impl IoPoller for NeverEmpty {
        fn poll(&mut self, _io: &mut IoEngine, _me: PollerId) -> usize {
            0
        }
        fn on_complete(&mut self, _tag: u64, _result: IoResult) {}
        fn in_flight(&self) -> usize {
            usize::from(!self.quiesced)
        }
        fn quiesce(&mut self) {
            self.quiesced = true;
        }
    }
    let (r, _) = reactor(PollMode::Adaptive);
    let id = r
        .call(|w| {
            w.add_poller(Box::new(NeverEmpty { quiesced: false }))
                .ok()
                .unwrap()
        })
        .unwrap();
    let t = Instant::now();
    assert!(remove_when_idle(&r, id, Duration::from_secs(5))
        .unwrap()
        .is_some());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    r.stop();
}

/// A poller whose requests do not finish in time stays registered,
/// quiesced, and the caller is told how many are in flight.
#[test]
fn removal_gives_up_after_its_limit_with_requests_in_flight() {
    struct Stuck;
    impl IoPoller for Stuck {
        fn poll(&mut self, _io: &mut IoEngine, _me: PollerId) -> usize {
            0
        }
        fn on_complete(&mut self, _tag: u64, _result: IoResult) {}
        fn in_flight(&self) -> usize {
            2
        }
    }
    let (r, st) = reactor(PollMode::Adaptive);
    let id = r
        .call(|w| w.add_poller(Box::new(Stuck)).ok().unwrap())
        .unwrap();
    match remove_when_idle(&r, id, Duration::from_millis(100)) {
        Err(RemoveError::Busy { in_flight: 2, .. }) => {}
        other => panic!("{:?}", other.map(|p| p.is_some())),
    }
    assert_eq!(st.snapshot().pollers, 1);
    r.stop();
}

/// A poller that panics takes its reactor into failing mode: every poller
/// there is told to fail, the reactor keeps running messages, and another
/// reactor is untouched.
#[test]
fn a_panicking_poller_fails_its_reactor_only() {
    let (bad, _) = reactor(PollMode::Adaptive);
    let (good, good_st) = reactor(PollMode::Adaptive);
    let (d_bad, d_good) = (malloc_on(&bad), malloc_on(&good));
    let done = Arc::new(AtomicUsize::new(0));
    let d2 = done.clone();
    let victim = bad
        .call(move |w| {
            w.add_poller(Box::new(Writer::new(d_bad, 100, d2)))
                .ok()
                .unwrap()
        })
        .unwrap();
    wait_until("victim did not run", || done.load(Ordering::Relaxed) == 100);
    let culprit_done = Arc::new(AtomicUsize::new(0));
    bad.call(move |w| {
        let mut p = Writer::new(d_bad, 1, culprit_done);
        p.panic_in_poll = true;
        w.add_poller(Box::new(p)).ok().unwrap()
    })
    .unwrap();
    wait_until("failure not reported", || bad.failure().is_some());
    assert_eq!(bad.failure().as_deref(), Some("poller bug"));
    // the victim was told to fail and can still be removed
    assert!(remove_when_idle(&bad, victim, Duration::from_secs(5))
        .unwrap()
        .is_some());
    // the other reactor serves as before
    let done = Arc::new(AtomicUsize::new(0));
    let d3 = done.clone();
    good.call(move |w| {
        w.add_poller(Box::new(Writer::new(d_good, 500, d3)))
            .ok()
            .unwrap()
    })
    .unwrap();
    wait_until("good reactor stalled", || {
        done.load(Ordering::Relaxed) == 500
    });
    assert!(good.failure().is_none());
    assert_eq!(good_st.snapshot().ios_completed, 500);
    bad.stop_within(Duration::from_secs(1));
    good.stop();
}

#[test]
fn cookies_carry_the_poller_and_its_tag() {
    let c = Cookie::new(PollerId(513), (1 << 48) - 1);
    assert_eq!(c.poller(), PollerId(513));
    assert_eq!(c.tag(), (1 << 48) - 1);
    let c = Cookie::new(PollerId(u16::MAX), 7);
    assert_eq!((c.poller(), c.tag()), (PollerId(u16::MAX), 7));
}

/// Sees the cycle's clock reading in `poll` and takes the end-of-cycle
/// reading in `end_cycle`, as a device queue with histograms on does.
struct ClockProbe {
    seen: Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    at_poll: u64,
}

impl IoPoller for ClockProbe {
    fn poll(&mut self, io: &mut IoEngine, _me: PollerId) -> usize {
        self.at_poll = io.clock();
        1
    }
    fn on_complete(&mut self, _tag: u64, _result: IoResult) {}
    fn end_cycle(&mut self, now: &mut u64) {
        let end = quern_reactor::clock::ticks_once(now);
        self.seen.lock().unwrap().push((self.at_poll, end));
    }
}

/// A cycle that follows the last one at once starts with the reading the
/// last one took after its publish (one clock read a cycle, not two); one
/// after a sleep or after messages ran reads the clock afresh.
#[test]
fn a_cycle_reuses_the_last_cycles_end_reading_unless_something_ran_between() {
    use quern_reactor::Work;
    let mut r = ReactorIo::new(0, EngineConfig::default(), Arc::new(IoStats::default())).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let probe = ClockProbe {
        seen: seen.clone(),
        at_poll: 0,
    };
    assert!(r.add_poller(Box::new(probe)).is_ok());
    let gap = || {
        // a few microseconds, so a fresh reading surely differs
        let t = Instant::now();
        while t.elapsed() < Duration::from_micros(20) {}
    };
    r.cycle();
    gap();
    r.cycle();
    gap();
    r.clock_stale();
    r.cycle();
    gap();
    r.after_sleep();
    r.cycle();
    let s = seen.lock().unwrap().clone();
    assert_eq!(s.len(), 4);
    assert_eq!(s[1].0, s[0].1, "a cycle straight after: {s:?}");
    assert!(s[2].0 > s[1].1, "after messages ran: {s:?}");
    assert!(s[3].0 > s[2].1, "after a sleep: {s:?}");
    for (at_poll, end) in s {
        assert!(at_poll <= end);
    }
}
