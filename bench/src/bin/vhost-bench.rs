//! vhost-user-blk load generator (libblkio client) and a side-by-side
//! comparison of Quern, qemu-storage-daemon (several versions), SPDK and
//! fio. See bench/README.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use quern_bench::backends::{qsd_version, Backend, Flavor, Setup};
use quern_bench::compare::{self, Plan};
use quern_bench::job::{self, parse_size, Job};
use quern_bench::{client, root_dir};

#[derive(Parser)]
#[command(
    name = "vhost-bench",
    about = "vhost-user-blk benchmarks: a libblkio load generator and side-by-side backend comparisons"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Subcommand)]
enum Cmd {
    /// Drive an already running vhost-user-blk socket; fio-style JSON on stdout.
    Run {
        job: PathBuf,
        #[arg(long)]
        socket: PathBuf,
        /// Core for the client threads.
        #[arg(long, default_value_t = 0)]
        cpu: usize,
        /// Block in do_io for completions instead of spinning.
        #[arg(long)]
        wait: bool,
        /// Override the job's runtime (seconds).
        #[arg(long)]
        runtime: Option<u64>,
    },
    /// Connect, bind every queue with one read, stay idle and report the
    /// backend's CPU use.
    Idle {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value_t = 10)]
        secs: u64,
        #[arg(long, default_value_t = 1)]
        queues: usize,
    },
    /// The job against each backend, one at a time, in alternating passes.
    Compare(Box<CompareArgs>),
}

