//! The refresh engine: the operations every front end calls.
//!
//! [`Broker`] is a thin async driver. The decisions (serve, refresh, adopt,
//! mark for re-login, serve stale, give up) are pure: functions in
//! [`decide`], and the refresh of one grant as a state machine in `refresh`
//! (`Refresh::step(now, event) -> action`). The driver carries them out
//! through [`Store`], [`Provider`](crate::Provider) and an
//! injected [`Runtime`].
//!
//! Two rules shape the refresh path:
//!
//! * **Persist before answer.** A refresh token the provider rotated is
//!   written to the store (compare-and-swap on the grant's version) before
//!   any caller sees the access token obtained with it. If the store will not
//!   take it, the payload stays in memory as a *pending write*, retried in
//!   the background and by the next request, and the caller is told
//!   `store_unavailable`; the lease is kept so no other instance refreshes
//!   with the rotated-away token meanwhile.
//! * **One refresh per grant at a time.** Inside a process, concurrent
//!   requests share one refresh (single flight). Across processes, a lease
//!   beside the grant record lets one instance refresh while the others wait
//!   for its "token refreshed" notice (or the lease deadline) and re-read.

pub(crate) mod cache;
pub mod decide;
mod error;
mod handles;
mod login;
mod maintenance;
mod metrics;
mod refresh;
mod token;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_channel::oneshot;
use futures_util::StreamExt;
use secrecy::SecretString;

pub use self::decide::{BreakerPolicy, BreakerState, CircuitBreaker, TokenDecision};
pub use self::error::{EngineError, ErrorCode};
pub use self::handles::{
    GrantRevocation, HandleInfo, MintedHandle, PageRevocation, ProviderRevocation, REVOKE_TICKET_TTL,
};
pub use self::login::{
    BROWSER_PROOF_LEN, Callback, Completed, DeviceConfirmation, DevicePoll, DeviceStart, HandoffFetch, HandoffState,
    LoginComplete, LoginStart, MIN_HANDOFF_TOKEN_LEN, TokenHandout,
};
pub use self::maintenance::{
    GcCandidate, GcReport, GrantDetails, GrantFilter, GrantSummary, HandleSummary, OperatorRevocation, ResealReport,
    Stats, SweepCursor, SweepReport, sweep_pass,
};
pub use self::metrics::{LATENCY_BUCKETS_MS, LatencyHistogram, MetricsSnapshot, RefreshOutcome, RotationMismatch};

use self::cache::TokenCache;
use self::metrics::Metrics;
use self::token::{Flight, Pending};
use crate::catalogue::Catalogue;
use crate::keys::{MasterKeyring, RecordKeys, SymmetricKey};
use crate::random::Random;
use crate::records::{GrantId, HandoffId};
use crate::runtime::Runtime;
use crate::store::{Notice, Store, StoreError};
use crate::time::Timestamp;

/// The path of the broker's redirect URI: where a provider sends the browser
/// back after a login.
pub const REDIRECT_PATH: &str = "/logged-in";

/// The exact redirect URI registered with providers: the broker's public base
/// URL and [`REDIRECT_PATH`]. The one place it is built: the engine sends it
/// with a login, the provider clients with the code exchange.
pub fn redirect_uri(public_url: &str) -> String {
    format!("{}{REDIRECT_PATH}", public_url.trim_end_matches('/'))
}

/// Tunables of the engine. The defaults are what a production broker uses.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This instance's name in leases; empty means "generate one".
    pub instance_id: String,
    /// The broker's public base URL (the redirect URI is [`redirect_uri`] of it).
    pub public_url: String,
    /// Validity an access token must have left to be served, unless the client asks for more.
    pub min_validity: Duration,
    /// How long a refresh lease is held at most.
    pub lease_ttl: Duration,
    /// How often a lease waiter re-reads even without a notice.
    pub lease_poll: Duration,
    /// How long a login transaction (the `state`) is accepted.
    pub login_ttl: Duration,
    /// How long a hand-off waits for its login and its fetch.
    pub handoff_ttl: Duration,
    /// How long device codes live.
    pub device_ttl: Duration,
    /// The polling interval device clients are told.
    pub device_interval: Duration,
    /// Cached tokens at most.
    pub cache_capacity: usize,
    /// Cached tokens are re-validated against the store after this long.
    pub cache_ttl: Duration,
    /// Retries of a transient provider failure within one refresh.
    pub provider_retries: u32,
    /// First retry delay (doubles each time, with jitter).
    pub provider_retry_base: Duration,
    /// A provider's `Retry-After` longer than this is not waited out inside a request.
    pub max_retry_wait: Duration,
    /// `Retry-After` given when a provider fails without saying.
    pub provider_retry_after: Duration,
    /// Per-provider circuit breaker.
    pub breaker: BreakerPolicy,
    /// Immediate attempts to store a refreshed grant before keeping it pending.
    pub persist_attempts: u32,
    /// How often a pending write is retried in the background.
    pub pending_retry: Duration,
    /// How long the lease is held (and renewed on each retry) while a
    /// rotated token waits to be stored: long enough to outlast a store
    /// outage, so no other instance refreshes with the rotated-away token.
    pub pending_lease_ttl: Duration,
    /// A handle's last-used time is written at most this often.
    pub touch_interval: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            instance_id: String::new(),
            public_url: "http://127.0.0.1:8080".into(),
            min_validity: Duration::from_secs(300),
            lease_ttl: Duration::from_secs(30),
            lease_poll: Duration::from_secs(1),
            login_ttl: Duration::from_secs(600),
            handoff_ttl: Duration::from_secs(900),
            device_ttl: Duration::from_secs(900),
            device_interval: Duration::from_secs(5),
            cache_capacity: 100_000,
            cache_ttl: Duration::from_secs(600),
            provider_retries: 2,
            provider_retry_base: Duration::from_millis(250),
            max_retry_wait: Duration::from_secs(5),
            provider_retry_after: Duration::from_secs(30),
            breaker: BreakerPolicy::default(),
            persist_attempts: 3,
            pending_retry: Duration::from_secs(1),
            pending_lease_ttl: Duration::from_secs(600),
            touch_interval: Duration::from_secs(3600),
        }
    }
}

