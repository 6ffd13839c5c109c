//! Drive `IoEngine` with a `UringBdev` (O_DIRECT) on a file: 4k random read
//! and write at QD1 and QD32, then run fio on the same file with the same
//! shape and print quern/fio ratios.
//!
//! Usage: uring-bench [--file PATH] [--size 1G] [--runtime SECS] [--cpu N]
//!                    [--wait] [--no-fio] [--only randread|randwrite]
//!                    [--submit-batch N]
//!
//! By default the loop spins on flush/reap (polled mode, like a reactor);
//! `--wait` blocks in `submit_and_wait(1)` when a cycle reaped nothing.
//! `--submit-batch` is the engine's most SQEs per enter (0: a whole cycle's).

use std::alloc::{self, Layout};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use quern_bdev::drivers::{UringBdev, UringOptions};
use quern_bdev::{
    parse_size, Cookie, EngineConfig, IoEngine, IoKind, IoRequest, MergeConfig, PollerId,
};
use quern_bench::{pin_to_cpu, prepare_file, Rng};

const BS: usize = 4096;

/// IoEngine + UringBdev on a file against fio on the same file.
#[derive(Parser)]
#[command(name = "uring-bench")]
struct Opts {
    /// The file (created and filled with random data when missing or sparse).
    #[arg(long, default_value = "/var/tmp/quern-bench/disk.img")]
    file: PathBuf,
    #[arg(long, default_value = "1G", value_parser = size_arg)]
    size: u64,
    /// Seconds per case.
    #[arg(long, default_value_t = 5)]
    runtime: u64,
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Block in submit_and_wait(1) when a cycle reaped nothing.
    #[arg(long)]
    wait: bool,
    /// Do not run fio.
    #[arg(long)]
    no_fio: bool,
    /// Only this case.
    #[arg(long, value_parser = ["randread", "randwrite"])]
    only: Option<String>,
    /// The engine's most SQEs per enter (0: a whole cycle's).
    #[arg(long, default_value_t = quern_bdev::engine::DEFAULT_SUBMIT_BATCH)]
    submit_batch: usize,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

#[derive(Clone, Copy)]
struct Figures {
    iops: f64,
    mean_us: f64,
    p50_us: f64,
    p99_us: f64,
}

/// 4 KiB-aligned, zero-initialised-then-randomised buffers, allocated once.
struct Buffers {
    ptr: *mut u8,
    layout: Layout,
}

impl Buffers {
    fn new(count: usize, rng: &mut Rng) -> Result<Self, String> {
        let layout = Layout::from_size_align(count * BS, BS).map_err(|e| e.to_string())?;
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(format!("cannot allocate {} bytes of buffers", count * BS));
        }
        for i in 0..count * BS / 8 {
            // SAFETY: in bounds, and u64-aligned (base is 4k-aligned).
            unsafe { ptr.cast::<u64>().add(i).write(rng.next_u64()) };
        }
        Ok(Buffers { ptr, layout })
    }