#[derive(clap::Args)]
struct CompareArgs {
    job: PathBuf,
    /// JSON per run, the generated quern.toml, backend logs, sockets.
    #[arg(long, default_value = "/var/tmp/quern-bench/vhost")]
    out: PathBuf,
    /// Backing file, created and filled with random data once.
    #[arg(long, default_value = "/var/tmp/quern-bench/disk.img")]
    file: PathBuf,
    /// Size of the backing file / of the null devices.
    #[arg(long, default_value = "1G", value_parser = size_arg)]
    size: u64,
    /// Quern's [reactor] poll_mode.
    #[arg(long, default_value = "busy")]
    poll: String,
    /// Quern's [merge] enabled.
    #[arg(long, value_enum, default_value = "on")]
    merge: OnOff,
    /// Null devices everywhere (Quern `null`, qsd `null-co`, SPDK null bdev); no fio.
    #[arg(long)]
    null: bool,
    /// Backends in the order of the first pass: quern, qsd (every --qsd binary), spdk, fio;
    /// quern-bare (no histograms, no QoS: the default, said explicitly), quern-hist
    /// (latency histograms on) and quern-metered (histograms and a QoS limit that
    /// never binds) measure what those features cost; quern-noevidx is
    /// Quern not offering EVENT_IDX (`event_idx = false`); quern-base runs the
    /// `--quern-base` build, to measure a change against the build before it
    /// (quern-base-bare, -hist, -metered, -noevidx: that build in a flavor);
    /// fio-spin is fio with a thread spinning on the client's core, the load
    /// a polling client puts on it (a busy vCPU can slow a VM's own disk).
    #[arg(long, default_value = "quern,qsd,spdk,fio", value_delimiter = ',')]
    backends: Vec<String>,
    #[arg(long, default_value = "target/release/quern")]
    quern: PathBuf,
    /// Another `quern` binary (for example built from an earlier commit in a
    /// git worktree), measured as the backend quern-base.
    #[arg(long)]
    quern_base: Option<PathBuf>,
    /// The client sleeps until a completion comes (kicks and call
    /// notifications, as a guest runs) instead of polling.
    #[arg(long)]
    client_wait: bool,
    /// qemu-storage-daemon binaries, each measured and labelled with its
    /// version (default: the one in PATH, and 7.2 from
    /// target/peers/qsd-7.2 when bench/peers/fetch-qsd.sh has put it there).
    #[arg(long)]
    qsd: Vec<PathBuf>,
    /// SPDK's vhost application (or $SPDK_VHOST); spdk is skipped without it.
    #[arg(long, env = "SPDK_VHOST")]
    spdk_vhost: Option<PathBuf>,
    /// SPDK's scripts/rpc.py (or $SPDK_RPC).
    #[arg(long, env = "SPDK_RPC")]
    spdk_rpc: Option<PathBuf>,
    /// Block-layer merging of the backing file's disk (off: nomerges=2 for
    /// the run, restored after; root).
    #[arg(long, value_enum, default_value = "on")]
    kernel_merges: OnOff,
    /// Quern's [reactor] submit_batch.
    #[arg(long)]
    submit_batch: Option<usize>,
    /// Quern's [merge] max_bytes.
    #[arg(long, value_parser = size_arg)]
    merge_max_bytes: Option<u64>,
    /// Alternating passes (backends in order, then reversed, ...); ratios
    /// are medians over the pairs.
    #[arg(long, default_value_t = 1)]
    pairs: usize,
    /// Override the job's runtime (seconds).
    #[arg(long)]
    runtime: Option<u64>,
    /// A check that the benchmark runs, not a measurement: 1 s runs on 64 MiB.
    #[arg(long)]
    smoke: bool,
    /// Core the backends run on (the client runs on the other one).
    #[arg(long, default_value_t = 1)]
    backend_cpu: usize,
    /// Two Quern builds or flavors, both running, measured in alternating
    /// windows of this many milliseconds (the other stopped), `--pairs`
    /// pairs of them: adjacent windows share this machine's speed phase.
    /// Null or file, one queue, a polling client or (`--client-wait`) a sleeping one.
    #[arg(long)]
    interleave_ms: Option<u64>,
    /// With --interleave-ms: rounds, each with both backends started
    /// afresh (one process can be faster than another of the same build
    /// for its whole life); --pairs pairs of windows per round.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| format!("`{s}` is not a size (e.g. 64M, 1G)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run {
            job,
            socket,
            cpu,
            wait,
            runtime,
        } => load_job(&job, runtime).and_then(|j| {
            let v = client::run(&j, &socket, cpu, wait)?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(())
        }),
        Cmd::Idle {
            socket,
            pid,
            secs,
            queues,
        } => client::idle(&socket, queues, pid, secs).map(|v| {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }),
        Cmd::Compare(a) => run_compare(*a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_job(path: &Path, runtime: Option<u64>) -> Result<Job, String> {
    let mut j = job::load(path)?;
    if let Some(r) = runtime {
        j.runtime_secs = r;
    }
    Ok(j)
}

fn run_compare(a: CompareArgs) -> Result<(), String> {
    let mut job = load_job(&a.job, a.runtime)?;
    let mut size = a.size;
    let mut pairs = a.pairs.max(1);
    if a.smoke {
        job.runtime_secs = 1;
        job.size = Some(job.size.unwrap_or(64 << 20).min(64 << 20));
        size = size.min(64 << 20);
        pairs = 1;
    }
    let cpus = quern_bench::online_cpus();
    if a.backend_cpu >= cpus {
        return Err(format!(
            "--backend-cpu {} does not exist ({cpus} cores)",
            a.backend_cpu
        ));
    }
    let setup = Setup {
        out: a.out,
        file: a.file,
        size,
        null: a.null,
        quern: a.quern,
        poll: a.poll,
        merge: a.merge == OnOff::On,
        submit_batch: a.submit_batch,
        merge_max_bytes: a.merge_max_bytes,
        backend_cpu: a.backend_cpu,
        client_wait: a.client_wait,
        client_cpu: if a.backend_cpu == 0 {
            1.min(cpus - 1)
        } else {
            0
        },
    };
    let mut backends = Vec::new();
    for name in &a.backends {
        if let Some(flavor) = Flavor::from_name(name, "quern") {
            if !setup.quern.exists() {
                return Err(format!(
                    "{} missing: cargo build --release -p quern",
                    setup.quern.display()
                ));
            }
            backends.push(Backend::Quern(flavor));
            continue;
        }
        if name == "quern-base" || name.starts_with("quern-base-") {
            let flavor = Flavor::from_name(name, "quern-base").ok_or_else(|| {
                format!(
                    "unknown backend {name}: quern-base takes the suffixes of the Quern \
                     flavors (-bare, -hist, -metered, -noevidx)"
                )
            })?;
            match &a.quern_base {
                Some(b) if b.exists() => backends.push(Backend::QuernBase(b.clone(), flavor)),
                Some(b) => return Err(format!("--quern-base {} does not exist", b.display())),
                None => return Err(format!("the backend {name} needs --quern-base PATH")),
            }
            continue;
        }
        match name.as_str() {
            "qsd" => backends.extend(qsd_backends(&a.qsd)),
            "spdk" => match (&a.spdk_vhost, &a.spdk_rpc) {
                (Some(v), Some(r)) if v.exists() && r.exists() => backends.push(Backend::Spdk {
                    vhost: v.clone(),
                    rpc: r.clone(),
                }),
                (Some(v), Some(r)) => {
                    return Err(format!(
                        "SPDK: {} or {} does not exist",
                        v.display(),
                        r.display()
                    ))
                }
                _ => eprintln!(
                    "skipping spdk: give --spdk-vhost and --spdk-rpc (or SPDK_VHOST and SPDK_RPC)"
                ),
            },
            "fio" | "fio-spin" => {
                if which("fio") {
                    backends.push(Backend::Fio {
                        spin: name == "fio-spin",
                    })
                } else {
                    eprintln!("skipping fio: not in PATH (apt-get install fio)")
                }
            }
            other => {
                return Err(format!(
                    "unknown backend `{other}` (quern, quern-bare, quern-hist, quern-metered, quern-noevidx, quern-base[-flavor], qsd, spdk, fio or fio-spin)"
                ))
            }
        }
    }
    if backends.is_empty() {
        return Err("no backend to measure".into());
    }
    if let Some(ms) = a.interleave_ms {
        if !a.smoke {
            quern_bench::compare::check_alone("vhost-bench compare")?;
        }
        let rounds = if a.smoke { 2 } else { a.rounds };
        return quern_bench::interleave::run(&job, &setup, &backends, rounds, pairs, ms);
    }
    let plan = Plan {
        setup,
        backends,
        passes: pairs,
        kernel_merges_off: a.kernel_merges == OnOff::Off,
        exclusive: !a.smoke,
    };
    compare::run(&job, &plan).map(|_| ())
}

/// The qemu-storage-daemon builds to measure, each with its version; a
/// missing one is skipped with a message.
fn qsd_backends(given: &[PathBuf]) -> Vec<Backend> {
    let mut bins: Vec<PathBuf> = given.to_vec();
    if bins.is_empty() {
        bins.push("qemu-storage-daemon".into());
        let old = root_dir().join("target/peers/qsd-7.2/usr/bin/qemu-storage-daemon");
        if old.exists() {
            bins.push(old);
        } else {
            eprintln!(
                "qemu-storage-daemon 7.2 not found under target/peers: run bench/peers/fetch-qsd.sh 7.2 \
                 to compare with it too (it is up to three times cheaper per I/O than 10.0)"
            );
        }
    }
    bins.into_iter()
        .filter_map(|bin| match qsd_version(&bin) {
            Ok(version) => Some(Backend::Qsd { bin, version }),
            Err(e) => {
                eprintln!("skipping qemu-storage-daemon {}: {e}", bin.display());
                None
            }
        })
        .collect()
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}
