//! The management API in-process: random sequences of creates and deletes
//! of bdevs, devices, QoS limits and groups (valid and not), then `config_save`, then a fresh engine from that
//! text: it has the same objects with the same settings, and so does an
//! engine started again on the state directory.

use std::sync::Arc;

use proptest::prelude::*;
use quern::config::{
    BdevSection, Config, Driver, QosGroupSection, QosLimits, Size, VhostBlkSection,
};
use quern::engine::{Engine, StartOptions};
use serde_json::{json, Value};

#[derive(Clone, Debug)]
enum Op {
    Bdev {
        name: u8,
        driver: u8,
        size_mib: u8,
        base: u8,
        read_only: bool,
    },
    DelBdev(u8),
    Device {
        name: u8,
        bdev: u8,
        queues: u8,
        read_only: bool,
        serial: bool,
    },
    DelDevice {
        name: u8,
        force: bool,
    },
    /// A device's limit (0: cleared; 3: refused, burst_ms 0).
    SetQos {
        name: u8,
        iops: u16,
        kind: u8,
    },
    Group {
        name: u8,
        iops: u16,
    },
    DelGroup(u8),
    /// Into group `group` (None: out of its group).
    Join {
        name: u8,
        group: Option<u8>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..5, 0u8..4, 0u8..5, 0u8..5, any::<bool>()).prop_map(
            |(name, driver, size_mib, base, read_only)| Op::Bdev {
                name,
                driver,
                size_mib,
                base,
                read_only
            }
        ),
        (0u8..5).prop_map(Op::DelBdev),
        (0u8..4, 0u8..5, 0u8..6, any::<bool>(), any::<bool>()).prop_map(
            |(name, bdev, queues, read_only, serial)| Op::Device {
                name,
                bdev,
                queues,
                read_only,
                serial
            }
        ),
        (0u8..4, any::<bool>()).prop_map(|(name, force)| Op::DelDevice { name, force }),
        (0u8..4, 0u16..3000, 0u8..4).prop_map(|(name, iops, kind)| Op::SetQos { name, iops, kind }),
        (0u8..3, 0u16..3000).prop_map(|(name, iops)| Op::Group { name, iops }),
        (0u8..3).prop_map(Op::DelGroup),
        (0u8..4, proptest::option::of(0u8..3)).prop_map(|(name, group)| Op::Join { name, group }),
    ]
}

fn bdev(name: u8, driver: u8, size_mib: u8, base: u8, read_only: bool) -> BdevSection {
    let mut b = BdevSection {
        // 0 MiB is refused (less than a block): an invalid call
        size: Some(Size::Text(format!("{size_mib}M"))),
        read_only,
        ..BdevSection::new(
            &format!("b{name}"),
            [Driver::Malloc, Driver::Null, Driver::Uring, Driver::Qcow2][driver as usize],
        )
    };
    match b.driver {
        Driver::Uring => {
            b.path = Some(format!("b{name}-{size_mib}.img").into());
            b.read_only = false;
        }
        Driver::Qcow2 => {
            b.path = Some(format!("b{name}-over-b{base}.qcow2").into());
            b.base = Some(format!("b{base}"));
            b.size = None;
            b.read_only = false;
        }
        _ => {}
    }
    b
}

fn device(name: u8, bdev: u8, queues: u8, read_only: bool, serial: bool) -> VhostBlkSection {
    VhostBlkSection {
        name: format!("d{name}"),
        bdev: format!("b{bdev}"),
        socket: format!("d{name}.sock").into(),
        // 0 queues is refused: an invalid call
        num_queues: u16::from(queues),
        queue_size: 128,
        cores: None,
        queue_cores: None,
        read_only,
        event_idx: name.is_multiple_of(2),
        uuid: None,
        serial: serial.then(|| format!("serial-{name}")),
        qos: None,
        qos_group: None,
    }
}

fn config(dir: &std::path::Path) -> Config {
    Config::parse(&format!(
        "state_dir = \"{}\"\n[reactor]\ncores = [0]\n",
        dir.display()
    ))
    .unwrap()
}

fn apply(e: &Engine, op: &Op) {
    // the outcome does not matter: refused calls must change nothing
    let _ = match op.clone() {
        Op::Bdev {
            name,
            driver,
            size_mib,
            base,
            read_only,
        } => e.bdev_create(bdev(name, driver, size_mib, base, read_only)),
        Op::DelBdev(n) => e.bdev_delete(&format!("b{n}")),
        Op::Device {
            name,
            bdev,
            queues,
            read_only,
            serial,
        } => e.vhost_blk_create(device(name, bdev, queues, read_only, serial)),
        Op::DelDevice { name, force } => e.vhost_blk_delete(&format!("d{name}"), force),
        Op::SetQos { name, iops, kind } => {
            let mut q = QosLimits::default();
            match kind {
                0 => q.iops = iops.into(),
                1 => q.write_bps = u64::from(iops) << 10,
                2 => q.read_iops = iops.into(),
                _ => q.burst_ms = 0,
            }
            e.vhost_blk_set_qos(&format!("d{name}"), q)
        }
        Op::Group { name, iops } => {
            let g = QosGroupSection {
                name: format!("g{name}"),
                qos: QosLimits {
                    iops: iops.into(),
                    ..QosLimits::default()
                },
            };
            // a new group, or new limits for one that exists
            e.qos_group_create(g.clone())
                .or_else(|_| e.qos_group_set(g))
        }
        Op::DelGroup(n) => e.qos_group_delete(&format!("g{n}")),
        Op::Join { name, group } => {
            e.vhost_blk_set_qos_group(&format!("d{name}"), group.map(|g| format!("g{g}")))
        }
    };
}

/// What an engine has, for comparison.
fn shape(e: &Engine) -> (Value, Value) {
    let mut devices = e.vhost_blk_list();
    // counters and connections are not settings
    for d in devices.as_array_mut().unwrap() {
        let o = d.as_object_mut().unwrap();
        o.remove("queues");
        o.remove("connections");
        o.remove("connected");
        o.remove("throttled_requests");
        o.remove("throttled_seconds");
    }
    let mut groups = e.qos_group_list();
    for g in groups.as_array_mut().unwrap() {
        let o = g.as_object_mut().unwrap();
        o.remove("throttled_requests");
        o.remove("throttled_seconds");
    }
    (e.bdev_list(), json!([devices, groups]))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn config_save_restores_the_same_objects(ops in proptest::collection::vec(op(), 1..24)) {
        let dir = tempfile::Builder::new().prefix("quern-api").tempdir_in("/var/tmp").unwrap();
        let cfg = config(dir.path());
        let e = Engine::start(&cfg, StartOptions::default()).unwrap();
        for o in &ops {
            apply(&e, o);
        }
        let want = shape(&e);
        let saved = e.config_save();
        e.stop();
        drop(e);
        // a fresh engine from config_save's text
        let c2 = Config::parse(&saved).unwrap_or_else(|err| panic!("{err}\n{saved}"));
        let e2 = Engine::start(&c2, StartOptions { reset_state: true }).unwrap();
        prop_assert_eq!(&shape(&e2), &want);
        prop_assert_eq!(e2.config_save(), saved.clone());
        e2.stop();
        drop(e2);
        // and one that loads the state directory
        let e3: Arc<Engine> = Engine::start(&cfg, StartOptions::default()).unwrap();
        prop_assert_eq!(&shape(&e3), &want);
        e3.stop();
    }
}