    fn iov(&self, i: usize) -> libc::iovec {
        // SAFETY: caller passes i < count.
        libc::iovec {
            iov_base: unsafe { self.ptr.add(i * BS) }.cast(),
            iov_len: BS,
        }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

fn run_quern(o: &Opts, kind: IoKind, qd: usize) -> Result<Figures, String> {
    let bdev = UringBdev::open(&UringOptions {
        block_size: Some(4096),
        ..UringOptions::new("bench", o.file.clone())
    })
    .map_err(|e| format!("open {}: {e}", o.file.display()))?;
    if !bdev.is_direct() {
        return Err(format!(
            "O_DIRECT is not available on {} (tmpfs?)",
            o.file.display()
        ));
    }
    let cfg = EngineConfig {
        max_requests: 256,
        ring_entries: 256,
        bounce_buffers: 0,
        merge: MergeConfig::default(),
        submit_batch: o.submit_batch,
        ..EngineConfig::default()
    };
    let mut e = IoEngine::new(cfg).map_err(|e| format!("io_uring: {e}"))?;
    let dev = e
        .add_device(Arc::new(bdev))
        .map_err(|e| format!("add device: {e}"))?;
    let blocks = e.device_info(dev).map_or(0, |d| d.capacity_bytes) / BS as u64;
    if blocks == 0 {
        return Err(format!("{} is smaller than one block", o.file.display()));
    }
    let mut rng = Rng::new(0xbeef ^ qd as u64 ^ ((kind as u64) << 8));
    let bufs = Buffers::new(qd, &mut rng)?;
    let mut started = vec![Instant::now(); qd];
    let mut free: Vec<usize> = (0..qd).rev().collect();
    let mut ready: Vec<usize> = Vec::with_capacity(qd);
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut done: u64 = 0;
    let mut errors: u64 = 0;
    let runtime = Duration::from_secs(o.runtime);
    let t0 = Instant::now();
    let mut stop = false;
    loop {
        if !stop {
            while let Some(i) = free.pop() {
                let iov = [bufs.iov(i)];
                let r = IoRequest {
                    dev,
                    kind,
                    offset: rng.below(blocks) * BS as u64,
                    len: BS as u64,
                    iov: &iov,
                    fua: false,
                    cookie: Cookie::new(PollerId(0), i as u64),
                };
                started[i] = Instant::now();
                // SAFETY: `bufs` outlives the engine's use of it (every
                // request completes before this function returns).
                unsafe { e.submit(&r) }.map_err(|e| format!("submit: {e}"))?;
            }
        }
        e.flush();
        let n = e.reap(|cookie, res| {
            let i = cookie.tag() as usize;
            if res.is_err() {
                errors += 1;
            }
            ready.push(i);
        });
        if n > 0 {
            let now = Instant::now();
            for &i in &ready {
                let ns = now.duration_since(started[i]).as_nanos() as u64;
                hist.saturating_record(ns.max(1));
            }
            done += n as u64;
            free.append(&mut ready);
        } else if o.wait {
            let _ = e.ring().submit_and_wait(1);
        }
        if !stop && t0.elapsed() >= runtime {
            stop = true;
        }
        if stop && e.in_flight() == 0 {
            break;
        }
    }
    let el = t0.elapsed().as_secs_f64();
    if errors > 0 {
        return Err(format!("{errors} I/O errors"));
    }
    let st = e.stats();
    eprintln!(
        "  quern {kind} qd{qd}: {done} ios, {} ops, {} ring enters, {} bounced, {} merged ops",
        st.ops_started,
        st.ring_enters,
        st.bounced_ops,
        e.merge_stats().merged_ops
    );
    Ok(Figures {
        iops: done as f64 / el,
        mean_us: hist.mean() / 1000.0,
        p50_us: hist.value_at_quantile(0.50) as f64 / 1000.0,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

fn run_fio(o: &Opts, rw: &str, qd: usize) -> Option<Figures> {
    let args = fio_args(o, rw, qd);
    let out = match Command::new("fio").args(&args).output() {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            eprintln!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Err(e) => {
            eprintln!("cannot run fio: {e}");
            return None;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON
    let json = &text[text.find('{')?..];
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let dir = if rw == "randread" { "read" } else { "write" };
    let j = &v["jobs"][0][dir];
    let pct = |p: &str| j["clat_ns"]["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1000.0;
    Some(Figures {
        iops: j["iops"].as_f64()?,
        mean_us: j["lat_ns"]["mean"].as_f64()? / 1000.0,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

fn fio_args(o: &Opts, rw: &str, qd: usize) -> Vec<String> {
    vec![
        "--name=x".into(),
        format!("--filename={}", o.file.display()),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--rw={rw}"),
        "--bs=4k".into(),
        format!("--iodepth={qd}"),
        format!("--runtime={}", o.runtime),
        "--time_based".into(),
        format!("--cpus_allowed={}", o.cpu),
        "--output-format=json".into(),
    ]
}

fn main() -> std::process::ExitCode {
    let o = Opts::parse();
    match run(&o) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uring-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(o: &Opts) -> Result<(), String> {
    prepare_file(&o.file, o.size).map_err(|e| format!("{}: {e}", o.file.display()))?;
    if let Err(e) = pin_to_cpu(o.cpu) {
        eprintln!("warning: could not pin to cpu {}: {e}", o.cpu);
    }
    println!(
        "uring bdev: file {} ({} MiB), O_DIRECT, 4k, {} s per case, cpu {}, {} loop, submit_batch {}",
        o.file.display(),
        o.size >> 20,
        o.runtime,
        o.cpu,
        if o.wait {
            "wait (submit_and_wait)"
        } else {
            "spin (flush/reap)"
        },
        o.submit_batch
    );
    if !o.no_fio {
        println!(
            "fio: fio {}",
            fio_args(o, "<rw>", 0)
                .join(" ")
                .replace("--iodepth=0", "--iodepth=<qd>")
        );
    }
    println!();
    println!("| case | engine | IOPS | mean µs | p50 µs | p99 µs |");
    println!("|------|--------|-----:|--------:|-------:|-------:|");
    let mut ratios = Vec::new();
    for (rw, kind) in [("randread", IoKind::Read), ("randwrite", IoKind::Write)] {
        if o.only.as_deref().is_some_and(|x| x != rw) {
            continue;
        }
        for qd in [1usize, 32] {
            let q = run_quern(o, kind, qd)?;
            let row = |name: &str, f: &Figures| {
                println!(
                    "| {rw} qd{qd} | {name} | {:.0} | {:.1} | {:.1} | {:.1} |",
                    f.iops, f.mean_us, f.p50_us, f.p99_us
                );
            };
            row("quern", &q);
            let _ = std::io::stdout().flush();
            if !o.no_fio {
                if let Some(f) = run_fio(o, rw, qd) {
                    row("fio", &f);
                    ratios.push((format!("{rw} qd{qd}"), q.iops / f.iops));
                }
            }
        }
    }
    if !ratios.is_empty() {
        println!();
        println!("| case | quern/fio IOPS |");
        println!("|------|---------------:|");
        for (c, r) in &ratios {
            println!("| {c} | {r:.3} |");
        }
    }
    Ok(())
}
