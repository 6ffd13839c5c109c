//! QoS accuracy: a device limited by IOPS or bandwidth, two queues on two
//! reactors with a QD32 libblkio client on each, measured against its
//! limit; a limit lowered at run time, timed until it holds; and an
//! unlimited neighbour on the same reactors, its IOPS with the limited
//! device loaded (at `--neighbour-limit` IOPS, 5,000) against alone: in
//! alternating pairs of runs, and in alternating windows of one run (the
//! limited device's client, a process of its own, stopped in one window
//! and running in the next).
//!
//! Prints a table per part and a verdict per target (within 5 %, holds
//! within 1 s, neighbour at least 95 %). See bench/README.md; figures in
//! bench/RESULTS.md.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use quern_bench::client::TimelineSpec;
use quern_bench::clock::ticks;
use quern_bench::job::Job;
use quern_bench::quern::{call, QuernChild};
use quern_bench::report::median;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "qos-bench")]
struct Opts {
    #[arg(long, default_value = "target/release/quern")]
    quern: PathBuf,
    #[arg(long, default_value = "/var/tmp/quern-bench/qos")]
    out: PathBuf,
    /// Seconds per limited run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Alone/loaded pairs of neighbour runs.
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Windows of the interleaved neighbour measurement, in ms.
    #[arg(long, default_value_t = 500)]
    window_ms: u64,
    /// Alone/loaded pairs of windows (0: no interleaved measurement).
    #[arg(long, default_value_t = 40)]
    window_pairs: usize,
    /// The limited device's IOPS limit in the neighbour measurements.
    #[arg(long, default_value_t = 5000)]
    neighbour_limit: u64,
    /// Only the neighbour measurements (no accuracy, no run-time change).
    #[arg(long)]
    neighbour_only: bool,
    /// A check that the benchmark runs, not a measurement: 2 s runs, one pair.
    #[arg(long)]
    smoke: bool,
}

const CONFIG: &str = r#"state_dir = "@DIR@"
[reactor]
cores = [0, 1]
poll_mode = "adaptive"
[[bdev]]
name = "limited"
driver = "null"
size = "1G"
[[bdev]]
name = "neighbour"
driver = "null"
size = "1G"
[[vhost_blk]]
name = "limited"
bdev = "limited"
socket = "limited.sock"
num_queues = 2
cores = [0, 1]
[[vhost_blk]]
name = "neighbour"
bdev = "neighbour"
socket = "neighbour.sock"
num_queues = 2
cores = [0, 1]
"#;

fn job(rw: &str, bs: usize, secs: u64) -> Job {
    Job {
        name: format!("{rw}-{bs}"),
        rw: rw.into(),
        bs,
        iodepth: 32,
        numjobs: 2,
        runtime_secs: secs,
        size: None,
    }
}

/// Run `job` on a device (client threads on `cpu`, blocking for
/// completions): operations and bytes per second.
fn drive(q: &QuernChild, dev: &str, job: &Job, cpu: usize) -> Result<(f64, f64), String> {
    let v = quern_bench::client::run(job, &q.dir.join(format!("{dev}.sock")), cpu, true)?;
    let d = &v["jobs"][0][job.direction()];
    let iops = d["iops"].as_f64().unwrap_or(0.0);
    Ok((iops, iops * job.bs as f64))
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "within"
    } else {
        "MISSED"
    }
}

