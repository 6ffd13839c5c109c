//! What Quern keeps of a VM: the spec it was created from (or where an
//! attached QEMU's QMP socket is), its identity, and the map from disk
//! UUIDs to the names the guest gives them. All of it is persisted in the
//! state directory.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::names;

/// A VM Quern starts and supervises (`vm_create`, `[[vm]]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique VM name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// The VM's UUID (QEMU's -uuid; the guest's SMBIOS UUID); generated
    /// when absent, then kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Virtual CPUs (1..=64).
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Guest RAM in MiB (64..=65536), a shared memfd (vhost-user needs it).
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// QEMU's -cpu model.
    #[serde(default = "default_cpu")]
    pub cpu: String,
    /// QEMU's machine type; disk insert needs an i440fx machine (`pc`,
    /// `pc-i440fx-*`), whose PCI bridges take hot-plugged disks.
    #[serde(default = "default_machine")]
    pub machine: String,
    /// Accelerators in the order QEMU tries them.
    #[serde(default = "default_accel")]
    pub accel: Vec<String>,
    /// A kernel to boot directly (with `initrd` and `append`), or none to
    /// boot from `boot_disk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// The device the firmware boots from (one of `disks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_disk: Option<String>,
    /// Quern devices (vhost_blk names) the VM starts with; the guest names
    /// them vda, vdb, ... in this order.
    #[serde(default)]
    pub disks: Vec<String>,
    /// `none`, or `user` (QEMU's user-mode network with a virtio NIC).
    #[serde(default)]
    pub network: Network,
    /// The QEMU binary (default qemu-system-x86_64 from PATH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<PathBuf>,
}

fn one() -> u32 {
    1
}
fn default_memory() -> u64 {
    512
}
fn default_cpu() -> String {
    "max".into()
}
fn default_machine() -> String {
    "pc".into()
}
fn default_accel() -> Vec<String> {
    vec!["kvm".into(), "tcg".into()]
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    #[default]
    None,
    User,
}

impl VmSpec {
    /// What a spec must satisfy that its types do not say.
    pub fn check(&self) -> Result<(), (String, String)> {
        let e = |k: &str, r: String| Err((k.to_string(), r));
        check_name(&self.name).or_else(|r| e("name", r))?;
        if let Some(u) = &self.uuid {
            if let Err(x) = uuid::Uuid::parse_str(u) {
                return e("uuid", format!("`{u}` is not a UUID: {x}"));
            }
        }
        if !(1..=64).contains(&self.vcpus) {
            return e("vcpus", format!("{} is outside 1..=64", self.vcpus));
        }
        if !(64..=65536).contains(&self.memory_mib) {
            return e(
                "memory_mib",
                format!("{} is outside 64..=65536", self.memory_mib),
            );
        }
        if !(self.machine == "pc" || self.machine.starts_with("pc-i440fx")) {
            return e(
                "machine",
                format!(
                    "`{}`: disks are hot-plugged behind PCI bridges, which needs an i440fx machine (pc, pc-i440fx-*)",
                    self.machine
                ),
            );
        }
        if self.accel.is_empty()
            || self
                .accel
                .iter()
                .any(|a| !matches!(a.as_str(), "kvm" | "tcg"))
        {
            return e("accel", format!("{:?}: give kvm and/or tcg", self.accel));
        }
        for (k, v) in [("cpu", &self.cpu), ("machine", &self.machine)] {
            if v.is_empty() || v.contains(|c: char| c == ',' || c.is_whitespace()) {
                return e(k, format!("`{v}` is not a {k} name"));
            }
        }
        if self.kernel.is_none() && (self.initrd.is_some() || self.append.is_some()) {
            return e("kernel", "initrd and append need a kernel".into());
        }
        if self.kernel.is_none() && self.boot_disk.is_none() {
            return e("kernel", "give a kernel or a boot_disk".into());
        }
        if let Some(b) = &self.boot_disk {
            if !self.disks.contains(b) {
                return e("boot_disk", format!("`{b}` is not one of disks"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.disks {
            if !seen.insert(d) {
                return e("disks", format!("`{d}` is listed twice"));
            }
        }
        if self.disks.len() > MAX_DISKS as usize {
            return e("disks", format!("more than {MAX_DISKS}"));
        }
        Ok(())
    }
}

/// Names of VMs follow the same rule as other objects.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("`{c}` is not allowed (letters, digits, -, _, .)"));
    }
    Ok(())
}

/// Disks a VM can hold: two PCI bridges of 30 hot-plug slots each.
pub const MAX_DISKS: u32 = 60;
/// Hot-plug slots per bridge (1..=30; slot 0 and 31 are left alone).
pub const SLOTS_PER_BRIDGE: u32 = 30;
/// Bridges Quern puts in the VMs it starts.
pub const BRIDGES: u32 = 2;

/// Who runs the QEMU.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    /// Quern started it from the spec.
    Quern,
    /// Someone else did; Quern talks to its QMP socket.
    Attached,
}

/// One disk in a VM's map: a UUID and the name it has in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    pub uuid: String,
    /// vda, vdb, ...
    pub name: String,
    /// The Quern device (vhost_blk) that serves it.
    pub device: String,
    /// In the VM now; false: removed, its name reserved for it until
    /// `vm_disk_release`.
    pub attached: bool,
}

