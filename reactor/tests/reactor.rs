//! Reactors running a work of their own: cycles, messages, statistics,
//! sleeping and waking, failure containment, and draining at stop.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quern_reactor::{spawn_reactor, PollMode, ReactorConfig, ReactorGone, ReactorHandle, Work};

/// A work that counts down `left` units, one per cycle, and can be told to
/// panic, keep requests "in flight", or watch extra wake fds.
#[derive(Default)]
struct Toy {
    left: u64,
    done: Arc<AtomicU64>,
    panic_next: bool,
    in_flight: usize,
    failed: Arc<AtomicBool>,
    fds: Vec<RawFd>,
    generation: u64,
}

impl Work for Toy {
    fn cycle(&mut self) -> usize {
        if self.panic_next {
            self.panic_next = false;
            panic!("injected failure");
        }
        if self.left > 0 {
            self.left -= 1;
            self.done.fetch_add(1, Ordering::Relaxed);
            return 1;
        }
        0
    }
    fn in_flight(&self) -> usize {
        self.in_flight
    }
    fn wake_fds(&self, out: &mut Vec<RawFd>) {
        out.extend(&self.fds);
    }
    fn wake_generation(&self) -> u64 {
        self.generation
    }
    fn fail(&mut self) {
        self.failed.store(true, Ordering::Relaxed);
    }
}

fn cfg(mode: PollMode) -> ReactorConfig {
    ReactorConfig {
        id: 0,
        core: None,
        mode,
        idle_spin: Duration::from_micros(100),
    }
}

fn toy(mode: PollMode, t: Toy) -> Arc<ReactorHandle<Toy>> {
    spawn_reactor(cfg(mode), move || Ok(t)).unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn runs_to_completion(mode: PollMode) {
    let done = Arc::new(AtomicU64::new(0));
    let r = toy(
        mode,
        Toy {
            left: 10_000,
            done: done.clone(),
            ..Toy::default()
        },
    );
    wait_until("work stalled", || done.load(Ordering::Relaxed) == 10_000);
    let s = r.stats.snapshot();
    r.stop();
    assert!(r.stats.snapshot().cycles >= s.cycles);
    assert!(s.cycles > 0 && !s.failed);
}

#[test]
fn busy_reactor_runs_its_work_to_completion() {
    runs_to_completion(PollMode::Busy);
}

#[test]
fn adaptive_reactor_runs_its_work_to_completion() {
    runs_to_completion(PollMode::Adaptive);
}

#[test]
fn interrupt_reactor_sleeps_and_wakes_on_messages() {
    let r = toy(PollMode::Interrupt, Toy::default());
    std::thread::sleep(Duration::from_millis(50));
    let before = r.stats.snapshot();
    assert!(before.sleeps > 0, "an idle interrupt-mode reactor sleeps");
    // a message wakes it at once
    let t = Instant::now();
    assert_eq!(r.call(|w| w.left).unwrap(), 0);
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
    let r = toy(PollMode::Adaptive, Toy::default());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut mb = r.mailbox();
    for i in 0..200 {
        let s = seen.clone();
        mb.send(Box::new(move |_| s.lock().unwrap().push(i)))
            .unwrap();
    }
    r.call(|_| ()).unwrap();
    wait_until("messages lost", || seen.lock().unwrap().len() == 200);
    assert_eq!(*seen.lock().unwrap(), (0..200).collect::<Vec<_>>());
    r.stop();
}

#[test]
fn pins_to_an_existing_core() {
    let cores = quern_reactor::available_cores();
    assert!(!cores.is_empty());
    let mut c = cfg(PollMode::Adaptive);
    c.core = Some(*cores.last().unwrap());
    let r = spawn_reactor(c, || Ok(Toy::default())).unwrap();
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = r.call(|_| unsafe { libc::sched_getcpu() }).unwrap();
    assert_eq!(cpu as usize, *cores.last().unwrap());
    r.stop();
}

#[test]
fn a_work_that_cannot_be_built_fails_the_spawn() {
    let r = spawn_reactor(cfg(PollMode::Busy), || -> std::io::Result<Toy> {
        Err(std::io::Error::other("no ring"))
    });
    assert_eq!(r.err().map(|e| e.to_string()), Some("no ring".into()));
}

/// A cycle that panics is contained: the reactor says why once, tells its
/// work to fail, and keeps running messages, so a caller never blocks or
/// panics on it ("expect reactor thread ended" cascaded before).
#[test]
fn a_panicking_cycle_fails_the_reactor_not_the_process() {
    let failed = Arc::new(AtomicBool::new(false));
    let r = toy(
        PollMode::Adaptive,
        Toy {
            failed: failed.clone(),
            ..Toy::default()
        },
    );
    assert!(r.failure().is_none());
    r.call(|w| w.panic_next = true).unwrap();
    wait_until("failure not reported", || r.failure().is_some());
    assert_eq!(r.failure().as_deref(), Some("injected failure"));
    assert!(r.stats.snapshot().failed);
    assert!(failed.load(Ordering::Relaxed), "the work was told to fail");
    // messages still run, and cycles go on
    assert_eq!(r.call(|w| w.left + 5).unwrap(), 5);
    let c = r.stats.snapshot().cycles;
    wait_until("cycles stopped", || r.stats.snapshot().cycles > c);
    // a message that panics is an error for its caller, not a hang
    assert_eq!(
        r.call(|_| -> u32 { panic!("bad message") }),
        Err(ReactorGone)
    );
    // failing again: the reactor only runs messages from now on
    assert_eq!(r.call(|_| 1).unwrap(), 1);
    r.stop();
    assert!(!r.is_alive());
}

#[test]
fn a_stopped_reactor_refuses_messages() {
    let r = toy(PollMode::Adaptive, Toy::default());
    r.stop();
    assert_eq!(r.call(|_| 1), Err(ReactorGone));
    assert!(r.send(Box::new(|_| ())).is_err());
}

#[test]
fn stopping_waits_for_in_flight_work_within_a_bound() {
    let r = toy(
        PollMode::Adaptive,
        Toy {
            in_flight: 3,
            ..Toy::default()
        },
    );
    let t = Instant::now();
    r.stop_within(Duration::from_millis(200));
    let el = t.elapsed();
    assert!(el >= Duration::from_millis(200), "left after {el:?}");
    assert!(el < Duration::from_secs(5), "stop took {el:?}");
    // and without the bound it waits for the work to finish
    let r = toy(
        PollMode::Adaptive,
        Toy {
            in_flight: 1,
            ..Toy::default()
        },
    );
    let h = r.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let _ = h.send(Box::new(|w| w.in_flight = 0));
    });
    let t = Instant::now();
    r.stop();
    assert!(t.elapsed() >= Duration::from_millis(100));
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