/// The limited runs: each limit against what the client measured.
fn accuracy(q: &QuernChild, secs: u64) -> Result<bool, String> {
    let mut c = q.client()?;
    let cases: [(&str, Value, Job, bool); 5] = [
        (
            "iops",
            json!({"iops": 5000}),
            job("randread", 4096, secs),
            true,
        ),
        (
            "write_iops",
            json!({"write_iops": 3000}),
            job("randwrite", 4096, secs),
            true,
        ),
        (
            "read_bps",
            json!({"read_bps": 50_000_000}),
            job("randread", 65536, secs),
            false,
        ),
        (
            "write_bps",
            json!({"write_bps": 30_000_000}),
            job("randwrite", 65536, secs),
            false,
        ),
        (
            "bps (reads)",
            json!({"bps": 40_000_000}),
            job("randread", 16384, secs),
            false,
        ),
    ];
    println!("| limit | job | target | measured | ratio | ±5 % |");
    println!("|---|---|---:|---:|---:|---|");
    let mut all = true;
    for (name, qos, j, by_ops) in cases {
        call(
            &mut c,
            "vhost_blk_set_qos",
            json!({"name": "limited", "qos": qos}),
        )?;
        let target = qos
            .as_object()
            .and_then(|m| m.values().next())
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        let (iops, bps) = drive(q, "limited", &j, 0)?;
        let got = if by_ops { iops } else { bps };
        let ratio = got / target;
        let ok = (0.95..=1.05).contains(&ratio);
        all &= ok;
        println!(
            "| {name} | {} {}k QD32×2 {}s | {target:.0} | {got:.0} | {ratio:.3} | {} |",
            j.rw,
            j.bs / 1024,
            j.runtime_secs,
            verdict(ok)
        );
    }
    limit_the_limited(&mut c, json!({}))?;
    Ok(all)
}

/// The limit lowered from 5000 to 2000 IOPS while the client runs: the
/// device's completions sampled every 50 ms; how long after the change
/// every later 250 ms window stays within 5 % of the new limit, and the
/// rate over the whole time after the first second.
fn change(q: &QuernChild, secs: u64) -> Result<bool, String> {
    let mut c = q.client()?;
    call(
        &mut c,
        "vhost_blk_set_qos",
        json!({"name": "limited", "qos": {"iops": 5000}}),
    )?;
    let total = secs.max(4);
    let j = job("randread", 4096, total);
    let (qq, jj) = (q.dir.clone(), j.clone());
    let client = std::thread::spawn(move || {
        quern_bench::client::run(&jj, &qq.join("limited.sock"), 0, true)
    });
    let completed = |c: &mut quern::mgmt::Client| -> Result<u64, String> {
        let v = call(c, "vhost_blk_list", json!({}))?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["name"] == "limited")
            .flat_map(|d| d["queues"].as_array().cloned().unwrap_or_default())
            .filter_map(|q| q["completed"].as_u64())
            .sum())
    };
    let t0 = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let change_at = 2.0;
    let mut changed = false;
    while t0.elapsed().as_secs_f64() < total as f64 - 0.3 {
        let t = t0.elapsed().as_secs_f64();
        if !changed && t >= change_at {
            call(
                &mut c,
                "vhost_blk_set_qos",
                json!({"name": "limited", "qos": {"iops": 2000}}),
            )?;
            changed = true;
            samples.push((t0.elapsed().as_secs_f64(), completed(&mut c)?));
        }
        samples.push((t, completed(&mut c)?));
        std::thread::sleep(Duration::from_millis(50));
    }
    client.join().map_err(|_| "client panicked")??;
    limit_the_limited(&mut c, json!({}))?;
    let rate = |a: f64, b: f64| -> Option<f64> {
        let at = |t: f64| samples.iter().find(|s| s.0 >= t);
        let (x, y) = (at(a)?, at(b)?);
        (y.0 > x.0).then(|| (y.1 - x.1) as f64 / (y.0 - x.0))
    };
    let before = rate(0.5, change_at).unwrap_or(0.0);
    let end = samples.last().map_or(0.0, |s| s.0);
    // the first moment from which every 250 ms window is within 5 %
    let mut settled = None;
    let mut t = change_at;
    while t + 0.25 <= end {
        let ok_from_here = {
            let mut u = t;
            let mut ok = true;
            while u + 0.25 <= end {
                if let Some(r) = rate(u, u + 0.25) {
                    ok &= (r - 2000.0).abs() <= 0.05 * 2000.0;
                }
                u += 0.25;
            }
            ok
        };
        if ok_from_here {
            settled = Some(t - change_at);
            break;
        }
        t += 0.05;
    }
    let after = rate(change_at + 1.0, end).unwrap_or(0.0);
    let ok = settled.is_some_and(|s| s <= 1.0) && (after / 2000.0 - 1.0).abs() <= 0.05;
    println!("\n| change | before (IOPS) | after +1 s to end (IOPS) | settled after | holds within 1 s |");
    println!("|---|---:|---:|---:|---|");
    println!(
        "| iops 5000 → 2000 at {change_at:.0} s of {total} s | {before:.0} | {after:.0} | {} | {} |",
        settled.map_or("never".into(), |s| format!("{:.2} s", s)),
        if ok { "yes" } else { "NO" }
    );
    Ok(ok)
}