/// What a broker is built from.
pub struct BrokerParts {
    /// Where records live.
    pub store: Arc<dyn Store>,
    /// Services and providers.
    pub catalogue: Catalogue,
    /// Master keys (the first is current).
    pub keyring: MasterKeyring,
    /// Clock, timers, spawning.
    pub runtime: Arc<dyn Runtime>,
    /// Randomness.
    pub rng: Arc<dyn Random>,
    /// Tunables.
    pub config: EngineConfig,
}

/// An access token as handed to a client.
///
/// Laid out in the order written (`repr(C)`): what a cache hit reads to
/// answer — the token, its expiry and the service id — comes first, so
/// that with the `Arc`'s counts before it they span the first 72 bytes of
/// the allocation, two cache lines, where the compiler's own order put the
/// token last and spread them over three or four. With 10,000 AuthIDs
/// requested in turn, each of those lines is a memory miss.
#[derive(Clone)]
#[repr(C)]
pub struct TokenGrant {
    /// The access token.
    pub access_token: SecretString,
    /// When it expires (`None`: never).
    pub expires_at: Option<Timestamp>,
    /// The service id.
    pub service: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Token type the provider reported.
    pub token_type: Option<String>,
    /// By when the grant must be used again before the provider's idle expiry.
    pub refresh_deadline: Option<Timestamp>,
}

// What a cache hit reads ends within the grant's first 56 bytes (72 of the
// `Arc`'s allocation, counts included).
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(offset_of!(TokenGrant, access_token) + size_of::<SecretString>() <= 56);
    assert!(offset_of!(TokenGrant, expires_at) + size_of::<Option<Timestamp>>() <= 56);
    assert!(offset_of!(TokenGrant, service) + size_of::<String>() <= 56);
};

impl fmt::Debug for TokenGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenGrant")
            .field("access_token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("service", &self.service)
            .field("scopes", &self.scopes)
            .field("refresh_deadline", &self.refresh_deadline)
            .finish_non_exhaustive()
    }
}

