//! Disk names as Linux gives them to virtio disks, and libvirt numbers
//! them: a prefix (`vd`, also `sd`, `hd`, `xvd`) and a base-26 "number"
//! of letters without a zero, so that vda is 0, vdz 25, vdaa 26, vdzz 701
//! and vdaaa 702.

/// The prefixes a disk name may have.
const PREFIXES: [&str; 4] = ["xvd", "vd", "sd", "hd"];

/// The most letters a name may have after its prefix (vdzzzz is index
/// 475,253: far beyond any VM's disks).
const MAX_LETTERS: usize = 4;

/// The name of disk `index` with `prefix` (`index_to_name("vd", 26)` is
/// `vdaa`).
pub fn index_to_name(prefix: &str, index: u32) -> String {
    let mut letters = Vec::new();
    let mut n = i64::from(index);
    loop {
        letters.push(b'a' + (n % 26) as u8);
        n = n / 26 - 1;
        if n < 0 {
            break;
        }
    }
    letters.reverse();
    format!("{prefix}{}", String::from_utf8_lossy(&letters))
}

/// A name's prefix and index (`vdaa` is `("vd", 26)`), or why it is not a
/// disk name.
pub fn name_to_index(name: &str) -> Result<(&'static str, u32), String> {
    let prefix = PREFIXES
        .iter()
        .find(|p| name.starts_with(**p))
        .ok_or_else(|| format!("`{name}` does not start with vd, sd, hd or xvd"))?;
    let letters = &name[prefix.len()..];
    if letters.is_empty() {
        return Err(format!("`{name}` has no letters after `{prefix}`"));
    }
    if letters.len() > MAX_LETTERS {
        return Err(format!("`{name}` has more than {MAX_LETTERS} letters"));
    }
    let mut idx: i64 = -1;
    for c in letters.bytes() {
        if !c.is_ascii_lowercase() {
            return Err(format!("`{name}`: `{}` is not a letter a-z", c as char));
        }
        idx = (idx + 1) * 26 + i64::from(c - b'a');
    }
    Ok((prefix, idx as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libvirt's own vectors (tests/utiltest.c, virDiskNameToIndex).
    #[test]
    fn libvirts_vectors() {
        for (name, idx) in [
            ("sda", 0),
            ("sdb", 1),
            ("sdz", 25),
            ("sdaa", 26),
            ("sdab", 27),
            ("sdaz", 51),
            ("sdba", 52),
            ("sdzz", 701),
            ("sdaaa", 702),
            ("sdzzz", 18277),
            ("hda", 0),
            ("hdz", 25),
            ("vda", 0),
            ("vdaa", 26),
            ("vdzz", 701),
            ("vdaaa", 702),
            ("xvdb", 1),
        ] {
            assert_eq!(name_to_index(name).map(|(_, i)| i), Ok(idx), "{name}");
            let prefix = name_to_index(name).unwrap().0;
            assert_eq!(index_to_name(prefix, idx), name);
        }
    }

    #[test]
    fn bad_names_are_refused_saying_why() {
        for (bad, why) in [
            ("vd", "no letters"),
            ("nvme0n1", "does not start"),
            ("vdA", "not a letter"),
            ("vd1", "not a letter"),
            ("vdaaaaa", "more than 4"),
            ("", "does not start"),
        ] {
            let e = name_to_index(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn names_and_indices_round_trip(i in 0u32..475_254) {
            let n = index_to_name("vd", i);
            proptest::prop_assert_eq!(name_to_index(&n), Ok(("vd", i)));
        }
    }
}
