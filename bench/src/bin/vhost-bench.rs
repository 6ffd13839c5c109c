//! vhost-user-blk load generator (libblkio client) and a side-by-side
//! comparison of Quern, qemu-storage-daemon and fio.
//!
//! Usage:
//!   vhost-bench run JOBFILE --socket SOCK [--cpu 0]
//!       drive an already running vhost-user-blk socket; fio-style JSON on stdout
//!   vhost-bench compare JOBFILE [--out DIR] [--file PATH] [--size 1G]
//!       [--poll busy|adaptive|interrupt] [--merge on|off] [--null]
//!       [--backends quern,qsd,fio] [--quern PATH] [--kernel-merges off]
//!       run the job against Quern, qemu-storage-daemon and fio on the same
//!       file (or null devices with --null) and print a table;
//!       --kernel-merges off sets the file's disk to `nomerges=2` for the
//!       run (root; restored after), so that only Quern's merge stage merges
//!
//! Job files: a small fio subset (`key=value` lines, `[sections]` and `;`/`#`
//! comments ignored): rw=randread|randwrite|read|write, bs, iodepth,
//! numjobs (= queues, one pinned client thread per queue), runtime, size.

use std::fs::File;
use std::io::Write;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use hdrhistogram::Histogram;
use quern_bench::{arg_value, pin_to_cpu, prepare_file, Rng};
use serde_json::{json, Value};

const PCTS: [f64; 8] = [1.0, 5.0, 10.0, 50.0, 90.0, 99.0, 99.9, 99.99];

#[derive(Clone, Debug)]
struct Job {
    name: String,
    rw: String,
    bs: usize,
    iodepth: usize,
    numjobs: usize,
    runtime: u64,
    size: Option<u64>,
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.trim_end_matches("ib").trim_end_matches('b');
    let (num, mul) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1u64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok().map(|n| n * mul)
}

fn parse_job(path: &Path) -> Job {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut job = Job {
        name: path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "job".into()),
        rw: "randread".into(),
        bs: 4096,
        iodepth: 1,
        numjobs: 1,
        runtime: 5,
        size: None,
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';', '[']) {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        let bad = || -> ! { panic!("{}: bad value for {k}: {v}", path.display()) };
        match k {
            "rw" | "readwrite" => match v {
                "randread" | "randwrite" | "read" | "write" => job.rw = v.into(),
                _ => bad(),
            },
            "bs" => job.bs = parse_size(v).unwrap_or_else(|| bad()) as usize,
            "iodepth" => job.iodepth = v.parse().unwrap_or_else(|_| bad()),
            "numjobs" => job.numjobs = v.parse().unwrap_or_else(|_| bad()),
            "runtime" => job.runtime = v.trim_end_matches('s').parse().unwrap_or_else(|_| bad()),
            "size" => job.size = Some(parse_size(v).unwrap_or_else(|| bad())),
            _ => eprintln!("{}: ignoring {k}", path.display()),
        }
    }
    assert!(
        job.bs >= 512 && job.bs.is_multiple_of(512),
        "bs must be a multiple of 512"
    );
    assert!(job.iodepth >= 1 && job.numjobs >= 1 && job.runtime >= 1);
    job
}

fn is_read(rw: &str) -> bool {
    rw == "randread" || rw == "read"
}

/// Per-thread result.
struct ThreadOut {
    ios: u64,
    hist: Histogram<u64>,
    /// Time spent in polls that returned completions and in handling them
    /// (resubmitting), in `ticks` units, and the run's length in them.
    busy_ticks: u64,
    run_ticks: u64,
    polls: u64,
    empty_polls: u64,
}

/// A cheap monotonic counter for the client's clocks (latency, busy time):
/// the TSC on x86_64, as fio's default `clocksource=cpu`, a few ns where
/// `clock_gettime` is about 20; nanoseconds elsewhere.
#[inline]
fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: rdtsc has no preconditions.
    unsafe {
        std::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// A libblkio `virtio-blk-vhost-user` client on `socket`, started with
/// `queues` queues.
fn connect(socket: &Path, queues: usize) -> (Blkio, blkio::BlkioStartOutcome) {
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", socket.to_str().unwrap()).expect("path");
    b.connect().expect("connect");
    b.set_i32("num-queues", queues as i32).expect("num-queues");
    let started = b.start().expect("start");
    (b, started)
}

/// Nanoseconds per `ticks()` unit, measured once against the monotonic
/// clock over 50 ms (the TSC is invariant on the CPUs this runs on: the
/// kernel's `tsc` clocksource relies on the same).
fn ns_per_tick() -> f64 {
    static SCALE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| {
        if !cfg!(target_arch = "x86_64") {
            return 1.0;
        }
        let (t, k) = (Instant::now(), ticks());
        std::thread::sleep(Duration::from_millis(50));
        let (dk, dt) = (ticks() - k, t.elapsed());
        dt.as_nanos() as f64 / dk.max(1) as f64
    })
}

