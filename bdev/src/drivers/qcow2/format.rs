//! qcow2 on-disk structures: the header (parse, validate, create), header
//! extensions, and the entry encodings of the L1/L2 and refcount tables.
//!
//! Only what this driver supports is accepted: version 2 or 3, 16-bit
//! refcounts, no compression, encryption, external data file, extended L2
//! entries or snapshots, and a clean image (no dirty or corrupt bit).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Bits 9..55 of an L1/L2 entry: the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Refcount is exactly one": set on every entry this driver writes.
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
/// v3 L2 entry flag: the cluster reads as zeroes.
pub const ZERO_FLAG: u64 = 1;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const V3_HEADER_LEN: u32 = 104;
const V2_HEADER_LEN: u32 = 72;
/// Smallest cluster accepted. The in-memory map takes 8 bytes per guest
/// cluster of the base's capacity: 2 GiB per TiB at 4 KiB clusters, 8 times
/// that at QEMU's 512-byte minimum, which no image this driver creates uses.
pub const MIN_CLUSTER_BITS: u32 = 12;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits on the tables it loads whole (QCOW_MAX_L1_SIZE and
/// QCOW_MAX_REFTABLE_SIZE).
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// Why an image is refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("bad magic {0:#010x} (not a qcow2 image)")]
    BadMagic(u32),
    #[error("qcow2 version {0} is not supported (only 2 and 3)")]
    Version(u32),
    #[error("cluster_bits {0} is out of range 12..=21")]
    ClusterBits(u32),
    #[error("unknown incompatible feature bits {0:#x}")]
    UnknownIncompatible(u64),
    #[error("the image is dirty (lazy refcounts); repair it with `qemu-img check -r all`")]
    Dirty,
    #[error("the image is marked corrupt; repair it with `qemu-img check -r all`")]
    Corrupt,
    #[error("external data files are not supported")]
    ExternalData,
    #[error("compression type other than zlib or compressed clusters are not supported")]
    Compression,
    #[error("extended L2 entries are not supported")]
    ExtendedL2,
    #[error("encryption method {0} is not supported")]
    Encrypted(u32),
    #[error("refcount_order {0} is not supported (only 4, 16-bit refcounts)")]
    RefcountOrder(u32),
    #[error("images with {0} internal snapshots are not supported")]
    Snapshots(u32),
    #[error("{what} at offset {offset} is past the end of the file ({file_len} bytes)")]
    PastEof {
        what: &'static str,
        offset: u64,
        file_len: u64,
    },
    #[error("{what} at offset {offset:#x} is not cluster aligned")]
    Misaligned { what: &'static str, offset: u64 },
    #[error("L1 table of {l1_size} entries is too small for a virtual size of {size} bytes")]
    L1TooSmall { l1_size: u32, size: u64 },
    #[error("{what} of {bytes} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        what: &'static str,
        bytes: u64,
        max: u64,
    },
    #[error("{what} at offset {offset:#x} overlaps {other}")]
    Overlap {
        what: &'static str,
        offset: u64,
        other: &'static str,
    },
    #[error("header is truncated or malformed: {0}")]
    Malformed(&'static str),
}

impl From<FormatError> for io::Error {
    fn from(e: FormatError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// The parsed header fields this driver uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub autoclear_features: u64,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// L2 entries per table (one cluster of 8-byte entries).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Parse and validate the header in `buf` (the image's first cluster,
    /// or at least its first 4 KiB), against a file of `file_len` bytes.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, FormatError> {
        if buf.len() < 72 {
            return Err(FormatError::Malformed("shorter than a v2 header"));
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(FormatError::BadMagic(magic));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(FormatError::Version(version));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(FormatError::ClusterBits(cluster_bits));
        }
        let (incompat, autoclear, refcount_order, header_len) = if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(FormatError::Malformed("shorter than a v3 header"));
            }
            (be64(buf, 72), be64(buf, 88), be32(buf, 96), be32(buf, 100))
        } else {
            (0, 0, 4, V2_HEADER_LEN)
        };
        if header_len < V3_HEADER_LEN && version == 3 {
            return Err(FormatError::Malformed("header_length is below 104"));
        }
        if u64::from(header_len) > 1u64 << cluster_bits {
            return Err(FormatError::Malformed(
                "header_length is larger than a cluster",
            ));
        }
        check_incompatible(incompat)?;
        let crypt = be32(buf, 32);
        if crypt != 0 {
            return Err(FormatError::Encrypted(crypt));
        }
        if refcount_order != 4 {
            return Err(FormatError::RefcountOrder(refcount_order));
        }
        let nb_snapshots = be32(buf, 60);
        if nb_snapshots != 0 {
            return Err(FormatError::Snapshots(nb_snapshots));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            autoclear_features: autoclear,
            backing_file: None,
            backing_format: None,
        };
        h.check_tables(file_len)?;
        let (bf_off, bf_len) = (be64(buf, 8) as usize, be32(buf, 16) as usize);
        // extensions end at the backing file name or the cluster's end
        let ext_end = if bf_off != 0 { bf_off } else { buf.len() };
        let ext_end = ext_end.min(buf.len()).min(h.cluster_size() as usize);
        h.backing_format = parse_extensions(&buf[..ext_end], header_len as usize)?;
        if bf_off != 0 {
            let end = bf_off
                .checked_add(bf_len)
                .ok_or(FormatError::Malformed("backing file name offset overflows"))?;
            let name = buf.get(bf_off..end).ok_or(FormatError::Malformed(
                "backing file name outside the header cluster",
            ))?;
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        Ok(h)
    }

    fn check_tables(&self, file_len: u64) -> Result<(), FormatError> {
        let cs = self.cluster_size();
        let per_l1 = cs * self.l2_entries();
        if u64::from(self.l1_size) < self.size.div_ceil(per_l1) {
            return Err(FormatError::L1TooSmall {
                l1_size: self.l1_size,
                size: self.size,
            });
        }
        let tables = [
            (
                "L1 table",
                self.l1_table_offset,
                u64::from(self.l1_size) * 8,
            ),
            (
                "refcount table",
                self.refcount_table_offset,
                u64::from(self.refcount_table_clusters) * cs,
            ),
        ];
        for ((what, offset, len), max) in tables.into_iter().zip([MAX_L1_BYTES, MAX_REFTABLE_BYTES])
        {
            if len > max {
                return Err(FormatError::TooLarge {
                    what,
                    bytes: len,
                    max,
                });
            }
            if !offset.is_multiple_of(cs) {
                return Err(FormatError::Misaligned { what, offset });
            }
            if offset < cs {
                return Err(FormatError::Overlap {
                    what,
                    offset,
                    other: "the header cluster",
                });
            }
            if offset.saturating_add(len) > file_len {
                return Err(FormatError::PastEof {
                    what,
                    offset,
                    file_len,
                });
            }
        }
        // both start cluster aligned; compare the clusters they cover
        let [(_, l1, l1_len), (_, rt, rt_len)] = tables;
        if l1 < rt + rt_len.next_multiple_of(cs) && rt < l1 + l1_len.next_multiple_of(cs) {
            return Err(FormatError::Overlap {
                what: "L1 table",
                offset: l1,
                other: "the refcount table",
            });
        }
        Ok(())
    }
}

