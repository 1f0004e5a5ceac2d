//! Counters the engine keeps about itself; the server renders them for Prometheus.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// How a provider refresh ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefreshOutcome {
    /// A new access token (rotation or not).
    Success,
    /// `invalid_grant`.
    InvalidGrant,
    /// Timeout, 5xx, 429, malformed answer.
    Transient,
    /// `invalid_client` and the like.
    Misconfigured,
    /// Refused locally by the open circuit breaker.
    BreakerOpen,
    /// Given up because this instance's lease could not be kept while the
    /// provider was slow (another instance holds it now).
    LeaseLost,
}

impl RefreshOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshOutcome::Success => "success",
            RefreshOutcome::InvalidGrant => "invalid_grant",
            RefreshOutcome::Transient => "transient",
            RefreshOutcome::Misconfigured => "misconfigured",
            RefreshOutcome::BreakerOpen => "breaker_open",
            RefreshOutcome::LeaseLost => "lease_lost",
        }
    }
}

/// Upper bounds (milliseconds) of the provider latency histogram's buckets.
pub const LATENCY_BUCKETS_MS: [u64; 11] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000];

/// A cumulative-ready latency histogram for one provider.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Observations per bucket of [`LATENCY_BUCKETS_MS`], the last one above all bounds.
    pub buckets: [u64; LATENCY_BUCKETS_MS.len() + 1],
    /// Sum of all observations in milliseconds.
    pub sum_ms: u64,
    /// Number of observations.
    pub count: u64,
}

impl LatencyHistogram {
    fn observe(&mut self, ms: u64) {
        let index = LATENCY_BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(LATENCY_BUCKETS_MS.len());
        self.buckets[index] += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
        self.count += 1;
    }
}

#[derive(Default)]
pub(crate) struct Metrics {
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) single_flight_joins: AtomicU64,
    pub(crate) lease_waits: AtomicU64,
    pub(crate) lease_renewals: AtomicU64,
    pub(crate) adopted_tokens: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) persist_failures: AtomicU64,
    pub(crate) failed_secrets: AtomicU64,
    refreshes: Mutex<BTreeMap<(String, RefreshOutcome), u64>>,
    latency: Mutex<BTreeMap<String, LatencyHistogram>>,
}

impl Metrics {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refresh(&self, provider: &str, outcome: RefreshOutcome) {
        let mut map = self.refreshes.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((provider.to_owned(), outcome)).or_default() += 1;
    }

    pub(crate) fn provider_latency(&self, provider: &str, ms: u64) {
        let mut map = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(provider.to_owned()).or_default().observe(ms);
    }

    pub(crate) fn snapshot(&self, pending_writes: usize, cached_tokens: usize) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            cache_hits: get(&self.cache_hits),
            cache_misses: get(&self.cache_misses),
            single_flight_joins: get(&self.single_flight_joins),
            lease_waits: get(&self.lease_waits),
            lease_renewals: get(&self.lease_renewals),
            adopted_tokens: get(&self.adopted_tokens),
            stale_served: get(&self.stale_served),
            persist_failures: get(&self.persist_failures),
            failed_secrets: get(&self.failed_secrets),
            pending_writes: pending_writes as u64,
            cached_tokens: cached_tokens as u64,
            refreshes: self.refreshes.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            provider_latency: self.latency.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// A copy of the engine's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Token requests answered from the cache.
    pub cache_hits: u64,
    /// Token requests the cache could not answer.
    pub cache_misses: u64,
    /// Requests that joined a refresh already in flight in this process.
    pub single_flight_joins: u64,
    /// Times a refresh waited for another instance's lease.
    pub lease_waits: u64,
    /// Times this instance renewed its lease while a slow provider answered.
    pub lease_renewals: u64,
    /// Times another instance's (or an earlier) token was adopted instead of refreshing.
    pub adopted_tokens: u64,
    /// Stored tokens served while the provider was failing.
    pub stale_served: u64,
    /// Failed attempts to store a refreshed grant.
    pub persist_failures: u64,
    /// AuthIDs with a known keyid but a wrong secret.
    pub failed_secrets: u64,
    /// Refreshed grants held in memory until the store takes them.
    pub pending_writes: u64,
    /// Tokens in the cache.
    pub cached_tokens: u64,
    /// Provider refreshes by provider id and outcome.
    pub refreshes: BTreeMap<(String, RefreshOutcome), u64>,
    /// Latency of provider refresh calls, by provider id.
    pub provider_latency: BTreeMap<String, LatencyHistogram>,
}
