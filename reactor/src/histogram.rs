//! Latency histograms written by one thread (a reactor) and read by any.
//!
//! Buckets are log-linear in the manner of Prometheus's native histograms
//! of schema 3: eight per power of two, bucket `k` holding values in
//! (2^((k-1)/8), 2^(k/8)] seconds, so they are exported as native
//! histograms without conversion, and the power-of-two boundaries give
//! exact classic `le` buckets. Values are kept in units of 2^-30 s (see
//! [`crate::clock`]); the bucket is the value's binary exponent and a table
//! lookup of its next eight bits, so recording costs a few instructions.
//!
//! The owner records with plain load-and-store pairs on relaxed atomics
//! (no atomic read-modify-write, no lock: one writer); readers copy the
//! counters, which may be a few requests apart from each other, never
//! torn. Nothing is ever reset: counters only grow (Prometheus's `rate`
//! needs that); a reader that wants "since now" keeps a snapshot and
//! subtracts ([`Snapshot::since`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::clock::UNIT_SECS;

/// Sub-buckets per power of two (native histogram schema 3).
pub const SCHEMA: i32 = 3;
const SUB: usize = 1 << SCHEMA;
/// Powers of two covered: 2^-30 s (about 1 ns) up to 2^5 s (32 s).
const OCTAVES: usize = 35;
/// Buckets kept; the last also takes everything above.
pub const BUCKETS: usize = OCTAVES * SUB;
/// The native bucket index of our bucket 0: k = i + FIRST_K.
pub const FIRST_K: i32 = 1 - 30 * SUB as i32;

/// `SUB_OF[m]` for the eight bits `m` after a value's leading one: which
/// of the octave's eight sub-buckets (exponential, as native histograms
/// have them) the value falls in: floor(8 * log2(1 + m/256)).
static SUB_OF: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut m = 0;
    while m < 256 {
        // the largest s with 2^(s/8) <= (256 + m) / 256
        let x = ((256 + m) as u128) << 32;
        let mut s = 0;
        while s < 7 && x >= (POW2_8TH[s + 1] as u128) << 8 {
            s += 1;
        }
        t[m] = s as u8;
        m += 1;
    }
    t
};

/// 2^(k/8) for k = 0..=8, times 2^32.
const POW2_8TH: [u64; 9] = [
    4294967296, 4683695048, 5107605667, 5569883475, 6074001000, 6623745059, 7223245206, 7877004752,
    8589934592,
];

/// The bucket of a value in units of 2^-30 s (0 goes to the first bucket).
#[inline]
pub fn bucket_of(units: u64) -> usize {
    if units == 0 {
        return 0;
    }
    let e = 63 - units.leading_zeros() as usize;
    // the eight bits after the leading one
    let m = if e >= 8 {
        (units >> (e - 8)) & 0xff
    } else {
        (units << (8 - e)) & 0xff
    } as usize;
    (e * SUB + SUB_OF[m] as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, in seconds: 2^((i + FIRST_K)/8).
pub fn upper_secs(i: usize) -> f64 {
    2f64.powf((i as i32 + FIRST_K) as f64 / SUB as f64)
}

/// One latency histogram.
pub struct Histogram {
    counts: [AtomicU64; BUCKETS],
    /// Sum of all values, in units of 2^-30 s.
    sum: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snapshot();
        write!(
            f,
            "Histogram {{ count: {}, p50: {:?} }}",
            s.count(),
            s.quantile(0.5)
        )
    }
}

impl Histogram {
    /// Record one value (units of 2^-30 s). Only the owner calls this.
    #[inline]
    pub fn record(&self, units: u64) {
        let c = &self.counts[bucket_of(units)];
        c.store(c.load(Relaxed).wrapping_add(1), Relaxed);
        self.sum
            .store(self.sum.load(Relaxed).wrapping_add(units), Relaxed);
    }

    /// Record `n` values of `units` each (a batch that took one time).
    #[inline]
    pub fn record_n(&self, units: u64, n: u64) {
        let c = &self.counts[bucket_of(units)];
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
        self.sum.store(
            self.sum.load(Relaxed).wrapping_add(units.wrapping_mul(n)),
            Relaxed,
        );
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            counts: std::array::from_fn(|i| self.counts[i].load(Relaxed)),
            sum: self.sum.load(Relaxed),
        }
    }
}

/// A plain copy of a histogram; several merge by addition.
#[derive(Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub counts: [u64; BUCKETS],
    /// Units of 2^-30 s.
    pub sum: u64,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            counts: [0; BUCKETS],
            sum: 0,
        }
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Snapshot {{ count: {}, p50: {:?} }}",
            self.count(),
            self.quantile(0.5)
        )
    }
}

