//! Randomness as the core sees it: an injected [`Random`] source.

/// A source of cryptographically strong random bytes, injected so tests and
/// fuzzing can run deterministically.
pub trait Random: Send + Sync {
    /// Fills `buf` with random bytes.
    fn fill(&self, buf: &mut [u8]);
}

/// The operating system's CSPRNG (`getrandom`).
#[derive(Debug, Clone, Copy, Default)]
pub struct OsRandom;

impl Random for OsRandom {
    fn fill(&self, buf: &mut [u8]) {
        // The OS generator failing means the machine cannot make keys at all;
        // carrying on with predictable bytes would be far worse than stopping.
        #[allow(clippy::expect_used)]
        getrandom::getrandom(buf).expect("the operating system's random source failed");
    }
}

/// Draws an array of random bytes.
pub(crate) fn array<const N: usize>(rng: &dyn Random) -> [u8; N] {
    let mut out = [0u8; N];
    rng.fill(&mut out);
    out
}
