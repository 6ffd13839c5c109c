//! `quern`: start the engine from a TOML file, or check one.
//!
//! ```text
//! quern --config FILE.toml        run until SIGINT/SIGTERM
//! quern check-config FILE.toml    validate only
//! quern ctl [-c FILE.toml | -s SOCKET] REQUEST
//!                                 ask a running quern (stats, devices, ...)
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use quern::config::Config;
use quern::startup::Engine;

const USAGE: &str = "usage: quern --config FILE.toml
       quern check-config FILE.toml
       quern ctl [--config FILE.toml | --socket SOCKET] REQUEST
                 (REQUEST: stats, reactors, bdevs, devices, version, help;
                  the socket defaults to the one FILE.toml configures, or
                  $TMPDIR/quern/quern.sock)";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUERN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["check-config", path] | ["--check-config", path] => check(PathBuf::from(path)),
        ["--config", path] | ["-c", path] => run(PathBuf::from(path)),
        ["ctl", rest @ ..] => ctl(rest),
        ["--help"] | ["-h"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn check(path: PathBuf) -> ExitCode {
    match Config::load(&path) {
        Ok(_) => {
            println!("{}: configuration is valid", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("quern: invalid configuration: {e}");
            ExitCode::from(1)
        }
    }
}

fn ctl(args: &[&str]) -> ExitCode {
    let (socket, request) = match args {
        ["--socket" | "-s", s, req] => (PathBuf::from(s), *req),
        ["--config" | "-c", c, req] => match Config::load_unvalidated(std::path::Path::new(c)) {
            Ok(cfg) => match cfg.management_socket() {
                Some(s) => (s, *req),
                None => {
                    eprintln!("quern ctl: {c} disables the management socket");
                    return ExitCode::from(1);
                }
            },
            Err(e) => {
                eprintln!("quern ctl: invalid configuration: {e}");
                return ExitCode::from(1);
            }
        },
        [req] => (std::env::temp_dir().join("quern/quern.sock"), *req),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match quern::mgmt::request(&socket, request) {
        Ok(answer) => {
            println!("{answer}");
            if answer.starts_with("{\"error\"") {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("quern ctl: {}: {e}", socket.display());
            ExitCode::from(1)
        }
    }
}

fn run(path: PathBuf) -> ExitCode {
    let cfg = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("quern: invalid configuration: {e}");
            return ExitCode::from(1);
        }
    };
    // Block the stop signals before any thread starts, so every thread
    // inherits the mask and only this one receives them (in sigwait).
    let set = stop_signals();
    // SAFETY: set is an initialised sigset.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let engine = match Engine::start(&cfg) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("quern: start-up failed: {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(config = %path.display(), reactors = engine.reactors.len(), bdevs = engine.bdevs.len(), "quern running");
    let mut sig: libc::c_int = 0;
    // SAFETY: waits for one of the blocked signals.
    unsafe { libc::sigwait(&set, &mut sig) };
    tracing::info!(signal = sig, "stopping: draining in-flight I/O");
    engine.stop();
    for r in &engine.reactors {
        let s = r.stats.snapshot();
        tracing::info!(
            reactor = r.id,
            cycles = s.cycles,
            ios = s.ios_completed,
            busy_ms = s.busy_ns / 1_000_000,
            "reactor statistics"
        );
    }
    for d in &engine.devices {
        for (q, st) in d.queues.iter().enumerate() {
            let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                device = %d.name,
                queue = q,
                requests = g(&st.requests),
                completed = g(&st.completed),
                errors = g(&st.errors),
                malformed = g(&st.malformed),
                "queue statistics"
            );
        }
    }
    tracing::info!("quern stopped");
    ExitCode::SUCCESS
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}
