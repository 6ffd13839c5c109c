//! A real Prometheus (Debian's `prometheus`) for the tests: started with a
//! scrape configuration pointing at Quern's metrics endpoint, native
//! histograms on, queried through its HTTP API; killed on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A port nothing listens on now (bound and released: another process may
/// take it in between, which the tests would notice at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` from `addr` ("127.0.0.1:9090") over HTTP/1.0: status, headers
/// and body.
pub fn http_get(
    addr: &str,
    path: &str,
    accept: Option<&str>,
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    Ok((status, head, raw[split + 4..].to_vec()))
}

/// Percent-encode a query parameter's value.
pub fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub struct Prometheus {
    child: Child,
    pub addr: String,
}

impl Prometheus {
    /// Start Prometheus under `dir`, scraping `target` ("host:port") every
    /// `interval_ms`, and wait until it is ready.
    pub fn start(dir: &Path, target: &str, interval_ms: u64) -> Prometheus {
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: {interval_ms}ms\n  evaluation_interval: {interval_ms}ms\n\
                 scrape_configs:\n  - job_name: quern\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prom-data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--enable-feature=native-histograms")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start prometheus (apt-get install prometheus)");
        let p = Prometheus { child, addr };
        let t0 = Instant::now();
        loop {
            if let Ok((200, _, _)) = http_get(&p.addr, "/-/ready", None) {
                return p;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "prometheus did not become ready:\n{}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An instant query at unix time `at`: the `data.result` array.
    pub fn query(&self, expr: &str, at: f64) -> Value {
        let path = format!("/api/v1/query?query={}&time={at:.3}", encode(expr));
        let (status, _, body) = http_get(&self.addr, &path, None).expect("query prometheus");
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(status, 200, "{expr}: {v}");
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"].clone()
    }

    /// The scrape target's health and last error, from `/api/v1/targets`.
    pub fn target_health(&self) -> (String, String) {
        let (_, _, body) = http_get(&self.addr, "/api/v1/targets", None).expect("targets");
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let t = &v["data"]["activeTargets"][0];
        (
            t["health"].as_str().unwrap_or_default().to_string(),
            t["lastError"].as_str().unwrap_or_default().to_string(),
        )
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The unix time now, in seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
