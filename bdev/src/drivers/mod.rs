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

/// Open `path` for reading (and writing unless `read_only`), with O_DIRECT
/// if `direct` and the filesystem takes it, else buffered (with a warning
/// naming bdev `name`). Returns the file and whether O_DIRECT is on.
pub(crate) fn open_data_file(
    name: &str,
    path: &std::path::Path,
    read_only: bool,
    direct: bool,
) -> std::io::Result<(std::fs::File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |direct: bool| {
        let mut oo = std::fs::OpenOptions::new();
        oo.read(true).write(!read_only);
        if direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        oo.open(path)
    };
    match open(direct) {
        Ok(f) => Ok((f, direct)),
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(bdev = %name, path = %path.display(), "O_DIRECT not supported here; using buffered I/O");
            Ok((open(false)?, false))
        }
        Err(e) => Err(e),
    }
}

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
