//! Operating Quern: latency histograms checked against a device of known
//! delay, the Prometheus endpoint scraped by a real Prometheus whose
//! `rate()` and `histogram_quantile()` must agree with what a libblkio
//! client measured, `quern ctl top`, and QoS limits and groups through
//! the API, kept across a restart.
//!
//! The timed tests take a lock so they do not share the two cores with
//! each other.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use quern::engine::codes;
use quern_tests::client::Client;
use quern_tests::prom::{free_port, http_get, unix_now, Prometheus};
use quern_tests::{disk_tempdir, quern_bin, QuernProcess};
use serde_json::{json, Value};

static TIMED: Mutex<()> = Mutex::new(());

fn timed() -> std::sync::MutexGuard<'static, ()> {
    TIMED.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a closed-loop client measured: completions as (unix time,
/// latency in µs).
struct Load {
    done: Vec<(f64, f64)>,
}

impl Load {
    fn count_between(&self, a: f64, b: f64) -> usize {
        self.done.iter().filter(|(t, _)| *t > a && *t <= b).count()
    }

    fn quantile_between(&self, a: f64, b: f64, q: f64) -> f64 {
        let mut v: Vec<f64> = self
            .done
            .iter()
            .filter(|(t, _)| *t > a && *t <= b)
            .map(|(_, l)| *l)
            .collect();
        assert!(!v.is_empty(), "no completions between {a} and {b}");
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
    }
}

/// 4 KiB reads at queue depth `qd` on each of `queues` queues of
/// `socket` for `secs`, each slot resubmitted when it completes;
/// `write_every`: every n-th request is a write instead. One queue waits
/// for its completions; several are polled in turn.
fn closed_loop(socket: &Path, queues: usize, qd: usize, secs: f64, write_every: usize) -> Load {
    closed_loop_with(socket, queues, qd, secs, write_every, false)
}

/// [`closed_loop`]; `spin`: a single queue is polled too, not waited on.
fn closed_loop_with(
    socket: &Path,
    queues: usize,
    qd: usize,
    secs: f64,
    write_every: usize,
    spin: bool,
) -> Load {
    let mut c = Client::connect_retry(socket, queues as i32, Duration::from_secs(10));
    let blocks = c.capacity() / 4096;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut issued = 0usize;
    let mut submit = |c: &mut Client, q: usize, slot: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let off = rng % blocks * 4096;
        issued += 1;
        let buf = (q * qd + slot) * 4096;
        if write_every > 0 && issued.is_multiple_of(write_every) {
            c.write(q, off, buf, 4096, slot);
        } else {
            c.read(q, off, buf, 4096, slot);
        }
    };
    let mut t0 = vec![vec![Instant::now(); qd]; queues];
    for (q, times) in t0.iter_mut().enumerate() {
        for (slot, t) in times.iter_mut().enumerate() {
            *t = Instant::now();
            submit(&mut c, q, slot);
        }
    }
    let start = Instant::now();
    let mut done = Vec::new();
    let mut inflight = vec![qd; queues];
    while inflight.iter().any(|&n| n > 0) {
        for q in 0..queues {
            if inflight[q] == 0 {
                continue;
            }
            let got = if queues == 1 && !spin {
                c.wait(q, 1)
            } else {
                c.poll(q)
            };
            for (slot, ret) in got {
                assert_eq!(ret, 0, "request failed");
                inflight[q] -= 1;
                let lat = t0[q][slot].elapsed().as_secs_f64() * 1e6;
                done.push((unix_now(), lat));
                if start.elapsed().as_secs_f64() < secs {
                    t0[q][slot] = Instant::now();
                    submit(&mut c, q, slot);
                    inflight[q] += 1;
                }
            }
            if queues > 1 {
                c.submit(q);
            }
        }
    }
    Load { done }
}