/// Set the limited device's QoS limits (`{}`: none).
fn limit_the_limited(c: &mut quern::mgmt::Client, qos: Value) -> Result<Value, String> {
    call(
        c,
        "vhost_blk_set_qos",
        json!({"name": "limited", "qos": qos}),
    )
}

/// Neighbour IOPS alone against with the limited device loaded at its
/// limit meanwhile.
fn neighbour(q: &QuernChild, secs: u64, pairs: usize, limit: u64) -> Result<bool, String> {
    let mut c = q.client()?;
    limit_the_limited(&mut c, json!({"iops": limit}))?;
    let j = job("randread", 4096, secs);
    println!("\n| pair | order | neighbour alone (IOPS) | neighbour, limited device loaded (IOPS) | limited (IOPS) | ratio |");
    println!("|---:|---|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for pair in 0..pairs {
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut got = [0.0; 2];
        let mut limited = 0.0;
        for loaded in order {
            if loaded {
                // the limited device's client runs from before the
                // neighbour's run to after it
                let (qq, lj) = (q.dir.clone(), job("randread", 4096, secs + 2));
                let bg = std::thread::spawn(move || {
                    quern_bench::client::run(&lj, &qq.join("limited.sock"), 0, true)
                });
                std::thread::sleep(Duration::from_millis(500));
                got[1] = drive(q, "neighbour", &j, 1)?.0;
                let v = bg.join().map_err(|_| "client panicked")??;
                limited = v["jobs"][0]["read"]["iops"].as_f64().unwrap_or(0.0);
            } else {
                got[0] = drive(q, "neighbour", &j, 1)?.0;
            }
        }
        let r = got[1] / got[0];
        ratios.push(r);
        println!(
            "| {pair} | {} | {:.0} | {:.0} | {limited:.0} | {r:.3} |",
            if order[0] {
                "loaded first"
            } else {
                "alone first"
            },
            got[0],
            got[1]
        );
    }
    limit_the_limited(&mut c, json!({}))?;
    let m = median(&ratios);
    let ok = m >= 0.95;
    println!(
        "\nneighbour loaded/alone over {} pairs: median {m:.3} (range {:.3}-{:.3}); at least 0.95: {}",
        ratios.len(),
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
        if ok { "yes" } else { "NO" }
    );
    Ok(ok)
}

/// The limited device's client as a process of its own (`vhost-bench
/// run`), so that it can be stopped and continued; killed on drop.
struct LimitedClient(Child);

impl LimitedClient {
    fn start(dir: &Path, secs: u64) -> Result<LimitedClient, String> {
        let job = dir.join("limited.fio");
        std::fs::write(
            &job,
            "[limited]\nrw=randread\nbs=4k\niodepth=32\nnumjobs=2\nruntime=1\nsize=1G\n",
        )
        .map_err(|e| format!("{}: {e}", job.display()))?;
        let exe = std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("vhost-bench");
        let child = Command::new(&exe)
            .arg("run")
            .arg(&job)
            .arg("--socket")
            .arg(dir.join("limited.sock"))
            .args(["--cpu", "0", "--wait", "--runtime", &secs.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        Ok(LimitedClient(child))
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, sig) };
    }
}