/// The engine. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    store: Arc<dyn Store>,
    catalogue: Catalogue,
    keyring: MasterKeyring,
    record_keys: RecordKeys,
    rt: Arc<dyn Runtime>,
    rng: Arc<dyn Random>,
    config: EngineConfig,
    cache: TokenCache,
    flights: Mutex<HashMap<GrantId, Flight>>,
    breakers: Mutex<HashMap<String, CircuitBreaker>>,
    pending: Mutex<HashMap<GrantId, Pending>>,
    waiters: Mutex<HashMap<GrantId, Vec<oneshot::Sender<()>>>>,
    device_polls: Mutex<HashMap<HandoffId, Timestamp>>,
    sweep_cursor: Mutex<SweepCursor>,
    metrics: Metrics,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a few map operations; a panic in one
    // cannot leave a half-updated entry, so poisoning is safe to ignore.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Broker {
    /// Builds a broker. Call [`Broker::start`] to follow the store's notices.
    pub fn new(parts: BrokerParts) -> Self {
        let BrokerParts { store, catalogue, keyring, runtime, rng, mut config } = parts;
        if config.instance_id.is_empty() {
            config.instance_id = format!("instance-{}", crate::records::GrantId::generate(rng.as_ref()));
        }
        let cache = TokenCache::new(SymmetricKey::generate(rng.as_ref()), config.cache_capacity, config.cache_ttl);
        Broker {
            inner: Arc::new(Inner {
                store,
                catalogue,
                record_keys: keyring.record_keys(),
                keyring,
                rt: runtime,
                rng,
                config,
                cache,
                flights: Mutex::default(),
                breakers: Mutex::default(),
                pending: Mutex::default(),
                waiters: Mutex::default(),
                device_polls: Mutex::default(),
                sweep_cursor: Mutex::default(),
                metrics: Metrics::default(),
            }),
        }
    }

    /// Subscribes to the store's notices: "grant changed" purges this
    /// instance's cache, "token refreshed" wakes requests waiting on another
    /// instance's lease, and "resync" (notices may have been lost while the
    /// store's listener was disconnected) purges the whole cache and wakes
    /// every waiter.
    pub async fn start(&self) -> Result<(), StoreError> {
        let mut notices = self.inner.store.subscribe().await?;
        let weak = Arc::downgrade(&self.inner);
        self.inner.rt.spawn(Box::pin(async move {
            while let Some(notice) = notices.next().await {
                let Some(inner) = weak.upgrade() else { break };
                match notice {
                    Notice::GrantChanged(grant) => {
                        inner.cache.purge_grant(&grant);
                        inner.wake(&grant);
                    }
                    Notice::TokenRefreshed(grant) => inner.wake(&grant),
                    Notice::Resync => {
                        inner.cache.purge_all();
                        inner.wake_all();
                    }
                }
            }
        }));
        Ok(())
    }

    /// The services and providers.
    pub fn catalogue(&self) -> &Catalogue {
        &self.inner.catalogue
    }

    /// How long a login may take from the click to the provider's answer.
    pub fn login_ttl(&self) -> Duration {
        self.inner.config.login_ttl
    }

    /// This instance's id in leases.
    pub fn instance_id(&self) -> &str {
        &self.inner.config.instance_id
    }

    /// The counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let pending = lock(&self.inner.pending).len();
        self.inner.metrics.snapshot(pending, self.inner.cache.len())
    }

    /// How long a token this broker served has left, by the engine's clock
    /// (`None`: it never expires). Front ends answer `expires_in` with it, so
    /// the lifetime a client is told and the one the engine serves by come
    /// from the same clock.
    pub fn expires_in(&self, token: &TokenGrant) -> Option<Duration> {
        token.expires_at.map(|at| at.duration_since(self.inner.now()))
    }

    /// Providers whose refresh answers first contradicted the catalogue's
    /// `rotates_refresh_tokens` since the last call, each provider and
    /// direction once per process: for the front end to warn about. Cheap
    /// when there are none (one atomic read).
    pub fn take_rotation_mismatches(&self) -> Vec<RotationMismatch> {
        self.inner.metrics.take_unreported()
    }

    /// Provider refreshes running in this process (for a graceful shutdown
    /// that lets them finish storing what they obtained).
    pub fn refreshes_in_flight(&self) -> usize {
        lock(&self.inner.flights).len()
    }

    /// Tries once to store every pending write (for a graceful shutdown);
    /// answers how many remain.
    pub async fn flush_pending(&self) -> usize {
        let grants: Vec<GrantId> = lock(&self.inner.pending).keys().copied().collect();
        for grant in grants {
            let _ = self.inner.flush_pending(&grant).await;
        }
        lock(&self.inner.pending).len()
    }

    /// The state of a provider's circuit breaker.
    pub fn breaker_state(&self, provider: &str) -> BreakerState {
        lock(&self.inner.breakers)
            .get(provider)
            .map(CircuitBreaker::state)
            .unwrap_or(BreakerState::Closed { failures: 0 })
    }

    /// The exact redirect URI registered with providers.
    pub fn redirect_uri(&self) -> String {
        self.inner.redirect_uri()
    }
}

impl Inner {
    fn redirect_uri(&self) -> String {
        redirect_uri(&self.config.public_url)
    }

    fn now(&self) -> Timestamp {
        self.rt.now()
    }

    /// A receiver woken when the grant's token changes (here or, through a
    /// notice, on another instance).
    fn waiter(&self, grant: &GrantId) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut waiters = lock(&self.waiters);
        let list = waiters.entry(*grant).or_default();
        list.retain(|s| !s.is_canceled());
        list.push(tx);
        rx
    }

    fn wake(&self, grant: &GrantId) {
        for tx in lock(&self.waiters).remove(grant).unwrap_or_default() {
            let _ = tx.send(());
        }
    }

    /// Wakes every waiter: a notice for any grant may have been lost.
    fn wake_all(&self) {
        for tx in std::mem::take(&mut *lock(&self.waiters)).into_values().flatten() {
            let _ = tx.send(());
        }
    }

    /// Purges this instance's cache for a grant and tells the others.
    async fn grant_changed(&self, grant: &GrantId) {
        self.cache.purge_grant(grant);
        self.wake(grant);
        // Other instances purge when the notice arrives; our own cache is
        // already clean, so a failed publish only delays theirs (bounded by
        // the cache TTL). The change itself stands; the failure is counted
        // for the front end to report.
        if self.store.publish(Notice::GrantChanged(*grant)).await.is_err() {
            Metrics::bump(&self.metrics.notice_publish_failures);
        }
    }
}