fn wait_for_sleeps(r: &ReactorHandle<Toy>, more_than: u64) {
    wait_until("reactor never slept", || {
        r.stats.snapshot().sleeps > more_than
    });
}

/// A queue restart replaces a poller's wake fd while the device keeps the
/// kick file open. The reactor must forget the old registration: if it
/// did not, a kick would wake it through the old fd number, by then reused
/// for someone else's eventfd, and it would read (steal) that eventfd's
/// count. This is how a libblkio client in the same process once lost a
/// completion notification and timed out.
#[test]
fn replaced_wake_fd_is_forgotten_and_its_number_reuse_is_not_read() {
    let r = toy(PollMode::Interrupt, Toy::default());
    let kick = eventfd();
    // SAFETY: dup of a valid fd.
    let first = unsafe { libc::dup(kick) };
    assert!(first >= 0);
    let s0 = r.stats.snapshot().sleeps;
    r.call(move |w| {
        w.fds = vec![first];
        w.generation += 1;
    })
    .unwrap();
    // it sleeps with `first` in its epoll set
    wait_for_sleeps(&r, s0);
    // The fd goes, and before the reactor next sleeps the number `first`
    // comes to name a bystander's eventfd (dup2 replaces the file under
    // the number without freeing it, so no other test thread can take the
    // number in between).
    let bystander = eventfd();
    let moved = r
        .call(move |w| {
            w.fds.clear();
            w.generation += 1;
            // SAFETY: both fds are ours.
            unsafe { libc::dup2(bystander, first) }
        })
        .unwrap();
    assert_eq!(moved, first);
    bump(first);
    let second = eventfd();
    let s1 = r.stats.snapshot().sleeps;
    r.call(move |w| {
        w.fds = vec![second];
        w.generation += 1;
    })
    .unwrap();
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
