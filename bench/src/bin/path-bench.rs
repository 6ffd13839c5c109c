//! The data path's cost per request, in one thread: a queue poller over a
//! fake guest's ring, a null bdev, and the guest played in the same loop
//! (`quern_vhost::harness`). Variants (nothing extra, latency histograms,
//! QoS accounting with a limit that never binds, both, dirty logging on)
//! run in short slices, alternating, many rounds; per variant the median
//! ns per request and its ratio to nothing extra. No second thread and no
//! second process share the measurement, so the machine's speed drifting
//! between slices is all the noise there is.
//!
//! See bench/README.md; figures in bench/RESULTS.md.

use std::process::ExitCode;

use clap::Parser;
use quern_bench::report::median;
use quern_vhost::harness::{Features, Rig};

#[derive(Parser)]
#[command(name = "path-bench")]
struct Opts {
    /// Requests in flight (1..=85).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1u16, 32])]
    depth: Vec<u16>,
    /// Rounds (each runs every variant once, in rotating order).
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Requests per slice.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// A check that it runs: 2 rounds of 2,000 requests.
    #[arg(long)]
    smoke: bool,
    /// Only these variants (for an instruction count under
    /// `valgrind --tool=cachegrind`, one variant at a time).
    #[arg(long, value_delimiter = ',')]
    variant: Vec<String>,
}

const VARIANTS: [(&str, Features); 5] = [
    (
        "bare",
        Features {
            histograms: false,
            qos: false,
            dirty_log: false,
        },
    ),
    (
        "histograms",
        Features {
            histograms: true,
            qos: false,
            dirty_log: false,
        },
    ),
    (
        "qos",
        Features {
            histograms: false,
            qos: true,
            dirty_log: false,
        },
    ),
    (
        "histograms+qos",
        Features {
            histograms: true,
            qos: true,
            dirty_log: false,
        },
    ),
    (
        "dirty-log",
        Features {
            histograms: false,
            qos: false,
            dirty_log: true,
        },
    ),
];

fn run(o: &Opts) -> Result<(), String> {
    let (rounds, n) = if o.smoke {
        (2, 2_000)
    } else {
        (o.rounds, o.requests)
    };
    let _ = quern_bench::pin_to_cpu(1.min(quern_bench::online_cpus() - 1));
    let chosen: Vec<(&str, Features)> = VARIANTS
        .iter()
        .filter(|(name, _)| o.variant.is_empty() || o.variant.iter().any(|v| v == name))
        .copied()
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = VARIANTS.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "--variant {:?}: none of {}",
            o.variant,
            names.join(", ")
        ));
    }
    println!(
        "| depth | variant | rounds | ns/request (median) | range | vs {} (median of per-round ratios) |",
        chosen[0].0
    );
    println!("|---:|---|---:|---:|---|---:|");
    for &depth in &o.depth {
        let mut rigs: Vec<Rig> = chosen
            .iter()
            .map(|(_, f)| Rig::new(depth, *f).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        // warm up
        for r in &mut rigs {
            r.run(n / 10 + 1);
        }
        let mut ns = vec![Vec::new(); chosen.len()];
        for round in 0..rounds {
            for k in 0..chosen.len() {
                let v = (k + round) % chosen.len();
                let t = rigs[v].run(n);
                ns[v].push(t.as_nanos() as f64 / n as f64);
            }
        }
        for (v, (name, _)) in chosen.iter().enumerate() {
            let ratios: Vec<f64> = ns[v].iter().zip(&ns[0]).map(|(a, b)| a / b).collect();
            let lo = ns[v].iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ns[v].iter().copied().fold(0.0, f64::max);
            println!(
                "| {depth} | {name} | {rounds} | {:.1} | {lo:.1}-{hi:.1} | {:.3} |",
                median(&ns[v]),
                median(&ratios)
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let o = Opts::parse();
    match run(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("path-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
