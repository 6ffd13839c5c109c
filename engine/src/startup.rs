//! Start-up and shutdown: bdevs are opened first (a failure stops start-up
//! before any reactor runs), then reactors are started and every bdev is
//! attached to every reactor's engine.

use std::sync::Arc;
use std::time::Duration;

use quern_bdev::drivers::{MallocBdev, NullBdev, Qcow2Bdev, Qcow2Options, UringBdev, UringOptions};
use quern_bdev::{BdevRef, EngineConfig, MergeConfig};
use quern_reactor::{spawn_reactor, ReactorConfig, ReactorHandle};
use quern_vhost::{DeviceConfig, DeviceHandle, QueueBinding};

use crate::config::{BdevSection, Config};
use crate::mgmt::{Management, View};

/// A running engine.
pub struct Engine {
    pub reactors: Vec<Arc<ReactorHandle>>,
    pub bdevs: Vec<(String, BdevRef)>,
    pub devices: Vec<Arc<DeviceHandle>>,
    /// The management socket, if configured.
    pub management: Option<Management>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("bdev `{name}`: {source}")]
    Bdev {
        name: String,
        source: std::io::Error,
    },
    #[error("vhost_blk `{name}`: {source}")]
    Device {
        name: String,
        source: std::io::Error,
    },
    #[error("management socket {path}: {source}")]
    Management {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("reactor on core {core}: {source}")]
    Reactor { core: usize, source: std::io::Error },
}

/// Open one bdev; `opened` holds the bdevs before it (a qcow2 base).
fn open_bdev(
    cfg: &Config,
    b: &BdevSection,
    opened: &[(String, BdevRef)],
) -> std::io::Result<BdevRef> {
    let size = b
        .size
        .as_deref()
        .map(quern_bdev::parse_size)
        .transpose()
        .map_err(std::io::Error::other)?;
    let bs = b.block_size.unwrap_or(512);
    Ok(match b.driver.as_str() {
        "malloc" => Arc::new(MallocBdev::new(
            &b.name,
            size.unwrap_or(0),
            bs,
            b.read_only,
        )?),
        "null" => Arc::new(NullBdev::new(&b.name, size.unwrap_or(0), bs, b.read_only)),
        "uring" => Arc::new(UringBdev::open(&UringOptions {
            name: b.name.clone(),
            path: cfg.resolve(
                b.path
                    .as_deref()
                    .unwrap_or_else(|| std::path::Path::new("")),
            ),
            create_size: size,
            direct: b.direct,
            read_only: b.read_only,
            block_size: b.block_size,
            delay_us: b.delay_us,
        })?),
        #[cfg(feature = "rbd")]
        "rbd" => {
            use quern_bdev::drivers::{RbdBdev, RbdOptions};
            let mut o = RbdOptions::new(
                &b.name,
                b.pool.as_deref().unwrap_or_default(),
                b.image.as_deref().unwrap_or_default(),
            );
            o.snapshot = b.snapshot.clone();
            if let Some(c) = &b.ceph_conf {
                o.ceph_conf = cfg.resolve(c);
            }
            if let Some(id) = &b.client_id {
                o.client_id = id.clone();
            }
            o.keyring = b.keyring.as_deref().map(|k| cfg.resolve(k));
            o.read_only = b.read_only || b.snapshot.is_some();
            if let Some(t) = b.timeout_secs {
                o.timeout_secs = t;
            }
            o.block_size = b.block_size;
            Arc::new(RbdBdev::open(&o)?)
        }
        "qcow2" => Arc::new(open_qcow2(cfg, b, size, opened)?),
        other => return Err(std::io::Error::other(format!("unknown driver {other}"))),
    })
}

fn open_qcow2(
    cfg: &Config,
    b: &BdevSection,
    size: Option<u64>,
    opened: &[(String, BdevRef)],
) -> std::io::Result<Qcow2Bdev> {
    let base_name = b.base.as_deref().unwrap_or_default();
    let base = opened
        .iter()
        .find(|(n, _)| n == base_name)
        .map(|(_, d)| d.clone())
        .ok_or_else(|| std::io::Error::other(format!("base `{base_name}` is not open")))?;
    let cluster_size = match &b.cluster_size {
        Some(s) => quern_bdev::parse_size(s).map_err(std::io::Error::other)?,
        None => 64 << 10,
    };
    Qcow2Bdev::open(&Qcow2Options {
        name: b.name.clone(),
        path: cfg.resolve(
            b.path
                .as_deref()
                .unwrap_or_else(|| std::path::Path::new("")),
        ),
        base,
        size,
        cluster_size: u32::try_from(cluster_size).map_err(std::io::Error::other)?,
        copy_on_read: b.copy_on_read,
        read_only: b.read_only,
        direct: b.direct,
    })
}

