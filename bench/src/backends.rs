//! The backends `vhost-bench compare` measures, one at a time: Quern,
//! qemu-storage-daemon (any number of builds, each labelled with its
//! version), SPDK's `vhost` application, and fio on the same file as the
//! ceiling for real storage.
//!
//! Every backend runs on core 1 (`taskset -c 1`, one reactor), the client
//! on core 0. Backend CPU is utime+stime of the whole backend process from
//! /proc, sampled right before the client connects and right after it
//! leaves; for fio it is the `wait4` rusage of the fio process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client;
use crate::job::Job;

/// Where the backends are and how Quern is set up.
#[derive(Clone, Debug)]
pub struct Setup {
    pub out: PathBuf,
    pub file: PathBuf,
    pub size: u64,
    pub null: bool,
    pub quern: PathBuf,
    pub poll: String,
    pub merge: bool,
    /// Quern's `[reactor] submit_batch`; None leaves Quern's default.
    pub submit_batch: Option<usize>,
    /// Quern's `[merge] max_bytes`; None leaves Quern's default.
    pub merge_max_bytes: Option<u64>,
    /// Core the backend runs on.
    pub backend_cpu: usize,
    /// Core the client threads run on.
    pub client_cpu: usize,
    /// The client sleeps in `do_io` until a completion comes (as a guest
    /// waits for an interrupt) instead of polling.
    pub client_wait: bool,
}

/// How Quern's measurement features are set for a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// As configured by default: latency histograms off, no QoS limit.
    Default,
    /// Histograms off and no QoS limit, said explicitly: the data path
    /// with nothing extra (the same as the default since histograms are
    /// off by default).
    Bare,
    /// Latency histograms on, no QoS limit: what the histograms alone
    /// cost.
    Histograms,
    /// Histograms on and a QoS limit on the device too high to bind
    /// (10^8 IOPS, 2^40 bytes/s): every request goes through QoS
    /// accounting, none waits.
    Metered,
    /// As configured by default, but the device does not offer
    /// VIRTIO_RING_F_EVENT_IDX (`event_idx = false`).
    NoEventIdx,
}

impl Flavor {
    /// The flavor a backend name gives after `prefix` (`quern`,
    /// `quern-base`): the default with nothing after it, else `-bare`,
    /// `-hist`, `-metered` or `-noevidx`; `None` for anything else.
    pub fn from_name(name: &str, prefix: &str) -> Option<Flavor> {
        let rest = name.strip_prefix(prefix)?;
        if rest.is_empty() {
            return Some(Flavor::Default);
        }
        [
            Flavor::Bare,
            Flavor::Histograms,
            Flavor::Metered,
            Flavor::NoEventIdx,
        ]
        .into_iter()
        .find(|f| f.suffix() == rest)
    }

    /// The suffix of its rows' labels (`-noevidx`; empty for the default).
    fn suffix(self) -> &'static str {
        match self {
            Flavor::Default => "",
            Flavor::Bare => "-bare",
            Flavor::Histograms => "-hist",
            Flavor::Metered => "-metered",
            Flavor::NoEventIdx => "-noevidx",
        }
    }
}

/// One backend to measure.
#[derive(Clone, Debug)]
pub enum Backend {
    Quern(Flavor),
    /// Another build of Quern (`--quern-base`), in one of the flavors: a
    /// change measured against the build before it, in the same run.
    QuernBase(PathBuf, Flavor),
    /// A qemu-storage-daemon binary and its version (`10.0.2`).
    Qsd {
        bin: PathBuf,
        version: String,
    },
    /// SPDK's vhost application and its rpc.py.
    Spdk {
        vhost: PathBuf,
        rpc: PathBuf,
    },
    /// fio on the backend's core. `spin`: with a thread spinning on the
    /// client's core for the run, as a polling client keeps it busy (on a
    /// VM, a busy vCPU can slow the virtual disk itself: `fio-spin` is what
    /// the disk gives fio under the load the vhost backends run under).
    Fio {
        spin: bool,
    },
}

impl Backend {
    /// The label of its rows: `quern-busy-mergeon`, `qsd-7.2.22`, `spdk`, `fio`.
    pub fn label(&self, s: &Setup) -> String {
        match self {
            Backend::Quern(f) => format!(
                "quern-{}-merge{}{}",
                s.poll,
                if s.merge { "on" } else { "off" },
                f.suffix()
            ),
            Backend::QuernBase(_, f) => format!(
                "quern-base-{}-merge{}{}",
                s.poll,
                if s.merge { "on" } else { "off" },
                f.suffix()
            ),
            Backend::Qsd { version, .. } => format!("qsd-{version}"),
            Backend::Spdk { .. } => "spdk".into(),
            Backend::Fio { spin: false } => "fio".into(),
            Backend::Fio { spin: true } => "fio-spin".into(),
        }
    }

