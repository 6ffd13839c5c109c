//! A QMP client: the greeting, `qmp_capabilities`, commands with their
//! replies or errors, and the asynchronous events, over a UNIX socket.
//!
//! One reader thread takes every line QEMU sends: a reply goes to the
//! command that waits for it (matched by `id`), an event into a bounded
//! log with a sequence number, so a caller can issue a command and then
//! wait for an event it causes without missing one that came first
//! (`cursor` before the command, `wait_event` after). Anything that is not
//! QMP closes the connection with the reason; so does QEMU going away,
//! and every command still waiting then fails with that reason at once.
//!
//! Serde types of our own for the few messages used, not a generated QMP
//! schema: Quern drives QEMU 7.2 and 10.0 alike, and only a handful of
//! commands.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest line accepted from QEMU (a reply to `query-qmp-schema` is about
/// 200 KiB; anything this long is not QEMU).
const MAX_LINE: u64 = 16 << 20;
/// Events kept for waiters.
const EVENT_LOG: usize = 4096;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to {path}: {reason}")]
    Connect { path: String, reason: String },
    #[error("not a QMP peer: {0}")]
    Protocol(String),
    #[error("{command} failed: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("{what}: no answer within {secs} s")]
    Timeout { what: String, secs: f64 },
    #[error("{command}: the QMP connection closed ({reason})")]
    Closed { command: String, reason: String },
}

/// One asynchronous event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub name: String,
    pub data: Value,
}

#[derive(Default)]
struct State {
    replies: HashMap<u64, Result<Value, (String, String)>>,
    events: VecDeque<Event>,
    next_event: u64,
    /// Why the connection is closed, once it is.
    closed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connected, negotiated QMP session.
pub struct Qmp {
    writer: Mutex<(UnixStream, u64)>,
    shared: Arc<Shared>,
    /// QEMU's version (major, minor, micro), from the greeting.
    pub version: (u32, u32, u32),
    reader: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Qmp {{ version: {:?} }}", self.version)
    }
}