fn check_incompatible(bits: u64) -> Result<(), FormatError> {
    let known = INCOMPAT_DIRTY
        | INCOMPAT_CORRUPT
        | INCOMPAT_DATA_FILE
        | INCOMPAT_COMPRESSION
        | INCOMPAT_EXTL2;
    if bits & !known != 0 {
        return Err(FormatError::UnknownIncompatible(bits & !known));
    }
    if bits & INCOMPAT_DIRTY != 0 {
        return Err(FormatError::Dirty);
    }
    if bits & INCOMPAT_CORRUPT != 0 {
        return Err(FormatError::Corrupt);
    }
    if bits & INCOMPAT_DATA_FILE != 0 {
        return Err(FormatError::ExternalData);
    }
    if bits & INCOMPAT_COMPRESSION != 0 {
        return Err(FormatError::Compression);
    }
    if bits & INCOMPAT_EXTL2 != 0 {
        return Err(FormatError::ExtendedL2);
    }
    Ok(())
}

/// Walk the header extensions in `buf`; returns the backing format, if named.
fn parse_extensions(buf: &[u8], mut at: usize) -> Result<Option<String>, FormatError> {
    let mut format = None;
    loop {
        if at + 8 > buf.len() {
            // no end marker before the backing file name (old v2 images)
            return Ok(format);
        }
        let (ty, len) = (be32(buf, at), be32(buf, at + 4) as usize);
        if ty == 0 {
            return Ok(format);
        }
        let data = buf.get(at + 8..at + 8 + len).ok_or(FormatError::Malformed(
            "header extension runs past the cluster",
        ))?;
        match ty {
            EXT_BACKING_FORMAT => format = Some(String::from_utf8_lossy(data).into_owned()),
            EXT_DATA_FILE => return Err(FormatError::ExternalData),
            _ => {}
        }
        at += 8 + len.next_multiple_of(8);
    }
}

