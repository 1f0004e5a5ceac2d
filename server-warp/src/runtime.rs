//! The engine's [`Runtime`] on tokio and the system clock.

use std::time::Duration;

use latchkey_core::{BoxFuture, Clock, Runtime, SystemClock, Timestamp};

/// Tokio timers and tasks, wall-clock time.
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