impl Qmp {
    /// Connect to `path` (retrying until `timeout` while nothing listens
    /// yet: a QEMU that is starting), read the greeting and negotiate.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let t0 = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() < timeout => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })
                }
            }
        };
        let left = timeout
            .saturating_sub(t0.elapsed())
            .max(Duration::from_secs(1));
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| QmpError::Protocol(e.to_string()))?;
        let mut reader = BufReader::new(
            stream
                .try_clone()
                .map_err(|e| QmpError::Protocol(e.to_string()))?,
        );
        let greeting = read_line(&mut reader).map_err(|e| match e {
            LineError::Io(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                QmpError::Timeout {
                    what: format!("the QMP greeting from {}", path.display()),
                    secs: left.as_secs_f64(),
                }
            }
            other => QmpError::Protocol(format!("reading the greeting: {other}")),
        })?;
        let v: Value = serde_json::from_str(&greeting).map_err(|_| {
            QmpError::Protocol(format!(
                "not a QMP greeting: {:?}",
                greeting.chars().take(80).collect::<String>()
            ))
        })?;
        let ver = &v["QMP"]["version"]["qemu"];
        let Some(major) = ver["major"].as_u64() else {
            return Err(QmpError::Protocol(format!(
                "not a QMP greeting: {}",
                greeting.chars().take(80).collect::<String>()
            )));
        };
        let version = (
            major as u32,
            ver["minor"].as_u64().unwrap_or(0) as u32,
            ver["micro"].as_u64().unwrap_or(0) as u32,
        );
        stream
            .set_read_timeout(None)
            .map_err(|e| QmpError::Protocol(e.to_string()))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        });
        let s2 = shared.clone();
        let reader = std::thread::Builder::new()
            .name("quern-qmp".into())
            .spawn(move || read_loop(reader, &s2))
            .map_err(|e| QmpError::Protocol(e.to_string()))?;
        let q = Qmp {
            writer: Mutex::new((stream, 1)),
            shared,
            version,
            reader: Some(reader),
        };
        q.execute(
            "qmp_capabilities",
            json!({}),
            timeout.max(Duration::from_secs(5)),
        )?;
        Ok(q)
    }

    /// Run `command` with `args` and wait for its reply at most `timeout`.
    pub fn execute(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let closed = |reason: String| QmpError::Closed {
            command: command.to_string(),
            reason,
        };
        let id = {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = &self.shared.lock().closed {
                return Err(closed(r.clone()));
            }
            let id = w.1;
            w.1 += 1;
            let mut msg = json!({"execute": command, "id": id});
            if args.as_object().is_some_and(|o| !o.is_empty()) {
                msg["arguments"] = args;
            }
            let mut line = msg.to_string();
            line.push('\n');
            if let Err(e) = w.0.write_all(line.as_bytes()) {
                return Err(closed(e.to_string()));
            }
            id
        };
        self.wait_for(timeout, command, |st| {
            if let Some(r) = st.replies.remove(&id) {
                return Some(r.map_err(|(class, desc)| QmpError::Command {
                    command: command.to_string(),
                    class,
                    desc,
                }));
            }
            st.closed.clone().map(|r| Err(closed(r)))
        })
    }

    /// Wait, at most `timeout`, until `check` (called under the lock on
    /// every change) has an answer; `what` names it in a timeout.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&mut State) -> Option<Result<T, QmpError>>,
    ) -> Result<T, QmpError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(r) = check(&mut st) {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpError::Timeout {
                    what: what.to_string(),
                    secs: timeout.as_secs_f64(),
                });
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The sequence number the next event will have: pass it to
    /// [`Qmp::wait_event`] to see events from now on.
    pub fn cursor(&self) -> u64 {
        self.shared.lock().next_event
    }

    /// Wait for an event numbered `from` or later that `matches`, at most
    /// `timeout`; `what` names it in the error.
    pub fn wait_event(
        &self,
        from: u64,
        what: &str,
        matches: impl Fn(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event, QmpError> {
        self.wait_for(timeout, what, |st| {
            if let Some(e) = st.events.iter().find(|e| e.seq >= from && matches(e)) {
                return Some(Ok(e.clone()));
            }
            st.closed.clone().map(|r| {
                Err(QmpError::Closed {
                    command: format!("waiting for {what}"),
                    reason: r,
                })
            })
        })
    }

    /// Events numbered `from` or later (for a watcher that polls).
    pub fn events_since(&self, from: u64) -> Vec<Event> {
        self.shared
            .lock()
            .events
            .iter()
            .filter(|e| e.seq >= from)
            .cloned()
            .collect()
    }

    /// Block until an event numbered `from` or later arrives, the
    /// connection closes, or `timeout` passes.
    pub fn wait_any(&self, from: u64, timeout: Duration) {
        let st = self.shared.lock();
        if st.next_event > from || st.closed.is_some() {
            return;
        }
        let _ = self.shared.cv.wait_timeout(st, timeout);
    }

    /// Why the connection closed, if it has.
    pub fn closed(&self) -> Option<String> {
        self.shared.lock().closed.clone()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let _ = w.0.shutdown(std::net::Shutdown::Both);
        drop(w);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[derive(Debug)]
enum LineError {
    Io(std::io::Error),
    Eof,
    TooLong,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineError::Io(e) => write!(f, "{e}"),
            LineError::Eof => f.write_str("QEMU closed the connection"),
            LineError::TooLong => write!(f, "a line longer than {MAX_LINE} bytes"),
        }
    }
}

fn read_line(r: &mut BufReader<UnixStream>) -> Result<String, LineError> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE)
        .read_until(b'\n', &mut buf)
        .map_err(LineError::Io)?;
    if n == 0 {
        return Err(LineError::Eof);
    }
    if buf.last() != Some(&b'\n') {
        return Err(if n as u64 >= MAX_LINE {
            LineError::TooLong
        } else {
            LineError::Eof
        });
    }
    Ok(String::from_utf8_lossy(&buf).trim().to_string())
}

