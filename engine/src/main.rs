//! `quern`: run the engine from a TOML file, check one, or talk to a
//! running engine.
//!
//! ```text
//! quern --config FILE.toml [--reset-state]   run until SIGINT/SIGTERM
//! quern check-config FILE.toml               validate only
//! quern ctl [--socket S | --config F] [--json] METHOD [--param VALUE ...]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Arg, ArgAction, Command};
use quern::config::Config;
use quern::engine::{Engine, StartOptions, STOP_DRAIN};
use quern::metrics::MetricsServer;
use quern::mgmt::Management;

fn cli() -> Command {
    Command::new("quern")
        .about("A polled-mode storage engine serving vhost-user-blk disks")
        .version(env!("CARGO_PKG_VERSION"))
        .arg(
            Arg::new("config")
                .long("config")
                .short('c')
                .value_name("FILE.toml")
                .help("Run with this configuration"),
        )
        .arg(
            Arg::new("reset-state")
                .long("reset-state")
                .action(ArgAction::SetTrue)
                .requires("config")
                .help("Forget the state directory's bdevs and devices and start from the file's"),
        )
        .subcommand(
            Command::new("check-config")
                .about("Validate a configuration file without starting anything")
                .arg(Arg::new("file").required(true).value_name("FILE.toml")),
        )
        .subcommand(quern::ctl::command())
        .arg_required_else_help(true)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUERN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let m = match cli().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 2,
            });
        }
    };
    match m.subcommand() {
        Some(("check-config", sub)) => check(PathBuf::from(
            sub.get_one::<String>("file").cloned().unwrap_or_default(),
        )),
        Some(("ctl", sub)) => quern::ctl::run(sub),
        _ => match m.get_one::<String>("config") {
            Some(c) => run(PathBuf::from(c), m.get_flag("reset-state")),
            None => {
                let _ = cli().print_help();
                ExitCode::from(2)
            }
        },
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

fn run(path: PathBuf, reset_state: bool) -> ExitCode {
    let cfg = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("quern: invalid configuration: {e}");
            return ExitCode::from(1);
        }
    };
    // Block the stop signals before any thread starts, so every thread
    // inherits the mask and only this one receives them (in sigwait).
    let set = quern::sys::block_stop_signals();
    let engine = match Engine::start(&cfg, StartOptions { reset_state }) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("quern: start-up failed: {e}");
            return ExitCode::from(1);
        }
    };
    let mgmt = match cfg.management_socket() {
        None => None,
        Some(sock) => {
            let gid = cfg
                .management
                .group
                .as_deref()
                .and_then(quern::sys::group_id);
            match Management::serve(&sock, gid, Arc::clone(&engine)) {
                Ok(m) => Some(m),
                Err(e) => {
                    eprintln!("quern: management socket {}: {e}", sock.display());
                    engine.stop();
                    return ExitCode::from(1);
                }
            }
        }
    };
    let mut metrics = match cfg.metrics_listen() {
        Ok(None) => None,
        Ok(Some(l)) => match MetricsServer::serve(&l, Arc::clone(&engine)) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!(
                    "quern: metrics.listen = {:?}: {e}",
                    cfg.metrics.listen.as_deref().unwrap_or_default()
                );
                if let Some(m) = &mgmt {
                    m.stop();
                }
                engine.stop();
                return ExitCode::from(1);
            }
        },
        Err(e) => {
            eprintln!("quern: invalid configuration: {e}");
            engine.stop();
            return ExitCode::from(1);
        }
    };
    tracing::info!(config = %path.display(), reactors = engine.reactors.len(), state = %engine.state_dir().display(), "quern running");
    let sig = quern::sys::wait_for_stop_signal(&set);
    tracing::info!(
        signal = sig,
        "stopping: no new requests; those in flight finish or stay recorded for the next start"
    );
    if let Some(m) = &mgmt {
        m.stop();
    }
    if let Some(m) = &mut metrics {
        m.stop();
    }
    let devices = engine.devices();
    engine.stop_within(STOP_DRAIN);
    for (r, io) in engine.reactors.iter().zip(&engine.io_stats) {
        let s = r.stats.snapshot();
        tracing::info!(
            reactor = r.id,
            cycles = s.cycles,
            ios = io.snapshot().ios_completed,
            busy_ms = s.busy_ns / 1_000_000,
            "reactor statistics"
        );
    }
    for (name, d) in devices {
        for (q, st) in d.queues.iter().enumerate() {
            let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                device = %name,
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
