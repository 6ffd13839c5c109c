//! The client's clock: the TSC on x86_64 (as fio's default
//! `clocksource=cpu`: a few ns per read, where `clock_gettime` is about
//! 20), nanoseconds elsewhere; scaled to nanoseconds once per process.

use std::time::{Duration, Instant};

/// A cheap monotonic counter.
#[inline]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: rdtsc has no preconditions.
    unsafe {
        std::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Nanoseconds per [`ticks`] unit, measured once against the monotonic
/// clock over 50 ms (the TSC is invariant on the CPUs this runs on: the
/// kernel's `tsc` clocksource relies on the same). Call it before a
/// measured window: the first call sleeps.
pub fn ns_per_tick() -> f64 {
    static SCALE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| {
        if !cfg!(target_arch = "x86_64") {
            return 1.0;
        }
        let (t, k) = (Instant::now(), ticks());
        std::thread::sleep(Duration::from_millis(50));
        let (dk, dt) = (ticks() - k, t.elapsed());
        dt.as_nanos() as f64 / dk.max(1) as f64
    })
}