impl Snapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum_secs(&self) -> f64 {
        self.sum as f64 * UNIT_SECS
    }

    pub fn add(&mut self, o: &Snapshot) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.sum += o.sum;
    }

    /// What was recorded after `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            counts: std::array::from_fn(|i| self.counts[i].saturating_sub(earlier.counts[i])),
            sum: self.sum.saturating_sub(earlier.sum),
        }
    }

    /// The `q` quantile (0..=1) in seconds: the upper bound of the bucket
    /// holding it (at most 9 % above the true value), or None if empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper_secs(i));
            }
        }
        Some(upper_secs(BUCKETS - 1))
    }

    /// The largest value's bucket bound, in seconds.
    pub fn max(&self) -> Option<f64> {
        self.counts.iter().rposition(|&c| c > 0).map(upper_secs)
    }

    /// Classic cumulative buckets at each power of two of seconds:
    /// (upper bound, values at or below it), the last one +Inf.
    pub fn classic_buckets(&self) -> Vec<(f64, u64)> {
        let mut out = Vec::with_capacity(OCTAVES + 1);
        let mut cum = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            cum += c;
            // bucket i's upper bound is a power of two when (i + FIRST_K)
            // is a multiple of SUB
            if (i as i32 + FIRST_K).rem_euclid(SUB as i32) == 0 && i + 1 < BUCKETS {
                out.push((upper_secs(i), cum));
            }
        }
        out.push((f64::INFINITY, cum));
        out
    }

    /// Native histogram sparse buckets: spans (offset, length) and count
    /// deltas, as Prometheus's protobuf encodes them (schema 3).
    pub fn native_buckets(&self) -> (Vec<(i32, u32)>, Vec<i64>) {
        let mut spans: Vec<(i32, u32)> = Vec::new();
        let mut deltas = Vec::new();
        let mut prev_k: Option<i32> = None;
        let mut prev_count = 0i64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let k = i as i32 + FIRST_K;
            match prev_k {
                Some(p) if k == p + 1 => {
                    if let Some(last) = spans.last_mut() {
                        last.1 += 1;
                    }
                }
                Some(p) => spans.push((k - p - 1, 1)),
                None => spans.push((k, 1)),
            }
            deltas.push(c as i64 - prev_count);
            prev_count = c as i64;
            prev_k = Some(k);
        }
        (spans, deltas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_native_schema_3_boundaries() {
        // every value lands in the bucket whose bounds hold it
        let mut x = 1u64;
        while x < 1 << 34 {
            for v in [x, x + 1, x + x / 3, x + x / 2, 2 * x - 1] {
                let i = bucket_of(v);
                let secs = v as f64 * UNIT_SECS;
                let hi = upper_secs(i);
                let lo = if i == 0 { 0.0 } else { upper_secs(i - 1) };
                // allow the table's one-in-256 rounding at the edges
                assert!(
                    secs <= hi * 1.004 && secs >= lo * 0.996,
                    "{v}: {secs} not in ({lo}, {hi}]"
                );
            }
            x *= 2;
        }
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        // 1 µs is about 2^-20 s: within 9 % of its bucket's bound
        let i = bucket_of(1074); // 1000 ns in 2^-30 s units
        assert!(
            (upper_secs(i) / 1e-6 - 1.0).abs() < 0.1,
            "{}",
            upper_secs(i)
        );
    }

    #[test]
    fn quantiles_and_exports() {
        let h = Histogram::default();
        let u = |ns: f64| (ns * 1e-9 / UNIT_SECS) as u64;
        for _ in 0..90 {
            h.record(u(200_000.0));
        }
        for _ in 0..10 {
            h.record(u(2_000_000.0));
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        let p50 = s.quantile(0.5).unwrap();
        assert!((200e-6..200e-6 * 1.1).contains(&p50), "{p50}");
        let p99 = s.quantile(0.99).unwrap();
        assert!((2e-3..2.2e-3).contains(&p99), "{p99}");
        assert!((s.sum_secs() - (90.0 * 200e-6 + 10.0 * 2e-3)).abs() < 1e-4);
        let classic = s.classic_buckets();
        assert_eq!(classic.last().unwrap().1, 100);
        let at_1ms = classic
            .iter()
            .find(|(le, _)| (*le - 2f64.powi(-10)).abs() < 1e-12)
            .unwrap();
        assert_eq!(at_1ms.1, 90);
        let (spans, deltas) = s.native_buckets();
        assert_eq!(spans.len(), 2);
        assert_eq!(deltas, vec![90, -80]);
        let mut later = s.clone();
        later.add(&s);
        assert_eq!(later.since(&s), s);
    }
}