/// Drive `socket` with `job`; client threads pinned to `cpu`. Returns fio-style JSON.
/// `wait`: block in do_io until a completion arrives instead of spinning
/// (for backends that need the client's CPU, e.g. a Ceph on the same host).
fn run_client(job: &Job, socket: &Path, cpu: usize, wait: bool) -> Value {
    let scale = ns_per_tick();
    let (mut b, started) = connect(socket, job.numjobs);
    let capacity = b.get_u64("capacity").expect("capacity");
    let size = job.size.unwrap_or(capacity).min(capacity);
    let per_q = job.iodepth * job.bs;
    let len = (per_q * job.numjobs).div_ceil(2 << 20) * (2 << 20);
    let region = b.alloc_mem_region(len).expect("alloc_mem_region");
    b.map_mem_region(&region).expect("map_mem_region");
    let mut rng = Rng::new(7);
    for i in 0..len / 8 {
        // SAFETY: inside the region, u64-aligned.
        unsafe { (region.addr as *mut u64).add(i).write(rng.next_u64()) };
    }
    let blocks = size / job.bs as u64;
    let threads: Vec<_> = started
        .queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            let job = job.clone();
            let base = region.addr + qi * per_q;
            std::thread::spawn(move || {
                let _ = pin_to_cpu(cpu);
                let read = is_read(&job.rw);
                let random = job.rw.starts_with("rand");
                let mut rng = Rng::new(0x9e37_79b9 ^ (qi as u64 + 1));
                // sequential: each queue walks its own slice of the device
                let slice = (blocks / job.numjobs as u64).max(1);
                let mut seq = 0u64;
                let mut next_off = |rng: &mut Rng| -> u64 {
                    let blk = if random {
                        rng.below(blocks)
                    } else {
                        let b = qi as u64 * slice + seq % slice;
                        seq += 1;
                        b
                    };
                    blk * job.bs as u64
                };
                // latencies in ticks; fio_json scales them to ns
                let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).unwrap();
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
                let end = ticks() + (job.runtime as f64 * 1e9 / scale) as u64;
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
                while inflight > 0 {
                    let t_poll = ticks();
                    let k = q
                        .do_io(&mut comps, usize::from(wait), None, None)
                        .expect("do_io");
                    if !stopping {
                        polls += 1;
                    }
                    if k == 0 {
                        if !stopping {
                            empty_polls += 1;
                        }
                        continue;
                    }
                    let now = ticks();
                    if !stopping && now >= end {
                        stopping = true;
                        tick_end = t_poll;
                    }
                    for c in &comps[..k] {
                        // SAFETY: do_io initialised the first k entries.
                        let c = unsafe { c.assume_init_read() };
                        assert_eq!(c.ret, 0, "I/O failed on queue {qi}");
                        let slot = c.user_data;
                        inflight -= 1;
                        if stopping {
                            continue;
                        }
                        ios += 1;
                        hist.saturating_record(now.saturating_sub(t0[slot]).max(1));
                        t0[slot] = ticks();
                        let off = next_off(&mut rng);
                        submit(&mut q, slot, off);
                        inflight += 1;
                    }
                    if !stopping {
                        busy_ticks += ticks() - t_poll;
                    }
                }
                let out = ThreadOut {
                    ios,
                    hist,
                    busy_ticks,
                    run_ticks: tick_end.saturating_sub(tick0),
                    polls,
                    empty_polls,
                };
                (out, start.elapsed(), q)
            })
        })
        .collect();
    let mut ios = 0u64;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).unwrap();
    let mut secs: f64 = 0.0;
    let mut queues = Vec::new();
    let (mut busy_ticks, mut run_ticks, mut polls, mut empty_polls) = (0u64, 0u64, 0u64, 0u64);
    let nthreads = threads.len();
    for t in threads {
        let (o, el, q) = t.join().expect("client thread");
        ios += o.ios;
        hist.add(&o.hist).unwrap();
        busy_ticks += o.busy_ticks;
        run_ticks += o.run_ticks;
        polls += o.polls;
        empty_polls += o.empty_polls;
        secs = secs.max(el.as_secs_f64().min(job.runtime as f64));
        queues.push(q);
    }
    drop(queues);
    drop(b);
    let mut v = fio_json(job, ios, secs, &hist, scale);
    if nthreads > 1 || wait {
        // several threads share one core: wall-clock busy time would count
        // the time each waits for the others; a waiting client's polls
        // include the time blocked in the kernel
        return v;
    }
    v["vhost_bench_client"] = json!({
        "busy_share": busy_ticks as f64 / run_ticks.max(1) as f64,
        "busy_ns_per_io": if ios > 0 { busy_ticks as f64 * scale / ios as f64 } else { 0.0 },
        "polls": polls,
        "empty_polls": empty_polls,
        "completions_per_busy_poll": ios as f64 / (polls - empty_polls).max(1) as f64,
    });
    v
}

