//! Reactors driving a real engine: pollers, completion routing, messages,
//! statistics, sleeping and waking, and draining at stop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quern_bdev::drivers::MallocBdev;
use quern_bdev::{EngineConfig, IoEngine, IoKind, IoRequest, IoResult};
use quern_reactor::{remove_when_idle, spawn_reactor, PollMode, Poller, ReactorConfig};

/// Writes `total` 4 KiB blocks, QD 8, then verifies nothing.
struct Writer {
    dev: u16,
    buf: Vec<u8>,
    next: u64,
    total: u64,
    inflight: usize,
    done: Arc<AtomicUsize>,
}

impl Poller for Writer {
    fn poll(&mut self, io: &mut IoEngine, base: u64) -> usize {
        let mut n = 0;
        while self.inflight < 8 && self.next < self.total {
            let v = [libc::iovec {
                iov_base: self.buf.as_mut_ptr().cast(),
                iov_len: 4096,
            }];
            let r = IoRequest {
                dev: self.dev,
                kind: IoKind::Write,
                offset: self.next * 4096,
                len: 4096,
                iov: &v,
                fua: false,
                cookie: base | self.next,
            };
            io.submit(&r).unwrap();
            self.next += 1;
            self.inflight += 1;
            n += 1;
        }
        n
    }
    fn on_complete(&mut self, _cookie: u64, result: IoResult) {
        assert_eq!(result, Ok(4096));
        self.inflight -= 1;
        self.done.fetch_add(1, Ordering::Relaxed);
    }
    fn in_flight(&self) -> usize {
        self.inflight
    }
}

fn cfg(mode: PollMode) -> ReactorConfig {
    ReactorConfig {
        id: 0,
        core: None,
        mode,
        idle_spin: Duration::from_micros(100),
        engine: EngineConfig::default(),
    }
}

fn run_writer(mode: PollMode) {
    let r = spawn_reactor(cfg(mode)).unwrap();
    let m = Arc::new(MallocBdev::new("m", 8 << 20, 512, false).unwrap());
    let dev = r.call(move |ctx| ctx.io.add_device(m).unwrap());
    let done = Arc::new(AtomicUsize::new(0));
    let w = Writer {
        dev,
        buf: vec![7u8; 4096],
        next: 0,
        total: 1000,
        inflight: 0,
        done: done.clone(),
    };
    let slot = r.call(move |ctx| ctx.add_poller(Box::new(w)));
    let t = Instant::now();
    while done.load(Ordering::Relaxed) < 1000 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "writer stalled at {}",
            done.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(remove_when_idle(&r, slot).is_some());
    let s = r.stats.snapshot();
    assert_eq!(s.ios_submitted, 1000);
    assert_eq!(s.ios_completed, 1000);
    assert!(s.cycles > 0);
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

#[test]
fn interrupt_reactor_sleeps_and_wakes_on_messages() {
    let r = spawn_reactor(cfg(PollMode::Interrupt)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let before = r.stats.snapshot();
    assert!(before.sleeps > 0, "an idle interrupt-mode reactor sleeps");
    // a message wakes it at once
    let t = Instant::now();
    assert_eq!(r.call(|ctx| ctx.id), 0);
    assert!(t.elapsed() < Duration::from_millis(500));
    // idle: it spends its time asleep, not spinning
    std::thread::sleep(Duration::from_millis(200));
    let s = r.stats.snapshot();
    assert!(
        s.cycles - before.cycles < 1000,
        "idle reactor cycled {} times",
        s.cycles - before.cycles
    );
    r.stop();
}

#[test]
fn separate_mailboxes_deliver_in_order() {
    let r = spawn_reactor(cfg(PollMode::Adaptive)).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut mb = r.mailbox();
    for i in 0..200 {
        let s = seen.clone();
        mb.send(Box::new(move |_| s.lock().unwrap().push(i)));
    }
    r.call(|_| ());
    let t = Instant::now();
    while seen.lock().unwrap().len() < 200 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(*seen.lock().unwrap(), (0..200).collect::<Vec<_>>());
    r.stop();
}

#[test]
fn pins_to_an_existing_core() {
    let cores = quern_reactor::available_cores();
    assert!(!cores.is_empty());
    let mut c = cfg(PollMode::Adaptive);
    c.core = Some(*cores.last().unwrap());
    let r = spawn_reactor(c).unwrap();
    let cpu = r.call(|_| unsafe { libc::sched_getcpu() });
    assert_eq!(cpu as usize, *cores.last().unwrap());
    r.stop();
}

/// A poller that only lends the reactor a wake fd (the test owns the fd).
struct Waker(i32);

impl Poller for Waker {
    fn poll(&mut self, _io: &mut IoEngine, _base: u64) -> usize {
        0
    }
    fn on_complete(&mut self, _cookie: u64, _result: IoResult) {}
    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.0)
    }
}