impl Drop for LimitedClient {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The limited device's completed requests (all queues).
fn completed(c: &mut quern::mgmt::Client, dev: &str) -> Result<u64, String> {
    let v = call(c, "vhost_blk_list", json!({}))?;
    let d = v
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == dev))
        .ok_or_else(|| format!("no device {dev}"))?;
    Ok(d["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| q["completed"].as_u64().unwrap_or(0))
        .sum())
}

/// The neighbour in alternating windows of one run: its client runs
/// throughout; the limited device's client (saturating its 5,000 IOPS
/// limit) runs in one window and is stopped (SIGSTOP) in the next, in
/// alternating order. Adjacent windows share the machine's speed phase,
/// which 10 s runs one after another do not. Per pair, loaded/alone.
fn neighbour_windows(
    q: &QuernChild,
    window_ms: u64,
    pairs: usize,
    limit: u64,
) -> Result<Option<bool>, String> {
    if pairs == 0 {
        return Ok(None);
    }
    const SETTLE_MS: u64 = 50;
    const BIN_MS: u64 = 5;
    let mut c = q.client()?;
    limit_the_limited(&mut c, json!({"iops": limit}))?;
    let total_ms = 1000 + 2 * pairs as u64 * window_ms;
    // (each window also waits for two management calls: a margin)
    let secs = total_ms.div_ceil(1000) + 2;
    let limited = LimitedClient::start(&q.dir, secs + 2)?;
    let scale = quern_bench::clock::ns_per_tick();
    let to_ticks = |ms: u64| (ms as f64 * 1e6 / scale) as u64;
    let spec = TimelineSpec {
        origin: ticks(),
        bin_ticks: to_ticks(BIN_MS),
        mark: Arc::new(AtomicBool::new(false)),
    };
    let (sock, sp) = (q.dir.join("neighbour.sock"), spec.clone());
    let runner = std::thread::spawn(move || {
        quern_bench::client::run_with_timeline(
            &job("randread", 4096, secs),
            &sock,
            1,
            true,
            Some(sp),
        )
    });
    // both running first: connections made, queues started
    std::thread::sleep(Duration::from_millis(1000));
    // (loaded, first bin, bins, limited device's completions)
    let mut windows: Vec<(bool, usize, usize, u64)> = Vec::new();
    for pair in 0..pairs {
        let order = if pair % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for loaded in order {
            limited.signal(if loaded { libc::SIGCONT } else { libc::SIGSTOP });
            std::thread::sleep(Duration::from_millis(SETTLE_MS));
            let t0 = ticks();
            let n0 = completed(&mut c, "limited")?;
            std::thread::sleep(Duration::from_millis(window_ms - SETTLE_MS));
            let n1 = completed(&mut c, "limited")?;
            let t1 = ticks();
            // whole bins inside the window
            let first = (t0 - spec.origin).div_ceil(spec.bin_ticks) as usize;
            let end = ((t1 - spec.origin) / spec.bin_ticks) as usize;
            windows.push((loaded, first, end.saturating_sub(first), n1 - n0));
        }
    }
    limited.signal(libc::SIGCONT);
    drop(limited);
    let (_, bins) = runner.join().map_err(|_| "neighbour client panicked")??;
    limit_the_limited(&mut c, json!({}))?;
    let iops = |&(_, first, n, _): &(bool, usize, usize, u64)| {
        let done: u64 = bins.iter().skip(first).take(n).sum();
        done as f64 / (n.max(1) as f64 * BIN_MS as f64 / 1000.0)
    };
    // a window past the end of the neighbour's run is not counted
    windows.retain(|w| w.1 + w.2 <= bins.len() && w.2 > 0);
    let mut ratios = Vec::new();
    let (mut alone, mut loaded, mut lim_on, mut lim_off) = (vec![], vec![], vec![], vec![]);
    let secs_of = |w: &(bool, usize, usize, u64)| w.2 as f64 * BIN_MS as f64 / 1000.0;
    for w in windows.chunks_exact(2) {
        let (l, a) = if w[0].0 {
            (&w[0], &w[1])
        } else {
            (&w[1], &w[0])
        };
        ratios.push(iops(l) / iops(a));
        loaded.push(iops(l));
        alone.push(iops(a));
        lim_on.push(l.3 as f64 / secs_of(l).max(1e-3));
        lim_off.push(a.3 as f64 / secs_of(a).max(1e-3));
    }
    if ratios.is_empty() {
        return Err("no pair of windows inside the neighbour's run".into());
    }
    // the load is what is measured: a limited client that did not run
    // (or a limit that did not hold) is an error, not a verdict
    if median(&lim_on) < 0.5 * limit as f64 || median(&lim_off) > 0.1 * limit as f64 {
        return Err(format!(
            "the limited device ran {:.0} IOPS in its loaded windows and {:.0} in its stopped ones, not about {limit} and 0",
            median(&lim_on),
            median(&lim_off)
        ));
    }
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let quart = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    let m = median(&ratios);
    let ok = m >= 0.95;
    println!(
        "\nneighbour in alternating windows: {pairs} pairs of {window_ms} ms windows (the first {SETTLE_MS} ms of each not counted), one neighbour run throughout\n"
    );
    println!("| neighbour alone (IOPS, median) | neighbour, limited device loaded | limited device in loaded windows | in alone windows |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {:.0} | {:.0} | {:.0} | {:.0} |",
        median(&alone),
        median(&loaded),
        median(&lim_on),
        median(&lim_off)
    );
    println!(
        "\nneighbour loaded/alone in windows: median of {} pairs {m:.3} (quartiles {:.3}-{:.3}; range {:.3}-{:.3}); at least 0.95: {}",
        ratios.len(),
        quart(0.25),
        quart(0.75),
        sorted[0],
        sorted[sorted.len() - 1],
        if ok { "yes" } else { "NO" }
    );
    Ok(Some(ok))
}