impl DiskEntry {
    pub fn index(&self) -> u32 {
        names::name_to_index(&self.name).map_or(u32::MAX, |(_, i)| i)
    }
}

/// Everything kept of a VM.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    pub name: String,
    pub uuid: String,
    pub owner: Owner,
    /// For a VM Quern runs: how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<VmSpec>,
    pub qmp_socket: PathBuf,
    /// The QEMU process Quern started (to recognise it after a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Names `vd[a..]` below this index are held by disks Quern did not
    /// insert (an attached VM's own).
    #[serde(default)]
    pub foreign: u32,
    /// Indices held in the guest by placeholder disks (a removed disk's
    /// reserved name, or a gap below a disk given a name by hand): each is
    /// a 4 KiB read-only disk with serial `quern-gap`, so that the guest,
    /// which names a new disk by the lowest free index, gives each disk
    /// the name in this map.
    #[serde(default)]
    pub gaps: Vec<u32>,
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskEntry>,
}

impl VmRecord {
    /// Indices the guest has in use (foreign, attached disks, gap holders).
    pub fn occupied(&self, idx: u32) -> bool {
        idx < self.foreign
            || self.gaps.contains(&idx)
            || self.disks.iter().any(|d| d.attached && d.index() == idx)
    }

    /// The entry holding name index `idx` (attached or reserved).
    pub fn holder(&self, idx: u32) -> Option<&DiskEntry> {
        self.disks.iter().find(|d| d.index() == idx)
    }

    /// The lowest name index no entry holds and no foreign disk has.
    pub fn lowest_free(&self) -> u32 {
        (self.foreign..)
            .find(|&i| self.holder(i).is_none())
            .unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        serde_json::from_value(
            serde_json::json!({"name": "vm0", "kernel": "/k", "disks": ["a", "b"]}),
        )
        .unwrap()
    }

    #[test]
    fn specs_are_checked_naming_the_key() {
        assert!(spec().check().is_ok());
        let bad = |f: &dyn Fn(&mut VmSpec), key: &str| {
            let mut s = spec();
            f(&mut s);
            let (k, r) = s.check().unwrap_err();
            assert_eq!(k, key, "{r}");
        };
        bad(&|s| s.vcpus = 0, "vcpus");
        bad(&|s| s.memory_mib = 8, "memory_mib");
        bad(&|s| s.machine = "q35".into(), "machine");
        bad(&|s| s.uuid = Some("nope".into()), "uuid");
        bad(&|s| s.boot_disk = Some("c".into()), "boot_disk");
        bad(&|s| s.disks.push("a".into()), "disks");
        bad(&|s| s.name = "a b".into(), "name");
        bad(&|s| s.accel = vec!["hvf".into()], "accel");
        bad(&|s| s.cpu = "max,+x".into(), "cpu");
        bad(
            &|s| {
                s.kernel = None;
                s.boot_disk = None;
            },
            "kernel",
        );
    }

    #[test]
    fn the_lowest_free_name_skips_reserved_and_foreign_ones() {
        let e = |name: &str, attached| DiskEntry {
            uuid: name.into(),
            name: name.into(),
            device: name.into(),
            attached,
        };
        let mut r = VmRecord {
            name: "v".into(),
            uuid: "u".into(),
            owner: Owner::Attached,
            spec: None,
            qmp_socket: "/q".into(),
            pid: None,
            foreign: 1,
            gaps: vec![2],
            disks: vec![e("vdb", true), e("vdc", false)],
        };
        assert_eq!(r.lowest_free(), 3);
        assert!(r.occupied(0) && r.occupied(1) && r.occupied(2));
        assert!(!r.occupied(3));
        r.disks.remove(0);
        assert_eq!(r.lowest_free(), 1);
    }
}
