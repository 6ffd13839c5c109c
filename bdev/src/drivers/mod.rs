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

/// Create a new file for writing at `path`, with its parent folders; fails
/// if it exists.
pub(crate) fn create_new_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}
