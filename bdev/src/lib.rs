//! Block devices for Quern.
//!
//! A [`Bdev`] describes one block device (capacity, block size, read-only)
//! and hands out per-reactor [`BdevChannel`]s that execute operations. The
//! per-reactor [`IoEngine`] sits between request producers (virtqueues) and
//! the channels: it validates requests, gathers each poll cycle's batch, runs
//! the [`merge`] stage over it, executes the merged operations (one io_uring
//! submission per cycle) and splits completions back to the originals.
//!
//! Invariants: nothing on the request path allocates (slots and iovec arrays
//! are preallocated), and nothing takes a lock (an engine belongs to one
//! reactor thread).

pub mod drivers;
pub mod engine;
mod fd;
pub mod merge;
mod types;

pub use engine::{EngineConfig, EngineStats, IoEngine, IoRequest};
pub use fd::eventfd;
pub use merge::{MergeConfig, MergeStats};
pub use types::*;
