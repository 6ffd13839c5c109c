//! The frontend's memory table: each region mapped into Quern, and the
//! translations the data path needs (guest-physical and frontend-virtual
//! addresses to host pointers), always bounds-checked.
//!
//! Addresses have types: a [`GuestAddress`] is guest-physical (what
//! descriptors carry), a [`FrontendAddress`] is the frontend's own virtual
//! address (what SET_VRING_ADDR carries). A translation yields a raw host
//! pointer, valid while the table lives; nothing here makes a Rust
//! reference over guest memory, which the guest may write at any time.

use std::fs::File;

pub use vm_memory::GuestAddress;

use crate::sys::SharedMapping;

/// An address in the frontend's (QEMU's) own address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendAddress(pub u64);

/// One mapped region; its mapping goes with it.
#[derive(Debug)]
pub struct Region {
    pub gpa: GuestAddress,
    pub size: u64,
    /// The frontend's own virtual address of the region (vring addresses use it).
    pub uva: FrontendAddress,
    /// The region's first byte in `map` (the mapping starts at the file's
    /// offset 0, so the region starts at its mmap offset).
    offset: usize,
    map: SharedMapping,
}

impl Region {
    fn host(&self) -> *mut u8 {
        // SAFETY: offset + size <= map.len() by construction.
        unsafe { self.map.as_ptr().add(self.offset) }
    }
}

/// An immutable memory table; replaced whole when the frontend changes it.
#[derive(Debug, Default)]
pub struct MemTable {
    regions: Vec<Region>,
}

#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("region at guest address {gpa:#x} of {size} bytes (mmap offset {offset}) overflows")]
    Overflow { gpa: u64, size: u64, offset: u64 },
    #[error("region at guest address {gpa:#x} of {size} bytes overlaps the region at {other:#x}")]
    Overlap { gpa: u64, size: u64, other: u64 },
    #[error("mapping region at guest address {gpa:#x}: {source}")]
    Map { gpa: u64, source: std::io::Error },
    #[error("no region at guest address {0:#x}")]
    NotFound(u64),
    #[error("more than {0} memory regions")]
    TooMany(usize),
}

/// Most regions one table holds (what GET_MAX_MEM_SLOTS answers).
pub const MAX_REGIONS: usize = 32;

impl MemTable {
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Map a region and return a new table with it added. On error nothing
    /// stays mapped (each region owns its mapping).
    pub fn with_region(
        &self,
        gpa: GuestAddress,
        size: u64,
        uva: FrontendAddress,
        mmap_offset: u64,
        file: &File,
    ) -> Result<MemTable, MemError> {
        if self.regions.len() >= MAX_REGIONS {
            return Err(MemError::TooMany(MAX_REGIONS));
        }
        let overflow = || MemError::Overflow {
            gpa: gpa.0,
            size,
            offset: mmap_offset,
        };
        let end = gpa.0.checked_add(size).ok_or_else(overflow)?;
        let map_len = mmap_offset.checked_add(size).ok_or_else(overflow)?;
        if size == 0 || uva.0.checked_add(size).is_none() || usize::try_from(map_len).is_err() {
            return Err(overflow());
        }
        if let Some(o) = self
            .regions
            .iter()
            .find(|r| gpa.0 < r.gpa.0 + r.size && r.gpa.0 < end)
        {
            return Err(MemError::Overlap {
                gpa: gpa.0,
                size,
                other: o.gpa.0,
            });
        }
        let mut regions: Vec<Region> = Vec::with_capacity(self.regions.len() + 1);
        for r in &self.regions {
            // each table owns its mappings: the old one is unmapped when
            // the last queue using it has stopped
            regions.push(duplicate(r)?);
        }
        let map = SharedMapping::new(file, map_len, 0)
            .map_err(|source| MemError::Map { gpa: gpa.0, source })?;
        regions.push(Region {
            gpa,
            size,
            uva,
            offset: mmap_offset as usize,
            map,
        });
        Ok(MemTable { regions })
    }

    /// A new table without the region at `gpa`.
    pub fn without_region(&self, gpa: GuestAddress) -> Result<MemTable, MemError> {
        if !self.regions.iter().any(|r| r.gpa == gpa) {
            return Err(MemError::NotFound(gpa.0));
        }
        let regions = self
            .regions
            .iter()
            .filter(|r| r.gpa != gpa)
            .map(duplicate)
            .collect::<Result<_, _>>()?;
        Ok(MemTable { regions })
    }

    /// Host pointer for `len` bytes at guest-physical `gpa`, if all of them
    /// lie in one region. Valid while this table lives.
    #[inline]
    pub fn gpa(&self, gpa: GuestAddress, len: u64) -> Option<*mut u8> {
        let gpa = gpa.0;
        for r in &self.regions {
            if gpa >= r.gpa.0 && gpa - r.gpa.0 < r.size {
                let off = gpa - r.gpa.0;
                return if len <= r.size - off {
                    // SAFETY: off + len stays within the mapped region.
                    Some(unsafe { r.host().add(off as usize) })
                } else {
                    None
                };
            }
        }
        None
    }

    /// Host pointer for `len` bytes at the frontend's virtual address `uva`.
    pub fn uva(&self, uva: FrontendAddress, len: u64) -> Option<*mut u8> {
        let uva = uva.0;
        for r in &self.regions {
            if uva >= r.uva.0 && uva - r.uva.0 < r.size {
                let off = uva - r.uva.0;
                return (len <= r.size - off).then(|| {
                    // SAFETY: within the region, as above.
                    unsafe { r.host().add(off as usize) }
                });
            }
        }
        None
    }

    /// The guest-physical address of frontend address `uva` (the dirty log
    /// is indexed by guest-physical pages).
    pub fn uva_to_gpa(&self, uva: FrontendAddress) -> Option<GuestAddress> {
        self.regions
            .iter()
            .find(|r| uva.0 >= r.uva.0 && uva.0 - r.uva.0 < r.size)
            .map(|r| GuestAddress(r.gpa.0 + (uva.0 - r.uva.0)))
    }
}

fn duplicate(r: &Region) -> Result<Region, MemError> {
    Ok(Region {
        gpa: r.gpa,
        size: r.size,
        uva: r.uva,
        offset: r.offset,
        map: r.map.duplicate().map_err(|source| MemError::Map {
            gpa: r.gpa.0,
            source,
        })?,
    })
}