fn read_loop(mut r: BufReader<UnixStream>, shared: &Shared) {
    let reason = loop {
        let line = match read_line(&mut r) {
            Ok(l) => l,
            Err(e) => break e.to_string(),
        };
        if line.is_empty() {
            continue;
        }
        let v: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => break format!("not QMP: {:?}", line.chars().take(80).collect::<String>()),
        };
        let mut st = shared.lock();
        if let Some(name) = v["event"].as_str() {
            let seq = st.next_event;
            st.next_event += 1;
            st.events.push_back(Event {
                seq,
                name: name.to_string(),
                data: v.get("data").cloned().unwrap_or(Value::Null),
            });
            if st.events.len() > EVENT_LOG {
                st.events.pop_front();
            }
        } else if let Some(id) = v["id"].as_u64() {
            let r = if let Some(e) = v.get("error") {
                Err((
                    e["class"].as_str().unwrap_or("GenericError").to_string(),
                    e["desc"].as_str().unwrap_or_default().to_string(),
                ))
            } else if let Some(ret) = v.get("return") {
                Ok(ret.clone())
            } else {
                drop(st);
                break format!("a reply without return or error: {line}");
            };
            st.replies.insert(id, r);
        } else if v.get("QMP").is_none() {
            drop(st);
            break format!("not QMP: {:?}", line.chars().take(80).collect::<String>());
        }
        drop(st);
        shared.cv.notify_all();
    };
    shared.lock().closed = Some(reason);
    shared.cv.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QMP peer: greets, then answers per `script` (line in → lines
    /// out; None: hang up).
    fn fake(
        dir: &Path,
        greeting: &'static str,
        script: fn(&str) -> Option<Vec<String>>,
    ) -> std::path::PathBuf {
        let path = dir.join(format!("qmp-{}.sock", rand_suffix()));
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.write_all(greeting.as_bytes());
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let Some(outs) = script(line.trim()) else {
                    return;
                };
                for out in outs {
                    if s.write_all(out.as_bytes()).is_err() {
                        return;
                    }
                }
                line.clear();
            }
        });
        path
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    const GREETING: &str =
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\n";

    fn id_of(line: &str) -> u64 {
        serde_json::from_str::<Value>(line).unwrap()["id"]
            .as_u64()
            .unwrap()
    }

    #[test]
    fn commands_replies_errors_and_events() {
        let d = tempfile::tempdir().unwrap();
        let p = fake(d.path(), GREETING, |line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let id = v["id"].as_u64().unwrap();
            Some(match v["execute"].as_str().unwrap() {
                "qmp_capabilities" => vec![format!("{{\"return\": {{}}, \"id\": {id}}}\n")],
                "device_del" => vec![
                    format!("{{\"return\": {{}}, \"id\": {id}}}\n"),
                    "{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"d1\"}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n".into(),
                ],
                "nope" => vec![format!(
                    "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}, \"id\": {id}}}\n"
                )],
                _ => vec![],
            })
        });
        let q = Qmp::connect(&p, Duration::from_secs(5)).unwrap();
        assert_eq!(q.version, (10, 0, 2));
        let c = q.cursor();
        q.execute("device_del", json!({"id": "d1"}), Duration::from_secs(5))
            .unwrap();
        let e = q
            .wait_event(
                c,
                "DEVICE_DELETED",
                |e| e.name == "DEVICE_DELETED" && e.data["device"] == "d1",
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(e.data["device"], "d1");
        let err = q
            .execute("nope", json!({}), Duration::from_secs(5))
            .unwrap_err();
        assert!(
            matches!(&err, QmpError::Command { class, .. } if class == "CommandNotFound"),
            "{err}"
        );
        // no answer at all: a timeout naming the command
        let err = q
            .execute("silence", json!({}), Duration::from_millis(200))
            .unwrap_err();
        assert!(err.to_string().contains("silence: no answer"), "{err}");
    }

    #[test]
    fn garbage_and_a_peer_that_dies_are_errors_that_say_so() {
        let d = tempfile::tempdir().unwrap();
        let p = fake(d.path(), "hello, I am not QEMU\n", |_| Some(vec![]));
        let e = Qmp::connect(&p, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("not a QMP greeting"), "{e}");
        // garbage after a good start closes the session with the reason
        let p = fake(d.path(), GREETING, |line| {
            let id = id_of(line);
            Some(if line.contains("qmp_capabilities") {
                vec![format!("{{\"return\": {{}}, \"id\": {id}}}\n")]
            } else {
                vec!["\u{1}\u{2} garbage\n".into()]
            })
        });
        let q = Qmp::connect(&p, Duration::from_secs(5)).unwrap();
        let e = q
            .execute("query-status", json!({}), Duration::from_secs(5))
            .unwrap_err();
        assert!(e.to_string().contains("not QMP"), "{e}");
        // a peer that closes mid-command
        let p = fake(d.path(), GREETING, |line| {
            line.contains("qmp_capabilities")
                .then(|| vec![format!("{{\"return\": {{}}, \"id\": {}}}\n", id_of(line))])
        });
        let q = Qmp::connect(&p, Duration::from_secs(5)).unwrap();
        let e = q
            .execute("device_add", json!({}), Duration::from_secs(5))
            .unwrap_err();
        assert!(
            matches!(&e, QmpError::Closed { command, .. } if command == "device_add"),
            "{e}"
        );
        // nothing listening
        let e = Qmp::connect(&d.path().join("none.sock"), Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, QmpError::Connect { .. }), "{e}");
    }
}
