//! What the engine needs from an async runtime, injected so `core` has none.

use std::future::Future;
use std::pin::Pin;

use crate::time::{Clock, Timestamp};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Time, timers and task spawning, supplied by the embedding program (tokio
/// in the server; a manual clock in tests, so no test waits for real time).
pub trait Runtime: Clock {
    /// A future that completes once the clock reads `deadline` or later.
    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()>;

    /// Runs `task` to completion in the background, independent of the caller.
    ///
    /// The engine spawns the part of a refresh that must finish even when the
    /// request that started it goes away: a rotated refresh token obtained
    /// from the provider must reach the store.
    fn spawn(&self, task: BoxFuture<'static, ()>);
}