fn eventfd() -> i32 {
    // SAFETY: plain eventfd creation.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    fd
}

fn bump(fd: i32) {
    let one: u64 = 1;
    // SAFETY: an 8-byte write to an eventfd.
    assert_eq!(
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) },
        8
    );
}

fn count(fd: i32) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: an 8-byte read from a non-blocking eventfd.
    let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    if n == 8 {
        v
    } else {
        0
    }
}

fn wait_for_sleeps(r: &quern_reactor::ReactorHandle, more_than: u64) {
    let t = Instant::now();
    while r.stats.snapshot().sleeps <= more_than {
        assert!(t.elapsed() < Duration::from_secs(10), "reactor never slept");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A queue restart replaces a poller's wake fd while the device keeps the
/// kick file open. The reactor must forget the old registration: if it
/// did not, a kick would wake it through the old fd number, by then reused
/// for someone else's eventfd, and it would read (steal) that eventfd's
/// count. This is how a libblkio client in the same process once lost a
/// completion notification and timed out.
#[test]
fn replaced_wake_fd_is_forgotten_and_its_number_reuse_is_not_read() {
    let r = spawn_reactor(cfg(PollMode::Interrupt)).unwrap();
    let kick = eventfd();
    // SAFETY: dup of a valid fd.
    let first = unsafe { libc::dup(kick) };
    assert!(first >= 0);
    let s0 = r.stats.snapshot().sleeps;
    let slot = r.call(move |ctx| ctx.add_poller(Box::new(Waker(first))));
    // it sleeps with `first` in its epoll set
    wait_for_sleeps(&r, s0);
    // The poller goes, and before the reactor next sleeps the number
    // `first` comes to name a bystander's eventfd (dup2 replaces the file
    // under the number without freeing it, so no other test thread can
    // take the number in between).
    let bystander = eventfd();
    let gone = r.call(move |ctx| {
        let p = ctx.remove_poller(slot);
        // SAFETY: both fds are ours.
        let moved = unsafe { libc::dup2(bystander, first) };
        moved == first && p.is_some()
    });
    assert!(gone);
    bump(first);
    let second = eventfd();
    let s1 = r.stats.snapshot().sleeps;
    r.call(move |ctx| ctx.add_poller(Box::new(Waker(second))));
    wait_for_sleeps(&r, s1);
    // kick through the original file: the reactor no longer watches it
    for _ in 0..20 {
        bump(kick);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(count(first), 1, "the reactor read a bystander's eventfd");
    // the current wake fd still wakes it
    let s2 = r.stats.snapshot().sleeps;
    bump(second);
    // two sleeps later it has surely woken and drained it (the count of
    // sleeps goes up as a sleep begins, so one could be the wake itself)
    wait_for_sleeps(&r, s2 + 1);
    assert_eq!(count(second), 0, "the reactor drains its wake fd");
    r.stop();
    // SAFETY: closing our fds.
    unsafe {
        libc::close(kick);
        libc::close(first);
        libc::close(bystander);
        libc::close(second);
    }
}
