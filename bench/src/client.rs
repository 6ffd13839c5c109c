//! The load generator: a libblkio `virtio-blk-vhost-user` client that
//! drives any vhost-user-blk socket with a [`Job`] and reports fio-style
//! JSON.
//!
//! One thread per queue (`numjobs` = queues), `iodepth` requests in flight
//! per queue, each slot resubmitted as soon as it completes. By default the
//! threads busy-poll completions (`do_io` with `min_completions = 0`);
//! `wait` blocks in `do_io` instead. Latency is submit-to-completion per
//! request, in TSC ticks, kept in an hdrhistogram.

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::clock::{ns_per_tick, ticks};
use crate::job::Job;
use crate::{pin_to_cpu, Rng};

/// Percentiles reported, as fio does.
pub const PERCENTILES: [f64; 8] = [1.0, 5.0, 10.0, 50.0, 90.0, 99.0, 99.9, 99.99];

/// Per-thread result.
struct ThreadOut {
    ios: u64,
    hist: Histogram<u64>,
    /// Time spent in polls that returned completions and in handling them
    /// (resubmitting), in ticks, and the run's length in them.
    busy_ticks: u64,
    run_ticks: u64,
    polls: u64,
    empty_polls: u64,
    /// The thread's CPU time (user and system) over the measured run.
    cpu_ns: u64,
    /// Completions per bin of the run's timeline (empty: not kept).
    timeline: Vec<u64>,
    /// Latencies of the completions reaped while the timeline's mark was
    /// down.
    unmarked: Histogram<u64>,
}

/// Completions counted in bins of `bin_ticks` TSC ticks from `origin`
/// (a [`ticks`] reading), to line a run up with events beside it.
/// While `mark` is up (something beside the run is happening), the
/// completions reaped are left out of a second latency histogram, which
/// then holds the run's latencies away from those moments.
#[derive(Clone, Debug)]
pub struct TimelineSpec {
    pub origin: u64,
    pub bin_ticks: u64,
    pub mark: Arc<AtomicBool>,
}

/// This thread's CPU time, user and system, in ns.
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

pub(crate) fn blkio_err(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A libblkio client on `socket` with `queues` queues, started. A device
/// that offers only reads is opened read-only when `read_only`.
pub fn connect(
    socket: &Path,
    queues: usize,
    read_only: bool,
) -> Result<(Blkio, blkio::BlkioStartOutcome), String> {
    let path = socket
        .to_str()
        .ok_or_else(|| format!("{}: not UTF-8", socket.display()))?;
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blkio_err("libblkio"))?;
    b.set_str("path", path).map_err(blkio_err("path"))?;
    if read_only {
        b.set_bool("read-only", true)
            .map_err(blkio_err("read-only"))?;
    }
    // the handshake blocks on the backend's answers: watched, so a
    // backend that never answers ends the run instead of hanging it
    let _watch = crate::watchdog::watch();
    b.connect()
        .map_err(|e| format!("connect to {}: {e}", socket.display()))?;
    b.set_i32("num-queues", queues as i32)
        .map_err(blkio_err("num-queues"))?;
    let started = b
        .start()
        .map_err(|e| format!("start {}: {e}", socket.display()))?;
    Ok((b, started))
}

/// Drive `socket` with `job`, client threads pinned to `cpu`; fio-style
/// JSON (`jobs[0].read|write.iops`, `clat_ns.percentile`, ...). `wait`:
/// block in `do_io` until a completion arrives instead of spinning (for
/// backends that need the client's CPU, such as a Ceph on the same host).
/// Read jobs open the device read-only, so read-only devices serve them.
pub fn run(job: &Job, socket: &Path, cpu: usize, wait: bool) -> Result<Value, String> {
    run_with_timeline(job, socket, cpu, wait, None).map(|(v, _)| v)
}