/// Geometry of a new image: where each initial table lives.
pub struct Layout {
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub rt_offset: u64,
    pub rt_clusters: u32,
    pub rb_offset: u64,
    pub l1_offset: u64,
    /// Clusters the initial metadata occupies (all refcount 1).
    pub meta_clusters: u64,
}

impl Layout {
    /// Header, refcount table (sized for the image fully allocated),
    /// refcount block 0, then the L1 table.
    pub fn new(size: u64, cluster_bits: u32) -> io::Result<Layout> {
        let cs = 1u64 << cluster_bits;
        let l2_entries = cs / 8;
        let l1_size = size.div_ceil(cs * l2_entries).max(1);
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        let guest_clusters = size.div_ceil(cs);
        let rb_entries = cs / 2;
        // every cluster the image can ever hold: data, L2 tables, metadata, refblocks
        let host_max = guest_clusters + l1_size + l1_clusters + 64;
        let host_max = host_max + host_max.div_ceil(rb_entries);
        let rt_clusters = (host_max.div_ceil(rb_entries) * 8).div_ceil(cs).max(1);
        let meta_clusters = 1 + rt_clusters + 1 + l1_clusters;
        if meta_clusters > rb_entries || l1_size > u64::from(u32::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a {size}-byte image needs more metadata than refcount block 0 \
                     covers with {cs}-byte clusters; use a larger cluster_size"
                ),
            ));
        }
        Ok(Layout {
            cluster_bits,
            size,
            l1_size: l1_size as u32,
            rt_offset: cs,
            rt_clusters: rt_clusters as u32,
            rb_offset: cs * (1 + rt_clusters),
            l1_offset: cs * (2 + rt_clusters),
            meta_clusters,
        })
    }

    /// The whole initial image: header cluster, tables, refcounts.
    pub fn image(&self, backing: Option<&str>) -> io::Result<Vec<u8>> {
        let cs = 1usize << self.cluster_bits;
        let mut img = vec![0u8; cs * self.meta_clusters as usize];
        self.write_header(&mut img[..cs], backing)?;
        let rt = self.rt_offset as usize;
        img[rt..rt + 8].copy_from_slice(&self.rb_offset.to_be_bytes());
        let rb = self.rb_offset as usize;
        for i in 0..self.meta_clusters as usize {
            img[rb + 2 * i..rb + 2 * i + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        Ok(img)
    }

    fn write_header(&self, h: &mut [u8], backing: Option<&str>) -> io::Result<()> {
        let put32 =
            |h: &mut [u8], at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |h: &mut [u8], at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(h, 0, MAGIC);
        put32(h, 4, 3);
        put32(h, 20, self.cluster_bits);
        put64(h, 24, self.size);
        put32(h, 36, self.l1_size);
        put64(h, 40, self.l1_offset);
        put64(h, 48, self.rt_offset);
        put32(h, 56, self.rt_clusters);
        put32(h, 96, 4); // refcount_order
        put32(h, 100, V3_HEADER_LEN);
        let mut at = V3_HEADER_LEN as usize;
        if let Some(name) = backing {
            // backing format extension "raw", then the end marker, then the name
            put32(h, at, EXT_BACKING_FORMAT);
            put32(h, at + 4, 3);
            h[at + 8..at + 11].copy_from_slice(b"raw");
            at += 16;
            at += 8; // end-of-extensions: type 0, length 0
            if at + name.len() > h.len() || name.len() > 1023 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("backing file name `{name}` does not fit in the header"),
                ));
            }
            h[at..at + name.len()].copy_from_slice(name.as_bytes());
            put64(h, 8, at as u64);
            put32(h, 16, name.len() as u32);
        }
        Ok(())
    }
}

