//! The management socket: statistics and bindings, read from outside the
//! process while it runs.
//!
//! A UNIX stream socket (default `<state_dir>/quern.sock`). Each request is
//! one line of text; each answer is one line of JSON. Requests:
//! `stats` (everything below), `reactors`, `bdevs`, `devices`, `version`,
//! `help`. Anything else is answered with `{"error": ...}` naming the
//! request and the known ones, and the connection stays open. `quern ctl`
//! is the command-line client.
//!
//! The thread reads counters the data path publishes (atomics); it never
//! touches a reactor.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quern_bdev::BdevRef;
use quern_reactor::ReactorHandle;
use quern_vhost::DeviceHandle;
use serde_json::{json, Value};

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 1024;
/// Management clients served at once; more are told to come back later.
pub const MAX_SESSIONS: usize = 16;
const REQUESTS: &[&str] = &["stats", "reactors", "bdevs", "devices", "version", "help"];

/// What the management socket reports on.
#[derive(Clone)]
pub struct View {
    pub reactors: Vec<Arc<ReactorHandle>>,
    pub bdevs: Vec<(String, BdevRef)>,
    pub devices: Vec<Arc<DeviceHandle>>,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl View {
    fn reactors(&self) -> Value {
        Value::Array(
            self.reactors
                .iter()
                .map(|r| {
                    let s = r.stats.snapshot();
                    json!({
                        "id": r.id,
                        "core": r.core,
                        "cycles": s.cycles,
                        "busy_ns": s.busy_ns,
                        "idle_ns": s.idle_ns,
                        "sleeps": s.sleeps,
                        "pollers": s.pollers,
                        "ios_submitted": s.ios_submitted,
                        "ios_completed": s.ios_completed,
                        "merge_requests_in": s.merge_requests_in,
                        "merge_requests_out": s.merge_requests_out,
                        "merge_bytes": s.merge_bytes,
                    })
                })
                .collect(),
        )
    }

    fn bdevs(&self) -> Value {
        Value::Array(
            self.bdevs
                .iter()
                .map(|(name, b)| {
                    let i = b.info();
                    json!({
                        "name": name,
                        "driver": i.driver,
                        "capacity_bytes": i.capacity_bytes,
                        "block_size": i.block_size,
                        "read_only": i.read_only,
                    })
                })
                .collect(),
        )
    }

    fn devices(&self) -> Value {
        Value::Array(
            self.devices
                .iter()
                .map(|d| {
                    let queues: Vec<Value> = d
                        .queues
                        .iter()
                        .enumerate()
                        .map(|(i, q)| {
                            let r = load(&q.reactor);
                            json!({
                                "queue": i,
                                // the reactor the queue is bound to; null while the
                                // frontend has not started it
                                "reactor": (r != u64::MAX).then_some(r),
                                "requests": load(&q.requests),
                                "completed": load(&q.completed),
                                "errors": load(&q.errors),
                                "malformed": load(&q.malformed),
                                "notifies": load(&q.notifies),
                                "resubmitted": load(&q.resubmitted),
                            })
                        })
                        .collect();
                    json!({
                        "name": d.name,
                        "connections": load(&d.connections),
                        "queues": queues,
                    })
                })
                .collect(),
        )
    }

    /// The answer to one request line.
    pub fn answer(&self, request: &str) -> Value {
        match request.trim() {
            "stats" => json!({
                "reactors": self.reactors(),
                "bdevs": self.bdevs(),
                "devices": self.devices(),
            }),
            "reactors" => json!({ "reactors": self.reactors() }),
            "bdevs" => json!({ "bdevs": self.bdevs() }),
            "devices" => json!({ "devices": self.devices() }),
            "version" => json!({ "version": env!("CARGO_PKG_VERSION") }),
            "help" => json!({ "requests": REQUESTS }),
            other => json!({
                "error": format!(
                    "unknown request `{}`; known requests: {}",
                    other.escape_debug(),
                    REQUESTS.join(", ")
                )
            }),
        }
    }
}

/// The running management socket.
pub struct Management {
    socket: PathBuf,
    shutdown: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Management {
    /// Listen on `socket` (a stale socket file is replaced).
    pub fn serve(socket: &Path, view: View) -> std::io::Result<Management> {
        if socket.exists() {
            std::fs::remove_file(socket)?;
        }
        let listener = UnixListener::bind(socket)?;
        let shutdown = Arc::new(AtomicBool::new(false));
        let thread = {
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name("quern-mgmt".into())
                .spawn(move || {
                    let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                    for stream in listener.incoming() {
                        if shutdown.load(Ordering::Acquire) {
                            break;
                        }
                        let Ok(mut stream) = stream else { continue };
                        if sessions.load(Ordering::Acquire) >= MAX_SESSIONS {
                            let e = json!({ "error": format!("more than {MAX_SESSIONS} management clients at once; try again") });
                            let _ = writeln!(stream, "{e}");
                            continue;
                        }
                        sessions.fetch_add(1, Ordering::AcqRel);
                        let (view, mine) = (view.clone(), sessions.clone());
                        // one short-lived thread per client: a slow client
                        // cannot hold up another
                        let spawned = std::thread::Builder::new()
                            .name("quern-mgmt-client".into())
                            .spawn(move || {
                                session(stream, &view);
                                mine.fetch_sub(1, Ordering::AcqRel);
                            });
                        if spawned.is_err() {
                            sessions.fetch_sub(1, Ordering::AcqRel);
                            tracing::warn!("management socket: cannot start a client thread");
                        }
                    }
                })?
        };
        tracing::info!(socket = %socket.display(), "management socket listening");
        Ok(Management {
            socket: socket.to_path_buf(),
            shutdown,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::Release);
        let _ = UnixStream::connect(&self.socket); // wake accept()
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn session(stream: UnixStream, view: &View) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(600)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        // read at most one byte past the limit, so an endless line ends
        let n = match (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if n > MAX_REQUEST_BYTES {
            let e = json!({ "error": format!("request longer than {MAX_REQUEST_BYTES} bytes") });
            let _ = writeln!(out, "{e}");
            return;
        }
        let answer = match std::str::from_utf8(&line) {
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) => view.answer(text),
            Err(_) => json!({ "error": "request is not UTF-8 text" }),
        };
        if writeln!(out, "{answer}").is_err() {
            return;
        }
    }
}

/// `quern ctl`: send one request, return the answer line.
pub fn request(socket: &Path, request: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(s, "{request}")?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    Ok(answer.trim_end().to_string())
}