    pub fn is_quern(&self) -> bool {
        matches!(self, Backend::Quern(_) | Backend::QuernBase(..))
    }
}

/// A qemu-storage-daemon binary's version (`10.0.2`), from `--version`.
pub fn qsd_version(bin: &Path) -> Result<String, String> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| format!("{}: no version in `{}`", bin.display(), text.trim()))
}

/// One measurement: fio-style JSON (with backend extras) and the backend's
/// CPU seconds over the client's run.
pub struct Measured {
    pub json: Value,
    pub cpu_secs: f64,
}

/// Run `job` against `b`: start it, wait until it serves, drive it, stop
/// it and wait until it has exited. `Ok(None)`: not applicable (fio on a
/// null device).
pub fn measure(b: &Backend, job: &Job, s: &Setup) -> Result<Option<Measured>, String> {
    match b {
        Backend::Fio { .. } if s.null => Ok(None),
        Backend::Fio { spin } => run_fio(job, s, *spin).map(Some),
        Backend::Quern(f) => run_quern(&s.quern, job, s, *f).map(Some),
        Backend::QuernBase(bin, f) => run_quern(bin, job, s, *f).map(Some),
        Backend::Qsd { bin, .. } => run_qsd(bin, job, s).map(Some),
        Backend::Spdk { vhost, rpc } => run_spdk(vhost, rpc, job, s).map(Some),
    }
}

/// A started backend process; stopped (and reaped) on drop.
pub(crate) struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    pub(crate) fn spawn(what: &str, cmd: &mut Command, log: &Path) -> Result<Proc, String> {
        let log = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = cmd
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("start {what}: {e}"))?;
        crate::watchdog::adopt(child.id());
        Ok(Proc {
            child,
            what: what.into(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait until `ready` holds; an error if the process exits first or
    /// after 30 s.
    pub(crate) fn wait_ready(&mut self, mut ready: impl FnMut() -> bool) -> Result<(), String> {
        let t = Instant::now();
        while !ready() {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("{} exited before it was ready: {st}", self.what));
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err(format!("{} not ready after 30 s", self.what));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGTERM (SIGINT for SPDK), then SIGKILL after 10 s; always reaped
    /// (and then no longer the watchdog's to kill).
    fn stop(&mut self, sig: i32) {
        self.stop_and_reap(sig);
        crate::watchdog::disown(self.pid());
    }

    fn stop_and_reap(&mut self, sig: i32) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let t = Instant::now();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if t.elapsed() > Duration::from_secs(10) {
                eprintln!(
                    "{} ({}) ignored its stop signal; killing",
                    self.what,
                    self.pid()
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(libc::SIGTERM);
    }
}

pub(crate) fn taskset(s: &Setup, bin: &Path) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", &s.backend_cpu.to_string()]).arg(bin);
    c
}

/// Drive a started backend and sample its CPU around the client's run.
fn drive(job: &Job, s: &Setup, pid: u32, sock: &Path) -> Result<Measured, String> {
    // calibrated outside the backend's CPU window
    crate::clock::ns_per_tick();
    let c0 = crate::proc::cpu_secs(pid)?;
    let json = client::run(job, sock, s.client_cpu, s.client_wait)?;
    let c1 = crate::proc::cpu_secs(pid)?;
    Ok(Measured {
        json,
        cpu_secs: c1 - c0,
    })
}

/// Quern's configuration for one run (one reactor on the backend core).
pub fn quern_toml(job: &Job, s: &Setup, flavor: Flavor, dir: &Path, sock: &Path) -> String {
    let bdev = if s.null {
        format!("driver = \"null\"\nsize = \"{}\"\n", s.size)
    } else {
        format!(
            "driver = \"uring\"\npath = \"{}\"\ndirect = true\n",
            s.file.display()
        )
    };
    let submit_batch = s
        .submit_batch
        .map_or(String::new(), |b| format!("submit_batch = {b}\n"));
    let merge_max = s
        .merge_max_bytes
        .map_or(String::new(), |b| format!("max_bytes = {b}\n"));
    let (metrics, qos) = match flavor {
        Flavor::Default => ("", ""),
        Flavor::NoEventIdx => ("", "event_idx = false\n"),
        Flavor::Bare => ("[metrics]\nhistograms = false\n", ""),
        Flavor::Histograms => ("[metrics]\nhistograms = true\n", ""),
        Flavor::Metered => (
            "[metrics]\nhistograms = true\n",
            "qos = { iops = 100000000, bps = 1099511627776 }\n",
        ),
    };
    format!(
        "state_dir = \"{dir}\"\n\n[reactor]\ncores = [{cpu}]\npoll_mode = \"{poll}\"\n{submit_batch}\n\
         [merge]\nenabled = {merge}\n{merge_max}\n{metrics}\n\
         [[bdev]]\nname = \"disk0\"\n{bdev}\n\
         [[vhost_blk]]\nname = \"bench0\"\nbdev = \"disk0\"\nsocket = \"{sock}\"\nnum_queues = {q}\ncores = [{cpu}]\n{qos}",
        dir = dir.display(),
        cpu = s.backend_cpu,
        poll = s.poll,
        merge = s.merge,
        sock = sock.display(),
        q = job.numjobs
    )
}

fn run_quern(bin: &Path, job: &Job, s: &Setup, flavor: Flavor) -> Result<Measured, String> {
    let dir = s.out.join("quern-state");
    // a fresh state directory: nothing persisted by an earlier run
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let sock = dir.join("bench.sock");
    let cfg = s.out.join("quern.toml");
    std::fs::write(&cfg, quern_toml(job, s, flavor, &dir, &sock))
        .map_err(|e| format!("{}: {e}", cfg.display()))?;
    let log = s.out.join("quern.log");
    let mut p = Proc::spawn("quern", taskset(s, bin).arg("--config").arg(&cfg), &log)?;
    p.wait_ready(|| sock.exists())?;
    let mut m = drive(job, s, p.pid(), &sock)?;
    // The reactor's own accounting: time in cycles that found work, per
    // request. Independent of the client's speed, unlike CPU per I/O in
    // busy mode (which spins its whole core whatever the load).
    match quern_reactors(bin, &cfg) {
        Ok(r) => m.json["backend_reactors"] = r,
        Err(e) => eprintln!("quern reactor statistics unavailable ({e})"),
    }
    p.stop(libc::SIGTERM);
    Ok(m)
}

/// Quern's reactors' busy and idle time and completed I/Os, summed.
fn quern_reactors(quern: &Path, cfg: &Path) -> Result<Value, String> {
    let out = Command::new(quern)
        .args(["ctl", "--config"])
        .arg(cfg)
        .args(["--json", "reactor_list"])
        .output()
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stderr).trim()))?;
    let list = v
        .as_array()
        .ok_or_else(|| format!("not a list of reactors: {v}"))?;
    let sum = |k: &str| list.iter().map(|x| x[k].as_u64().unwrap_or(0)).sum::<u64>();
    Ok(json!({
        "busy_ns": sum("busy_ns"),
        "idle_ns": sum("idle_ns"),
        "ios_completed": sum("ios_completed"),
    }))
}

