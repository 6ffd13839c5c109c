//! The client's clock: the reactors' own cheap clock (`quern_reactor::clock`:
//! the TSC on x86_64, as fio's default `clocksource=cpu`), scaled to
//! nanoseconds once per process.

pub use quern_reactor::clock::ticks;

/// Nanoseconds per [`ticks`] unit, measured once against the monotonic
/// clock. Call it before a measured window: the first call sleeps.
pub fn ns_per_tick() -> f64 {
    quern_reactor::clock::scale().ns_per_tick
}
