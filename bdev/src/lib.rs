//! Block devices for Quern.
//!
//! A [`Bdev`] describes one block device (capacity, block size, read-only)
//! and hands out per-reactor [`BdevChannel`]s that execute operations. The
//! per-reactor [`IoEngine`] sits between request producers (virtqueues) and
//! the channels: it validates requests, gathers each poll cycle's batch, runs
//! the [`merge`] stage over it, executes the merged operations (one io_uring
//! submission per cycle) and splits completions back to the originals.
//! [`poller::ReactorIo`] is what a reactor runs: the engine and the
//! [`poller::IoPoller`]s that feed it.
//!
//! Invariants: nothing on the request path allocates (slots and iovec arrays
//! are preallocated), and nothing takes a lock (an engine belongs to one
//! reactor thread).

pub mod drivers;
pub mod engine;
pub mod merge;
pub mod poller;
pub mod sys;
mod types;

pub use engine::{EngineConfig, EngineStats, IoEngine, IoRequest};
pub use merge::{MergeConfig, MergeStats};
pub use poller::{Cookie, IoPoller, IoReactor, PollerId, ReactorIo};
pub use types::*;
