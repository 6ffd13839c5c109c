//! The frontend's memory table: each region mapped into Quern, and the
//! translations the data path needs (guest-physical and frontend-virtual
//! addresses to host pointers), always bounds-checked.

use std::fs::File;
use std::os::fd::AsRawFd;

/// One mapped region.
#[derive(Debug)]
pub struct Region {
    pub gpa: u64,
    pub size: u64,
    /// The frontend's own virtual address of the region (vring addresses use it).
    pub uva: u64,
    host: *mut u8,
    map_base: *mut u8,
    map_len: usize,
}

/// An immutable memory table; replaced whole when the frontend changes it.
#[derive(Debug, Default)]
pub struct MemTable {
    regions: Vec<Region>,
}

// SAFETY: the mappings are plain shared memory owned by the table until Drop.
unsafe impl Send for MemTable {}
unsafe impl Sync for MemTable {}

impl Drop for MemTable {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: each mapping was created in `map` with this base/length.
            unsafe { libc::munmap(r.map_base.cast(), r.map_len) };
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("region at guest address {gpa:#x} of {size} bytes overflows")]
    Overflow { gpa: u64, size: u64 },
    #[error("mapping region at guest address {gpa:#x}: {source}")]
    Map { gpa: u64, source: std::io::Error },
    #[error("no region at guest address {0:#x}")]
    NotFound(u64),
}

impl MemTable {
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Map a region and return a new table with it added.
    pub fn with_region(
        &self,
        gpa: u64,
        size: u64,
        uva: u64,
        mmap_offset: u64,
        file: &File,
    ) -> Result<MemTable, MemError> {
        let mut regions: Vec<Region> = Vec::with_capacity(self.regions.len() + 1);
        for r in &self.regions {
            // re-map shared: each table owns its mappings
            regions.push(dup_region(r)?);
        }
        regions.push(map(gpa, size, uva, mmap_offset, file)?);
        Ok(MemTable { regions })
    }

    /// A new table without the region at `gpa`.
    pub fn without_region(&self, gpa: u64) -> Result<MemTable, MemError> {
        if !self.regions.iter().any(|r| r.gpa == gpa) {
            return Err(MemError::NotFound(gpa));
        }
        let regions = self
            .regions
            .iter()
            .filter(|r| r.gpa != gpa)
            .map(dup_region)
            .collect::<Result<_, _>>()?;
        Ok(MemTable { regions })
    }

    /// Host pointer for `len` bytes at guest-physical `gpa`, if all of them
    /// lie in one region.
    #[inline]
    pub fn gpa(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        for r in &self.regions {
            if gpa >= r.gpa && gpa - r.gpa < r.size {
                let off = gpa - r.gpa;
                return if len <= r.size - off {
                    // SAFETY: off + len stays within the mapped region.
                    Some(unsafe { r.host.add(off as usize) })
                } else {
                    None
                };
            }
        }
        None
    }

    /// Host pointer for `len` bytes at the frontend's virtual address `uva`.
    pub fn uva(&self, uva: u64, len: u64) -> Option<*mut u8> {
        for r in &self.regions {
            if uva >= r.uva && uva - r.uva < r.size {
                let off = uva - r.uva;
                return (len <= r.size - off).then(|| {
                    // SAFETY: within the region, as above.
                    unsafe { r.host.add(off as usize) }
                });
            }
        }
        None
    }
}

fn map(gpa: u64, size: u64, uva: u64, mmap_offset: u64, file: &File) -> Result<Region, MemError> {
    let map_len = mmap_offset
        .checked_add(size)
        .ok_or(MemError::Overflow { gpa, size })?;
    if gpa.checked_add(size).is_none() || uva.checked_add(size).is_none() || size == 0 {
        return Err(MemError::Overflow { gpa, size });
    }
    // SAFETY: a new shared mapping of the frontend's memory fd; checked.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(MemError::Map {
            gpa,
            source: std::io::Error::last_os_error(),
        });
    }
    let base = base.cast::<u8>();
    // SAFETY: mmap_offset < map_len.
    let host = unsafe { base.add(mmap_offset as usize) };
    Ok(Region {
        gpa,
        size,
        uva,
        host,
        map_base: base,
        map_len: map_len as usize,
    })
}

/// A second mapping of the same memory (the fd is gone; mremap with
/// old_size 0 duplicates a shared mapping).
fn dup_region(r: &Region) -> Result<Region, MemError> {
    // SAFETY: mremap(old, 0, len, MREMAP_MAYMOVE) on a shared mapping makes
    // a new mapping of the same pages.
    let base = unsafe { libc::mremap(r.map_base.cast(), 0, r.map_len, libc::MREMAP_MAYMOVE) };
    if base == libc::MAP_FAILED {
        return Err(MemError::Map {
            gpa: r.gpa,
            source: std::io::Error::last_os_error(),
        });
    }
    let base = base.cast::<u8>();
    let off = r.host as usize - r.map_base as usize;
    // SAFETY: same layout as the original mapping.
    let host = unsafe { base.add(off) };
    Ok(Region {
        gpa: r.gpa,
        size: r.size,
        uva: r.uva,
        host,
        map_base: base,
        map_len: r.map_len,
    })
}
