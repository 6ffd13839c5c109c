//! Reactors: one pinned thread per configured core.
//!
//! Each reactor runs a poll loop over its registered [`Poller`]s and owns one
//! [`IoEngine`] (and so one io_uring). A cycle: every poller polls its source
//! and submits requests into the engine; the engine merges and submits the
//! whole cycle's work with one system call; completions are reaped from the
//! completion ring and routed back to the poller that owns them; pollers end
//! the cycle (publish and signal once per cycle).
//!
//! Poll modes: `busy` never sleeps; `adaptive` spins while work arrives and,
//! after `idle_spin` without any, asks every poller to arm its notifications
//! and sleeps in epoll on the mailbox doorbell, the ring's completion eventfd
//! and the pollers' wake fds; `interrupt` sleeps as soon as a cycle finds
//! nothing to do.
//!
//! Control messages reach a reactor over lock-free SPSC rings (one per
//! sender) with an eventfd doorbell; nothing on a reactor waits for anyone.

mod mailbox;
mod thread;

pub use mailbox::{Mailbox, Msg};
pub use thread::{remove_when_idle, spawn_reactor, ReactorCtx, ReactorHandle};

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quern_bdev::{EngineConfig, IoEngine, IoResult};

/// How a reactor waits when there is nothing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    pub engine: EngineConfig,
}

/// A source of work polled once per cycle (a virtqueue, a timer, ...).
/// Completions of the requests it submitted come back through
/// [`Poller::on_complete`] with the low 48 bits of their cookie.
pub trait Poller: Send {
    /// Find new work and submit it; returns how much was found.
    fn poll(&mut self, io: &mut IoEngine, cookie_base: u64) -> usize;
    fn on_complete(&mut self, cookie: u64, result: IoResult);
    /// Publish what completed this cycle (once per cycle, not per request).
    fn end_cycle(&mut self) {}
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
    /// Requests submitted and not yet completed.
    fn in_flight(&self) -> usize {
        0
    }
    /// For a queue-like poller: where a restarted successor resumes.
    fn resume_index(&self) -> Option<u16> {
        None
    }
}

/// Bits of a request cookie that belong to the poller.
pub const COOKIE_BITS: u32 = 48;
pub const COOKIE_MASK: u64 = (1 << COOKIE_BITS) - 1;

/// Per-reactor counters, written by the reactor, read by anyone.
#[derive(Debug, Default)]
pub struct ReactorStats {
    pub busy_ns: AtomicU64,
    pub idle_ns: AtomicU64,
    pub cycles: AtomicU64,
    pub sleeps: AtomicU64,
    pub ios_submitted: AtomicU64,
    pub ios_completed: AtomicU64,
    pub merge_requests_in: AtomicU64,
    pub merge_requests_out: AtomicU64,
    pub merge_bytes: AtomicU64,
    pub pollers: AtomicU64,
}

/// A plain copy of [`ReactorStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub busy_ns: u64,
    pub idle_ns: u64,
    pub cycles: u64,
    pub sleeps: u64,
    pub ios_submitted: u64,
    pub ios_completed: u64,
    pub merge_requests_in: u64,
    pub merge_requests_out: u64,
    pub merge_bytes: u64,
    pub pollers: u64,
}

impl ReactorStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            busy_ns: g(&self.busy_ns),
            idle_ns: g(&self.idle_ns),
            cycles: g(&self.cycles),
            sleeps: g(&self.sleeps),
            ios_submitted: g(&self.ios_submitted),
            ios_completed: g(&self.ios_completed),
            merge_requests_in: g(&self.merge_requests_in),
            merge_requests_out: g(&self.merge_requests_out),
            merge_bytes: g(&self.merge_bytes),
            pollers: g(&self.pollers),
        }
    }
}

/// Cores that exist on this machine.
pub fn available_cores() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}
