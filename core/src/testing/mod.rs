//! Test support for this crate and every adapter: a manual clock, a
//! deterministic random source, and the store conformance suite.
//!
//! Built for this crate's own tests and, for other crates, behind the
//! `testing` feature. Nothing here is fit for production use: [`SeqRandom`]
//! is predictable by design.

pub mod conformance;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::random::Random;
use crate::time::{Clock, Timestamp};

/// A clock that moves only when told to. Clones share one time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock(Arc::new(AtomicU64::new(start.unix_millis())))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock to `to`.
    pub fn set(&self, to: Timestamp) {
        self.0.store(to.unix_millis(), Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    /// 2026-01-01T00:00:00Z, so tests do not start at the epoch.
    fn default() -> Self {
        ManualClock::new(Timestamp::from_unix_secs(1_767_225_600))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_millis(self.0.load(Ordering::SeqCst))
    }
}

/// A deterministic, **insecure** random source (SplitMix64) for reproducible tests.
#[derive(Debug)]
pub struct SeqRandom(AtomicU64);

impl SeqRandom {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SeqRandom(AtomicU64::new(seed))
    }
}

impl Random for SeqRandom {
    fn fill(&self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut z = self.0.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }
}
