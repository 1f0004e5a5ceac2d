//! Background upkeep while the broker serves: the sweep of expired login
//! transactions, hand-offs and device codes (`[sweep]`), and an error in the
//! log whenever a "grant changed" notice could not be published. Started by
//! [`crate::serve`]; stops when the [`Upkeep`] it returns is dropped.

use std::time::Duration;

use latchkey_core::Broker;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::SweepConfig;

/// How often the engine's count of unpublished notices is looked at.
const PUBLISH_CHECK: Duration = Duration::from_secs(1);

/// The upkeep tasks; dropping this stops them.
pub struct Upkeep {
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Upkeep {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts the sweep (a pass every `config.interval_secs`, the first one
/// interval after start) and the watch on unpublished notices.
pub fn spawn(broker: &Broker, config: &SweepConfig) -> Upkeep {
    let every = Duration::from_secs(config.interval_secs.max(1));
    Upkeep {
        tasks: [
            tokio::spawn(sweep(broker.clone(), every, config.records_per_pass)),
            tokio::spawn(watch_publish_failures(broker.clone())),
        ],
    }
}

/// One pass per interval; a pass that the store fails is retried at the next.
/// Passes on several instances at once are harmless (the engine deletes at
/// the version read).
async fn sweep(broker: Broker, every: Duration, limit: usize) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match broker.sweep_expired(limit).await {
            Ok(report) => tracing::debug!(
                logins = report.expired_logins,
                handoffs = report.expired_handoffs,
                devices = report.expired_devices,
                examined = report.examined,
                more = report.more,
                "sweep: expired records deleted"
            ),
            Err(e) => tracing::warn!(error = %e, "sweep: the store failed; the next pass tries again"),
        }
    }
}

/// Logs an error when the engine counts new notices the store would not
/// publish: other instances may go on serving tokens of a grant revoked here.
async fn watch_publish_failures(broker: Broker) {
    let mut seen = broker.metrics().notice_publish_failures;
    let mut tick = tokio::time::interval(PUBLISH_CHECK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = broker.metrics().notice_publish_failures;
        if now > seen {
            tracing::error!(
                failed = now - seen,
                total = now,
                "grant-changed notices (revocations, re-login marks) could not be published through the store: \
                 other instances may serve those grants' cached tokens until their cache entries expire or \
                 their notice listener reconnects; the changes themselves were made"
            );
            seen = now;
        }
    }
}
