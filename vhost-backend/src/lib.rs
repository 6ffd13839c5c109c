//! vhost-user-blk devices served from Quern's reactors.
//!
//! The control plane (one thread per device socket) speaks the vhost-user
//! protocol through the rust-vmm `vhost` crate and keeps the memory table and
//! vring setup. When the frontend starts a vring, the device binds it to a
//! reactor (by the configured policy) and hands that reactor a
//! [`queue::QueuePoller`], which polls the avail ring itself, decodes
//! requests with iovecs pointing straight into guest memory, and completes
//! them on the used ring once per cycle.

pub mod blk;
pub mod device;
pub mod dirty;
#[cfg(feature = "harness")]
pub mod harness;
pub mod inflight;
pub mod memory;
pub mod qos;
pub mod queue;
pub mod sys;
pub mod virtq;

pub use device::{serve, DeviceConfig, DeviceHandle, QueueBinding};

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
