//! fio-style job files: the small subset of fio's syntax the benchmarks
//! read (`key=value` lines; `[section]` lines and `;`/`#` comments ignored).

use std::path::Path;

/// One job: what the client offers a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub name: String,
    /// `randread`, `randwrite`, `read` or `write`.
    pub rw: String,
    pub bs: usize,
    pub iodepth: usize,
    /// Queues, one client thread each.
    pub numjobs: usize,
    pub runtime_secs: u64,
    /// Region of the device used (default: all of it).
    pub size: Option<u64>,
}

impl Job {
    pub fn is_read(&self) -> bool {
        self.rw == "randread" || self.rw == "read"
    }

    pub fn is_random(&self) -> bool {
        self.rw.starts_with("rand")
    }

    /// `read` or `write`: the fio JSON section this job's figures are in.
    pub fn direction(&self) -> &'static str {
        if self.is_read() {
            "read"
        } else {
            "write"
        }
    }
}

/// A size such as `4k`, `1G`, `2MiB` or `512`, in bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.trim_end_matches("ib").trim_end_matches('b');
    let (num, mul) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1u64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mul)
}

/// Read a job file; an unreadable file or a bad value is an error naming
/// the file and the key.
pub fn load(path: &Path) -> Result<Job, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "job".into());
    parse(&name, &text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parse a job file's text.
pub fn parse(name: &str, text: &str) -> Result<Job, String> {
    let mut job = Job {
        name: name.into(),
        rw: "randread".into(),
        bs: 4096,
        iodepth: 1,
        numjobs: 1,
        runtime_secs: 5,
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
        let bad = || format!("bad value for {k}: `{v}`");
        match k {
            "rw" | "readwrite" => match v {
                "randread" | "randwrite" | "read" | "write" => job.rw = v.into(),
                _ => return Err(bad() + " (randread, randwrite, read or write)"),
            },
            "bs" => job.bs = parse_size(v).ok_or_else(bad)? as usize,
            "iodepth" => job.iodepth = v.parse().map_err(|_| bad())?,
            "numjobs" => job.numjobs = v.parse().map_err(|_| bad())?,
            "runtime" => job.runtime_secs = v.trim_end_matches('s').parse().map_err(|_| bad())?,
            "size" => job.size = Some(parse_size(v).ok_or_else(bad)?),
            _ => eprintln!("job {name}: ignoring {k}"),
        }
    }
    if job.bs < 512 || !job.bs.is_multiple_of(512) {
        return Err(format!("bs {} is not a multiple of 512", job.bs));
    }
    if !(1..=4096).contains(&job.iodepth) {
        return Err(format!("iodepth {} is outside 1..=4096", job.iodepth));
    }
    if !(1..=64).contains(&job.numjobs) {
        return Err(format!("numjobs {} is outside 1..=64", job.numjobs));
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_file_parses() {
        let j = parse(
            "t",
            "[t]\n; comment\nrw=randwrite\nbs=4k\niodepth=32\nnumjobs=2\nruntime=3s\nsize=1G\n",
        )
        .unwrap();
        assert_eq!(
            (
                j.rw.as_str(),
                j.bs,
                j.iodepth,
                j.numjobs,
                j.runtime_secs,
                j.size
            ),
            ("randwrite", 4096, 32, 2, 3, Some(1 << 30))
        );
        assert!(!j.is_read() && j.is_random());
    }

    #[test]
    fn bad_values_are_errors_naming_the_key() {
        assert!(parse("t", "rw=trim").unwrap_err().contains("rw"));
        assert!(parse("t", "bs=100").unwrap_err().contains("bs"));
        assert!(parse("t", "iodepth=x").unwrap_err().contains("iodepth"));
        assert!(parse("t", "iodepth=0").unwrap_err().contains("iodepth"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("2MiB"), Some(2 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }
}
