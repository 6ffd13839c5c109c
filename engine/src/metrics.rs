//! The Prometheus endpoint: `GET /metrics` over HTTP on a TCP address or a
//! UNIX socket (`[metrics] listen`), served by its own thread.
//!
//! A scrape reads the counters and histograms the reactors publish (plain
//! loads of relaxed atomics) and never sends a reactor a message, so a
//! slow or stuck scraper costs the data path nothing. Latency is exposed
//! as native histograms (schema 3, the reactors' own buckets, no
//! conversion) with classic power-of-two `le` buckets beside them: the
//! protobuf exposition carries both (Prometheus with
//! `--enable-feature=native-histograms` asks for it), the OpenMetrics text
//! exposition the classic ones.
//!
//! Names follow Prometheus's conventions (`quern_` prefix, base units,
//! `_total` counters): see README, "Metrics".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, NativeHistogram, NativeHistogramBuckets, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use quern_reactor::histogram::{Snapshot, SCHEMA};
use quern_vhost::queue::OPS;

use crate::config::MetricsListen;
use crate::engine::Engine;

type Labels = Vec<(&'static str, String)>;

/// The engine's metrics, gathered at each scrape.
struct EngineCollector(Arc<Engine>);

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineCollector")
    }
}

fn counters<V: prometheus_client::encoding::EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, V)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (l, v) in rows {
        m.encode_family(l)?
            .encode_counter::<NoLabelSet, V, u64>(v, None)?;
    }
    Ok(())
}

fn gauges<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, V)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, v) in rows {
        m.encode_family(l)?.encode_gauge(v)?;
    }
    Ok(())
}

