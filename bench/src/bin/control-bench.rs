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
use quern_bench::job::Job;
use quern_bench::quern::{call, QuernChild};
use quern_bench::report::median;
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

/// One neighbour run: IOPS and p99 µs, with or without churn meanwhile.
fn neighbour_run(o: &Opts, q: &QuernChild, churn: bool) -> Result<(f64, f64, u64), String> {
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
    let churner = churn.then(|| {
        let (stop, changes, sock) = (stop.clone(), changes.clone(), q.socket.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let _ = quern_bench::pin_to_cpu(0);
            let mut c = Client::connect(&sock).map_err(|e| e.to_string())?;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
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
                i += 1;
                if let Some(rest) = Duration::from_secs(1).checked_sub(t.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            Ok(())
        })
    });
    let sock = q.socket.with_file_name("neighbour.sock");
    let v = quern_bench::client::run(&job, &sock, 0, false);
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = churner {
        t.join().map_err(|_| "churn thread panicked")??;
    }
    let v = v?;
    let r = &v["jobs"][0]["read"];
    Ok((
        r["iops"].as_f64().unwrap_or(0.0),
        r["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
        changes.load(Ordering::Relaxed),
    ))
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
    println!("\n| pair | order | quiet IOPS | busy IOPS | quiet p99 µs | busy p99 µs | changes |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for pair in 0..o.pairs {
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut got = [(0.0, 0.0, 0); 2];
        for busy in order {
            got[usize::from(busy)] = neighbour_run(o, &q, busy)?;
        }
        let (quiet, busy) = (got[0], got[1]);
        println!(
            "| {pair} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {} |",
            if order[0] {
                "busy first"
            } else {
                "quiet first"
            },
            quiet.0,
            busy.0,
            quiet.1,
            busy.1,
            busy.2
        );
        iops.push(busy.0 / quiet.0);
        p99.push(busy.1 / quiet.1);
    }
    println!(
        "\nbusy/quiet over {} pairs: IOPS median {:.3} (range {:.3}-{:.3}), p99 median {:.3} (range {:.3}-{:.3})",
        o.pairs,
        median(&iops),
        iops.iter().copied().fold(f64::INFINITY, f64::min),
        iops.iter().copied().fold(0.0, f64::max),
        median(&p99),
        p99.iter().copied().fold(f64::INFINITY, f64::min),
        p99.iter().copied().fold(0.0, f64::max),
    );
    Ok(())
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