/// Read `len` bytes at `offset` into a new buffer (open-time metadata).
pub fn read_vec(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    file.read_exact_at(&mut v, offset)?;
    Ok(v)
}

/// Decode a big-endian table of 8-byte entries.
pub fn decode_table(buf: &[u8]) -> impl Iterator<Item = u64> + '_ {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_header_parses_back() {
        let l = Layout::new(1 << 30, 16).unwrap();
        let img = l.image(Some("/x/base.raw")).unwrap();
        let h = Header::parse(&img[..65536], img.len() as u64).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.cluster_bits, 16);
        assert_eq!(h.l1_table_offset, l.l1_offset);
        assert_eq!(h.backing_file.as_deref(), Some("/x/base.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
    }

    #[test]
    fn refusals_name_the_problem() {
        let l = Layout::new(1 << 20, 16).unwrap();
        let mut img = l.image(None).unwrap();
        let n = img.len() as u64;
        img[72 + 7] |= 1 << 5;
        let e = Header::parse(&img, n).unwrap_err().to_string();
        assert!(e.contains("unknown incompatible feature bits 0x20"), "{e}");
        img[72 + 7] = 1;
        assert!(matches!(Header::parse(&img, n), Err(FormatError::Dirty)));
        img[72 + 7] = 0;
        img[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&img, n),
            Err(FormatError::Version(4))
        ));
        img[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&img, 65536),
            Err(FormatError::PastEof { .. })
        ));
        for (bit, want) in [(2, "external data"), (3, "compression"), (4, "extended L2")] {
            let mut bad = img.clone();
            bad[72 + 7] = 1 << bit;
            let e = Header::parse(&bad, n).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let mut bad = img.clone();
        bad[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&bad, n),
            Err(FormatError::Encrypted(1))
        ));
        let mut bad = img.clone();
        bad[20..24].copy_from_slice(&22u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&bad, n),
            Err(FormatError::ClusterBits(22))
        ));
        let mut bad = img.clone();
        bad[96..100].copy_from_slice(&5u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&bad, n),
            Err(FormatError::RefcountOrder(5))
        ));
        assert!(Header::parse(&img, n).is_ok());
    }

    #[test]
    fn malformed_header_fields_are_refused() {
        let l = Layout::new(1 << 20, 16).unwrap();
        let img = l.image(Some("/x/base.raw")).unwrap();
        let n = img.len() as u64;
        let mut bad = img.clone();
        bad[100..104].copy_from_slice(&96u32.to_be_bytes());
        let e = Header::parse(&bad, n).unwrap_err().to_string();
        assert!(e.contains("header_length is below 104"), "{e}");
        // backing file name offset + length overflows
        let mut bad = img.clone();
        bad[8..16].copy_from_slice(&(u64::MAX - 2).to_be_bytes());
        bad[16..20].copy_from_slice(&16u32.to_be_bytes());
        let e = Header::parse(&bad, n).unwrap_err().to_string();
        assert!(e.contains("backing file name offset overflows"), "{e}");
        let mut bad = img.clone();
        bad[20..24].copy_from_slice(&11u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&bad, n),
            Err(FormatError::ClusterBits(11))
        ));
    }
}