/// `hist` holds latencies in units of `ns_per_unit` ns.
fn fio_json(job: &Job, ios: u64, secs: f64, hist: &Histogram<u64>, ns_per_unit: f64) -> Value {
    let iops = ios as f64 / secs;
    let ns = |v: u64| (v as f64 * ns_per_unit).round() as u64;
    let mut pct = serde_json::Map::new();
    for p in PCTS {
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
    let (r, w) = if is_read(&job.rw) {
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
                "numjobs": job.numjobs.to_string(), "runtime": job.runtime.to_string(),
            },
            "read": r,
            "write": w,
        }]
    })
}

/// utime + stime of a whole process (all threads), in seconds.
fn proc_cpu(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // after ')': field 3 (state) is f[0]; utime = field 14, stime = field 15
    let t: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    t as f64 / hz
}

struct Opts {
    out: PathBuf,
    file: PathBuf,
    size: u64,
    poll: String,
    merge: bool,
    null: bool,
    backends: Vec<String>,
    quern: PathBuf,
    kernel_merges: bool,
    /// Quern's `[reactor] submit_batch`; None leaves Quern's default.
    submit_batch: Option<usize>,
    /// Quern's `[merge] max_bytes`; None leaves Quern's default.
    merge_max_bytes: Option<u64>,
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

struct Row {
    name: String,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_s: f64,
}

impl Row {
    fn cpu_us_per_io(&self, runtime: u64) -> f64 {
        self.cpu_s * 1e6 / (self.iops * runtime as f64)
    }
}

fn figures(name: &str, v: &Value, rw: &str, cpu_s: f64) -> Row {
    let d = if is_read(rw) { "read" } else { "write" };
    let j = &v["jobs"][0][d];
    let pct = |p: &str| j["clat_ns"]["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1000.0;
    Row {
        name: name.into(),
        iops: j["iops"].as_f64().unwrap_or(f64::NAN),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        cpu_s,
    }
}

/// Wait until `ready` holds, or die after 15 s.
fn wait_for(what: &str, child: &mut Child, mut ready: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ready() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited before it was ready: {st}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{what} not ready after 15 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(child: &mut Child) {
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if t.elapsed() > Duration::from_secs(10) {
            eprintln!("backend {} ignored SIGTERM; killing", child.id());
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run the job against a started backend; returns (json, backend cpu seconds).
fn measure(job: &Job, pid: u32, sock: &Path) -> (Value, f64) {
    // calibrated outside the backend's CPU window
    ns_per_tick();
    let c0 = proc_cpu(pid);
    let v = run_client(job, sock, 0, false);
    let c1 = proc_cpu(pid);
    (v, c1 - c0)
}

fn run_quern(job: &Job, o: &Opts) -> (Value, f64) {
    let dir = o.out.join("quern-state");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("bench.sock");
    let _ = std::fs::remove_file(&sock);
    let bdev = if o.null {
        format!("driver = \"null\"\nsize = \"{}\"\n", o.size)
    } else {
        format!(
            "driver = \"uring\"\npath = \"{}\"\ndirect = true\n",
            o.file.display()
        )
    };
    let submit_batch = o
        .submit_batch
        .map_or(String::new(), |b| format!("submit_batch = {b}\n"));
    let merge_max = o
        .merge_max_bytes
        .map_or(String::new(), |b| format!("max_bytes = {b}\n"));
    let toml = format!(
        "state_dir = \"{}\"\n\n[reactor]\ncores = [1]\npoll_mode = \"{}\"\n{submit_batch}\n[merge]\nenabled = {}\n{merge_max}\n\
         [[bdev]]\nname = \"disk0\"\n{bdev}\n[[vhost_blk]]\nname = \"bench0\"\nbdev = \"disk0\"\n\
         socket = \"{}\"\nnum_queues = {}\ncores = [1]\n",
        dir.display(),
        o.poll,
        o.merge,
        sock.display(),
        job.numjobs
    );
    let cfg = o.out.join("quern.toml");
    std::fs::write(&cfg, toml).unwrap();
    let log = o.out.join("quern.log");
    let mut child = Command::new("taskset")
        .args(["-c", "1"])
        .arg(&o.quern)
        .arg("--config")
        .arg(&cfg)
        .stderr(File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .expect("start quern");
    wait_for("quern", &mut child, || {
        std::fs::read_to_string(&log)
            .map(|s| s.contains("vhost-user-blk device listening"))
            .unwrap_or(false)
    });
    let (mut v, cpu) = measure(job, child.id(), &sock);
    // The reactor's own accounting: time in cycles that found work, per
    // request. Independent of the client's speed, unlike CPU per I/O in
    // busy mode (which spins its whole core whatever the load).
    let ctl = Command::new(&o.quern)
        .args(["ctl", "--config"])
        .arg(&cfg)
        .arg("reactors")
        .output();
    let answer = match &ctl {
        Ok(out) => serde_json::from_slice::<Value>(&out.stdout)
            .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Err(e.to_string()),
    };
    match answer {
        Ok(r) => {
            let sum = |k: &str| {
                r["reactors"].as_array().map_or(0, |a| {
                    a.iter().map(|x| x[k].as_u64().unwrap_or(0)).sum::<u64>()
                })
            };
            v["quern_reactors"] = serde_json::json!({
                "busy_ns": sum("busy_ns"),
                "idle_ns": sum("idle_ns"),
                "ios_completed": sum("ios_completed"),
            });
        }
        Err(e) => eprintln!("quern ctl reactors failed ({e}): no reactor busy time in the report"),
    }
    stop(&mut child);
    (v, cpu)
}

fn run_qsd(job: &Job, o: &Opts) -> (Value, f64) {
    let sock = o.out.join("qsd.sock");
    let _ = std::fs::remove_file(&sock);
    let mut args: Vec<String> = vec!["-c".into(), "1".into(), "qemu-storage-daemon".into()];
    if o.null {
        args.push("--blockdev".into());
        args.push(format!(
            "driver=null-co,node-name=raw,read-zeroes=off,size={}",
            o.size
        ));
    } else {
        args.push("--blockdev".into());
        args.push(format!(
            "driver=file,node-name=file,filename={},cache.direct=on,aio=io_uring",
            o.file.display()
        ));
        args.push("--blockdev".into());
        args.push("driver=raw,node-name=raw,file=file".into());
    }
    args.push("--export".into());
    args.push(format!(
        "type=vhost-user-blk,id=exp,node-name=raw,addr.type=unix,addr.path={},writable=on,num-queues={}",
        sock.display(),
        job.numjobs
    ));
    let mut child = Command::new("taskset")
        .args(&args)
        .stderr(File::create(o.out.join("qsd.log")).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-storage-daemon");
    wait_for("qemu-storage-daemon", &mut child, || sock.exists());
    let r = measure(job, child.id(), &sock);
    stop(&mut child);
    r
}

fn fio_args(job: &Job, o: &Opts) -> Vec<String> {
    let mut a = vec![
        format!("--name={}", job.name),
        format!("--filename={}", o.file.display()),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.bs),
        format!("--iodepth={}", job.iodepth),
        format!("--numjobs={}", job.numjobs),
        format!("--runtime={}", job.runtime),
        "--time_based".into(),
        "--thread".into(),
        "--group_reporting".into(),
        "--cpus_allowed=1".into(),
        "--output-format=json".into(),
    ];
    if let Some(s) = job.size {
        a.push(format!("--size={s}"));
    }
    if !job.rw.starts_with("rand") && job.numjobs > 1 {
        a.push("--offset_increment=".to_string() + &(o.size / job.numjobs as u64).to_string());
        a.push(format!("--size={}", o.size / job.numjobs as u64));
    }
    a
}

fn run_fio(job: &Job, o: &Opts) -> Option<(Value, f64)> {
    let mut child = Command::new("fio")
        .args(fio_args(job, o))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .ok()?;
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).ok()?;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 on our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let cpu = tv(ru.ru_utime) + tv(ru.ru_stime);
    let v: Value = serde_json::from_str(&out[out.find('{')?..]).ok()?;
    Some((v, cpu))
}

fn compare(job: &Job, o: &Opts) {
    std::fs::create_dir_all(&o.out).unwrap();
    if !o.null {
        prepare_file(&o.file, o.size).expect("prepare backing file");
    }
    let _nomerges = (!o.kernel_merges && !o.null).then(|| {
        NoMerges::set(&o.file).unwrap_or_else(|e| {
            eprintln!("--kernel-merges off: {e}");
            std::process::exit(1);
        })
    });
    let _ = pin_to_cpu(0);
    let mut rows = Vec::new();
    let mut series = Vec::new();
    let mut reactor_busy: Vec<(String, (f64, f64))> = Vec::new();
    let mut client_busy: Vec<(String, (f64, f64, f64))> = Vec::new();
    let mode = match (o.null, o.kernel_merges) {
        (true, _) => "null",
        (false, true) => "file",
        (false, false) => "file-nomerges",
    };
    for be in &o.backends {
        let res = match be.as_str() {
            "quern" => Some(run_quern(job, o)),
            "qsd" => Some(run_qsd(job, o)),
            "fio" if !o.null => run_fio(job, o),
            "fio" => None,
            other => panic!("unknown backend {other}"),
        };
        let Some((v, cpu)) = res else {
            if be == "fio" && !o.null {
                eprintln!("fio run failed");
            }
            continue;
        };
        let tag = if be == "quern" {
            format!(
                "quern-{}-merge{}",
                o.poll,
                if o.merge { "on" } else { "off" }
            )
        } else {
            be.clone()
        };
        let path = o.out.join(format!("{}-{mode}-{tag}.json", job.name));
        let mut f = File::create(&path).unwrap();
        writeln!(f, "{}", serde_json::to_string_pretty(&v).unwrap()).unwrap();
        series.push((tag.clone(), percentiles(&v, &job.rw)));
        let row = figures(&tag, &v, &job.rw, cpu);
        let c = &v["vhost_bench_client"];
        if let (Some(share), Some(ns), Some(per)) = (
            c["busy_share"].as_f64(),
            c["busy_ns_per_io"].as_f64(),
            c["completions_per_busy_poll"].as_f64(),
        ) {
            client_busy.push((tag.clone(), (share, ns, per)));
        }
        let qr = &v["quern_reactors"];
        if let (Some(b), Some(i), Some(idle)) = (
            qr["busy_ns"].as_u64(),
            qr["ios_completed"].as_u64(),
            qr["idle_ns"].as_u64(),
        ) {
            if i > 0 {
                reactor_busy.push((
                    tag.clone(),
                    (
                        b as f64 / i as f64,
                        100.0 * b as f64 / (b + idle).max(1) as f64,
                    ),
                ));
            }
        }
        eprintln!(
            "{}: {:.0} IOPS, p50 {:.1} µs, p99 {:.1} µs, cpu {:.2} s -> {}",
            tag,
            row.iops,
            row.p50_us,
            row.p99_us,
            row.cpu_s,
            path.display()
        );
        rows.push(row);
    }
    println!(
        "\n{} ({mode}): rw={} bs={} iodepth={} numjobs={} runtime={}s poll={} merge={}{}{}{}\n",
        job.name,
        job.rw,
        job.bs,
        job.iodepth,
        job.numjobs,
        job.runtime,
        o.poll,
        if o.merge { "on" } else { "off" },
        if o.kernel_merges {
            ""
        } else {
            " kernel-merges=off"
        },
        o.submit_batch
            .map_or(String::new(), |b| format!(" submit_batch={b}")),
        o.merge_max_bytes
            .map_or(String::new(), |b| format!(" merge_max_bytes={b}"))
    );
    let svg = o.out.join(format!("{}-{mode}-latency.svg", job.name));
    std::fs::write(
        &svg,
        latency_svg(&format!("{} ({mode})", job.name), &series),
    )
    .unwrap();
    eprintln!("latency plot -> {}", svg.display());
    println!("| backend | IOPS | p50 µs | p99 µs | backend CPU s | CPU µs/IO |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.1} | {:.1} | {:.2} | {:.2} |",
            r.name,
            r.iops,
            r.p50_us,
            r.p99_us,
            r.cpu_s,
            r.cpu_us_per_io(job.runtime)
        );
    }
    for (name, r) in &reactor_busy {
        println!(
            "\n{name} reactor: busy {:.0} ns per I/O, busy {:.0}% of the time \
             (the rest is polling with nothing to do)",
            r.0, r.1
        );
    }
    for (name, c) in &client_busy {
        println!(
            "\nclient against {name}: busy {:.0}% of the time, {:.0} ns per I/O, \
             {:.1} completions per poll that found any (the rest is polling an empty used ring)",
            100.0 * c.0,
            c.1,
            c.2
        );
    }
    let q = rows.iter().find(|r| r.name.starts_with("quern"));
    for other in ["qsd", "fio"] {
        if let (Some(q), Some(x)) = (q, rows.iter().find(|r| r.name == other)) {
            println!(
                "\nquern/{other}: IOPS {:.3}, p50 {:.3}, p99 {:.3}, CPU µs/IO {:.3}",
                q.iops / x.iops,
                q.p50_us / x.p50_us,
                q.p99_us / x.p99_us,
                q.cpu_us_per_io(job.runtime) / x.cpu_us_per_io(job.runtime)
            );
        }
    }
}

/// Connect to `socket` with `queues` queues, do one 4k read per queue (so
/// every queue is bound and running), then stay connected and idle for
/// `secs` seconds and report the backend's CPU use over that time.
fn idle(socket: &Path, queues: usize, pid: u32, secs: u64) -> Value {
    let (mut b, mut started) = connect(socket, queues);
    let region = b.alloc_mem_region(2 << 20).expect("alloc_mem_region");
    b.map_mem_region(&region).expect("map_mem_region");
    for (i, q) in started.queues.iter_mut().enumerate() {
        q.read(
            0,
            (region.addr + i * 4096) as *mut u8,
            4096,
            i,
            ReqFlags::empty(),
        );
        let mut c = [MaybeUninit::<Completion>::uninit()];
        assert_eq!(q.do_io(&mut c, 1, None, None).expect("do_io"), 1);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (c0, t0) = (proc_cpu(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let (c1, el) = (proc_cpu(pid), t0.elapsed().as_secs_f64());
    serde_json::json!({
        "idle_secs": el,
        "backend_cpu_secs": c1 - c0,
        "backend_cpu_percent": 100.0 * (c1 - c0) / el,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("idle") {
        let sock = arg_value(&args, "--socket").expect("--socket SOCK");
        let pid = arg_value(&args, "--pid")
            .expect("--pid PID")
            .parse()
            .expect("--pid");
        let secs = arg_value(&args, "--secs").map_or(10, |s| s.parse().expect("--secs"));
        let queues = arg_value(&args, "--queues").map_or(1, |s| s.parse().expect("--queues"));
        let v = idle(Path::new(&sock), queues, pid, secs);
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return;
    }
    let usage = "usage: vhost-bench run JOBFILE --socket SOCK [--cpu 0] [--wait] | \
                 vhost-bench idle --socket SOCK --pid PID [--secs 10] [--queues 1] | \
                 vhost-bench compare JOBFILE [--out DIR] [--file PATH] [--size 1G] \
                 [--poll busy] [--merge on|off] [--null] [--backends quern,qsd,fio] [--quern PATH] \
                 [--kernel-merges off] [--submit-batch N] [--merge-max-bytes SIZE]";
    if args.len() < 3 {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let job = parse_job(Path::new(&args[2]));
    match args[1].as_str() {
        "run" => {
            let sock = arg_value(&args, "--socket").expect("--socket SOCK");
            let cpu = arg_value(&args, "--cpu").map_or(0, |c| c.parse().expect("--cpu"));
            let wait = args.iter().any(|a| a == "--wait");
            let v = run_client(&job, Path::new(&sock), cpu, wait);
            println!("{}", serde_json::to_string_pretty(&v).unwrap());
        }
        "compare" => {
            let size = arg_value(&args, "--size").unwrap_or_else(|| "1G".into());
            let o = Opts {
                out: arg_value(&args, "--out")
                    .unwrap_or_else(|| "/var/tmp/quern-bench/vhost".into())
                    .into(),
                file: arg_value(&args, "--file")
                    .unwrap_or_else(|| "/var/tmp/quern-bench/disk.img".into())
                    .into(),
                size: parse_size(&size).expect("--size"),
                poll: arg_value(&args, "--poll").unwrap_or_else(|| "busy".into()),
                merge: arg_value(&args, "--merge").is_none_or(|m| m != "off"),
                null: args.iter().any(|a| a == "--null"),
                backends: arg_value(&args, "--backends")
                    .unwrap_or_else(|| "quern,qsd,fio".into())
                    .split(',')
                    .map(str::to_string)
                    .collect(),
                quern: arg_value(&args, "--quern")
                    .unwrap_or_else(|| "target/release/quern".into())
                    .into(),
                kernel_merges: arg_value(&args, "--kernel-merges").is_none_or(|m| m != "off"),
                submit_batch: arg_value(&args, "--submit-batch")
                    .map(|b| b.parse().expect("--submit-batch N")),
                merge_max_bytes: arg_value(&args, "--merge-max-bytes")
                    .map(|b| parse_size(&b).expect("--merge-max-bytes SIZE")),
            };
            compare(&job, &o);
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}

/// (percentile, latency ns) pairs from a fio-style JSON's clat percentiles.
fn percentiles(v: &Value, rw: &str) -> Vec<(f64, f64)> {
    let dir = if is_read(rw) { "read" } else { "write" };
    let mut out: Vec<(f64, f64)> = v["jobs"][0][dir]["clat_ns"]["percentile"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, x)| Some((k.parse::<f64>().ok()?, x.as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// An SVG of latency against percentile, one line per backend. The x axis
/// counts nines (-log10(1 - p)), the y axis is logarithmic.
fn latency_svg(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    const W: f64 = 720.0;
    const H: f64 = 420.0;
    const M: f64 = 60.0;
    const COLORS: [&str; 4] = ["#1b6ac9", "#d1495b", "#2e933c", "#8d5cc4"];
    let nines = |p: f64| -(1.0 - (p / 100.0).min(0.99999)).log10();
    let pts = series
        .iter()
        .flat_map(|(_, s)| s.iter())
        .filter(|(_, ns)| *ns > 0.0);
    let (lo, hi) = pts.fold((f64::MAX, 1.0f64), |(lo, hi), (_, ns)| {
        (lo.min(*ns), hi.max(*ns))
    });
    let (ylo, yhi) = (
        lo.max(1.0).log10().floor(),
        hi.log10().ceil().max(lo.max(1.0).log10().floor() + 1.0),
    );
    let xmax = 5.0;
    let x = |p: f64| M + nines(p) / xmax * (W - 2.0 * M);
    let y = |ns: f64| H - M - (ns.max(1.0).log10() - ylo) / (yhi - ylo) * (H - 2.0 * M);
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' font-family='sans-serif' font-size='12'>\n\
         <rect width='100%' height='100%' fill='white'/>\n<text x='{M}' y='24' font-size='15'>{title}: completion latency by percentile</text>\n"
    );
    for d in (ylo as i32)..=(yhi as i32) {
        let ns = 10f64.powi(d);
        let label = if ns >= 1e6 {
            format!("{} ms", ns / 1e6)
        } else if ns >= 1e3 {
            format!("{} µs", ns / 1e3)
        } else {
            format!("{ns} ns")
        };
        let (yy, x2) = (y(ns), W - M);
        s += &format!("<line x1='{M}' x2='{x2}' y1='{yy}' y2='{yy}' stroke='#ddd'/><text x='4' y='{yy}'>{label}</text>\n");
    }
    for (p, label) in [
        (50.0, "p50"),
        (90.0, "p90"),
        (99.0, "p99"),
        (99.9, "p99.9"),
        (99.99, "p99.99"),
    ] {
        s += &format!(
            "<line x1='{0}' x2='{0}' y1='{M}' y2='{1}' stroke='#eee'/><text x='{0}' y='{2}' text-anchor='middle'>{label}</text>\n",
            x(p),
            H - M,
            H - M + 18.0
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(p, ns)| format!("{:.1},{:.1}", x(*p), y(*ns)))
            .collect();
        s += &format!(
            "<polyline fill='none' stroke='{c}' stroke-width='2' points='{}'/>\n",
            path.join(" ")
        );
        s += &format!(
            "<text x='{}' y='{}' fill='{c}'>{name}</text>\n",
            W - M - 150.0,
            M + 16.0 * i as f64
        );
    }
    s + "</svg>\n"
}
