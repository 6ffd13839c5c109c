//! `quern ctl top`: a live view of a running engine in the manner of
//! `spdk_top` and `iostat -x 1`. It samples `stats` (with each queue's
//! latency buckets) once per interval and shows what changed: reactors
//! (core, busy %, sleeps/s, I/O per second), then devices and their queues
//! (IOPS, MB/s, p50 and p99 latency over the interval, in flight,
//! throttled per second), busiest first. `--once` prints one screen, taken
//! over one interval, for scripts.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use quern_reactor::histogram::{Snapshot, BUCKETS};
use serde_json::{json, Value};

use crate::mgmt::Client;

/// One sample of `stats`, and when it was taken.
pub struct Sample {
    pub at: Instant,
    pub stats: Value,
}

/// Take a sample.
pub fn sample(client: &mut Client) -> Result<Sample, String> {
    let stats = client
        .call("stats", json!({"buckets": true}))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{} (code {})", e.message, e.code))?;
    Ok(Sample {
        at: Instant::now(),
        stats,
    })
}

/// Run the view: `once` prints one screen over `interval` and returns;
/// otherwise the screen is redrawn every `interval` until interrupted.
pub fn run(client: &mut Client, interval: Duration, once: bool) -> Result<(), String> {
    let mut prev = sample(client)?;
    loop {
        std::thread::sleep(interval);
        let cur = sample(client)?;
        let screen = render(&prev, &cur);
        if once {
            print!("{screen}");
            return Ok(());
        }
        // home, clear, draw
        print!("\x1b[H\x1b[2J{screen}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        prev = cur;
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// A queue's histogram from its `latency_buckets`.
fn buckets(q: &Value) -> Snapshot {
    let mut s = Snapshot::default();
    for b in q["latency_buckets"].as_array().into_iter().flatten() {
        let (i, c) = (u(&b[0]) as usize, u(&b[1]));
        if i < BUCKETS {
            s.counts[i] = c;
        }
    }
    s
}

fn us(v: Option<f64>) -> String {
    match v {
        Some(x) if x * 1e6 >= 100.0 => format!("{:.0}", x * 1e6),
        Some(x) => format!("{:.1}", x * 1e6),
        None => "-".into(),
    }
}

/// One device's or queue's row, computed from two samples.
struct Row {
    label: [String; 3],
    iops: f64,
    read_s: f64,
    write_s: f64,
    mbs: f64,
    lat: Snapshot,
    in_flight: u64,
    throttled_s: Option<f64>,
}

impl Row {
    fn cells(&self) -> Vec<String> {
        let mut c: Vec<String> = self.label.to_vec();
        c.extend([
            format!("{:.0}", self.iops),
            format!("{:.0}", self.read_s),
            format!("{:.0}", self.write_s),
            format!("{:.1}", self.mbs),
            us(self.lat.quantile(0.5)),
            us(self.lat.quantile(0.99)),
            self.in_flight.to_string(),
            self.throttled_s
                .map_or_else(|| "".into(), |t| format!("{t:.0}")),
        ]);
        c
    }
}

/// The screen for the interval between two samples.
pub fn render(prev: &Sample, cur: &Sample) -> String {
    let dt = cur.at.duration_since(prev.at).as_secs_f64().max(1e-3);
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / dt;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "quern top: interval {dt:.1} s, rates per second, latency in µs (bucket bounds, within 9 %)"
    );
    out.push('\n');

    // reactors, busiest first
    let by_id = |s: &Sample| -> HashMap<u64, Value> {
        s.stats["reactors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| (u(&r["id"]), r.clone()))
            .collect()
    };
    let (pr, cr) = (by_id(prev), by_id(cur));
    let mut reactors: Vec<(f64, Vec<String>)> = Vec::new();
    let mut ids: Vec<&u64> = cr.keys().collect();
    ids.sort();
    for id in ids {
        let c = &cr[id];
        let p = pr.get(id).unwrap_or(c);
        let busy = u(&c["busy_ns"]).saturating_sub(u(&p["busy_ns"]));
        let idle = u(&c["idle_ns"]).saturating_sub(u(&p["idle_ns"]));
        let pct = 100.0 * busy as f64 / (busy + idle).max(1) as f64;
        reactors.push((
            pct,
            vec![
                id.to_string(),
                c["core"].to_string(),
                format!("{pct:.1}"),
                format!("{:.0}", rate(u(&p["sleeps"]), u(&c["sleeps"]))),
                format!(
                    "{:.0}",
                    rate(u(&p["ios_completed"]), u(&c["ios_completed"]))
                ),
                c["pollers"].to_string(),
                match &c["failed"] {
                    Value::String(e) => format!("FAILED: {e}"),
                    _ => "running".into(),
                },
            ],
        ));
    }
    reactors.sort_by(|a, b| b.0.total_cmp(&a.0));
    out += &table(
        &[
            "REACTOR", "CORE", "BUSY%", "SLEEPS/S", "IOS/S", "POLLERS", "STATE",
        ],
        reactors.into_iter().map(|(_, r)| r).collect(),
    );
    out.push('\n');

    // devices, busiest first, each followed by its queues
    let devs = |s: &Sample| -> HashMap<String, Value> {
        s.stats["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                (
                    d["name"].as_str().unwrap_or_default().to_string(),
                    d.clone(),
                )
            })
            .collect()
    };
    let (pd, cd) = (devs(prev), devs(cur));
    let mut groups: Vec<(Row, Vec<Row>)> = Vec::new();
    for (name, d) in &cd {
        let p = pd.get(name);
        let mut queues = Vec::new();
        for q in d["queues"].as_array().into_iter().flatten() {
            let qi = u(&q["queue"]) as usize;
            let pq = p
                .and_then(|p| p["queues"].as_array())
                .and_then(|a| a.get(qi))
                .unwrap_or(q);
            let ops = |v: &Value, op: &str| u(&v["ops"][op]);
            let all = |v: &Value| {
                ["read", "write", "flush", "discard"]
                    .iter()
                    .map(|o| ops(v, o))
                    .sum::<u64>()
            };
            let bytes = |v: &Value| u(&v["bytes_read"]) + u(&v["bytes_written"]);
            queues.push(Row {
                label: [
                    String::new(),
                    qi.to_string(),
                    match &q["reactor"] {
                        Value::Null => "-".into(),
                        r => r.to_string(),
                    },
                ],
                iops: rate(all(pq), all(q)),
                read_s: rate(ops(pq, "read"), ops(q, "read")),
                write_s: rate(ops(pq, "write"), ops(q, "write")),
                mbs: rate(bytes(pq), bytes(q)) / 1e6,
                lat: buckets(q).since(&buckets(pq)),
                in_flight: u(&q["in_flight"]),
                throttled_s: None,
            });
        }
        queues.sort_by(|a, b| b.iops.total_cmp(&a.iops));
        let mut lat = Snapshot::default();
        for q in &queues {
            lat.add(&q.lat);
        }
        let throttled = rate(
            p.map_or(0, |p| u(&p["throttled_requests"])),
            u(&d["throttled_requests"]),
        );
        let limited = d["qos"]
            .as_object()
            .is_some_and(|o| o.iter().any(|(k, v)| k != "burst_ms" && u(v) > 0))
            || !d["qos_group"].is_null();
        let total = Row {
            label: [
                name.clone(),
                "*".into(),
                if d["connected"] == true {
                    "attached".into()
                } else {
                    "-".into()
                },
            ],
            iops: queues.iter().map(|q| q.iops).sum(),
            read_s: queues.iter().map(|q| q.read_s).sum(),
            write_s: queues.iter().map(|q| q.write_s).sum(),
            mbs: queues.iter().map(|q| q.mbs).sum(),
            lat,
            in_flight: queues.iter().map(|q| q.in_flight).sum(),
            throttled_s: limited.then_some(throttled),
        };
        groups.push((total, queues));
    }
    groups.sort_by(|a, b| {
        b.0.iops
            .total_cmp(&a.0.iops)
            .then(a.0.label[0].cmp(&b.0.label[0]))
    });
    let mut rows = Vec::new();
    for (d, qs) in groups {
        rows.push(d.cells());
        if qs.len() > 1 {
            rows.extend(qs.iter().map(Row::cells));
        }
    }
    out += &table(
        &[
            "DEVICE",
            "QUEUE",
            "REACTOR",
            "IOPS",
            "READ/S",
            "WRITE/S",
            "MB/S",
            "P50",
            "P99",
            "INFLIGHT",
            "THROTTLED/S",
        ],
        rows,
    );
    if cur.stats["histograms"] == false {
        out += "\nlatency histograms are off (P50 and P99 show -): \
                `quern ctl metrics_set_histograms --enabled true` switches them on\n";
    }
    out
}

fn table(head: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = w
                .get(i)
                .copied()
                .unwrap_or(0)
                .saturating_sub(c.chars().count());
            // numbers right-aligned, names left
            if i >= 3 || c.parse::<f64>().is_ok() {
                l += &" ".repeat(pad);
                l += c;
            } else {
                l += c;
                l += &" ".repeat(pad);
            }
            l += "  ";
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(&head.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for r in &rows {
        out += &line(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use quern_reactor::histogram::bucket_of;

    /// A sample `secs` after the reactors started, `busy` ns of them busy.
    fn sample(at: Instant, secs: u64, reads: u64, busy: u64, lat_units: u64, n: u64) -> Sample {
        Sample {
            at,
            stats: json!({
                "reactors": [
                    {"id": 0, "core": 0, "busy_ns": busy, "idle_ns": secs * 1_000_000_000 - busy, "sleeps": 0, "ios_completed": reads, "pollers": 2, "failed": null},
                    {"id": 1, "core": 1, "busy_ns": 0, "idle_ns": 0, "sleeps": 10, "ios_completed": 0, "pollers": 0, "failed": "boom"},
                ],
                "devices": [
                    {"name": "quiet", "connected": false, "qos": {}, "qos_group": null, "throttled_requests": 0,
                     "queues": [{"queue": 0, "reactor": null, "ops": {}, "in_flight": 0}]},
                    {"name": "busy", "connected": true, "qos": {"iops": 5000, "burst_ms": 100}, "qos_group": null, "throttled_requests": reads / 2,
                     "queues": [
                        {"queue": 0, "reactor": 0, "ops": {"read": reads}, "bytes_read": reads * 4096, "in_flight": 3,
                         "latency_buckets": [[bucket_of(lat_units), n]]},
                        {"queue": 1, "reactor": 1, "ops": {"read": reads / 4}, "bytes_read": reads * 1024, "in_flight": 1,
                         "latency_buckets": []},
                     ]},
                ],
            }),
        }
    }

    #[test]
    fn the_screen_shows_rates_latency_and_sorts_by_load() {
        let t0 = Instant::now();
        let a = sample(t0, 1, 1000, 100_000_000, 0, 0);
        // 1 s later: 10,000 more reads on queue 0, all at about 100 µs
        let hundred_us = (100e-6 / quern_reactor::clock::UNIT_SECS) as u64;
        let b = sample(
            t0 + Duration::from_secs(1),
            2,
            11_000,
            600_000_000,
            hundred_us,
            10_000,
        );
        let s = render(&a, &b);
        let lines: Vec<&str> = s.lines().collect();
        // busiest device first, its queues under it, busiest queue first
        let busy = lines.iter().position(|l| l.starts_with("busy")).expect(&s);
        let quiet = lines.iter().position(|l| l.starts_with("quiet")).expect(&s);
        assert!(busy < quiet, "{s}");
        let cols: Vec<&str> = lines[busy].split_whitespace().collect();
        // DEVICE QUEUE REACTOR IOPS READ/S WRITE/S MB/S P50 P99 INFLIGHT THROTTLED/S
        assert_eq!(cols[..4], ["busy", "*", "attached", "12500"], "{s}");
        assert_eq!(cols[7], cols[8], "one bucket: p50 = p99\n{s}");
        let p50: f64 = cols[7].parse().unwrap();
        assert!((100.0..110.0).contains(&p50), "{s}");
        assert_eq!(cols[9], "4", "{s}");
        assert_eq!(cols[10], "5000", "throttled per second\n{s}");
        let q0: Vec<&str> = lines[busy + 1].split_whitespace().collect();
        assert_eq!(q0[..3], ["0", "0", "10000"], "{s}");
        // the reactor that was busy 50 % of the interval, first
        let r: Vec<&str> = lines
            .iter()
            .find(|l| l.trim_start().starts_with('0') && l.contains("running"))
            .expect(&s)
            .split_whitespace()
            .collect();
        assert_eq!(r[2], "50.0", "{s}");
        assert!(s.contains("FAILED: boom"), "{s}");
        // the quiet device: no latency, no throttling column value
        let q: Vec<&str> = lines[quiet].split_whitespace().collect();
        assert_eq!(q[3], "0", "{s}");
        assert!(q.contains(&"-"), "{s}");
        assert!(!s.contains("histograms are off"), "{s}");
        // with the histograms off, the screen says why there is no latency
        let mut off = b;
        off.stats["histograms"] = false.into();
        let s = render(&a, &off);
        assert!(
            s.contains("latency histograms are off")
                && s.contains("metrics_set_histograms --enabled true"),
            "{s}"
        );
    }
}
