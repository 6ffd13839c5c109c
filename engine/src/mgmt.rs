//! The management socket: the JSON-RPC API ([`crate::rpc`]) on a UNIX
//! stream socket, one request (or batch) per line, one response per line.
//!
//! Who may talk to it: the socket is created owner-only (0600), or 0660
//! with the group `[management] group` names; every mutating call is
//! logged with the caller's pid and uid (SO_PEERCRED).
//!
//! Bounds, so that no client delays another or the data path: at most
//! [`MAX_CLIENTS`] at once (more are answered with a BUSY error and
//! closed), a request line of at most [`MAX_REQUEST_BYTES`], a line must
//! arrive whole within [`LINE_DEADLINE`] once begun, and a client silent
//! for [`IDLE_TIMEOUT`] is closed. Each client has its own thread; the
//! data path is reached only by messages to the reactors.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quern_reactor::sys::{claim_socket_path, BoundSocket};
use serde_json::Value;

use crate::engine::{codes, ApiError, Engine};
use crate::rpc::{self, Caller};

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Management clients served at once.
pub const MAX_CLIENTS: usize = 16;
/// Time a client has to finish a line it has begun.
pub const LINE_DEADLINE: Duration = Duration::from_secs(10);
/// A client that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The running management socket.
pub struct Management {
    socket: BoundSocket,
    shutdown: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Management {
    /// Listen on `socket` (a stale socket file is replaced; one another
    /// process serves, or a file that is not a socket, is refused),
    /// owner-only or for group `gid`. The socket appears under its name
    /// only once its mode is set (bound under a temporary name, then
    /// renamed).
    pub fn serve(
        socket: &Path,
        gid: Option<u32>,
        engine: Arc<Engine>,
    ) -> std::io::Result<Management> {
        if let Some(d) = socket.parent() {
            std::fs::create_dir_all(d)?;
        }
        claim_socket_path(socket)?;
        let tmp = socket.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        crate::sys::restrict_socket(&tmp, gid)?;
        std::fs::rename(&tmp, socket)?;
        let bound = BoundSocket::new(socket, &listener)?;
        let shutdown = Arc::new(AtomicBool::new(false));
        let thread = {
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name("quern-mgmt".into())
                .spawn(move || accept_loop(listener, &shutdown, engine))?
        };
        tracing::info!(socket = %socket.display(), mode = if gid.is_some() { "0660" } else { "0600" }, "management socket listening");
        Ok(Management {
            socket: bound,
            shutdown,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::Release);
        // wake accept(), whatever the path names now
        self.socket.wake();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        self.socket.remove();
    }
}

fn accept_loop(listener: UnixListener, shutdown: &AtomicBool, engine: Arc<Engine>) {
    let clients = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if shutdown.load(Ordering::Acquire) {
            break;
        }
        let Ok(mut stream) = stream else { continue };
        if clients.load(Ordering::Acquire) >= MAX_CLIENTS {
            let e = rpc::error_response(
                Value::Null,
                ApiError::new(
                    codes::BUSY,
                    format!("more than {MAX_CLIENTS} management clients at once; try again"),
                ),
            );
            let _ = writeln!(stream, "{e}");
            continue;
        }
        clients.fetch_add(1, Ordering::AcqRel);
        let (engine, mine) = (engine.clone(), clients.clone());
        // one thread per client: a slow or stuck client holds up no other
        let spawned = std::thread::Builder::new()
            .name("quern-mgmt-client".into())
            .spawn(move || {
                session(stream, &engine);
                mine.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            clients.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("management socket: cannot start a client thread");
        }
    }
}

/// Why a client's line could not be read.
enum LineError {
    Closed,
    TooLong,
    TooSlow,
    Idle,
}

/// Reads lines from a client with the bounds above.
struct LineReader {
    s: UnixStream,
    buf: Vec<u8>,
}

impl LineReader {
    fn next_line(&mut self) -> Result<Vec<u8>, LineError> {
        let idle_since = Instant::now();
        let mut begun: Option<Instant> = (!self.buf.is_empty()).then(Instant::now);
        let mut chunk = [0u8; 16 << 10];
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                if i > MAX_REQUEST_BYTES {
                    return Err(LineError::TooLong);
                }
                let rest = self.buf.split_off(i + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                return Ok(line);
            }
            if self.buf.len() > MAX_REQUEST_BYTES {
                return Err(LineError::TooLong);
            }
            let deadline = match begun {
                Some(t) => t + LINE_DEADLINE,
                None => idle_since + IDLE_TIMEOUT,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(if begun.is_some() {
                    LineError::TooSlow
                } else {
                    LineError::Idle
                });
            }
            let _ = self
                .s
                .set_read_timeout(Some(left.min(Duration::from_secs(1))));
            match self.s.read(&mut chunk) {
                Ok(0) => return Err(LineError::Closed),
                Ok(n) => {
                    if begun.is_none() {
                        begun = Some(Instant::now());
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return Err(LineError::Closed),
            }
        }
    }
}

fn session(stream: UnixStream, engine: &Engine) {
    let caller = crate::sys::peer_credentials(&stream)
        .map(|(pid, uid, _)| Caller { pid, uid })
        .unwrap_or_default();
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let _ = out.set_write_timeout(Some(LINE_DEADLINE));
    let mut reader = LineReader {
        s: stream,
        buf: Vec::new(),
    };
    loop {
        let line = match reader.next_line() {
            Ok(l) => l,
            Err(LineError::Closed) | Err(LineError::Idle) => return,
            Err(e) => {
                let msg = match e {
                    LineError::TooLong => format!("request longer than {MAX_REQUEST_BYTES} bytes"),
                    _ => format!("a request line must arrive whole within {LINE_DEADLINE:?}"),
                };
                let r = rpc::error_response(
                    Value::Null,
                    ApiError::new(codes::INVALID_REQUEST, format!("invalid request: {msg}")),
                );
                let _ = writeln!(out, "{r}");
                return;
            }
        };
        let answer = match std::str::from_utf8(&line) {
            Ok(t) if t.trim().is_empty() => continue,
            Ok(t) => rpc::handle_line(engine, t, caller),
            Err(_) => Some(rpc::error_response(
                Value::Null,
                ApiError::new(
                    codes::PARSE_ERROR,
                    "parse error: the request is not UTF-8 text",
                ),
            )),
        };
        if let Some(a) = answer {
            if writeln!(out, "{a}").is_err() {
                return;
            }
        }
    }
}

/// A management client: one connection, one call at a time.
pub struct Client {
    s: UnixStream,
    reader: std::io::BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    pub fn connect(socket: &Path) -> std::io::Result<Client> {
        let s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let reader = std::io::BufReader::new(s.try_clone()?);
        Ok(Client {
            s,
            reader,
            next_id: 1,
        })
    }

    /// Call `method` with `params`: its result, or its error.
    pub fn call(
        &mut self,
        method: &str,
        params: Value,
    ) -> std::io::Result<Result<Value, ApiError>> {
        use std::io::BufRead;
        let id = self.next_id;
        self.next_id += 1;
        let req =
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        writeln!(self.s, "{req}")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        let v: Value = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        if let Some(e) = v.get("error") {
            return Ok(Err(ApiError::new(
                e["code"].as_i64().unwrap_or(codes::INTERNAL_ERROR),
                e["message"].as_str().unwrap_or("no message").to_string(),
            )));
        }
        Ok(Ok(v.get("result").cloned().unwrap_or(Value::Null)))
    }
}
