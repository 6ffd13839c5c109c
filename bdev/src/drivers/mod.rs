//! Block device drivers, each behind the [`crate::Bdev`] trait.

pub mod malloc;
pub mod null;
pub mod uring;

pub use malloc::MallocBdev;
pub use null::NullBdev;
pub use uring::{UringBdev, UringOptions};

#[cfg(feature = "rbd")]
pub mod rbd;
#[cfg(feature = "rbd")]
pub use rbd::{RbdBdev, RbdOptions};