impl Engine {
    pub fn start(cfg: &Config) -> Result<Engine, StartError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| StartError::Bdev {
            name: "<state_dir>".into(),
            source,
        })?;
        let mut bdevs = Vec::new();
        for b in &cfg.bdevs {
            let bdev = open_bdev(cfg, b, &bdevs).map_err(|source| StartError::Bdev {
                name: b.name.clone(),
                source,
            })?;
            let i = bdev.info();
            tracing::info!(bdev = %i.name, driver = i.driver, capacity = i.capacity_bytes, block_size = i.block_size, read_only = i.read_only, "bdev ready");
            bdevs.push((b.name.clone(), bdev));
        }
        let engine_cfg = EngineConfig {
            max_requests: cfg.reactor.max_requests,
            submit_batch: cfg.reactor.submit_batch,
            merge: MergeConfig {
                enabled: cfg.merge.enabled,
                max_bytes: cfg.merge.max_bytes,
                max_segments: cfg.merge.max_segments,
            },
            ..EngineConfig::default()
        };
        let mode = cfg.reactor.poll_mode.parse().expect("validated");
        let mut reactors: Vec<Arc<ReactorHandle>> = Vec::new();
        for (id, &core) in cfg.reactor.cores.iter().enumerate() {
            let rc = ReactorConfig {
                id,
                core: Some(core),
                mode,
                idle_spin: Duration::from_micros(cfg.reactor.idle_spin_us),
                engine: engine_cfg,
            };
            match spawn_reactor(rc) {
                Ok(h) => reactors.push(h),
                Err(source) => {
                    reactors.iter().for_each(|r| r.stop());
                    return Err(StartError::Reactor { core, source });
                }
            }
        }
        let mut engine = Engine {
            reactors,
            bdevs,
            devices: Vec::new(),
            management: None,
        };
        // handles[b][r]: bdev b's handle on reactor r's engine
        let mut handles: Vec<Vec<u16>> = Vec::new();
        for (name, b) in &engine.bdevs {
            let mut per = Vec::new();
            for r in &engine.reactors {
                let b = b.clone();
                match r.call(move |ctx| ctx.io.add_device(b)) {
                    Ok(h) => per.push(h),
                    Err(source) => {
                        engine.stop();
                        return Err(StartError::Bdev {
                            name: name.clone(),
                            source,
                        });
                    }
                }
            }
            handles.push(per);
        }
        for v in &cfg.vhost_blk {
            let bi = engine
                .bdevs
                .iter()
                .position(|(n, _)| *n == v.bdev)
                .expect("validated");
            let (explicit, list) = cfg.binding(v);
            let dc = DeviceConfig {
                name: v.name.clone(),
                socket: cfg.resolve(&v.socket),
                num_queues: v.num_queues,
                queue_size: v.queue_size,
                read_only: v.read_only,
                serial: v.serial.clone().unwrap_or_else(|| v.name.clone()),
                binding: if explicit {
                    QueueBinding::Explicit(list)
                } else {
                    QueueBinding::RoundRobin(list)
                },
            };
            let bdev = engine.bdevs[bi].1.clone();
            match quern_vhost::serve(dc, bdev, engine.reactors.clone(), handles[bi].clone()) {
                Ok(d) => engine.devices.push(Arc::new(d)),
                Err(source) => {
                    engine.stop();
                    return Err(StartError::Device {
                        name: v.name.clone(),
                        source,
                    });
                }
            }
        }
        if let Some(path) = cfg.management_socket() {
            let view = View {
                reactors: engine.reactors.clone(),
                bdevs: engine.bdevs.clone(),
                devices: engine.devices.clone(),
            };
            match Management::serve(&path, view) {
                Ok(m) => engine.management = Some(m),
                Err(source) => {
                    engine.stop();
                    return Err(StartError::Management { path, source });
                }
            }
        }
        Ok(engine)
    }

    /// Stop serving devices, drain in-flight I/O on every reactor, stop them.
    pub fn stop(&self) {
        if let Some(m) = &self.management {
            m.stop();
        }
        for d in &self.devices {
            d.stop();
        }
        for r in &self.reactors {
            r.stop();
        }
    }
}
