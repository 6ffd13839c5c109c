//! Two backends (Quern builds or flavors, or SPDK) measured in short
//! alternating windows (`vhost-bench compare --interleave-ms N`).
//!
//! This machine has speed phases that last a second or more and move any
//! process's throughput by up to 2×, so passes a second long, one backend
//! after the other, compare phases as much as backends. Here both backends
//! run at once on the backend core, the one not being measured stopped
//! (SIGSTOP), and one client drives them in turn, a window of a few
//! milliseconds each: start the job's queue depth, keep it full until the
//! window ends, drain, stop that backend, continue the other. Adjacent
//! windows fall in the same phase, so the ratio of a pair of windows is
//! the backends' ratio. The first 2 ms of a window (caches and the TLB
//! after the switch, the same for both) are not counted.
//!
//! One process can also be faster than another of the same build for as
//! long as it lives (where its memory landed: two instances of one build
//! measured this way differed by up to 13 %). So the measurement runs in
//! rounds, each with both backends started afresh (which starts first
//! alternates), and the figure is the median over rounds of each round's
//! ratio.
//!
//! The client polls, or (`--client-wait`) sleeps in `do_io` until a
//! completion comes, as a guest does. Either way its CPU time per I/O in
//! each window is kept too: with a sleeping client the client is not the
//! bottleneck, so IOPS alone does not show what a backend makes it pay.

use std::mem::MaybeUninit;
use std::path::PathBuf;

use blkio::{Blkio, Completion, ReqFlags};
use hdrhistogram::Histogram;

use crate::backends::{quern_toml, start_spdk, taskset, Backend, Proc, Setup};
use crate::client::{blkio_err, connect, new_histogram, thread_cpu_ns};
use crate::clock::{ns_per_tick, ticks};
use crate::job::Job;
use crate::report::median;
use crate::{pin_to_cpu, Rng};

/// Ticks not counted at the start of a window.
const WARM_MS: f64 = 2.0;

/// One of the two backends in one round: its process and its client.
struct Side {
    label: String,
    proc: Proc,
    blkio: Blkio,
    q: blkio::Blkioq,
    base: usize,
}

/// What one backend measured over every round.
struct Tally {
    label: String,
    /// IOPS in each measured window.
    iops: Vec<f64>,
    /// The client's CPU ns per I/O in each measured window.
    cpu_ns: Vec<f64>,
    /// Latency of every counted request, ticks.
    hist: Histogram<u64>,
    /// The same, over the current round only.
    round: Histogram<u64>,
    /// The same, over the current window only (scratch).
    win: Histogram<u64>,
    /// The p50 of each measured window, µs.
    p50_us: Vec<f64>,
}

impl Side {
    fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.proc.pid() as i32, sig) };
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        // a stopped process takes its SIGTERM (Proc's drop) only once it runs
        self.signal(libc::SIGCONT);
    }
}

fn start(job: &Job, s: &Setup, b: &Backend, i: usize) -> Result<Side, String> {
    let dir: PathBuf = s.out.join(format!("interleave-{i}"));
    let (proc, sock) =
        match b {
            Backend::Spdk { vhost, rpc } => {
                let (p, sock, _) = start_spdk(vhost, rpc, s, &dir)?;
                (p, sock)
            }
            Backend::Quern(_) | Backend::QuernBase(..) => {
                let (bin, flavor) = match b {
                    Backend::QuernBase(p, f) => (p.clone(), *f),
                    Backend::Quern(f) => (s.quern.clone(), *f),
                    _ => unreachable!("matched above"),
                };
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(dir.join("state"))
                    .map_err(|e| format!("{}: {e}", dir.display()))?;
                let sock = dir.join("bench.sock");
                let cfg = dir.join("quern.toml");
                std::fs::write(&cfg, quern_toml(job, s, flavor, &dir.join("state"), &sock))
                    .map_err(|e| format!("{}: {e}", cfg.display()))?;
                let mut proc = Proc::spawn(
                    "quern",
                    taskset(s, &bin).arg("--config").arg(&cfg),
                    &dir.join("quern.log"),
                )?;
                proc.wait_ready(|| sock.exists())?;
                (proc, sock)
            }
            _ => return Err(
                "--interleave-ms compares Quern builds or flavors and SPDK (quern, quern-bare, \
                 quern-hist, quern-metered, quern-noevidx, quern-base[-flavor], spdk)"
                    .into(),
            ),
        };
    let (mut blkio, mut started) = connect(&sock, 1, job.is_read())?;
    let len = (job.iodepth * job.bs).div_ceil(2 << 20) * (2 << 20);
    let region = blkio
        .alloc_mem_region(len)
        .map_err(blkio_err("alloc_mem_region"))?;
    blkio
        .map_mem_region(&region)
        .map_err(blkio_err("map_mem_region"))?;
    let q = started.queues.pop().ok_or("libblkio started no queue")?;
    Ok(Side {
        label: b.label(s),
        proc,
        blkio,
        q,
        base: region.addr,
    })
}