fn run(o: &Opts) -> Result<bool, String> {
    std::fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    if o.smoke {
        eprintln!("qos-bench --smoke: a check that it runs, not a measurement");
    } else {
        quern_bench::compare::check_alone("qos-bench")?;
    }
    quern_bench::clock::ns_per_tick();
    let q = QuernChild::start(&o.quern, &o.out, "0,1", CONFIG, "neighbour.sock")?;
    let (secs, pairs) = if o.smoke { (2, 1) } else { (o.secs, o.pairs) };
    let (a, b) = if o.neighbour_only {
        (true, true)
    } else {
        (
            accuracy(&q, secs)?,
            change(&q, if o.smoke { 4 } else { secs.min(8) })?,
        )
    };
    let c = neighbour(&q, secs, pairs, o.neighbour_limit)?;
    let (window_ms, window_pairs) = if o.smoke {
        (200, 2)
    } else {
        (o.window_ms.max(100), o.window_pairs)
    };
    // the windows settle it when they ran: they resolve what the runs cannot
    let c = neighbour_windows(&q, window_ms, window_pairs, o.neighbour_limit)?.unwrap_or(c);
    println!(
        "\nQoS targets: accuracy {}, run-time change {}, neighbour {}",
        if a { "met" } else { "MISSED" },
        if b { "met" } else { "MISSED" },
        if c { "met" } else { "MISSED" }
    );
    Ok(a && b && c)
}

fn main() -> ExitCode {
    let o = Opts::parse();
    match run(&o) {
        // a missed target is a finding to report, not a failure to run
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qos-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