fn run_qsd(bin: &Path, job: &Job, s: &Setup) -> Result<Measured, String> {
    let sock = s.out.join("qsd.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = taskset(s, bin);
    if s.null {
        cmd.arg("--blockdev").arg(format!(
            "driver=null-co,node-name=raw,read-zeroes=off,size={}",
            s.size
        ));
    } else {
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=file,filename={},cache.direct=on,aio=io_uring",
            s.file.display()
        ));
        cmd.args(["--blockdev", "driver=raw,node-name=raw,file=file"]);
    }
    cmd.arg("--export").arg(format!(
        "type=vhost-user-blk,id=exp,node-name=raw,addr.type=unix,addr.path={},writable=on,num-queues={}",
        sock.display(),
        job.numjobs
    ));
    let mut p = Proc::spawn("qemu-storage-daemon", &mut cmd, &s.out.join("qsd.log"))?;
    p.wait_ready(|| sock.exists())?;
    let m = drive(job, s, p.pid(), &sock)?;
    p.stop(libc::SIGTERM);
    Ok(m)
}

/// SPDK's vhost target in poll mode without hugepages, with a null bdev
/// (or an aio bdev on the file) and one vhost-blk controller.
/// Start SPDK's vhost application in `dir` with a null (or aio) bdev and a
/// vhost-blk controller on the backend core; its process, the
/// controller's socket and the RPC socket.
pub(crate) fn start_spdk(
    vhost: &Path,
    rpc: &Path,
    s: &Setup,
    dir: &Path,
) -> Result<(Proc, PathBuf, PathBuf), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let rpc_sock = dir.join("rpc.sock");
    let mask = format!("{:#x}", 1u64 << s.backend_cpu);
    let mut p = Proc::spawn(
        "spdk vhost",
        Command::new(vhost)
            .args(["-m", &mask, "--no-huge", "-s", "1024", "-S"])
            .arg(dir)
            .arg("-r")
            .arg(&rpc_sock),
        &dir.with_extension("log"),
    )?;
    p.wait_ready(|| rpc_sock.exists())?;
    let call = |args: &[&str]| spdk_rpc(rpc, &rpc_sock, args);
    if s.null {
        let mib = (s.size >> 20).max(1).to_string();
        call(&["bdev_null_create", "Null0", &mib, "512"])?;
    } else {
        let f = s.file.to_string_lossy().into_owned();
        call(&["bdev_aio_create", &f, "Null0", "512"])?;
    }
    call(&[
        "vhost_create_blk_controller",
        "--cpumask",
        &mask,
        "vhost.0",
        "Null0",
    ])?;
    let sock = dir.join("vhost.0");
    p.wait_ready(|| sock.exists())?;
    Ok((p, sock, rpc_sock))
}