/// One window on `side`: the job's queue depth kept full for `win` ticks;
/// `wait`: sleep in `do_io` for completions instead of polling.
#[allow(clippy::too_many_arguments)]
fn window(
    side: &mut Side,
    tally: &mut Tally,
    job: &Job,
    blocks: u64,
    rng: &mut Rng,
    win: u64,
    warm: u64,
    scale: f64,
    wait: bool,
) -> Result<(), String> {
    let read = job.is_read();
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..job.iodepth).map(|_| MaybeUninit::uninit()).collect();
    let mut t_sub = vec![0u64; job.iodepth];
    side.signal(libc::SIGCONT);
    let t0 = ticks();
    // a sleeping client is watched in this window until it returns, by
    // any path (`watchdog`: it waits with no timeout)
    let watch = wait.then(crate::watchdog::watch);
    let (t_count, t_end) = (t0 + warm, t0 + win);
    let give_up = (5e9 / scale) as u64;
    let submit = |q: &mut blkio::Blkioq, slot: usize, off: u64| {
        let p = (side.base + slot * job.bs) as *mut u8;
        if read {
            q.read(off, p, job.bs, slot, ReqFlags::empty());
        } else {
            q.write(off, p, job.bs, slot, ReqFlags::empty());
        }
    };
    for (slot, t) in t_sub.iter_mut().enumerate() {
        *t = ticks();
        submit(&mut side.q, slot, rng.below(blocks) * job.bs as u64);
    }
    let (mut inflight, mut n) = (job.iodepth, 0u64);
    let mut failed = None;
    // the client's CPU time over the counted part of the window
    let (mut cpu_from, mut cpu_to) = (None, None);
    while inflight > 0 {
        let k = if wait {
            // no timeout: see `watchdog`
            side.q
                .do_io(&mut comps, 1, None, None)
                .map_err(|e| format!("{}: do_io: {e}", side.label))?
        } else {
            side.q
                .do_io(&mut comps, 0, None, None)
                .map_err(|e| format!("{}: do_io: {e}", side.label))?
        };
        if k == 0 {
            if ticks() > t_end + give_up {
                side.signal(libc::SIGSTOP);
                return Err(format!(
                    "{}: {inflight} requests unanswered 5 s after the window ended",
                    side.label
                ));
            }
            continue;
        }
        let now = ticks();
        if let Some(w) = &watch {
            w.progress(now);
        }
        if now >= t_count && cpu_from.is_none() {
            cpu_from = Some((thread_cpu_ns(), n));
        }
        if now >= t_end && cpu_to.is_none() {
            cpu_to = Some((thread_cpu_ns(), n));
        }
        for c in &comps[..k] {
            // SAFETY: do_io initialised the first k entries.
            let c = unsafe { c.assume_init_read() };
            inflight -= 1;
            if c.ret != 0 {
                failed.get_or_insert(c.ret);
                continue;
            }
            let slot = c.user_data;
            if now >= t_count && now < t_end {
                n += 1;
                tally
                    .win
                    .saturating_record(now.saturating_sub(t_sub[slot]).max(1));
            }
            if now < t_end && failed.is_none() {
                t_sub[slot] = ticks();
                submit(&mut side.q, slot, rng.below(blocks) * job.bs as u64);
                inflight += 1;
            }
        }
    }
    side.signal(libc::SIGSTOP);
    if let Some(ret) = failed {
        return Err(format!(
            "{}: a {} failed with {ret} ({})",
            side.label,
            job.direction(),
            std::io::Error::from_raw_os_error(-ret)
        ));
    }
    tally
        .iops
        .push(n as f64 / ((t_end - t_count) as f64 * scale / 1e9));
    tally
        .p50_us
        .push(tally.win.value_at_quantile(0.5) as f64 * scale / 1000.0);
    // (both share the window's bounds: adding cannot fail)
    let _ = tally.hist.add(&tally.win);
    let _ = tally.round.add(&tally.win);
    tally.win.reset();
    if let (Some((c0, n0)), Some((c1, n1))) = (cpu_from, cpu_to) {
        if n1 > n0 {
            tally.cpu_ns.push((c1 - c0) as f64 / (n1 - n0) as f64);
        }
    }
    Ok(())
}

