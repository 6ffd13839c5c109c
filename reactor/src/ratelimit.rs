//! Warnings at a bounded rate. A guest can make a warning happen once per
//! request (a malformed chain, a bad head); logging each one on a reactor
//! thread (formatting, the stderr lock, a write) would let it slow every
//! device on that reactor. Counters say how often; the log says that it
//! happens, at most [`LogLimiter::PER_WINDOW`] times per window, and how
//! many were left out.

use std::time::{Duration, Instant};

/// Decides whether one more warning of a kind may be logged now.
#[derive(Debug, Default)]
pub struct LogLimiter {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub const PER_WINDOW: u32 = 5;
    pub const WINDOW: Duration = Duration::from_secs(10);

    pub const fn new() -> Self {
        LogLimiter {
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log this one, and say that `n` like it were left out
    /// since the last one logged; `None`: leave it out. Reads the clock
    /// only when called (on the failure path).
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.window_start {
            Some(t) if now.duration_since(t) < Self::WINDOW => {}
            _ => {
                self.window_start = Some(now);
                self.in_window = 0;
            }
        }
        if self.in_window < Self::PER_WINDOW {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_a_few_lines_per_window() {
        let mut l = LogLimiter::new();
        let logged = (0..1000).filter(|_| l.allow().is_some()).count();
        assert_eq!(logged, LogLimiter::PER_WINDOW as usize);
        // the next window reports what was left out
        l.window_start = Some(Instant::now() - LogLimiter::WINDOW);
        assert_eq!(l.allow(), Some(1000 - u64::from(LogLimiter::PER_WINDOW)));
        assert_eq!(l.allow(), Some(0));
    }
}
