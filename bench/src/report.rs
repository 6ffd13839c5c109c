//! Figures out of a run's JSON, and the comparison of backends across
//! alternating runs: per-pair ratios of Quern against each peer, their
//! median and range.

use serde_json::Value;

use crate::job::Job;

/// The figures of one backend in one run.
#[derive(Clone, Debug)]
pub struct Row {
    pub label: String,
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The backend process's CPU seconds over the run.
    pub cpu_secs: f64,
    /// Backend reactor busy ns per I/O (Quern, SPDK), and busy share.
    pub reactor_ns_per_io: Option<f64>,
    pub reactor_busy_share: Option<f64>,
    /// The client's busy share and busy ns per I/O, completions per
    /// non-empty poll (one-queue jobs); for a sleeping client, NaN, its CPU
    /// time per I/O and completions per wake-up.
    pub client: Option<(f64, f64, f64)>,
}

impl Row {
    pub fn from_json(label: &str, v: &Value, job: &Job, cpu_secs: f64) -> Row {
        let j = &v["jobs"][0][job.direction()];
        let pct = |p: &str| j["clat_ns"]["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1000.0;
        let r = &v["backend_reactors"];
        let (mut ns, mut share) = (None, None);
        if let (Some(b), Some(i), Some(idle)) = (
            r["busy_ns"].as_u64(),
            r["ios_completed"].as_u64(),
            r["idle_ns"].as_u64(),
        ) {
            if i > 0 {
                ns = Some(b as f64 / i as f64);
                share = Some(b as f64 / (b + idle).max(1) as f64);
            }
        }
        let c = &v["vhost_bench_client"];
        let client = match (
            c["busy_share"].as_f64(),
            c["busy_ns_per_io"].as_f64(),
            c["completions_per_busy_poll"].as_f64(),
        ) {
            (Some(a), Some(b), Some(c)) => Some((a, b, c)),
            // a sleeping client: its CPU time per I/O (busy share means
            // nothing when it blocks), completions per wake-up
            _ => match (
                c["cpu_ns_per_io"].as_f64(),
                c["completions_per_wait"].as_f64(),
            ) {
                (Some(b), Some(w)) => Some((f64::NAN, b, w)),
                _ => None,
            },
        };
        Row {
            label: label.into(),
            iops: j["iops"].as_f64().unwrap_or(f64::NAN),
            p50_us: pct("50.000000"),
            p99_us: pct("99.000000"),
            cpu_secs,
            reactor_ns_per_io: ns,
            reactor_busy_share: share,
            client,
        }
    }

    /// Backend CPU µs per I/O over the job's runtime.
    pub fn cpu_us_per_io(&self, runtime_secs: u64) -> f64 {
        self.cpu_secs * 1e6 / (self.iops * runtime_secs as f64)
    }
}

/// Median of a non-empty list (the mean of the middle two for even lengths).
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Smallest and largest finite value of a list.
pub fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .filter(|x| x.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// `runs[pair]` holds the rows of one pass over the backends. Prints the
/// per-backend medians, then for each peer the per-pair ratios of Quern to
/// it (IOPS, p50, p99, CPU µs/IO, client ns/IO) with their median and
/// range. Returns the ratio summary as JSON.
pub fn summarize(job: &Job, runs: &[Vec<Row>]) -> Value {
    let mut labels: Vec<String> = Vec::new();
    for r in runs.iter().flatten() {
        if !labels.contains(&r.label) {
            labels.push(r.label.clone());
        }
    }
    let of =
        |label: &str| -> Vec<&Row> { runs.iter().flatten().filter(|r| r.label == label).collect() };
    println!(
        "\n| backend | runs | IOPS (median) | p50 µs | p99 µs | CPU µs/IO | reactor ns/IO | client ns/IO |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for l in &labels {
        let rows = of(l);
        let m = |f: &dyn Fn(&Row) -> Option<f64>, digits: usize| {
            let v: Vec<f64> = rows.iter().filter_map(|r| f(r)).collect();
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{:.*}", digits, median(&v))
            }
        };
        println!(
            "| {l} | {} | {} | {} | {} | {} | {} | {} |",
            rows.len(),
            m(&|r| Some(r.iops), 0),
            m(&|r| Some(r.p50_us), 2),
            m(&|r| Some(r.p99_us), 2),
            m(&|r| Some(r.cpu_us_per_io(job.runtime_secs)), 3),
            m(&|r| r.reactor_ns_per_io, 0),
            m(&|r| r.client.map(|c| c.1), 0),
        );
    }
    let querns: Vec<String> = labels
        .iter()
        .filter(|l| l.starts_with("quern"))
        .cloned()
        .collect();
    if querns.is_empty() {
        return Value::Null;
    }
    // the first Quern against everything else; every other Quern flavor
    // against the peers
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (k, quern) in querns.iter().enumerate() {
        for peer in labels.iter().filter(|l| *l != quern) {
            if k == 0 || !peer.starts_with("quern") {
                pairs.push((quern.clone(), peer.clone()));
            }
        }
    }
    let mut summary = serde_json::Map::new();
    for (quern, peer) in &pairs {
        let (quern, peer) = (quern.as_str(), peer.as_str());
        // one ratio per pass that measured both
        let mut ratios: [Vec<f64>; 5] = Default::default();
        for pass in runs {
            let (Some(q), Some(p)) = (
                pass.iter().find(|r| r.label == quern),
                pass.iter().find(|r| r.label == peer),
            ) else {
                continue;
            };
            ratios[0].push(q.iops / p.iops);
            ratios[1].push(q.p50_us / p.p50_us);
            ratios[2].push(q.p99_us / p.p99_us);
            ratios[3].push(q.cpu_us_per_io(job.runtime_secs) / p.cpu_us_per_io(job.runtime_secs));
            if let (Some(a), Some(b)) = (q.client, p.client) {
                ratios[4].push(a.1 / b.1);
            }
        }
        if ratios[0].is_empty() {
            continue;
        }
        let names = ["IOPS", "p50", "p99", "CPU µs/IO", "client ns/IO"];
        let mut line = format!("\n{quern}/{peer} over {} pairs:", ratios[0].len());
        let mut obj = serde_json::Map::new();
        for (name, v) in names.iter().zip(&ratios) {
            if v.is_empty() {
                continue;
            }
            let (lo, hi) = range(v);
            line += &format!(" {name} {:.3} ({lo:.3}-{hi:.3});", median(v));
            obj.insert(
                name.to_string(),
                serde_json::json!({"median": median(v), "min": lo, "max": hi, "pairs": v}),
            );
        }
        println!("{}", line.trim_end_matches(';'));
        summary.insert(format!("{quern}/{peer}"), Value::Object(obj));
    }
    Value::Object(summary)
}

/// (percentile, latency ns) pairs from a fio-style JSON's clat percentiles.
pub fn percentiles(v: &Value, job: &Job) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = v["jobs"][0][job.direction()]["clat_ns"]["percentile"]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 1.0]), 1.0);
    }
}