fn histograms(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, Snapshot)],
    created: std::time::SystemTime,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (l, s) in rows {
        let (spans, deltas) = s.native_buckets();
        m.encode_family(l)?
            .encode_histogram_with_native::<NoLabelSet>(
                s.sum_secs(),
                s.count(),
                &s.classic_buckets(),
                None,
                NativeHistogram {
                    schema: SCHEMA,
                    zero_threshold: 0.0,
                    zero_count: 0,
                    negative: NativeHistogramBuckets {
                        spans: &[],
                        deltas: &[],
                    },
                    positive: NativeHistogramBuckets {
                        spans: &spans,
                        deltas: &deltas,
                    },
                    created: Some(created),
                },
            )?;
    }
    Ok(())
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Collector for EngineCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let e = &self.0;
        let enc = &mut enc;
        let histograms_on = e.histograms_on();
        gauges(
            enc,
            "build_info",
            "Quern's version (always 1)",
            &[(
                vec![("version", env!("CARGO_PKG_VERSION").to_string())],
                1u64,
            )],
        )?;

        // reactors
        let mut busy = Vec::new();
        let mut idle = Vec::new();
        let mut sleeps = Vec::new();
        let mut failed = Vec::new();
        let mut cycles = Vec::new();
        let mut ios = Vec::new();
        let mut ios_failed = Vec::new();
        let mut merge_in = Vec::new();
        let mut merge_out = Vec::new();
        let mut merge_bytes = Vec::new();
        for (r, io) in e.reactors.iter().zip(&e.io_stats) {
            let l: Labels = vec![
                ("reactor", r.id.to_string()),
                ("core", r.core.map_or_else(|| "-".into(), |c| c.to_string())),
            ];
            let s = r.stats.snapshot();
            let i = io.snapshot();
            busy.push((l.clone(), s.busy_ns as f64 / 1e9));
            idle.push((l.clone(), s.idle_ns as f64 / 1e9));
            sleeps.push((l.clone(), s.sleeps));
            cycles.push((l.clone(), s.cycles));
            failed.push((l.clone(), u64::from(r.failure().is_some())));
            ios.push((l.clone(), i.ios_completed));
            ios_failed.push((l.clone(), i.ios_failed));
            merge_in.push((l.clone(), i.merge_requests_in));
            merge_out.push((l.clone(), i.merge_requests_out));
            merge_bytes.push((l, i.merge_bytes));
        }
        counters(
            enc,
            "reactor_busy",
            "Time reactors spent in cycles that found work",
            Some(&Unit::Seconds),
            &busy,
        )?;
        counters(
            enc,
            "reactor_idle",
            "Time reactors spent polling without work or asleep",
            Some(&Unit::Seconds),
            &idle,
        )?;
        counters(
            enc,
            "reactor_sleeps",
            "Times a reactor went to sleep (adaptive and interrupt poll modes)",
            None,
            &sleeps,
        )?;
        counters(enc, "reactor_cycles", "Reactor poll cycles", None, &cycles)?;
        gauges(
            enc,
            "reactor_failed",
            "1 if the reactor failed (a panic was contained) and fails its requests",
            &failed,
        )?;
        counters(
            enc,
            "reactor_ios",
            "Bdev operations a reactor completed (after merging)",
            None,
            &ios,
        )?;
        counters(
            enc,
            "reactor_io_errors",
            "Bdev operations that failed",
            None,
            &ios_failed,
        )?;
        counters(
            enc,
            "merge_requests_in",
            "Requests that entered the merge stage",
            None,
            &merge_in,
        )?;
        counters(
            enc,
            "merge_requests_out",
            "Operations the merge stage issued (requests_in - requests_out were fused away)",
            None,
            &merge_out,
        )?;
        counters(
            enc,
            "merge",
            "Bytes that went through fused operations",
            Some(&Unit::Bytes),
            &merge_bytes,
        )?;

        // devices and their queues
        let devices = e.devices();
        let mut reqs = Vec::new();
        let mut bytes = Vec::new();
        let mut errors = Vec::new();
        let mut in_flight = Vec::new();
        let mut notifies = Vec::new();
        let mut lat = Vec::new();
        let mut connected = Vec::new();
        let mut connections = Vec::new();
        let mut throttled = Vec::new();
        let mut throttled_secs = Vec::new();
        for (name, d) in &devices {
            let dl: Labels = vec![("device", name.clone())];
            connected.push((dl.clone(), u64::from(d.connected())));
            connections.push((dl.clone(), load(&d.connections)));
            let own = d.qos.own();
            throttled.push((dl.clone(), load(&own.throttled)));
            throttled_secs.push((dl, load(&own.throttled_ns) as f64 / 1e9));
            for (qi, q) in d.queues.iter().enumerate() {
                let ql = |extra: Option<(&'static str, String)>| -> Labels {
                    let mut l = vec![("device", name.clone()), ("queue", qi.to_string())];
                    l.extend(extra);
                    l
                };
                for (k, op) in OPS.iter().enumerate() {
                    reqs.push((ql(Some(("op", op.to_string()))), load(&q.ops[k])));
                    if histograms_on {
                        lat.push((ql(Some(("op", op.to_string()))), q.latency[k].snapshot()));
                    }
                }
                bytes.push((ql(Some(("op", "read".into()))), load(&q.bytes_read)));
                bytes.push((ql(Some(("op", "write".into()))), load(&q.bytes_written)));
                for (kind, a) in [
                    ("io", &q.errors),
                    ("malformed", &q.malformed),
                    ("unsupported", &q.unsupported),
                ] {
                    errors.push((ql(Some(("kind", kind.into()))), load(a)));
                }
                in_flight.push((ql(None), load(&q.in_flight)));
                notifies.push((ql(None), load(&q.notifies)));
            }
        }
        counters(enc, "requests", "Requests completed, by device, queue and operation (read, write, flush, discard: discard and write-zeroes)", None, &reqs)?;
        counters(
            enc,
            "request",
            "Bytes moved by requests, by device, queue and operation",
            Some(&Unit::Bytes),
            &bytes,
        )?;
        counters(enc, "request_errors", "Requests that failed: io (the device failed it), malformed (a bad descriptor chain or header), unsupported (a request type the device does not do)", None, &errors)?;
        gauges(enc, "requests_in_flight", "Requests taken off the avail ring and not yet completed (those waiting for QoS included)", &in_flight)?;
        counters(
            enc,
            "guest_notifications",
            "Interrupts signalled to the guest (at most one per queue and cycle)",
            None,
            &notifies,
        )?;
        histograms(
            enc,
            "request_duration",
            "Request latency from the avail ring to the used ring",
            &lat,
            e.started,
        )?;
        gauges(
            enc,
            "device_frontend_connected",
            "1 while a vhost-user frontend is attached",
            &connected,
        )?;
        counters(
            enc,
            "device_connections",
            "vhost-user frontends that connected",
            None,
            &connections,
        )?;
        counters(
            enc,
            "qos_throttled_requests",
            "Requests that waited for the device's QoS limits",
            None,
            &throttled,
        )?;
        counters(
            enc,
            "qos_throttled",
            "Time requests spent waiting for the device's QoS limits",
            Some(&Unit::Seconds),
            &throttled_secs,
        )?;
        let groups = e.qos_groups();
        let gt: Vec<(Labels, u64)> = groups
            .iter()
            .map(|g| (vec![("group", g.name.clone())], load(&g.throttled)))
            .collect();
        let gs: Vec<(Labels, f64)> = groups
            .iter()
            .map(|g| {
                (
                    vec![("group", g.name.clone())],
                    load(&g.throttled_ns) as f64 / 1e9,
                )
            })
            .collect();
        counters(
            enc,
            "qos_group_throttled_requests",
            "Requests that waited for a QoS group's limits",
            None,
            &gt,
        )?;
        counters(
            enc,
            "qos_group_throttled",
            "Time requests spent waiting for a QoS group's limits",
            Some(&Unit::Seconds),
            &gs,
        )?;

        // bdevs
        if histograms_on {
            let b: Vec<(Labels, Snapshot)> = e
                .bdev_names()
                .into_iter()
                .map(|n| {
                    let s = e.bdev_histogram(&n);
                    (vec![("bdev", n)], s)
                })
                .collect();
            histograms(
                enc,
                "bdev_op_duration",
                "Bdev operation service time, from submission to completion (after merging)",
                &b,
                e.started,
            )?;
        }
        Ok(())
    }
}