/// Two page-cache uring bdevs, one delaying every operation by 200 µs,
/// each served on core 1 (`reactor` settings: `poll`).
fn config(poll: &str, metrics: &str) -> String {
    format!(
        r#"
state_dir = "@DIR@"
[reactor]
{poll}
{metrics}
[[bdev]]
name = "slow"
driver = "uring"
path = "slow.img"
size = "64M"
direct = false
delay_us = 200
[[bdev]]
name = "fast"
driver = "uring"
path = "fast.img"
size = "64M"
direct = false
[[vhost_blk]]
name = "slow"
bdev = "slow"
socket = "slow.sock"
cores = [1]
[[vhost_blk]]
name = "fast"
bdev = "fast"
socket = "fast.sock"
cores = [1]
"#
    )
}

const ADAPTIVE: &str = "cores = [0, 1]\npoll_mode = \"adaptive\"";

fn us(v: &Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("not a number of µs: {v}"))
}

/// A uring bdev that delays each operation by 200 µs: the device's p50
/// and p99 (avail ring to used ring) are within a bucket of 200 µs plus
/// what the same device without the delay takes, the bdev's own service
/// time shows the delay, reads and writes are kept apart, and a reset
/// starts a new interval.
#[test]
fn latency_histograms_show_a_known_device_delay() {
    let _t = timed();
    let dir = disk_tempdir("quern-hist");
    // one busy-polling reactor on core 1 (the client has core 0): the
    // delay's timer is seen when it fires, not when a sleeping reactor
    // wakes up
    let mut q = QuernProcess::start(dir.path(), &config("cores = [1]\npoll_mode = \"busy\"", ""));
    q.wait_ready(Duration::from_secs(20));
    // off by default: requests are counted, their latency is not
    assert_eq!(q.ok("stats", json!({}))["histograms"], false);
    let before = closed_loop(&dir.path().join("fast.sock"), 1, 1, 0.3, 0);
    let f = q.ok("vhost_blk_latency", json!({"name": "fast"}));
    assert_eq!(f["device"]["read"]["count"], 0, "{f}");
    assert!(f["device"]["read"]["p50"].is_null(), "{f}");
    assert!(!before.done.is_empty());
    // switched on at run time, on the reactor that serves the devices
    let on = q.ok("metrics_set_histograms", json!({"enabled": true}));
    assert_eq!(on, json!({"histograms": true, "was": false}));
    assert_eq!(q.ok("stats", json!({}))["histograms"], true);
    // the device's own time: the same kind of file (page cache, so its
    // time is steady) and the same load without the delay
    let fast = closed_loop(&dir.path().join("fast.sock"), 1, 1, 3.0, 10);
    let slow = closed_loop(&dir.path().join("slow.sock"), 1, 1, 3.0, 10);
    let f = q.ok("vhost_blk_latency", json!({"name": "fast"}));
    let s = q.ok("vhost_blk_latency", json!({"name": "slow", "reset": true}));
    let (own50, own99) = (
        us(&f["device"]["read"]["p50"]),
        us(&f["device"]["read"]["p99"]),
    );
    let r = &s["device"]["read"];
    let (p50, p99) = (us(&r["p50"]), us(&r["p99"]));
    eprintln!("fast p50 {own50} p99 {own99}; slow p50 {p50} p99 {p99}; {s}");
    // within a bucket (a factor 2^(1/8) either side; the API gives bucket
    // upper bounds)
    let near = |got: f64, want: f64| (got / want).log2().abs() <= 1.0 / 8.0 + 0.02;
    // the bdev's own service time shows the delay as the kernel delivered
    // it: its 200 µs timer can fire late on a loaded or virtual machine
    // (35-45 µs late on this one some days, at p50)
    let b = q.ok("bdev_latency", json!({"name": "slow"}));
    let (b50, b99) = (us(&b["bdevs"][0]["p50"]), us(&b["bdevs"][0]["p99"]));
    eprintln!("slow bdev p50 {b50} p99 {b99}");
    assert!(p50 >= 200.0, "the delay is not in the p50: {p50}");
    assert!(
        (200.0..=300.0).contains(&b50),
        "the bdev's p50 {b50} µs is not the 200 µs delay (or its timer is more than 100 µs late)"
    );
    // the device's p50 is the delay plus the device's own time: 200 µs
    // when the timer is punctual, what the bdev measured when it is not
    assert!(
        near(p50, 200.0 + own50) || near(p50, b50 + own50),
        "p50 {p50} µs, expected 200 + {own50} (or the bdev's {b50} + {own50})"
    );
    // the device's p99 is within a bucket of the bdev's plus Quern's own
    // time on the same load
    // (the bdev's histogram has every operation: compared with the
    // device's "all", since the writes among them may be slower than the
    // reads; each operation's device time includes its bdev time)
    let all50 = us(&s["device"]["all"]["p50"]);
    assert!(
        b50 >= 200.0 && b50 <= all50,
        "bdev p50 {b50}, device p50 over all operations {all50}"
    );
    let all99 = us(&s["device"]["all"]["p99"]);
    assert!(
        all99 >= b99 / 1.1,
        "device p99 {all99} below the bdev's {b99}"
    );
    assert!(
        near(all99, b99 + own99 - own50),
        "p99 {all99} µs, the bdev's {b99} + {own99} - {own50}"
    );
    assert!(p99 >= 200.0 && p99 <= all99, "read p99 {p99}, all {all99}");
    // what the client saw includes Quern's time: the client's p50 is at
    // or above the device's lower bucket edge
    for (load, quern50) in [(&slow, p50), (&fast, own50)] {
        let client50 = load.quantile_between(0.0, f64::MAX, 0.5);
        assert!(
            client50 >= quern50 / 1.1,
            "client p50 {client50} µs below Quern's {quern50}"
        );
    }
    // every completed request counted once, by operation
    let count = |v: &Value, op: &str| v["device"][op]["count"].as_u64().unwrap();
    let writes = count(&s, "write");
    assert_eq!(
        count(&s, "read") + writes,
        slow.done.len() as u64,
        "counts by operation: {s}"
    );
    assert!(writes > 0 && writes < count(&s, "read"), "{s}");
    assert_eq!(count(&s, "flush"), 0);
    // reset: a new, empty interval
    let s2 = q.ok("vhost_blk_latency", json!({"name": "slow"}));
    assert_eq!(count(&s2, "read"), 0, "{s2}");
    assert!(s2["device"]["read"]["p50"].is_null());
    assert_eq!(
        q.err("vhost_blk_latency", json!({"name": "nope"})).code,
        codes::NOT_FOUND
    );
    // the switch is kept: after a restart the histograms are still on,
    // and switched off they stop growing
    assert!(q.stop());
    q.restart();
    q.wait_ready(Duration::from_secs(20));
    assert_eq!(q.ok("stats", json!({}))["histograms"], true);
    let on = closed_loop(&dir.path().join("fast.sock"), 1, 1, 0.3, 0);
    let f = q.ok("vhost_blk_latency", json!({"name": "fast", "reset": true}));
    assert_eq!(f["device"]["read"]["count"], on.done.len() as u64, "{f}");
    let off = q.ok("metrics_set_histograms", json!({"enabled": false}));
    assert_eq!(off, json!({"histograms": false, "was": true}));
    closed_loop(&dir.path().join("fast.sock"), 1, 1, 0.3, 0);
    let f = q.ok("vhost_blk_latency", json!({"name": "fast"}));
    assert_eq!(f["device"]["read"]["count"], 0, "{f}");
    let bad = q.err("metrics_set_histograms", json!({"enabled": "yes"}));
    assert!(bad.message.contains("enabled"), "{}", bad.message);
    assert!(q.stop());
}

