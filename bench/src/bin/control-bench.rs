//! The control plane's cost: how long `bdev_create` (uring, malloc,
//! qcow2) and `vhost_blk_create` take from the call to a ready socket
//! (median and p99 over many runs), and whether creating and deleting
//! devices once a second disturbs a neighbouring device's 4k random reads
//! at QD32 (IOPS and p99 against a quiet run, alternating pairs).
//!
//! See bench/README.md; figures in bench/RESULTS.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use quern::mgmt::Client;
use quern_bench::client::TimelineSpec;
use quern_bench::clock::ticks;
use quern_bench::job::Job;
use quern_bench::quern::{call, QuernChild};
use quern_bench::report::{median, range};
use serde_json::json;

#[derive(Parser)]
#[command(name = "control-bench")]
struct Opts {
    #[arg(long, default_value = "target/release/quern")]
    quern: PathBuf,
    #[arg(long, default_value = "/var/tmp/quern-bench/control")]
    out: PathBuf,
    /// Create/delete runs per kind.
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Quiet/busy pairs of neighbour runs.
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Seconds per neighbour run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Only the creation times (no neighbour runs).
    #[arg(long)]
    no_neighbour: bool,
    /// A check that the benchmark runs, not a measurement (measures beside
    /// other backends, with a warning).
    #[arg(long)]
    smoke: bool,
}