/// [`run`], also counting completions per bin of `timeline` (summed over
/// the job's queues; the bins cover the run from the spec's origin), and
/// with the latency percentiles of the completions reaped while its mark
/// was down as `jobs[0].<dir>.clat_ns_unmarked`.
pub fn run_with_timeline(
    job: &Job,
    socket: &Path,
    cpu: usize,
    wait: bool,
    timeline: Option<TimelineSpec>,
) -> Result<(Value, Vec<u64>), String> {
    let scale = ns_per_tick();
    let (mut b, started) = connect(socket, job.numjobs, job.is_read())?;
    let capacity = b.get_u64("capacity").map_err(blkio_err("capacity"))?;
    let size = job.size.unwrap_or(capacity).min(capacity);
    let blocks = size / job.bs as u64;
    if blocks == 0 {
        return Err(format!(
            "the device's {capacity} bytes hold no {}-byte block",
            job.bs
        ));
    }
    let per_q = job.iodepth * job.bs;
    let len = (per_q * job.numjobs).div_ceil(2 << 20) * (2 << 20);
    let region = b
        .alloc_mem_region(len)
        .map_err(blkio_err("alloc_mem_region"))?;
    b.map_mem_region(&region)
        .map_err(blkio_err("map_mem_region"))?;
    let mut rng = Rng::new(7);
    for i in 0..len / 8 {
        // SAFETY: inside the region, u64-aligned.
        unsafe { (region.addr as *mut u64).add(i).write(rng.next_u64()) };
    }
    let threads: Vec<_> = started
        .queues
        .into_iter()
        .enumerate()
        .map(|(qi, q)| {
            let job = job.clone();
            let timeline = timeline.clone();
            let base = region.addr + qi * per_q;
            std::thread::spawn(move || {
                queue_thread(&job, q, qi, base, blocks, cpu, wait, scale, timeline)
            })
        })
        .collect();
    let mut ios = 0u64;
    let mut hist = new_histogram();
    let mut secs: f64 = 0.0;
    let mut queues = Vec::new();
    let (mut busy_ticks, mut run_ticks, mut polls, mut empty_polls) = (0u64, 0u64, 0u64, 0u64);
    let mut cpu_ns = 0u64;
    let nthreads = threads.len();
    let mut first_err = None;
    let mut bins: Vec<u64> = Vec::new();
    let mut unmarked = new_histogram();
    for t in threads {
        match t.join() {
            Ok(Ok((o, el, q))) => {
                if bins.len() < o.timeline.len() {
                    bins.resize(o.timeline.len(), 0);
                }
                for (b, n) in bins.iter_mut().zip(&o.timeline) {
                    *b += n;
                }
                unmarked
                    .add(&o.unmarked)
                    .map_err(|e| format!("histogram: {e}"))?;
                ios += o.ios;
                hist.add(&o.hist).map_err(|e| format!("histogram: {e}"))?;
                busy_ticks += o.busy_ticks;
                run_ticks += o.run_ticks;
                polls += o.polls;
                empty_polls += o.empty_polls;
                cpu_ns += o.cpu_ns;
                secs = secs.max(el.as_secs_f64().min(job.runtime_secs as f64));
                queues.push(q);
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert("a client thread panicked".to_string());
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    drop(queues);
    drop(b);
    let mut v = fio_json(job, ios, secs, &hist, scale);
    if timeline.is_some() {
        let u = fio_json(job, unmarked.len(), secs, &unmarked, scale);
        let dir = if job.is_read() { "read" } else { "write" };
        v["jobs"][0][dir]["clat_ns_unmarked"] = u["jobs"][0][dir]["clat_ns"].clone();
    }
    if nthreads == 1 && wait {
        // each do_io returned after a wake-up (or found completions
        // already there): how many completions the backend's notifications
        // let the client take per call
        v["vhost_bench_client"] = json!({
            "waits": polls,
            "completions_per_wait": ios as f64 / polls.max(1) as f64,
            "cpu_ns_per_io": if ios > 0 { cpu_ns as f64 / ios as f64 } else { 0.0 },
        });
    }
    if nthreads > 1 || wait {
        // several threads share one core: wall-clock busy time would count
        // the time each waits for the others; a waiting client's polls
        // include the time blocked in the kernel
        return Ok((v, bins));
    }
    v["vhost_bench_client"] = json!({
        "busy_share": busy_ticks as f64 / run_ticks.max(1) as f64,
        "busy_ns_per_io": if ios > 0 { busy_ticks as f64 * scale / ios as f64 } else { 0.0 },
        "polls": polls,
        "empty_polls": empty_polls,
        "completions_per_busy_poll": ios as f64 / (polls - empty_polls).max(1) as f64,
    });
    Ok((v, bins))
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

type QueueOut = (ThreadOut, Duration, blkio::Blkioq);

#[allow(clippy::too_many_arguments)]
fn queue_thread(
    job: &Job,
    mut q: blkio::Blkioq,
    qi: usize,
    base: usize,
    blocks: u64,
    cpu: usize,
    wait: bool,
    scale: f64,
    timeline: Option<TimelineSpec>,
) -> Result<QueueOut, String> {
    let _ = pin_to_cpu(cpu);
    let read = job.is_read();
    let random = job.is_random();
    let mut rng = Rng::new(0x9e37_79b9 ^ (qi as u64 + 1));
    // sequential: each queue walks its own slice of the device
    let slice = (blocks / job.numjobs as u64).max(1);
    let mut seq = 0u64;
    let mut next_off = |rng: &mut Rng| -> u64 {
        let blk = if random {
            rng.below(blocks)
        } else {
            let b = (qi as u64 * slice + seq % slice).min(blocks - 1);
            seq += 1;
            b
        };
        blk * job.bs as u64
    };
    // latencies in ticks; fio_json scales them to ns
    let mut hist = new_histogram();
    let mut t0 = vec![0u64; job.iodepth];
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..job.iodepth).map(|_| MaybeUninit::uninit()).collect();
    let submit = |q: &mut blkio::Blkioq, slot: usize, off: u64| {
        let p = (base + slot * job.bs) as *mut u8;
        if read {
            q.read(off, p, job.bs, slot, ReqFlags::empty());
        } else {
            q.write(off, p, job.bs, slot, ReqFlags::empty());
        }
    };
    let start = Instant::now();
    let end = ticks() + (job.runtime_secs as f64 * 1e9 / scale) as u64;
    for (slot, t) in t0.iter_mut().enumerate() {
        *t = ticks();
        let off = next_off(&mut rng);
        submit(&mut q, slot, off);
    }
    let mut ios = 0u64;
    let mut inflight = job.iodepth;
    let mut stopping = false;
    let (mut busy_ticks, mut polls, mut empty_polls) = (0u64, 0u64, 0u64);
    let (tick0, mut tick_end) = (ticks(), 0u64);
    let (cpu0, mut cpu_end) = (thread_cpu_ns(), 0u64);
    // bins for the run and a second beyond it (allocated before it starts)
    let mut unmarked = new_histogram();
    let mut bins = match &timeline {
        Some(t) => {
            let run = end.saturating_sub(t.origin) + (1e9 / scale) as u64;
            vec![0u64; (run / t.bin_ticks.max(1)) as usize + 1]
        }
        None => Vec::new(),
    };
    let mut failed = None;
    // a sleeping client is watched from another thread (it blocks with no
    // timeout); a polling one gives up by itself after as long
    let watch = wait.then(crate::watchdog::watch);
    let stuck = crate::watchdog::stuck_ticks();
    let mut answered = ticks();
    while inflight > 0 {
        let t_poll = ticks();
        let k = q
            .do_io(&mut comps, usize::from(wait), None, None)
            .map_err(|e| format!("queue {qi}: do_io: {e}"))?;
        if !stopping {
            polls += 1;
        }
        if k == 0 {
            if !stopping {
                empty_polls += 1;
            }
            if t_poll.saturating_sub(answered) > stuck {
                return Err(format!(
                    "queue {qi}: {inflight} requests unanswered for {} s",
                    crate::watchdog::stuck_secs()
                ));
            }
            continue;
        }
        let now = ticks();
        answered = now;
        if let Some(w) = &watch {
            w.progress(now);
        }
        if !stopping && now >= end {
            stopping = true;
            tick_end = t_poll;
            cpu_end = thread_cpu_ns();
        }
        let ios_before = ios;
        let marked = timeline
            .as_ref()
            .is_some_and(|t| t.mark.load(Ordering::Relaxed));
        for c in &comps[..k] {
            // SAFETY: do_io initialised the first k entries.
            let c = unsafe { c.assume_init_read() };
            inflight -= 1;
            if c.ret != 0 {
                // drain the rest, then report
                failed.get_or_insert(c.ret);
                stopping = true;
            }
            if stopping {
                continue;
            }
            let slot = c.user_data;
            ios += 1;
            let lat = now.saturating_sub(t0[slot]).max(1);
            hist.saturating_record(lat);
            if timeline.is_some() && !marked {
                unmarked.saturating_record(lat);
            }
            t0[slot] = ticks();
            let off = next_off(&mut rng);
            submit(&mut q, slot, off);
            inflight += 1;
        }
        if let Some(t) = &timeline {
            let i = (now.saturating_sub(t.origin) / t.bin_ticks.max(1)) as usize;
            if let Some(b) = bins.get_mut(i) {
                *b += ios - ios_before;
            }
        }
        if !stopping {
            busy_ticks += ticks() - t_poll;
        }
    }
    if let Some(ret) = failed {
        return Err(format!(
            "queue {qi}: a {} failed with {ret} ({})",
            job.direction(),
            std::io::Error::from_raw_os_error(-ret)
        ));
    }
    let out = ThreadOut {
        ios,
        hist,
        busy_ticks,
        run_ticks: tick_end.saturating_sub(tick0),
        polls,
        empty_polls,
        cpu_ns: cpu_end.saturating_sub(cpu0),
        timeline: bins,
        unmarked,
    };
    Ok((out, start.elapsed(), q))
}

/// fio's JSON for one job; `hist` holds latencies in units of `ns_per_unit` ns.
pub fn fio_json(job: &Job, ios: u64, secs: f64, hist: &Histogram<u64>, ns_per_unit: f64) -> Value {
    let iops = if secs > 0.0 { ios as f64 / secs } else { 0.0 };
    let ns = |v: u64| (v as f64 * ns_per_unit).round() as u64;
    let mut pct = serde_json::Map::new();
    for p in PERCENTILES {
        pct.insert(
            format!("{p:.6}"),
            json!(ns(hist.value_at_quantile(p / 100.0))),
        );
    }
    let dir = json!({
        "io_bytes": ios * job.bs as u64,
        "io_kbytes": ios * job.bs as u64 / 1024,
        "total_ios": ios,
        "runtime": (secs * 1000.0) as u64,
        "iops": iops,
        "bw": iops * job.bs as f64 / 1024.0,
        "clat_ns": {
            "min": ns(hist.min()), "max": ns(hist.max()), "mean": hist.mean() * ns_per_unit,
            "stddev": hist.stdev() * ns_per_unit, "N": hist.len(), "percentile": Value::Object(pct),
        },
        "lat_ns": { "mean": hist.mean() * ns_per_unit },
    });
    let empty = json!({"io_bytes": 0, "io_kbytes": 0, "total_ios": 0, "iops": 0.0, "bw": 0.0});
    let (r, w) = if job.is_read() {
        (dir, empty)
    } else {
        (empty, dir)
    };
    json!({
        "fio version": "vhost-bench",
        "jobs": [{
            "jobname": job.name,
            "job options": {
                "rw": job.rw, "bs": job.bs.to_string(), "iodepth": job.iodepth.to_string(),
                "numjobs": job.numjobs.to_string(), "runtime": job.runtime_secs.to_string(),
            },
            "read": r,
            "write": w,
        }]
    })
}

/// Connect with `queues` queues, do one 4k read per queue (so every queue
/// is bound and running), then stay connected and idle for `secs` and
/// report the backend's CPU use over that time.
pub fn idle(socket: &Path, queues: usize, pid: u32, secs: u64) -> Result<Value, String> {
    let (mut b, mut started) = connect(socket, queues, true)?;
    let region = b
        .alloc_mem_region(2 << 20)
        .map_err(blkio_err("alloc_mem_region"))?;
    b.map_mem_region(&region)
        .map_err(blkio_err("map_mem_region"))?;
    for (i, q) in started.queues.iter_mut().enumerate() {
        q.read(
            0,
            (region.addr + i * 4096) as *mut u8,
            4096,
            i,
            ReqFlags::empty(),
        );
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let n = q.do_io(&mut c, 1, None, None).map_err(blkio_err("do_io"))?;
        if n != 1 {
            return Err(format!("queue {i}: the first read did not complete"));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let (c0, t0) = (crate::proc::cpu_secs(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let (c1, el) = (crate::proc::cpu_secs(pid)?, t0.elapsed().as_secs_f64());
    Ok(json!({
        "idle_secs": el,
        "backend_cpu_secs": c1 - c0,
        "backend_cpu_percent": 100.0 * (c1 - c0) / el,
    }))
}
