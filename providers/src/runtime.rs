//! [`TokioRuntime`]: the engine's [`Runtime`] on tokio and the system clock.
//!
//! `latchkey-core` takes its time, timers and task spawning from the
//! embedding program, so that it has no runtime of its own. This is the one
//! every tokio program uses — the broker's server, and any application that
//! embeds the engine — so it lives here, beside the HTTP providers (which run
//! on tokio already), rather than in the server crate: an embedder needs
//! `latchkey-core`, `latchkey-providers` and a store, not warp.

use std::time::Duration;

use latchkey_core::{BoxFuture, Clock, Runtime, SystemClock, Timestamp};

/// Tokio timers and tasks, wall-clock time.
///
/// ```
/// use std::sync::Arc;
/// use latchkey_core::{Clock, Runtime};
/// use latchkey_providers::TokioRuntime;
///
/// let runtime: Arc<dyn Runtime> = Arc::new(TokioRuntime);
/// assert!(runtime.now().unix_millis() > 0);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioRuntime;

impl Clock for TokioRuntime {
    fn now(&self) -> Timestamp {
        SystemClock.now()
    }
}

impl Runtime for TokioRuntime {
    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        let wait = deadline.duration_since(self.now());
        Box::pin(tokio::time::sleep(wait.min(Duration::from_secs(86_400))))
    }

    fn spawn(&self, task: BoxFuture<'static, ()>) {
        // Outside a runtime (a broker dropped after its runtime shut down,
        // releasing a lease from a destructor) there is nothing to run the
        // task on: it is dropped, never a panic in a destructor. A lease not
        // released lapses at its deadline.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(task);
        }
    }
}
