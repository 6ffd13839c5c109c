//! `vhost-bench compare`: the same job against each backend, one backend
//! at a time, in alternating passes (backends in order, then reversed, ...)
//! so that a machine's slow phases fall on both sides; then the medians of
//! the per-pair ratios.
//!
//! Never two backends at once: before each run, any backend process still
//! alive (ours or anyone's) stops the comparison with its pid and name,
//! since a busy-polling neighbour on the same core makes the measured one
//! look several times slower.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::backends::{self, Backend, Setup};
use crate::job::Job;
use crate::report::{self, Row};

/// What `compare` was asked to do.
pub struct Plan {
    pub setup: Setup,
    pub backends: Vec<Backend>,
    /// Alternating passes over the backends.
    pub passes: usize,
    /// Set the backing disk's `nomerges=2` for the runs (root).
    pub kernel_merges_off: bool,
    /// Refuse to measure while another backend runs (off for smoke runs,
    /// which check that the benchmark works, not what it measures: then a
    /// warning).
    pub exclusive: bool,
}

fn mode(p: &Plan) -> &'static str {
    match (p.setup.null, p.kernel_merges_off) {
        (true, _) => "null",
        (false, false) => "file",
        (false, true) => "file-nomerges",
    }
}

/// Refuse to start a backend while another one runs.
pub fn check_alone(label: &str) -> Result<(), String> {
    let others = crate::proc::running_backends(&[]);
    if others.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = others
        .iter()
        .map(|(p, n)| format!("{n} (pid {p})"))
        .collect();
    Err(format!(
        "not measuring {label}: {} still running; a busy-polling backend beside the \
         measured one makes its figures wrong (stop it first)",
        list.join(", ")
    ))
}

pub fn run(job: &Job, plan: &Plan) -> Result<Value, String> {
    let s = &plan.setup;
    std::fs::create_dir_all(&s.out).map_err(|e| format!("{}: {e}", s.out.display()))?;
    if !s.null {
        crate::prepare_file(&s.file, s.size)
            .map_err(|e| format!("backing file {}: {e}", s.file.display()))?;
    }
    let _nomerges = if plan.kernel_merges_off && !s.null {
        Some(NoMerges::set(&s.file)?)
    } else {
        None
    };
    let _ = crate::pin_to_cpu(s.client_cpu);
    let mode = mode(plan);
    let mut passes: Vec<Vec<Row>> = Vec::new();
    let mut series = Vec::new();
    for pass in 0..plan.passes {
        let mut order: Vec<&Backend> = plan.backends.iter().collect();
        if pass % 2 == 1 {
            order.reverse();
        }
        let mut rows = Vec::new();
        for b in order {
            let label = b.label(s);
            if let Err(e) = check_alone(&label) {
                if plan.exclusive {
                    return Err(e);
                }
                eprintln!("warning (smoke run): {e}");
            }
            if let Ok(busy) =
                crate::proc::core_busy_share(s.backend_cpu, Duration::from_millis(200))
            {
                if busy > 0.2 {
                    eprintln!(
                        "warning: core {} is {:.0}% busy before {label} starts: its figures may be low",
                        s.backend_cpu,
                        busy * 100.0
                    );
                }
            }
            let Some(m) = backends::measure(b, job, s).map_err(|e| format!("{label}: {e}"))? else {
                continue;
            };
            let path = s
                .out
                .join(format!("{}-{mode}-{label}-{pass}.json", job.name));
            let text = serde_json::to_string_pretty(&m.json).map_err(|e| e.to_string())?;
            std::fs::write(&path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
            let row = Row::from_json(&label, &m.json, job, m.cpu_secs);
            eprintln!(
                "pass {pass}: {label}: {:.0} IOPS, p50 {:.1} µs, p99 {:.1} µs, cpu {:.2} s{}{}{} -> {}",
                row.iops,
                row.p50_us,
                row.p99_us,
                row.cpu_secs,
                row.reactor_ns_per_io
                    .map_or(String::new(), |n| format!(", reactor {n:.0} ns/IO")),
                row.client
                    .filter(|c| !c.0.is_nan())
                    .map_or(String::new(), |c| format!(", client busy {:.0}% {:.0} ns/IO", c.0 * 100.0, c.1)),
                match (
                    m.json["vhost_bench_client"]["completions_per_wait"].as_f64(),
                    m.json["vhost_bench_client"]["cpu_ns_per_io"].as_f64(),
                ) {
                    (Some(w), Some(c)) => format!(", client {w:.1} completions per wake, CPU {c:.0} ns/IO"),
                    _ => String::new(),
                },
                path.display()
            );
            if pass == 0 {
                series.push((label.clone(), report::percentiles(&m.json, job)));
            }
            rows.push(row);
        }
        passes.push(rows);
    }
    println!(
        "\n{} ({mode}): rw={} bs={} iodepth={} numjobs={} runtime={}s poll={} merge={}{}{} client={}, {} pass(es)",
        job.name,
        job.rw,
        job.bs,
        job.iodepth,
        job.numjobs,
        job.runtime_secs,
        s.poll,
        if s.merge { "on" } else { "off" },
        s.submit_batch
            .map_or(String::new(), |b| format!(" submit_batch={b}")),
        s.merge_max_bytes
            .map_or(String::new(), |b| format!(" merge_max_bytes={b}")),
        if s.client_wait { "waiting" } else { "polling" },
        plan.passes
    );
    let summary = report::summarize(job, &passes);
    let svg = s.out.join(format!("{}-{mode}-latency.svg", job.name));
    std::fs::write(
        &svg,
        crate::plot::latency_svg(&format!("{} ({mode})", job.name), &series),
    )
    .map_err(|e| format!("{}: {e}", svg.display()))?;
    eprintln!("latency plot -> {}", svg.display());
    let out = json!({"job": job.name, "mode": mode, "passes": plan.passes, "ratios": summary});
    let path = s.out.join(format!("{}-{mode}-summary.json", job.name));
    let mut f = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(
        f,
        "{}",
        serde_json::to_string_pretty(&out).unwrap_or_default()
    )
    .map_err(|e| e.to_string())?;
    Ok(out)
}

/// The block-layer merge switch of the disk under `file`
/// (`/sys/dev/block/MAJ:MIN/queue/nomerges`, or the partition's parent's).
fn nomerges_path(file: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(file)
        .map_err(|e| format!("{}: {e}", file.display()))?
        .dev();
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    if maj == 0 {
        return Err(format!(
            "{} is not on a block device (device {maj}:{min})",
            file.display()
        ));
    }
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{maj}:{min}"))
        .map_err(|e| format!("/sys/dev/block/{maj}:{min}: {e}"))?;
    [sys.join("queue/nomerges"), sys.join("../queue/nomerges")]
        .into_iter()
        .find(|p| p.exists())
        .ok_or_else(|| format!("no queue/nomerges for {}", sys.display()))
}

/// Sets `nomerges=2` while alive, and puts the old value back on drop.
struct NoMerges {
    path: PathBuf,
    old: String,
}

impl NoMerges {
    fn set(file: &Path) -> Result<Self, String> {
        let path = nomerges_path(file)?;
        let old = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::write(&path, "2").map_err(|e| format!("{}: {e} (needs root)", path.display()))?;
        eprintln!(
            "kernel merging off: {} = 2 (was {})",
            path.display(),
            old.trim()
        );
        Ok(NoMerges { path, old })
    }
}

impl Drop for NoMerges {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, self.old.trim()) {
            eprintln!("could not restore {}: {e}", self.path.display());
        }
    }
}