/// Measure `backends` (two Quern builds or flavors, or Quern and SPDK) in
/// `rounds` rounds
/// of `pairs` pairs of windows of `window_ms` each, alternating which goes
/// first; prints the table and the ratio of the first to the second.
pub fn run(
    job: &Job,
    s: &Setup,
    backends: &[Backend],
    rounds: usize,
    pairs: usize,
    window_ms: u64,
) -> Result<(), String> {
    let [a, b] = backends else {
        return Err(format!(
            "--interleave-ms compares two backends, not {}",
            backends.len()
        ));
    };
    if job.numjobs != 1 {
        return Err("--interleave-ms drives one queue (numjobs = 1)".into());
    }
    if !s.null && !s.file.exists() {
        return Err(format!(
            "{} does not exist: a compare without --interleave-ms creates and fills it",
            s.file.display()
        ));
    }
    let scale = ns_per_tick();
    std::fs::create_dir_all(&s.out).map_err(|e| format!("{}: {e}", s.out.display()))?;
    let _ = pin_to_cpu(s.client_cpu);
    let win = (window_ms as f64 * 1e6 / scale) as u64;
    let warm = (WARM_MS * 1e6 / scale) as u64;
    if win <= warm {
        return Err(format!("--interleave-ms must exceed {WARM_MS} ms"));
    }
    let mut tallies = [a, b].map(|x| Tally {
        label: x.label(s),
        iops: Vec::new(),
        cpu_ns: Vec::new(),
        hist: new_histogram(),
        round: new_histogram(),
        win: new_histogram(),
        p50_us: Vec::new(),
    });
    let mut ratios = Vec::new();
    let mut p50_deltas = Vec::new();
    let mut cpu_ratios = Vec::new();
    let mut rng = Rng::new(7);
    for round in 0..rounds.max(1) {
        // fresh processes, started in turn first
        let mut sides = if round % 2 == 0 {
            let x = start(job, s, a, 0)?;
            [x, start(job, s, b, 1)?]
        } else {
            let y = start(job, s, b, 1)?;
            [start(job, s, a, 0)?, y]
        };
        // (asks the backends: before they are stopped)
        let mut capacity = u64::MAX;
        for side in &sides {
            capacity = capacity.min(
                side.blkio
                    .get_u64("capacity")
                    .map_err(blkio_err("capacity"))?,
            );
        }
        for side in &sides {
            side.signal(libc::SIGSTOP);
        }
        let blocks = job.size.unwrap_or(capacity).min(capacity) / job.bs as u64;
        if blocks == 0 {
            return Err(format!("the device's {capacity} bytes hold no block"));
        }
        let from = tallies[0].iops.len();
        let cpu_from = [tallies[0].cpu_ns.len(), tallies[1].cpu_ns.len()];
        for p in 0..pairs.max(1) {
            let order = if p % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                window(
                    &mut sides[i],
                    &mut tallies[i],
                    job,
                    blocks,
                    &mut rng,
                    win,
                    warm,
                    scale,
                    s.client_wait,
                )?;
            }
        }
        let sum = |t: &Tally| t.iops[from..].iter().sum::<f64>();
        let r = sum(&tallies[0]) / sum(&tallies[1]);
        let cpu = |i: usize| {
            let w = &tallies[i].cpu_ns[cpu_from[i]..];
            w.iter().sum::<f64>() / w.len().max(1) as f64
        };
        let rc = cpu(0) / cpu(1);
        let p50 = |t: &Tally| t.round.value_at_quantile(0.5) as f64 * scale / 1000.0;
        let dp50 = p50(&tallies[0]) - p50(&tallies[1]);
        for t in &mut tallies {
            t.round.reset();
        }
        eprintln!(
            "round {round}: {}/{} IOPS {r:.3}, client CPU per I/O {rc:.3}, p50 {dp50:+.3} µs",
            tallies[0].label, tallies[1].label
        );
        p50_deltas.push(dp50);
        ratios.push(r);
        if rc.is_finite() {
            cpu_ratios.push(rc);
        }
    }
    let quartiles = |v: &[f64]| {
        let mut sorted = v.to_vec();
        sorted.sort_by(f64::total_cmp);
        let q = |f: f64| sorted[((sorted.len() - 1) as f64 * f).round() as usize];
        [q(0.25), q(0.75), q(0.0), q(1.0)]
    };
    let [q25, q75, q0, q100] = quartiles(&ratios);
    let windows: Vec<f64> = tallies[0]
        .iops
        .iter()
        .zip(&tallies[1].iops)
        .map(|(x, y)| x / y)
        .collect();
    let us = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 * scale / 1000.0;
    println!(
        "\n{} ({}): {} rounds (both backends started afresh) of {} pairs of {window_ms} ms \
         windows, alternating, the first {WARM_MS} ms of each not counted\n",
        job.name,
        if s.null { "null" } else { "file" },
        ratios.len(),
        pairs.max(1)
    );
    println!(
        "| backend | windows | IOPS (median of windows) | p50 µs | p99 µs | client CPU ns/IO (median of windows) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for t in &tallies {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.0} |",
            t.label,
            t.iops.len(),
            median(&t.iops),
            us(&t.hist, 0.5),
            us(&t.hist, 0.99),
            median(&t.cpu_ns)
        );
    }
    println!(
        "\n{}/{}: IOPS, median of {} rounds {:.3} (quartiles {:.3}-{:.3}; range {:.3}-{:.3}); \
         median of {} window pairs {:.3}; p50 {:+.3} µs, p99 {:+.3} µs",
        tallies[0].label,
        tallies[1].label,
        ratios.len(),
        median(&ratios),
        q25,
        q75,
        q0,
        q100,
        windows.len(),
        median(&windows),
        us(&tallies[0].hist, 0.5) - us(&tallies[1].hist, 0.5),
        us(&tallies[0].hist, 0.99) - us(&tallies[1].hist, 0.99),
    );
    // The p50 above is of every request of all rounds, so a phase that
    // happened to hold more of one backend's requests moves it; paired
    // like the IOPS ratio it is not: the difference of each round's p50s
    // and of each pair of adjacent windows.
    let pair_p50: Vec<f64> = tallies[0]
        .p50_us
        .iter()
        .zip(&tallies[1].p50_us)
        .map(|(x, y)| x - y)
        .collect();
    let [d25, d75, d0, d100] = quartiles(&p50_deltas);
    let [w25, w75, ..] = quartiles(&pair_p50);
    println!(
        "{}/{}: p50 difference, median of {} rounds {:+.3} µs (quartiles {:+.3} to {:+.3}; range {:+.3} to {:+.3}); \
         median of {} window pairs {:+.3} µs (quartiles {:+.3} to {:+.3})",
        tallies[0].label,
        tallies[1].label,
        p50_deltas.len(),
        median(&p50_deltas),
        d25,
        d75,
        d0,
        d100,
        pair_p50.len(),
        median(&pair_p50),
        w25,
        w75,
    );
    if !cpu_ratios.is_empty() {
        let [c25, c75, c0, c100] = quartiles(&cpu_ratios);
        println!(
            "{}/{}: the {} client's CPU per I/O, median of {} rounds {:.3} (quartiles {:.3}-{:.3}; range {:.3}-{:.3})",
            tallies[0].label,
            tallies[1].label,
            if s.client_wait { "sleeping" } else { "polling" },
            cpu_ratios.len(),
            median(&cpu_ratios),
            c25,
            c75,
            c0,
            c100,
        );
    }
    Ok(())
}