/// A real Prometheus scrapes Quern once a second while a libblkio client
/// runs a steady load; Prometheus's rate() of the request counter and
/// histogram_quantile() of the native latency histogram agree with what
/// the client measured over the same window.
#[test]
fn prometheus_rate_and_quantiles_match_the_client() {
    let _t = timed();
    let dir = disk_tempdir("quern-prom");
    let port = free_port();
    let target = format!("127.0.0.1:{port}");
    let mut q = QuernProcess::start(
        dir.path(),
        &config(
            ADAPTIVE,
            &format!("[metrics]\nlisten = \"{target}\"\nhistograms = true\n"),
        ),
    );
    q.wait_ready(Duration::from_secs(20));
    // the endpoint itself: text by default, protobuf when asked
    let (st, head, body) = http_get(&target, "/metrics", None).expect("scrape");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(st, 200, "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    for needle in [
        "# TYPE quern_requests counter",
        "quern_requests_total{device=\"slow\",queue=\"0\",op=\"read\"} 0",
        "# TYPE quern_request_duration_seconds histogram",
        "quern_reactor_busy_seconds_total{reactor=\"1\",core=\"1\"}",
        "# TYPE quern_bdev_op_duration_seconds histogram",
        "quern_qos_throttled_requests_total{device=\"fast\"} 0",
        "quern_build_info{version=",
    ] {
        assert!(text.contains(needle), "no `{needle}` in:\n{text}");
    }
    let (st, head, _) = http_get(
        &target,
        "/metrics",
        Some("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"),
    )
    .expect("scrape");
    assert_eq!(st, 200);
    assert!(head.contains("application/vnd.google.protobuf"), "{head}");
    assert_eq!(http_get(&target, "/nope", None).unwrap().0, 404);

    let prom = Prometheus::start(dir.path(), &target, 1000);
    let secs = 14.0;
    // a polling client: one that sleeps between completions also measures
    // its own wake-ups, which on a virtual machine whose host is busy take
    // hundreds of µs (measured: a 200 µs sleep and a pipe round trip took
    // 500-580 µs at p50 while a run here saw the client's p50 at 577-767 µs
    // against Quern's 234)
    let load = closed_loop_with(&dir.path().join("slow.sock"), 1, 4, secs, 0, true);
    let t_end = load.done.last().unwrap().0;
    // let Prometheus scrape past the end of the load
    std::thread::sleep(Duration::from_secs(3));
    let (health, last_error) = prom.target_health();
    assert_eq!(health, "up", "scrape error: {last_error}");
    // a window inside the load, ending a second before it ended
    let (w, at) = (8.0, t_end - 1.0);
    let rate = prom.query(
        "sum(rate(quern_requests_total{device=\"slow\",op=\"read\"}[8s]))",
        at,
    );
    let prom_rate: f64 = rate[0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("rate: {rate}"));
    let client_rate = load.count_between(at - w, at) as f64 / w;
    eprintln!("rate: prometheus {prom_rate:.0}/s, client {client_rate:.0}/s");
    assert!(
        (prom_rate / client_rate - 1.0).abs() < 0.1,
        "prometheus rate {prom_rate} vs client {client_rate}"
    );
    // the latency histogram arrives as a native histogram
    let raw = prom.query(
        "quern_request_duration_seconds{device=\"slow\",op=\"read\"}",
        at,
    );
    assert!(
        raw[0].get("histogram").is_some(),
        "not a native histogram: {raw}"
    );
    // p50 matches; the client's tail also holds its own wake-ups on a
    // two-core machine shared with Prometheus and, in the suite, with
    // another test (a TCG guest), which Quern cannot see: a CI run saw the
    // client's p90 at 594 µs against Quern's 241 µs with its p50 at 260
    // against 224. So above the median Quern's quantiles are checked to be
    // no higher than the client's and no lower than the device's own
    // 200 µs delay
    for quant in [0.5, 0.9, 0.99] {
        let v = prom.query(
            &format!("histogram_quantile({quant}, sum(rate(quern_request_duration_seconds{{device=\"slow\",op=\"read\"}}[8s])))"),
            at,
        );
        let p: f64 = v[0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("histogram_quantile: {v}"));
        let p_us = p * 1e6;
        let c_us = load.quantile_between(at - w, at, quant);
        eprintln!("p{quant}: prometheus {p_us:.1} µs, client {c_us:.1} µs");
        // Quern's interval is inside the client's: at most the client's
        // (plus a bucket's width), not far below it
        let low = if quant <= 0.5 { c_us * 0.8 } else { 200.0 };
        assert!(
            p_us <= c_us * 1.1 && p_us >= low,
            "p{quant}: prometheus {p_us} µs, client {c_us} µs"
        );
    }
    drop(prom);
    assert!(q.stop());
}