fn registry(engine: &Arc<Engine>) -> Registry {
    let mut r = Registry::with_prefix("quern");
    r.register_collector(Box::new(EngineCollector(engine.clone())));
    r
}

/// The OpenMetrics text exposition of the engine's metrics.
pub fn text(engine: &Arc<Engine>) -> String {
    let mut s = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut s, &registry(engine)) {
        tracing::warn!("encoding metrics: {e}");
    }
    s
}

/// The protobuf exposition (length-delimited `MetricFamily` messages).
pub fn protobuf(engine: &Arc<Engine>) -> Vec<u8> {
    prometheus_client::encoding::prometheus_protobuf::encode_to_vec(&registry(engine))
        .unwrap_or_else(|e| {
            tracing::warn!("encoding metrics: {e:?}");
            Vec::new()
        })
}

const PROTOBUF: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The running endpoint.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    /// Where it listens (the bound address, for port 0).
    pub addr: String,
}

impl MetricsServer {
    pub fn serve(listen: &MetricsListen, engine: Arc<Engine>) -> std::io::Result<MetricsServer> {
        let server = match listen {
            MetricsListen::Tcp(a) => tiny_http::Server::http(a),
            MetricsListen::Unix(p) => {
                if let Some(d) = p.parent() {
                    std::fs::create_dir_all(d)?;
                }
                // a socket left by an earlier run is replaced; one another
                // process serves, or a file that is not a socket, refused
                quern_reactor::sys::claim_socket_path(p)?;
                tiny_http::Server::http_unix(p)
            }
        }
        .map_err(std::io::Error::other)?;
        let addr = match server.server_addr() {
            tiny_http::ListenAddr::IP(a) => a.to_string(),
            tiny_http::ListenAddr::Unix(a) => format!(
                "unix:{}",
                a.as_pathname()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        };
        let server = Arc::new(server);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("quern-metrics".into())
            .spawn(move || {
                for req in s.incoming_requests() {
                    respond(req, &engine);
                }
            })?;
        tracing::info!(listen = %addr, "metrics endpoint listening");
        Ok(MetricsServer {
            server,
            thread: Some(thread),
            addr,
        })
    }

    pub fn stop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn respond(req: tiny_http::Request, engine: &Arc<Engine>) {
    let header = |k: &str, v: &str| {
        tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).expect("a valid header")
    };
    let path = req.url().split('?').next().unwrap_or_default().to_string();
    let resp = match (req.method(), path.as_str()) {
        (tiny_http::Method::Get | tiny_http::Method::Head, "/metrics") => {
            let accept = req
                .headers()
                .iter()
                .find(|h| h.field.equiv("Accept"))
                .map(|h| h.value.as_str().to_string())
                .unwrap_or_default();
            if accept.contains("application/vnd.google.protobuf") {
                tiny_http::Response::from_data(protobuf(engine))
                    .with_header(header("Content-Type", PROTOBUF))
            } else {
                tiny_http::Response::from_data(text(engine).into_bytes())
                    .with_header(header("Content-Type", OPENMETRICS))
            }
        }
        (tiny_http::Method::Get, "/") => {
            tiny_http::Response::from_data(b"Quern: metrics at /metrics\n".to_vec())
                .with_header(header("Content-Type", "text/plain; charset=utf-8"))
        }
        (tiny_http::Method::Get | tiny_http::Method::Head, _) => {
            tiny_http::Response::from_data(b"not found: metrics are at /metrics\n".to_vec())
                .with_status_code(404)
        }
        _ => tiny_http::Response::from_data(b"method not allowed\n".to_vec())
            .with_status_code(405)
            .with_header(header("Allow", "GET, HEAD")),
    };
    if let Err(e) = req.respond(resp) {
        tracing::debug!("metrics response: {e}");
    }
}
