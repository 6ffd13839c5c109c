//! A backend that stops answering must end a benchmark with a message, not
//! hang it.
//!
//! A sleeping client (`--client-wait`, `run --wait`) blocks in `do_io`
//! with no timeout, as a guest's driver waits for its interrupt: a timeout
//! arms a timer at every wait, which on a VM costs the client more than
//! the I/O itself (measured at QD1: 2.3 -> 4.2 µs of client CPU per I/O)
//! and weighs differently on different backends. Nothing can tell a client
//! blocked so that its backend has gone quiet, so a thread watches its
//! progress: when a watched client sees no completion for [`stuck_secs`],
//! the backends this process started are killed (a stopped one too) and
//! the process ends with a message and exit status 1. The vhost-user
//! handshake is watched the same way; a polling client checks the same
//! limit itself (see `client`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use crate::clock::{ns_per_tick, ticks};

/// Seconds without a completion after which a client gives up.
const STUCK_SECS: u64 = 10;

/// The clock at the last completion a watched client saw.
static PROGRESS: AtomicU64 = AtomicU64::new(0);
/// Clients being watched now.
static WATCHED: AtomicUsize = AtomicUsize::new(0);
/// Backend processes this process started and has not stopped yet.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static STARTED: Once = Once::new();

/// [`STUCK_SECS`], or `$QUERN_BENCH_STUCK_SECS` (the tests' way to see
/// the watchdog fire in a second).
pub fn stuck_secs() -> u64 {
    std::env::var("QUERN_BENCH_STUCK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&s| s > 0)
        .unwrap_or(STUCK_SECS)
}

/// [`stuck_secs`] in clock ticks.
pub fn stuck_ticks() -> u64 {
    (stuck_secs() as f64 * 1e9 / ns_per_tick()) as u64
}

/// A started backend: killed if the watchdog gives up.
pub(crate) fn adopt(pid: u32) {
    lock().push(pid);
}

/// A backend stopped and reaped.
pub(crate) fn disown(pid: u32) {
    lock().retain(|&p| p != pid);
}

fn lock() -> std::sync::MutexGuard<'static, Vec<u32>> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// A client under watch until this is dropped (by any path).
pub(crate) struct Watch(());

/// Watch the calling client from now on.
pub(crate) fn watch() -> Watch {
    STARTED.call_once(|| {
        std::thread::spawn(guard);
    });
    PROGRESS.store(ticks(), Ordering::Relaxed);
    WATCHED.fetch_add(1, Ordering::Relaxed);
    Watch(())
}

impl Watch {
    /// The client saw completions at `now` (one relaxed store per batch).
    #[inline]
    pub(crate) fn progress(&self, now: u64) {
        PROGRESS.store(now, Ordering::Relaxed);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        WATCHED.fetch_sub(1, Ordering::Relaxed);
    }
}

fn guard() {
    let limit = stuck_ticks();
    let secs = stuck_secs();
    loop {
        std::thread::sleep(Duration::from_millis(if secs > 2 { 500 } else { 100 }));
        if WATCHED.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let last = PROGRESS.load(Ordering::Relaxed);
        if ticks().saturating_sub(last) > limit && WATCHED.load(Ordering::Relaxed) > 0 {
            let me = std::env::args()
                .next()
                .and_then(|a| {
                    std::path::Path::new(&a)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                })
                .unwrap_or_else(|| "vhost-bench".into());
            eprintln!(
                "{me}: the backend answered nothing for {secs} s; \
                 killing the backends this run started and giving up"
            );
            for &pid in lock().iter() {
                // SAFETY: signalling a child of ours by pid.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            std::process::exit(1);
        }
    }
}
