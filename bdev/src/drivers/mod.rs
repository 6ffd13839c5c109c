//! Block device drivers, each behind the [`crate::Bdev`] trait.

pub mod malloc;
pub mod null;
pub mod qcow2;
pub mod uring;

pub use malloc::MallocBdev;
pub use null::NullBdev;
pub use qcow2::{Qcow2Bdev, Qcow2Options};
pub use uring::{UringBdev, UringOptions};

#[cfg(feature = "rbd")]
pub mod rbd;
#[cfg(feature = "rbd")]
pub use rbd::{RbdBdev, RbdOptions};