fn start(o: &Opts) -> Result<QuernChild, String> {
    QuernChild::start(
        &o.quern,
        &o.out,
        "1",
        "state_dir = \"@DIR@\"\n[reactor]\ncores = [1]\npoll_mode = \"busy\"\n\
         [[bdev]]\nname = \"neighbour\"\ndriver = \"null\"\nsize = \"1G\"\n\
         [[bdev]]\nname = \"base\"\ndriver = \"malloc\"\nsize = \"64M\"\n\
         [[vhost_blk]]\nname = \"neighbour\"\nbdev = \"neighbour\"\nsocket = \"neighbour.sock\"\n",
        "neighbour.sock",
    )
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// bdev_create and vhost_blk_create times per kind, in µs.
fn creation_times(o: &Opts, q: &QuernChild) -> Result<(), String> {
    let mut c = Client::connect(&q.socket).map_err(|e| e.to_string())?;
    println!("| call | bdev driver | runs | median µs | p99 µs |");
    println!("|---|---|---:|---:|---:|");
    for kind in ["malloc", "uring", "qcow2"] {
        let (mut bdev_us, mut dev_us) = (Vec::new(), Vec::new());
        for i in 0..o.runs {
            let params = match kind {
                "malloc" => json!({"name": "b", "driver": "malloc", "size": "64M"}),
                "uring" => {
                    json!({"name": "b", "driver": "uring", "path": format!("u{}.img", i % 2), "size": "64M"})
                }
                _ => {
                    json!({"name": "b", "driver": "qcow2", "path": format!("o{i}.qcow2"), "base": "base"})
                }
            };
            let t = Instant::now();
            call(&mut c, "bdev_create", params)?;
            bdev_us.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            let r = call(
                &mut c,
                "vhost_blk_create",
                json!({"name": "d", "bdev": "b", "socket": "d.sock", "num_queues": 2}),
            )?;
            let sock = PathBuf::from(r["socket"].as_str().unwrap_or_default());
            // ready: a client can connect the moment the call returns
            let probe = std::os::unix::net::UnixStream::connect(&sock)
                .map_err(|e| format!("{} not ready after the call: {e}", sock.display()))?;
            dev_us.push(t.elapsed().as_secs_f64() * 1e6);
            // the probe was a frontend while connected: gone before the delete
            drop(probe);
            let t = Instant::now();
            // (accepted, counted, and let go)
            while call(&mut c, "vhost_blk_list", json!({}))?
                .as_array()
                .into_iter()
                .flatten()
                .any(|d| d["name"] == "d" && (d["connected"] == true || d["connections"] == 0))
            {
                if t.elapsed() > Duration::from_secs(5) {
                    return Err("the probe connection never went away".into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            call(&mut c, "vhost_blk_delete", json!({"name": "d"}))?;
            call(&mut c, "bdev_delete", json!({"name": "b"}))?;
        }
        println!(
            "| bdev_create | {kind} | {} | {:.0} | {:.0} |",
            o.runs,
            median(&bdev_us),
            pct(&mut bdev_us, 0.99)
        );
        println!(
            "| vhost_blk_create (to a connectable socket) | {kind} | {} | {:.0} | {:.0} |",
            o.runs,
            median(&dev_us),
            pct(&mut dev_us, 0.99)
        );
    }
    Ok(())
}

/// The timeline's bin.
const BIN_MS: u64 = 5;

/// What one neighbour run measured.
struct Neighbour {
    iops: f64,
    p99_us: f64,
    /// p99 of the completions away from the changes (from 20 ms after a
    /// create/delete cycle to the start of the next); on a quiet run,
    /// away from made-up times as long (the placebo).
    p99_away_us: f64,
    changes: u64,
    /// With churn: the I/Os the neighbour lost around the changes, by the
    /// timeline (see [`lost_to_churn`]). Without: the same estimate at
    /// made-up times (once a second, 20 ms long), a placebo that shows
    /// the estimate's own error.
    lost: Lost,
}

/// The neighbour's I/Os lost to the churn, found on its timeline: for
/// each create/delete cycle, the completions in the bins from the cycle's
/// start to 20 ms after its end, against the rate in the bins 50-300 ms
/// before it and 100-350 ms after it (the same second: this machine's
/// speed phases last seconds, so they cancel). Cycles in the run's first
/// and last half second are left out.
#[derive(Clone, Copy, Debug, Default)]
struct Lost {
    cycles: usize,
    /// I/Os lost, and I/Os in the run.
    lost: f64,
    total: f64,
    /// Mean length of a create/delete cycle, ms.
    cycle_ms: f64,
}

impl Lost {
    fn fraction(&self) -> f64 {
        self.lost / self.total.max(1.0)
    }
}

fn lost_to_churn(bins: &[u64], events: &[(u64, u64)], origin: u64, scale: f64) -> Lost {
    let bin = |t: u64| (t.saturating_sub(origin) as f64 * scale / 1e6 / BIN_MS as f64) as i64;
    let ms = |m: i64| m / BIN_MS as i64;
    let n = bins.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1) as i64;
    let sum = |a: i64, b: i64| -> (f64, i64) {
        let (a, b) = (a.max(0), b.min(n));
        if a >= b {
            return (0.0, 0);
        }
        (
            bins[a as usize..b as usize].iter().sum::<u64>() as f64,
            b - a,
        )
    };
    let mut out = Lost {
        total: bins.iter().sum::<u64>() as f64,
        ..Lost::default()
    };
    let mut cycle_ms = 0.0;
    for &(t0, t1) in events {
        let (s, e) = (bin(t0), bin(t1) + 1);
        if s < ms(500) || e + ms(500) > n {
            continue;
        }
        let (near, near_bins) = sum(s, e + ms(20));
        let (before, nb) = sum(s - ms(300), s - ms(50));
        let (after, na) = sum(e + ms(100), e + ms(350));
        if nb + na == 0 || near_bins == 0 {
            continue;
        }
        let rate = (before + after) / (nb + na) as f64;
        out.lost += rate * near_bins as f64 - near;
        out.cycles += 1;
        cycle_ms += t1.saturating_sub(t0) as f64 * scale / 1e6;
    }
    out.cycle_ms = cycle_ms / out.cycles.max(1) as f64;
    out
}

/// One neighbour run: IOPS and p99 µs, with or without churn meanwhile.
fn neighbour_run(o: &Opts, q: &QuernChild, churn: bool) -> Result<Neighbour, String> {
    let job = Job {
        name: "neighbour".into(),
        rw: "randread".into(),
        bs: 4096,
        iodepth: 32,
        numjobs: 1,
        runtime_secs: o.secs,
        size: None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicU64::new(0));
    let mark = Arc::new(AtomicBool::new(false));
    let churner = churn.then(|| {
        let (stop, changes, sock) = (stop.clone(), changes.clone(), q.socket.clone());
        let mark = mark.clone();
        std::thread::spawn(move || -> Result<Vec<(u64, u64)>, String> {
            let _ = quern_bench::pin_to_cpu(0);
            let mut c = Client::connect(&sock).map_err(|e| e.to_string())?;
            let mut i = 0u64;
            let mut events = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                mark.store(true, Ordering::Relaxed);
                let t0 = ticks();
                let b = format!("c{i}");
                call(
                    &mut c,
                    "bdev_create",
                    json!({"name": b, "driver": "malloc", "size": "16M"}),
                )?;
                call(
                    &mut c,
                    "vhost_blk_create",
                    json!({"name": b, "bdev": b, "socket": format!("{b}.sock")}),
                )?;
                call(&mut c, "vhost_blk_delete", json!({"name": b}))?;
                call(&mut c, "bdev_delete", json!({"name": b}))?;
                changes.fetch_add(4, Ordering::Relaxed);
                events.push((t0, ticks()));
                // completions just after the changes count as during them
                std::thread::sleep(Duration::from_millis(20));
                mark.store(false, Ordering::Relaxed);
                i += 1;
                if let Some(rest) = Duration::from_secs(1).checked_sub(t.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            Ok(events)
        })
    });
    // the quiet run's placebo: the mark goes up as the churn would put it
    // (once a second, for about a cycle and its 20 ms), and nothing happens
    let placebo = (!churn).then(|| {
        let (stop, mark) = (stop.clone(), mark.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                mark.store(true, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
                mark.store(false, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(950));
            }
        })
    });
    let sock = q.socket.with_file_name("neighbour.sock");
    let scale = quern_bench::clock::ns_per_tick();
    let spec = TimelineSpec {
        origin: ticks(),
        bin_ticks: (BIN_MS as f64 * 1e6 / scale) as u64,
        mark,
    };
    let v = quern_bench::client::run_with_timeline(&job, &sock, 0, false, Some(spec.clone()));
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = placebo {
        t.join().map_err(|_| "placebo thread panicked")?;
    }
    let events = match churner {
        Some(t) => Some(t.join().map_err(|_| "churn thread panicked")??),
        None => None,
    };
    let (v, bins) = v?;
    let r = &v["jobs"][0]["read"];
    Ok(Neighbour {
        iops: r["iops"].as_f64().unwrap_or(0.0),
        p99_us: r["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
        p99_away_us: r["clat_ns_unmarked"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
        changes: changes.load(Ordering::Relaxed),
        lost: {
            let events = events.unwrap_or_else(|| {
                let s = |ms: u64| spec.origin + (ms as f64 * 1e6 / scale) as u64;
                (0..o.secs)
                    .map(|k| (s(1000 * k + 300), s(1000 * k + 320)))
                    .collect()
            });
            lost_to_churn(&bins, &events, spec.origin, scale)
        },
    })
}

fn run(o: &Opts) -> Result<(), String> {
    std::fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    if o.smoke {
        eprintln!("control-bench --smoke: a check that it runs, not a measurement");
    } else {
        quern_bench::compare::check_alone("control-bench")?;
    }
    let _ = quern_bench::pin_to_cpu(0);
    quern_bench::clock::ns_per_tick();
    let q = start(o)?;
    creation_times(o, &q)?;
    if o.no_neighbour {
        return Ok(());
    }
    let (mut iops, mut p99) = (Vec::new(), Vec::new());
    let mut lost_all = Lost::default();
    let mut placebo = Lost::default();
    let mut lost_runs = Vec::new();
    let mut p99_in_run = Vec::new();
    let mut p99_placebo = Vec::new();
    println!(
        "\n| pair | order | quiet IOPS | busy IOPS | quiet p99 µs | busy p99 µs | busy p99 away from changes µs | changes | I/Os lost to the changes |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for pair in 0..o.pairs {
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut got = [None, None];
        for busy in order {
            got[usize::from(busy)] = Some(neighbour_run(o, &q, busy)?);
        }
        let [Some(quiet), Some(busy)] = got else {
            unreachable!("both runs of the pair ran")
        };
        let lost = busy.lost;
        placebo.lost += quiet.lost.lost;
        placebo.total += quiet.lost.total;
        placebo.cycles += quiet.lost.cycles;
        println!(
            "| {pair} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {:.2} % over {} cycles of {:.1} ms |",
            if order[0] {
                "busy first"
            } else {
                "quiet first"
            },
            quiet.iops,
            busy.iops,
            quiet.p99_us,
            busy.p99_us,
            busy.p99_away_us,
            busy.changes,
            100.0 * lost.fraction(),
            lost.cycles,
            lost.cycle_ms,
        );
        iops.push(busy.iops / quiet.iops);
        p99.push(busy.p99_us / quiet.p99_us);
        lost_runs.push(lost.fraction());
        p99_in_run.push(busy.p99_us / busy.p99_away_us);
        p99_placebo.push(quiet.p99_us / quiet.p99_away_us);
        lost_all.lost += lost.lost;
        lost_all.total += lost.total;
        lost_all.cycle_ms += lost.cycle_ms * lost.cycles as f64;
        lost_all.cycles += lost.cycles;
    }
    println!(
        "\nbusy/quiet over {} pairs: IOPS median {}, p99 median {}",
        o.pairs,
        spread(&iops, 1.0),
        spread(&p99, 1.0),
    );
    println!(
        "on the busy runs' timelines ({BIN_MS} ms bins, each cycle against the same second): \
         the changes cost the neighbour {:.2} % of its I/Os over {} create/delete cycles \
         (median of runs {} %); a cycle (4 changes) took {:.1} ms; \
         busy/quiet IOPS by this measure {:.3}; the same estimate on the quiet runs at \
         made-up times (its own error): {:.2} % over {} cycles",
        100.0 * lost_all.fraction(),
        lost_all.cycles,
        spread(&lost_runs, 100.0),
        lost_all.cycle_ms / lost_all.cycles.max(1) as f64,
        1.0 - lost_all.fraction(),
        100.0 * placebo.fraction(),
        placebo.cycles,
    );
    println!(
        "within the busy runs: p99 of every completion against p99 away from the changes, \
         median {}; the same on the quiet runs at made-up times: median {}",
        spread(&p99_in_run, 1.0),
        spread(&p99_placebo, 1.0),
    );
    Ok(())
}

/// "median (range min-max)" of `v`, each times `scale`.
fn spread(v: &[f64], scale: f64) -> String {
    let (lo, hi) = range(v);
    format!(
        "{:.3} (range {:.3}-{:.3})",
        scale * median(v),
        scale * lo,
        scale * hi
    )
}

fn main() -> ExitCode {
    let o = Opts::parse();
    match run(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("control-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
