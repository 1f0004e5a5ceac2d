//! Counters the engine keeps about itself; the server renders them for Prometheus.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::catalogue::ProviderSpec;

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

/// A provider whose refresh answer contradicted the catalogue's
/// `rotates_refresh_tokens`: the catalogue entry (or the provider) changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationMismatch {
    /// The provider id.
    pub provider: String,
    /// Whether the provider rotated the refresh token (the catalogue says the opposite).
    pub rotated: bool,
}

impl std::fmt::Display for RotationMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (did, says) = if self.rotated { ("issued a new", "false") } else { ("kept its", "true") };
        write!(
            f,
            "provider '{}' {did} refresh token on a refresh, but the catalogue says rotates_refresh_tokens = {says}; \
             check the provider's documentation and correct the catalogue",
            self.provider
        )
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
    pub(crate) swept_records: AtomicU64,
    pub(crate) notice_publish_failures: AtomicU64,
    refreshes: Mutex<BTreeMap<(String, RefreshOutcome), u64>>,
    latency: Mutex<BTreeMap<String, LatencyHistogram>>,
    /// Refreshes that contradicted the catalogue, by (provider, rotated).
    rotation_mismatches: Mutex<BTreeMap<(String, bool), u64>>,
    /// Contradictions seen for the first time and not yet taken for the log.
    unreported: Mutex<Vec<RotationMismatch>>,
    /// Whether `unreported` holds any: read on every token request, so the
    /// common case takes no lock.
    has_unreported: AtomicBool,
}

impl Metrics {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refresh(&self, provider: &str, outcome: RefreshOutcome) {
        let mut map = self.refreshes.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((provider.to_owned(), outcome)).or_default() += 1;
    }

    /// A refresh succeeded: counts it when whether the provider rotated the
    /// refresh token contradicts what the catalogue says (nothing when it
    /// says nothing). The first contradiction of each kind per provider is
    /// kept for the log ([`Metrics::take_unreported`]).
    pub(crate) fn refresh_rotation(&self, spec: Option<&ProviderSpec>, rotated: bool) {
        let Some(spec) = spec else { return };
        if spec.rotates_refresh_tokens.is_none_or(|says| says == rotated) {
            return;
        }
        let mut map = self.rotation_mismatches.lock().unwrap_or_else(|p| p.into_inner());
        let count = map.entry((spec.id.clone(), rotated)).or_default();
        *count += 1;
        if *count == 1 {
            let mismatch = RotationMismatch { provider: spec.id.clone(), rotated };
            self.unreported.lock().unwrap_or_else(|p| p.into_inner()).push(mismatch);
            self.has_unreported.store(true, Ordering::Release);
        }
    }

    /// The contradictions first seen since the last call (usually none).
    pub(crate) fn take_unreported(&self) -> Vec<RotationMismatch> {
        if !self.has_unreported.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.unreported.lock().unwrap_or_else(|p| p.into_inner()))
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
            swept_records: get(&self.swept_records),
            notice_publish_failures: get(&self.notice_publish_failures),
            pending_writes: pending_writes as u64,
            cached_tokens: cached_tokens as u64,
            refreshes: self.refreshes.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            provider_latency: self.latency.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            rotation_mismatches: self.rotation_mismatches.lock().unwrap_or_else(|p| p.into_inner()).clone(),
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
    /// Expired login transactions, hand-offs and device codes deleted by
    /// [`Broker::sweep_expired`](super::Broker::sweep_expired).
    pub swept_records: u64,
    /// "Grant changed" notices (a revocation, a re-login mark, a gc) the
    /// store would not publish: other instances keep serving that grant's
    /// cached tokens until their cache entries age out or their listener
    /// reconnects. The change itself was made.
    pub notice_publish_failures: u64,
    /// Refreshed grants held in memory until the store takes them.
    pub pending_writes: u64,
    /// Tokens in the cache.
    pub cached_tokens: u64,
    /// Provider refreshes by provider id and outcome.
    pub refreshes: BTreeMap<(String, RefreshOutcome), u64>,
    /// Latency of provider refresh calls, by provider id.
    pub provider_latency: BTreeMap<String, LatencyHistogram>,
    /// Successful refreshes whose rotation contradicted the catalogue's
    /// `rotates_refresh_tokens`, by provider id and whether the provider rotated.
    pub rotation_mismatches: BTreeMap<(String, bool), u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_that_contradict_the_catalogue_are_counted_and_reported_once() {
        let metrics = Metrics::default();
        let mut says_rotates = ProviderSpec::new("box");
        says_rotates.rotates_refresh_tokens = Some(true);
        let mut says_not = ProviderSpec::new("google");
        says_not.rotates_refresh_tokens = Some(false);
        let silent = ProviderSpec::new("custom");

        metrics.refresh_rotation(Some(&says_rotates), true);
        metrics.refresh_rotation(Some(&says_not), false);
        metrics.refresh_rotation(Some(&silent), true);
        metrics.refresh_rotation(None, true);
        assert!(metrics.take_unreported().is_empty(), "as the catalogue says, or it says nothing");

        for _ in 0..3 {
            metrics.refresh_rotation(Some(&says_not), true);
        }
        metrics.refresh_rotation(Some(&says_rotates), false);
        let reported = metrics.take_unreported();
        assert_eq!(
            reported,
            [
                RotationMismatch { provider: "google".into(), rotated: true },
                RotationMismatch { provider: "box".into(), rotated: false },
            ]
        );
        assert!(reported[0].to_string().contains("rotates_refresh_tokens = false"), "{}", reported[0]);
        metrics.refresh_rotation(Some(&says_not), true);
        assert!(metrics.take_unreported().is_empty(), "each kind is reported once");
        let counted = metrics.snapshot(0, 0).rotation_mismatches;
        assert_eq!(counted.get(&("google".to_owned(), true)), Some(&4));
        assert_eq!(counted.get(&("box".to_owned(), false)), Some(&1));
        assert_eq!(counted.len(), 2);
    }
}
