//! Reactors: one pinned thread per configured core, each running a poll
//! loop over its [`Work`].
//!
//! The reactor is the framework and knows nothing of what it polls (as
//! SPDK's `lib/thread` knows nothing of `lib/bdev`): the work (for Quern,
//! the bdev crate's per-reactor I/O engine and its pollers) runs one cycle
//! at a time, and the reactor decides when to spin and when to sleep, keeps
//! the clock and the statistics, and delivers messages.
//!
//! Poll modes: `busy` never sleeps; `adaptive` spins while work arrives and,
//! after `idle_spin` without any, asks the work to arm its notifications
//! and sleeps in epoll on the mailbox doorbell and the work's wake fds;
//! `interrupt` sleeps as soon as a cycle finds nothing to do.
//!
//! Control messages reach a reactor over lock-free SPSC rings (one per
//! sender) with an eventfd doorbell; nothing on a reactor waits for anyone.
//!
//! A cycle that panics (a bug, or an assertion on an invariant) does not
//! take the process down: the reactor reports the failure once, tells its
//! work to fail what comes instead of serving it ([`Work::fail`]), and goes
//! on delivering messages, so the control plane never blocks on it and the
//! other reactors keep serving.

pub mod clock;
pub mod histogram;
mod mailbox;
pub mod ratelimit;
pub mod sys;
mod thread;

pub use mailbox::{Mailbox, Msg};
pub use sys::available_cores;
pub use thread::{spawn_reactor, ReactorHandle};

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How a reactor waits when there is nothing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    Busy,
    Adaptive,
    Interrupt,
}

impl std::str::FromStr for PollMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "busy" => Ok(PollMode::Busy),
            "adaptive" => Ok(PollMode::Adaptive),
            "interrupt" => Ok(PollMode::Interrupt),
            o => Err(format!(
                "unknown poll mode `{o}` (expected busy, adaptive or interrupt)"
            )),
        }
    }
}

impl std::fmt::Display for PollMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PollMode::Busy => "busy",
            PollMode::Adaptive => "adaptive",
            PollMode::Interrupt => "interrupt",
        })
    }
}

#[derive(Clone, Debug)]
pub struct ReactorConfig {
    pub id: usize,
    /// CPU to pin to; `None` leaves the thread unpinned (tests).
    pub core: Option<usize>,
    pub mode: PollMode,
    pub idle_spin: Duration,
}

/// What a reactor runs: one poll cycle at a time, on the reactor's thread.
/// It is built on that thread and never leaves it, so it need not be `Send`.
pub trait Work: 'static {
    /// One poll cycle: find work, start it, complete what has finished.
    /// Returns how much it found (0: nothing; the reactor may sleep).
    fn cycle(&mut self) -> usize;
    /// Started and not yet finished (a stopping reactor waits for it; in
    /// busy and adaptive modes it counts as work for the spin decision).
    fn in_flight(&self) -> usize {
        0
    }
    /// About to sleep: arm notifications. Return false if work showed up.
    fn prepare_sleep(&mut self) -> bool {
        true
    }
    /// Woken up: disarm notifications.
    fn after_sleep(&mut self) {}
    /// Something other than [`Work::cycle`] ran on the reactor since the
    /// last cycle (messages): a clock reading the last cycle kept for the
    /// next is stale.
    fn clock_stale(&mut self) {}
    /// Fds that become readable when there is work (the reactor drains
    /// eventfds it is woken by). Read again whenever
    /// [`Work::wake_generation`] changes.
    fn wake_fds(&self, _out: &mut Vec<RawFd>) {}
    fn wake_generation(&self) -> u64 {
        0
    }
    /// At most how long a sleep may last (work waiting for time to pass,
    /// such as a rate limit's refill); `None`: until woken.
    fn sleep_limit_ms(&self) -> Option<u32> {
        None
    }
    /// A cycle panicked: from now on fail what comes instead of serving it,
    /// and finish what may still finish.
    fn fail(&mut self) {}
}

/// The reactor thread has ended (stopped), so it runs no more messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the reactor has stopped")]
pub struct ReactorGone;

/// Per-reactor counters, written by the reactor, read by anyone.
#[derive(Debug, Default)]
pub struct ReactorStats {
    pub busy_ns: AtomicU64,
    pub idle_ns: AtomicU64,
    pub cycles: AtomicU64,
    pub sleeps: AtomicU64,
    /// A cycle panicked (see the handle's `failure`).
    pub failed: AtomicBool,
}

/// A plain copy of [`ReactorStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub busy_ns: u64,
    pub idle_ns: u64,
    pub cycles: u64,
    pub sleeps: u64,
    pub failed: bool,
}

impl ReactorStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            busy_ns: g(&self.busy_ns),
            idle_ns: g(&self.idle_ns),
            cycles: g(&self.cycles),
            sleeps: g(&self.sleeps),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}