/// One `rpc.py` call to the SPDK application on `rpc_sock`.
fn spdk_rpc(rpc: &Path, rpc_sock: &Path, args: &[&str]) -> Result<Value, String> {
    let out = Command::new(rpc)
        .arg("-s")
        .arg(rpc_sock)
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", rpc.display()))?;
    if !out.status.success() {
        return Err(format!(
            "rpc.py {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(&text).unwrap_or(Value::String(text.trim().into())))
}

fn run_spdk(vhost: &Path, rpc: &Path, job: &Job, s: &Setup) -> Result<Measured, String> {
    let (mut p, sock, rpc_sock) = start_spdk(vhost, rpc, s, &s.out.join("spdk"))?;
    let call = |args: &[&str]| spdk_rpc(rpc, &rpc_sock, args);
    let before = call(&["framework_get_reactors"])?;
    let mut m = drive(job, s, p.pid(), &sock)?;
    let after = call(&["framework_get_reactors"])?;
    m.json["backend_reactors"] = spdk_reactor_delta(&before, &after, &m.json, job);
    p.stop(libc::SIGINT);
    Ok(m)
}

/// SPDK's busy and idle TSC over the run, in ns, as Quern reports them.
fn spdk_reactor_delta(before: &Value, after: &Value, run: &Value, job: &Job) -> Value {
    let sum = |v: &Value, k: &str| {
        v["reactors"].as_array().map_or(0, |a| {
            a.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum::<u64>()
        })
    };
    let rate = after["tick_rate"].as_u64().unwrap_or(0).max(1) as f64;
    let ns = |ticks: u64| (ticks as f64 * 1e9 / rate) as u64;
    let ios = run["jobs"][0][job.direction()]["total_ios"]
        .as_u64()
        .unwrap_or(0);
    json!({
        "busy_ns": ns(sum(after, "busy").saturating_sub(sum(before, "busy"))),
        "idle_ns": ns(sum(after, "idle").saturating_sub(sum(before, "idle"))),
        // the client's count: SPDK has no per-reactor I/O counter
        "ios_completed": ios,
    })
}

fn fio_args(job: &Job, s: &Setup) -> Vec<String> {
    let mut a = vec![
        format!("--name={}", job.name),
        format!("--filename={}", s.file.display()),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.bs),
        format!("--iodepth={}", job.iodepth),
        format!("--numjobs={}", job.numjobs),
        format!("--runtime={}", job.runtime_secs),
        "--time_based".into(),
        "--thread".into(),
        "--group_reporting".into(),
        format!("--cpus_allowed={}", s.backend_cpu),
        "--output-format=json".into(),
    ];
    if !job.is_random() && job.numjobs > 1 {
        let part = s.size / job.numjobs as u64;
        a.push(format!("--offset_increment={part}"));
        a.push(format!("--size={part}"));
    } else if let Some(sz) = job.size {
        a.push(format!("--size={}", sz.min(s.size)));
    }
    a
}

/// A thread spinning on one core until dropped.
struct Spinner {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    fn start(cpu: usize) -> Spinner {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let _ = crate::pin_to_cpu(cpu);
            while !flag.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        Spinner {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_fio(job: &Job, s: &Setup, spin: bool) -> Result<Measured, String> {
    let _spinner = spin.then(|| Spinner::start(s.client_cpu));
    let mut child = Command::new("fio")
        .args(fio_args(job, s))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("start fio: {e}"))?;
    let mut out = String::new();
    let stdout = child.stdout.as_mut().ok_or("fio: no stdout")?;
    std::io::Read::read_to_string(stdout, &mut out).map_err(|e| format!("fio output: {e}"))?;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 on our own child, which reaps it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("fio failed (wait status {status})"));
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let json: Value = out
        .find('{')
        .and_then(|i| serde_json::from_str(&out[i..]).ok())
        .ok_or_else(|| format!("fio printed no JSON: {}", out.trim()))?;
    Ok(Measured {
        json,
        cpu_secs: tv(ru.ru_utime) + tv(ru.ru_stime),
    })
}
