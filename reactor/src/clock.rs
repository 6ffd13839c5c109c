//! A cheap clock for the data path: the TSC on x86_64 (a few ns per read,
//! where `clock_gettime` costs about 20), nanoseconds elsewhere, and its
//! conversion to a binary unit of time, 2^-30 s (about 0.93 ns), in which
//! latency histograms keep their values: powers of two of it are powers of
//! two of seconds, so Prometheus's native histogram buckets fall exactly
//! on ours.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A reading of the cheap clock.
#[inline]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: rdtsc has no preconditions.
    unsafe {
        std::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// One reading shared by whoever needs it: `*reading`, taken from the
/// clock first if it is 0 (not read yet).
#[inline]
pub fn ticks_once(reading: &mut u64) -> u64 {
    if *reading == 0 {
        *reading = ticks();
    }
    *reading
}

/// How ticks convert: `units = ticks * mul >> SHIFT` (units of 2^-30 s),
/// and nanoseconds per tick.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    mul: u64,
    pub ns_per_tick: f64,
}

const SHIFT: u32 = 32;

/// The tick rate, measured once against the monotonic clock (20 ms, at the
/// first call: call it at start-up, off the data path). The TSC is
/// invariant on the CPUs this runs on; the kernel's `tsc` clocksource
/// relies on the same.
pub fn scale() -> Scale {
    static S: OnceLock<Scale> = OnceLock::new();
    *S.get_or_init(|| {
        let ns_per_tick = if cfg!(target_arch = "x86_64") {
            let (t, k) = (Instant::now(), ticks());
            std::thread::sleep(Duration::from_millis(20));
            let (dk, dt) = (ticks().wrapping_sub(k), t.elapsed());
            dt.as_nanos() as f64 / dk.max(1) as f64
        } else {
            1.0
        };
        // units per tick = ns_per_tick * 2^30 / 1e9
        let units_per_tick = ns_per_tick * (1u64 << 30) as f64 / 1e9;
        Scale {
            mul: (units_per_tick * (1u64 << SHIFT) as f64).round() as u64,
            ns_per_tick,
        }
    })
}

impl Scale {
    /// A tick count in units of 2^-30 s.
    #[inline]
    pub fn units(&self, ticks: u64) -> u64 {
        ((u128::from(ticks) * u128::from(self.mul)) >> SHIFT) as u64
    }

    pub fn ns(&self, ticks: u64) -> u64 {
        (ticks as f64 * self.ns_per_tick) as u64
    }
}

/// Seconds in one histogram unit.
pub const UNIT_SECS: f64 = 1.0 / (1u64 << 30) as f64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_convert_to_time() {
        let s = scale();
        let (t, k) = (Instant::now(), ticks());
        std::thread::sleep(Duration::from_millis(30));
        let (dk, dt) = (ticks() - k, t.elapsed());
        let secs = s.units(dk) as f64 * UNIT_SECS;
        assert!((secs - dt.as_secs_f64()).abs() < 0.005, "{secs} vs {dt:?}");
        let ns = s.ns(dk) as f64;
        assert!((ns / 1e9 - dt.as_secs_f64()).abs() < 0.005);
    }
}
