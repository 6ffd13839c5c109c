//! Helpers shared by the bdev integration tests.
#![allow(dead_code)] // each test file uses its own part

use quern_bdev::{BdevError, Cookie, IoEngine, IoRequest, PollerId};

/// A cookie for a test request `n`.
pub fn ck(n: u64) -> Cookie {
    Cookie::new(PollerId(0), n)
}

/// `IoEngine::submit` for tests, which keep every buffer alive and
/// untouched until the engine has completed the request.
pub trait Put {
    fn put(&mut self, r: &IoRequest<'_>) -> Result<(), BdevError>;
}

impl Put for IoEngine {
    fn put(&mut self, r: &IoRequest<'_>) -> Result<(), BdevError> {
        // SAFETY: the tests keep every buffer alive and untouched until
        // the engine has reported the request's completion.
        unsafe { self.submit(r) }
    }
}