/// `quern ctl top --once` over a loaded device: the device's row with its
/// IOPS near what the client measured, its latency, and the reactors.
#[test]
fn ctl_top_shows_the_load() {
    let _t = timed();
    let dir = disk_tempdir("quern-top");
    let mut q = QuernProcess::start(
        dir.path(),
        &config(ADAPTIVE, "[metrics]\nhistograms = true\n"),
    );
    q.wait_ready(Duration::from_secs(20));
    let sock = dir.path().join("fast.sock");
    let loader = std::thread::spawn(move || closed_loop(&sock, 1, 8, 4.0, 0));
    std::thread::sleep(Duration::from_millis(1000));
    let out = Command::new(quern_bin())
        .args(["ctl", "--socket"])
        .arg(q.mgmt_socket())
        .args(["top", "--once", "--interval", "2"])
        .output()
        .expect("quern ctl top");
    let t_top = unix_now();
    let load = loader.join().expect("load");
    let screen = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{screen}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{screen}");
    let lines: Vec<&str> = screen.lines().collect();
    assert!(lines.iter().any(|l| l.starts_with("REACTOR")), "{screen}");
    let dev = lines
        .iter()
        .position(|l| l.starts_with("fast "))
        .unwrap_or_else(|| panic!("no row for device fast:\n{screen}"));
    let idle = lines
        .iter()
        .position(|l| l.starts_with("slow "))
        .expect(&screen);
    assert!(dev < idle, "the busy device comes first:\n{screen}");
    let cols: Vec<&str> = lines[dev].split_whitespace().collect();
    // DEVICE QUEUE FRONTEND IOPS READ/S WRITE/S MB/S P50 P99 INFLIGHT
    assert_eq!(cols[2], "attached", "{screen}");
    let iops: f64 = cols[3].parse().unwrap();
    let client = load.count_between(t_top - 2.0, t_top) as f64 / 2.0;
    assert!(
        (iops / client - 1.0).abs() < 0.25,
        "top shows {iops} IOPS, the client did {client}:\n{screen}"
    );
    let p50: f64 = cols[7].parse().unwrap_or_else(|_| panic!("p50: {screen}"));
    assert!(p50 > 0.0, "{screen}");
    // bad arguments are refused clearly
    let bad = Command::new(quern_bin())
        .args(["ctl", "--socket"])
        .arg(q.mgmt_socket())
        .args(["top", "--interval", "0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--interval"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(q.stop());
}

/// QoS through the API and the file: a device limit across two queues on
/// two reactors, a group shared by two devices, limits changed and
/// cleared at run time, refusals for bad values, and everything kept in
/// the state directory across a restart.
#[test]
fn qos_limits_and_groups_through_the_api_survive_a_restart() {
    let _t = timed();
    let dir = disk_tempdir("quern-qos");
    let mut q = QuernProcess::start(
        dir.path(),
        r#"
state_dir = "@DIR@"
[reactor]
cores = [0, 1]
poll_mode = "adaptive"
[[qos_group]]
name = "tenant"
qos = { iops = 2000 }
[[bdev]]
name = "a"
driver = "null"
size = "256M"
[[bdev]]
name = "b"
driver = "null"
size = "256M"
[[vhost_blk]]
name = "a"
bdev = "a"
socket = "a.sock"
num_queues = 2
cores = [0, 1]
qos = { iops = 1500, burst_ms = 10 }
[[vhost_blk]]
name = "b"
bdev = "b"
socket = "b.sock"
num_queues = 2
cores = [0, 1]
"#,
    );
    q.wait_ready(Duration::from_secs(20));
    // device limit across both queues: two clients, one per queue
    let rate_of = |sock: &Path, secs: f64| -> f64 {
        closed_loop(sock, 2, 16, secs, 0).done.len() as f64 / secs
    };
    let a_sock = dir.path().join("a.sock");
    let b_sock = dir.path().join("b.sock");
    let r = rate_of(&a_sock, 4.0);
    assert!(
        (r / 1500.0 - 1.0).abs() < 0.1,
        "limited to 1500 IOPS, did {r}"
    );
    let list = q.ok("vhost_blk_list", json!({}));
    let a = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "a")
        .unwrap();
    assert!(a["throttled_requests"].as_u64().unwrap() > 0, "{a}");
    // a limit changed at run time
    q.ok(
        "vhost_blk_set_qos",
        json!({"name": "a", "qos": {"iops": 700}}),
    );
    let r = rate_of(&a_sock, 3.0);
    assert!(
        (r / 700.0 - 1.0).abs() < 0.1,
        "limited to 700 IOPS, did {r}"
    );
    // a group over both devices: together at most 2000, each its share
    q.ok("vhost_blk_set_qos", json!({"name": "a", "qos": {}}));
    q.ok(
        "vhost_blk_set_qos_group",
        json!({"name": "a", "group": "tenant"}),
    );
    q.ok(
        "vhost_blk_set_qos_group",
        json!({"name": "b", "group": "tenant"}),
    );
    let (sa, sb) = (a_sock.clone(), b_sock.clone());
    let ta = std::thread::spawn(move || closed_loop(&sa, 1, 16, 4.0, 0));
    let lb = closed_loop(&sb, 1, 16, 4.0, 0);
    let la = ta.join().unwrap();
    let (na, nb) = (la.done.len() as f64 / 4.0, lb.done.len() as f64 / 4.0);
    assert!(
        ((na + nb) / 2000.0 - 1.0).abs() < 0.1,
        "group of 2000 IOPS: {na} + {nb}"
    );
    assert!(na > 400.0 && nb > 400.0, "one device starved: {na} {nb}");
    let groups = q.ok("qos_group_list", json!({}));
    assert_eq!(groups[0]["devices"], json!(["a", "b"]), "{groups}");
    // refusals, each naming what is wrong
    let e = q.err(
        "vhost_blk_set_qos",
        json!({"name": "a", "qos": {"burst_ms": 0}}),
    );
    assert!(
        e.code == codes::INVALID_PARAMS && e.message.contains("burst_ms"),
        "{e}"
    );
    let e = q.err(
        "vhost_blk_set_qos",
        json!({"name": "a", "qos": {"iopz": 5}}),
    );
    assert!(
        e.code == codes::INVALID_PARAMS && e.message.contains("iopz"),
        "{e}"
    );
    let e = q.err(
        "vhost_blk_set_qos_group",
        json!({"name": "a", "group": "nope"}),
    );
    assert_eq!(e.code, codes::NOT_FOUND, "{e}");
    let e = q.err("qos_group_delete", json!({"name": "tenant"}));
    assert!(
        e.code == codes::IN_USE && e.message.contains("device `a`"),
        "{e}"
    );
    let e = q.err("qos_group_create", json!({"name": "tenant", "qos": {}}));
    assert_eq!(e.code, codes::ALREADY_EXISTS);
    let e = q.err(
        "vhost_blk_create",
        json!({"name": "c", "bdev": "a", "socket": "c.sock", "qos_group": "nope"}),
    );
    assert!(
        e.code == codes::INVALID_PARAMS && e.message.contains("qos_group"),
        "{e}"
    );
    // the group's limit changed, b leaves it; then a restart keeps it all
    q.ok(
        "qos_group_set",
        json!({"name": "tenant", "qos": {"iops": 1000}}),
    );
    q.ok("vhost_blk_set_qos_group", json!({"name": "b"}));
    q.ok(
        "vhost_blk_set_qos",
        json!({"name": "b", "qos": {"write_bps": 1048576}}),
    );
    q.kill();
    q.restart();
    q.wait_ready(Duration::from_secs(20));
    let list = q.ok("vhost_blk_list", json!({}));
    let find = |n: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(find("a")["qos_group"], "tenant");
    assert_eq!(find("b")["qos_group"], Value::Null);
    assert_eq!(find("b")["qos"]["write_bps"], 1048576);
    assert_eq!(q.ok("qos_group_list", json!({}))[0]["qos"]["iops"], 1000);
    let r = rate_of(&a_sock, 3.0);
    assert!(
        (r / 1000.0 - 1.0).abs() < 0.1,
        "group limit 1000 after the restart, did {r}"
    );
    // config_save writes what a restart reads
    let saved = q.ok("config_save", json!({}));
    let toml = saved["toml"].as_str().unwrap();
    assert!(
        toml.contains("[[qos_group]]") && toml.contains("qos_group = \"tenant\""),
        "{toml}"
    );
    quern::config::Config::parse(toml).expect("config_save is a valid configuration");
    // group deleted once empty
    q.ok("vhost_blk_set_qos_group", json!({"name": "a"}));
    q.ok("qos_group_delete", json!({"name": "tenant"}));
    assert!(q.stop());
}

/// Bad [metrics] and QoS settings in the file are refused at start-up,
/// naming the key.
#[test]
fn bad_metrics_and_qos_settings_are_refused_naming_the_key() {
    let dir = disk_tempdir("quern-badcfg");
    let base = "state_dir = \"@DIR@\"\n[reactor]\ncores = [0]\n";
    for (extra, key) in [
        ("[metrics]\nlisten = \"nowhere\"\n", "metrics.listen"),
        ("[metrics]\nlisten = \"unix:\"\n", "metrics.listen"),
        ("[metrics]\nhistogram = true\n", "histogram"),
        (
            "[[qos_group]]\nname = \"g\"\nqos = { iops = 5, burst_ms = 0 }\n",
            "qos_group[0].qos",
        ),
        (
            "[[bdev]]\nname = \"m\"\ndriver = \"null\"\nsize = \"1M\"\n[[vhost_blk]]\nname = \"d\"\nbdev = \"m\"\nsocket = \"d.sock\"\nqos_group = \"g\"\n",
            "vhost_blk[0].qos_group",
        ),
        (
            "[[bdev]]\nname = \"m\"\ndriver = \"null\"\nsize = \"1M\"\n[[vhost_blk]]\nname = \"d\"\nbdev = \"m\"\nsocket = \"d.sock\"\nqos = { iops = -1 }\n",
            "iops",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, format!("{base}{extra}").replace("@DIR@", dir.path().to_str().unwrap())).unwrap();
        let out = Command::new(quern_bin())
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{extra}");
        assert!(msg.contains(key), "`{key}` not named in: {msg}");
    }
    // a port in use: start-up fails naming metrics.listen, nothing left running
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let path = dir.path().join("busy.toml");
    std::fs::write(
        &path,
        format!("{base}[metrics]\nlisten = \"{addr}\"\n")
            .replace("@DIR@", dir.path().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new(quern_bin())
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(msg.contains("metrics.listen"), "{msg}");
}
