//! Test support for this crate and every adapter: a manual clock and
//! runtime, a deterministic random source, a store that fails on command
//! ([`FaultStore`]), a scripted provider ([`ScriptedProvider`]), and the store
//! conformance suite ([`conformance`]).
//!
//! Built for this crate's own tests and, for other crates, behind the
//! `testing` feature. Nothing here is fit for production use: [`SeqRandom`]
//! is predictable by design.

pub mod conformance;
mod faults;
mod provider;

pub use faults::FaultStore;
pub use provider::{Behaviour, EventLog, ScriptedProvider};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_channel::oneshot;

use crate::random::Random;
use crate::runtime::{BoxFuture, Runtime};
use crate::time::{Clock, Timestamp};

/// A clock that moves only when told to. Clones share one time. Timers set
/// with [`Runtime::sleep_until`] fire when [`ManualClock::advance`] or
/// [`ManualClock::set`] reaches them, so tests drive time instead of waiting.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<ClockState>>);

#[derive(Debug)]
struct ClockState {
    now: Timestamp,
    sleepers: Vec<(Timestamp, oneshot::Sender<()>)>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock(Arc::new(Mutex::new(ClockState { now: start, sleepers: Vec::new() })))
    }

    fn state(&self) -> MutexGuard<'_, ClockState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the clock forward, firing every timer now due.
    pub fn advance(&self, by: Duration) {
        let to = self.now().saturating_add(by);
        self.set(to);
    }

    /// Sets the clock to `to`, firing every timer now due.
    pub fn set(&self, to: Timestamp) {
        let mut state = self.state();
        state.now = to;
        let (due, waiting) = std::mem::take(&mut state.sleepers).into_iter().partition(|(at, _)| *at <= to);
        state.sleepers = waiting;
        drop(state);
        for (_, tx) in due {
            let _ = tx.send(());
        }
    }

    /// How many timers are waiting (for tests that must know a task is asleep).
    pub fn sleepers(&self) -> usize {
        let mut state = self.state();
        state.sleepers.retain(|(_, tx)| !tx.is_canceled());
        state.sleepers.len()
    }

    /// A future that completes once the clock reads `deadline`.
    pub fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        let mut state = self.state();
        if state.now >= deadline {
            return Box::pin(async {});
        }
        let (tx, rx) = oneshot::channel();
        state.sleepers.push((deadline, tx));
        Box::pin(async move {
            let _ = rx.await;
        })
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
        self.state().now
    }
}

/// Spawns a task on whatever executor the test uses.
pub type Spawner = Arc<dyn Fn(BoxFuture<'static, ()>) + Send + Sync>;

/// A [`Runtime`] over a [`ManualClock`] and the test's own spawner.
#[derive(Clone)]
pub struct ManualRuntime {
    /// The clock; advance it to move time.
    pub clock: ManualClock,
    spawner: Spawner,
}

impl ManualRuntime {
    /// A runtime on `clock` that spawns with `spawner` (e.g. `tokio::spawn`).
    pub fn new(clock: ManualClock, spawner: Spawner) -> Self {
        ManualRuntime { clock, spawner }
    }
}

impl Clock for ManualRuntime {
    fn now(&self) -> Timestamp {
        self.clock.now()
    }
}

impl Runtime for ManualRuntime {
    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        self.clock.sleep_until(deadline)
    }

    fn spawn(&self, task: BoxFuture<'static, ()>) {
        (self.spawner)(task)
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

/// A store that keeps something alive for as long as it lives — a temporary
/// directory, a database schema dropped on `Drop` — and otherwise delegates
/// every method (the provided ones too, so an adapter's overrides are used).
pub struct Guarded<S, G> {
    /// The store.
    pub store: S,
    _guard: G,
}

impl<S, G> Guarded<S, G> {
    /// `store`, keeping `guard` until it is dropped.
    pub fn new(store: S, guard: G) -> Self {
        Guarded { store, _guard: guard }
    }
}

#[async_trait::async_trait]
impl<S: crate::Store, G: Send + Sync> crate::Store for Guarded<S, G> {
    async fn get(&self, kind: crate::RecordKind, id: &[u8]) -> Result<Option<crate::StoredRecord>, crate::StoreError> {
        self.store.get(kind, id).await
    }
    async fn insert(
        &self,
        kind: crate::RecordKind,
        id: &[u8],
        group: Option<&[u8]>,
        body: &[u8],
    ) -> Result<(), crate::StoreError> {
        self.store.insert(kind, id, group, body).await
    }
    async fn compare_and_swap(
        &self,
        kind: crate::RecordKind,
        id: &[u8],
        expected: u64,
        group: Option<&[u8]>,
        body: &[u8],
    ) -> Result<u64, crate::StoreError> {
        self.store.compare_and_swap(kind, id, expected, group, body).await
    }
    async fn delete(&self, kind: crate::RecordKind, id: &[u8], expected: Option<u64>) -> Result<(), crate::StoreError> {
        self.store.delete(kind, id, expected).await
    }
    async fn list(&self, query: &crate::ListQuery) -> Result<crate::Page, crate::StoreError> {
        self.store.list(query).await
    }
    async fn publish(&self, notice: crate::Notice) -> Result<(), crate::StoreError> {
        self.store.publish(notice).await
    }
    async fn subscribe(&self) -> Result<crate::NoticeStream, crate::StoreError> {
        self.store.subscribe().await
    }
    async fn ping(&self) -> Result<(), crate::StoreError> {
        self.store.ping().await
    }
    async fn acquire_lease(
        &self,
        grant: &crate::GrantId,
        owner: &str,
        deadline: Timestamp,
        now: Timestamp,
    ) -> Result<crate::LeaseOutcome, crate::StoreError> {
        self.store.acquire_lease(grant, owner, deadline, now).await
    }
    async fn release_lease(&self, grant: &crate::GrantId, owner: &str) -> Result<bool, crate::StoreError> {
        self.store.release_lease(grant, owner).await
    }
}
