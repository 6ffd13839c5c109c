//! The VMs Quern knows: a QMP client ([`qmp`]), VM specs and records
//! ([`spec`]), disk names as libvirt numbers them ([`names`]), and the
//! manager that starts or attaches QEMUs and inserts and removes their
//! disks under names that never change ([`manager`]).
//!
//! It needs of a disk only what QEMU needs (socket path, UUID, serial,
//! queues), through the [`manager::Disks`] trait the engine implements.

pub mod manager;
pub mod names;
pub mod qmp;
pub mod spec;

pub use manager::{Code, DiskInfo, Disks, Store, VmError, VmManager};
pub use spec::{DiskEntry, Owner, VmRecord, VmSpec};

/// The serial a guest reads for a disk of this UUID: its first 20 hex
/// digits (GET_ID holds 20 bytes), so `/dev/disk/by-id/virtio-<serial>`
/// is the same wherever and whenever the disk is inserted.
pub fn serial_of(uuid: &str) -> String {
    uuid.chars().filter(|c| *c != '-').take(20).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn serials_come_from_the_uuid() {
        assert_eq!(
            super::serial_of("0f8fad5b-d9cb-469f-a165-70867728950e"),
            "0f8fad5bd9cb469fa165"
        );
    }
}
