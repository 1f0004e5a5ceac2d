//! The token path: cache, authentication, single flight, lease, refresh,
//! persist-before-answer, pending writes.

use std::sync::Arc;
use std::time::Duration;

use futures_channel::oneshot;
use futures_util::FutureExt;
use futures_util::future::{Shared, select};
use secrecy::SecretString;

use super::decide::{self, TokenDecision};
use super::error::STORE_RETRY_AFTER;
use super::metrics::{Metrics, RefreshOutcome};
use super::{Broker, EngineError, Inner, TokenGrant, lock};
use crate::authid::AuthId;
use crate::catalogue::ProviderEntry;
use crate::envelope::OpenError;
use crate::keys::DataKey;
use crate::provider::{ProviderError, RefreshRequest, TokenResponse};
use crate::random::array;
use crate::records::{Grant, GrantId, GrantPayload, GrantState, Handle};
use crate::runtime::BoxFuture;
use crate::store::{LeaseOutcome, Notice, StoreError, StoreExt};
use crate::time::Timestamp;

/// A refresh's lease is renewed every TTL / this while the provider answers.
const LEASE_RENEW_FRACTION: u32 = 3;

/// A token answer and the token's lifetime (for the cache's half-lifetime cap).
pub(crate) type Fresh = (TokenGrant, Option<Duration>);
type FlightResult = Result<Fresh, EngineError>;
pub(crate) type Flight = Shared<BoxFuture<'static, FlightResult>>;

/// A refreshed grant the store has not taken yet. Holds the only copy of a
/// rotated refresh token until it is stored.
#[derive(Clone)]
pub(crate) struct PendingWrite {
    payload: GrantPayload,
    data_key: DataKey,
    used: Option<SecretString>,
    service: String,
}

enum LeaseStep {
    Adopted(Fresh),
    Holding(Grant, GrantPayload),
}

enum Persisted {
    Stored(Grant),
    /// Another writer stored a newer refresh token first.
    Superseded,
    Revoked,
    Failed,
}

enum Attempt {
    Done(FlightResult),
    /// Re-read and start over (the refresh token changed under us).
    Again,
}

impl Broker {
    /// Parses an AuthID as a client sent it and answers a token.
    pub async fn token_for(&self, authid: &str, min_validity: Option<Duration>) -> Result<TokenGrant, EngineError> {
        let authid = AuthId::parse(authid)?;
        self.token(&authid, min_validity).await
    }

    /// An access token for `authid` with at least `min_validity` left (the
    /// configured default when `None`; capped at half the token's lifetime).
    pub async fn token(&self, authid: &AuthId, min_validity: Option<Duration>) -> Result<TokenGrant, EngineError> {
        let inner = &self.inner;
        let min_validity = min_validity.unwrap_or(inner.config.min_validity);
        let key = inner.cache.key_for(authid);
        let epoch = match inner.cache.lookup(&key, inner.now(), min_validity) {
            Ok(hit) => {
                Metrics::bump(&inner.metrics.cache_hits);
                return Ok(hit);
            }
            Err(epoch) => epoch,
        };
        Metrics::bump(&inner.metrics.cache_misses);
        let (handle, data_key) = inner.authenticate(authid).await?;
        let grant_id = handle.grant_id;
        inner.touch(handle);
        let (token, lifetime) = inner.token_for_grant(grant_id, &data_key, min_validity).await?;
        inner.cache.insert(key, grant_id, &token, lifetime, inner.now(), epoch);
        Ok(token)
    }
}

impl Inner {
    /// Loads the handle and unwraps the grant's data key with the AuthID's secret.
    pub(super) async fn authenticate(&self, authid: &AuthId) -> Result<(Handle, DataKey), EngineError> {
        let handle: Handle = self.store.load(authid.keyid().as_bytes()).await?.ok_or(EngineError::AuthIdInvalid)?;
        if handle.revoked_at.is_some() {
            return Err(EngineError::AuthIdRevoked);
        }
        match handle.unwrap_data_key(authid.secret(), &self.keyring) {
            Ok(data_key) => Ok((handle, data_key)),
            Err(OpenError::Authentication) => {
                Metrics::bump(&self.metrics.failed_secrets);
                Err(EngineError::AuthIdInvalid)
            }
            Err(OpenError::UnknownMasterKey(id)) => {
                Err(EngineError::Corrupt { detail: format!("master key '{id}' is not configured") })
            }
            Err(e) => Err(EngineError::Corrupt { detail: format!("handle key wrap: {e}") }),
        }
    }

    /// Records that a handle was used, at most once per `touch_interval`, in
    /// the background: a lost update only makes garbage collection later.
    fn touch(self: &Arc<Self>, mut handle: Handle) {
        let now = self.now();
        if now.duration_since(handle.last_used_at) < self.config.touch_interval {
            return;
        }
        let me = Arc::clone(self);
        self.rt.spawn(Box::pin(async move {
            handle.last_used_at = now;
            let _ = me.store.update(&mut handle).await;
        }));
    }

    pub(super) async fn load_grant(&self, id: &GrantId) -> Result<Grant, EngineError> {
        // A handle whose grant is gone (collected) is as good as unknown.
        self.store.load(id.as_bytes()).await?.ok_or(EngineError::AuthIdInvalid)
    }

    pub(super) fn open(&self, grant: &Grant, data_key: &DataKey) -> Result<GrantPayload, EngineError> {
        if grant.state == GrantState::Revoked {
            return Err(EngineError::AuthIdRevoked);
        }
        grant.open_payload(data_key).map_err(|e| EngineError::Corrupt { detail: format!("grant payload: {e}") })
    }

    /// The answer for a payload whose access token is to be served.
    fn answer(&self, grant: &Grant, payload: &GrantPayload) -> FlightResult {
        let access_token = payload
            .access_token
            .clone()
            .ok_or_else(|| EngineError::Corrupt { detail: "grant has no access token to serve".into() })?;
        let refresh_deadline = self
            .catalogue
            .provider_for(&grant.service)
            .and_then(|entry| decide::refresh_deadline(payload, &entry.spec));
        let lifetime = payload.access_expires_at.map(|expiry| expiry.duration_since(payload.refreshed_at));
        let token = TokenGrant {
            access_token,
            expires_at: payload.access_expires_at,
            service: grant.service.clone(),
            scopes: payload.scopes.clone(),
            token_type: payload.token_type.clone(),
            refresh_deadline,
        };
        Ok((token, lifetime))
    }

    fn refuse(&self, grant: &Grant, decision: TokenDecision) -> EngineError {
        match decision {
            TokenDecision::Revoked => EngineError::AuthIdRevoked,
            _ => EngineError::ReauthRequired { service: grant.service.clone() },
        }
    }

    pub(super) async fn token_for_grant(
        self: &Arc<Self>,
        grant_id: GrantId,
        data_key: &DataKey,
        min_validity: Duration,
    ) -> FlightResult {
        self.flush_pending(&grant_id).await?;
        match self.read_for_refresh(&grant_id, data_key, min_validity).await? {
            Ok(fresh) => Ok(fresh),
            Err(_) => self.join_flight(grant_id, data_key, min_validity).await,
        }
    }

    /// Joins the refresh in flight for this grant, or starts one. The refresh
    /// runs as its own task so it completes (and stores a rotated token) even
    /// if every request waiting on it goes away.
    async fn join_flight(
        self: &Arc<Self>,
        grant_id: GrantId,
        data_key: &DataKey,
        min_validity: Duration,
    ) -> FlightResult {
        let flight = {
            let mut flights = lock(&self.flights);
            match flights.get(&grant_id) {
                Some(flight) => {
                    Metrics::bump(&self.metrics.single_flight_joins);
                    flight.clone()
                }
                None => {
                    let (tx, rx) = oneshot::channel();
                    let lost = EngineError::ProviderUnavailable { retry_after: Duration::from_secs(1) };
                    let flight: Flight = rx.map(move |r| r.unwrap_or(Err(lost))).boxed().shared();
                    flights.insert(grant_id, flight.clone());
                    let me = Arc::clone(self);
                    let data_key = data_key.clone();
                    self.rt.spawn(Box::pin(async move {
                        let result = me.refresh_grant(grant_id, &data_key, min_validity).await;
                        lock(&me.flights).remove(&grant_id);
                        let _ = tx.send(result);
                    }));
                    flight
                }
            }
        };
        flight.await
    }

    async fn refresh_grant(
        self: &Arc<Self>,
        grant_id: GrantId,
        data_key: &DataKey,
        min_validity: Duration,
    ) -> FlightResult {
        // `Again` happens when the refresh token changed under us; a few
        // rounds are plenty, more means something is flapping.
        for _ in 0..4 {
            let (grant, payload) = match self.lease_or_adopt(&grant_id, data_key, min_validity).await? {
                LeaseStep::Adopted(fresh) => return Ok(fresh),
                LeaseStep::Holding(grant, payload) => (grant, payload),
            };
            match self.refresh_holding_lease(grant, payload, data_key).await {
                Attempt::Done(result) => return result,
                Attempt::Again => Metrics::bump(&self.metrics.adopted_tokens),
            }
        }
        Err(EngineError::ProviderUnavailable { retry_after: self.config.provider_retry_after })
    }

    /// Reads the grant and decides: `Ok(Ok(answer))` when the stored token
    /// will do, `Ok(Err((grant, payload)))` when it must be refreshed.
    async fn read_for_refresh(
        &self,
        grant_id: &GrantId,
        data_key: &DataKey,
        min_validity: Duration,
    ) -> Result<Result<Fresh, (Grant, GrantPayload)>, EngineError> {
        let grant = self.load_grant(grant_id).await?;
        let payload = self.open(&grant, data_key)?;
        match decide::decide(self.now(), grant.state, &payload, min_validity) {
            TokenDecision::Serve => self.answer(&grant, &payload).map(Ok),
            TokenDecision::Refresh => Ok(Err((grant, payload))),
            refused => Err(self.refuse(&grant, refused)),
        }
    }

    /// Re-reads the grant until either its stored token will do (another
    /// instance refreshed it) or this instance holds the grant's lease.
    async fn lease_or_adopt(
        &self,
        grant_id: &GrantId,
        data_key: &DataKey,
        min_validity: Duration,
    ) -> Result<LeaseStep, EngineError> {
        // A request waits at most one lease period for another instance's
        // refresh (or its pending write) before telling its client to retry.
        let give_up = self.now().saturating_add(self.config.lease_ttl);
        loop {
            // Registered before the read, so a notice between read and wait is not lost.
            let woken = self.waiter(grant_id);
            if let Ok(fresh) = self.read_for_refresh(grant_id, data_key, min_validity).await? {
                Metrics::bump(&self.metrics.adopted_tokens);
                return Ok(LeaseStep::Adopted(fresh));
            }
            let now = self.now();
            let deadline = now.saturating_add(self.config.lease_ttl);
            match self.store.acquire_lease(grant_id, &self.config.instance_id, deadline, now).await? {
                // Read again under the lease: the previous holder may have
                // stored a new token between our read and our acquire.
                LeaseOutcome::Acquired { .. } => {
                    let step = self.read_for_refresh(grant_id, data_key, min_validity).await;
                    if !matches!(step, Ok(Err(_))) {
                        self.release(grant_id).await;
                    }
                    return match step? {
                        Err((grant, payload)) => Ok(LeaseStep::Holding(grant, payload)),
                        Ok(fresh) => {
                            Metrics::bump(&self.metrics.adopted_tokens);
                            Ok(LeaseStep::Adopted(fresh))
                        }
                    };
                }
                LeaseOutcome::Held { .. } if now >= give_up => {
                    return Err(EngineError::StoreUnavailable { retry_after: STORE_RETRY_AFTER });
                }
                LeaseOutcome::Held { deadline, .. } => {
                    Metrics::bump(&self.metrics.lease_waits);
                    let wake_at = deadline.min(now.saturating_add(self.config.lease_poll));
                    let _ = select(woken, self.rt.sleep_until(wake_at)).await;
                }
            }
        }
    }

    async fn release(&self, grant_id: &GrantId) {
        // A lease that cannot be released lapses at its deadline.
        let _ = self.store.release_lease(grant_id, &self.config.instance_id).await;
    }

    async fn refresh_holding_lease(
        self: &Arc<Self>,
        grant: Grant,
        payload: GrantPayload,
        data_key: &DataKey,
    ) -> Attempt {
        let grant_id = grant.id;
        let Some(entry) = self.catalogue.provider_for(&grant.service).cloned() else {
            self.release(&grant_id).await;
            let detail = format!("service '{}' is no longer configured", grant.service);
            return Attempt::Done(Err(EngineError::ProviderMisconfigured { detail }));
        };
        let provider = entry.spec.id.clone();
        let permit = self.with_breaker(&provider, |b, now| b.permit(now));
        if let Err(retry_after) = permit {
            self.metrics.refresh(&provider, RefreshOutcome::BreakerOpen);
            self.release(&grant_id).await;
            return Attempt::Done(self.provider_down(&grant, &payload, retry_after));
        }
        let used = payload.refresh_token.clone();
        let result = match self.call_refresh_leased(&grant_id, &entry, &payload).await {
            Ok(result) => result,
            Err(lost) => {
                // Another instance holds the lease now: it refreshes; this
                // attempt's answer, whatever it was, is not ours to store.
                self.metrics.refresh(&provider, RefreshOutcome::LeaseLost);
                return Attempt::Done(Err(lost));
            }
        };
        self.with_breaker(&provider, |breaker, now| match &result {
            // Whatever it said, the provider answered: it is alive.
            Ok(_) | Err(ProviderError::InvalidGrant { .. } | ProviderError::InvalidClient { .. }) => {
                breaker.on_success()
            }
            Err(ProviderError::Unsupported(_)) => {}
            Err(_) => breaker.on_failure(now),
        });
        match result {
            Ok(response) => {
                self.metrics.refresh(&provider, RefreshOutcome::Success);
                self.after_success(grant, &payload, response, data_key, used).await
            }
            Err(ProviderError::InvalidGrant { .. }) => {
                self.metrics.refresh(&provider, RefreshOutcome::InvalidGrant);
                let attempt = self.after_invalid_grant(grant, data_key, used.as_ref()).await;
                self.release(&grant_id).await;
                attempt
            }
            Err(e @ (ProviderError::InvalidClient { .. } | ProviderError::Unsupported(_))) => {
                self.metrics.refresh(&provider, RefreshOutcome::Misconfigured);
                self.release(&grant_id).await;
                Attempt::Done(Err(EngineError::ProviderMisconfigured { detail: e.to_string() }))
            }
            Err(e) => {
                self.metrics.refresh(&provider, RefreshOutcome::Transient);
                self.release(&grant_id).await;
                let retry_after = match e {
                    ProviderError::RateLimited { retry_after: Some(d) } => d,
                    _ => self.config.provider_retry_after,
                };
                Attempt::Done(self.provider_down(&grant, &payload, retry_after))
            }
        }
    }

    fn with_breaker<T>(&self, provider: &str, f: impl FnOnce(&mut super::CircuitBreaker, Timestamp) -> T) -> T {
        let now = self.now();
        let mut breakers = lock(&self.breakers);
        let breaker =
            breakers.entry(provider.to_owned()).or_insert_with(|| super::CircuitBreaker::new(self.config.breaker));
        f(breaker, now)
    }

    /// The provider call with this instance's lease kept alive: a heartbeat
    /// renews it every [`LEASE_RENEW_FRACTION`]th of its TTL, so a provider
    /// slower than the lease never lets a second instance refresh with the
    /// same refresh token (which a strict-rotation provider punishes by
    /// revoking the grant). If the lease is lost anyway (the store refused the
    /// renewals until it lapsed, and another instance took it), the attempt is
    /// given up.
    async fn call_refresh_leased(
        &self,
        grant_id: &GrantId,
        entry: &ProviderEntry,
        payload: &GrantPayload,
    ) -> Result<Result<TokenResponse, ProviderError>, EngineError> {
        let call = std::pin::pin!(self.call_refresh(entry, payload));
        let heartbeat = std::pin::pin!(self.heartbeat(grant_id));
        match select(call, heartbeat).await {
            futures_util::future::Either::Left((result, _)) => Ok(result),
            futures_util::future::Either::Right((lost, _)) => Err(lost),
        }
    }

    /// Renews the lease on `grant_id` until dropped; returns only when it is lost.
    async fn heartbeat(&self, grant_id: &GrantId) -> EngineError {
        let ttl = self.config.lease_ttl;
        let mut held_until = self.now().saturating_add(ttl);
        loop {
            self.rt.sleep_until(self.now().saturating_add(ttl / LEASE_RENEW_FRACTION)).await;
            let now = self.now();
            let deadline = now.saturating_add(ttl);
            match self.store.acquire_lease(grant_id, &self.config.instance_id, deadline, now).await {
                Ok(LeaseOutcome::Acquired { .. }) => {
                    held_until = deadline;
                    Metrics::bump(&self.metrics.lease_renewals);
                }
                // The store is unreachable: the lease is still ours until it lapses.
                Err(_) if now < held_until => {}
                Ok(LeaseOutcome::Held { .. }) | Err(_) => {
                    return EngineError::StoreUnavailable { retry_after: STORE_RETRY_AFTER };
                }
            }
        }
    }

    /// Asks the provider, retrying transient failures with jittered backoff;
    /// no retry starts later than one lease TTL after the first try.
    async fn call_refresh(
        &self,
        entry: &ProviderEntry,
        payload: &GrantPayload,
    ) -> Result<TokenResponse, ProviderError> {
        let Some(refresh_token) = &payload.refresh_token else {
            return Err(ProviderError::InvalidGrant { description: Some("no refresh token stored".into()) });
        };
        let request = RefreshRequest { refresh_token, scopes: &payload.scopes, extra: &payload.extra };
        let retries_until = self.now().saturating_add(self.config.lease_ttl);
        let mut attempt = 0;
        loop {
            let started = self.now();
            let result = entry.client.refresh(&request).await;
            self.metrics.provider_latency(&entry.spec.id, self.now().duration_since(started).as_millis() as u64);
            let wait = match &result {
                Err(e) if e.is_transient() && attempt < self.config.provider_retries => match e {
                    ProviderError::RateLimited { retry_after: Some(d) } if *d > self.config.max_retry_wait => {
                        return result;
                    }
                    ProviderError::RateLimited { retry_after: Some(d) } => *d,
                    _ => decide::backoff(self.config.provider_retry_base, attempt, array::<1>(self.rng.as_ref())[0]),
                },
                _ => return result,
            };
            if self.now().saturating_add(wait) >= retries_until {
                return result;
            }
            attempt += 1;
            self.rt.sleep_until(self.now().saturating_add(wait)).await;
        }
    }

    /// Serves the stored token if it is still valid at all, else says when to retry.
    fn provider_down(&self, grant: &Grant, payload: &GrantPayload, retry_after: Duration) -> FlightResult {
        if decide::usable_while_provider_down(self.now(), payload) {
            Metrics::bump(&self.metrics.stale_served);
            return self.answer(grant, payload);
        }
        Err(EngineError::ProviderUnavailable { retry_after })
    }

    async fn after_success(
        self: &Arc<Self>,
        grant: Grant,
        old: &GrantPayload,
        response: TokenResponse,
        data_key: &DataKey,
        used: Option<SecretString>,
    ) -> Attempt {
        let grant_id = grant.id;
        let (payload, rotated) = decide::apply_refresh(self.now(), old, response);
        match self.persist(grant.clone(), &payload, data_key, used.as_ref()).await {
            Persisted::Stored(grant) => {
                self.release(&grant_id).await;
                self.wake(&grant_id);
                let _ = self.store.publish(Notice::TokenRefreshed(grant_id)).await;
                Attempt::Done(self.answer(&grant, &payload))
            }
            Persisted::Superseded => {
                self.release(&grant_id).await;
                Attempt::Again
            }
            Persisted::Revoked => {
                // Revoked while we refreshed: the token just obtained must not outlive it.
                self.release(&grant_id).await;
                if rotated {
                    let pending =
                        PendingWrite { payload, data_key: data_key.clone(), used, service: grant.service.clone() };
                    self.revoke_pending_token(&pending).await;
                }
                Attempt::Done(Err(EngineError::AuthIdRevoked))
            }
            Persisted::Failed if rotated => {
                // The rotated token exists only here now. Keep it, keep the
                // lease (nobody may refresh with the old token), keep trying.
                let service = grant.service.clone();
                lock(&self.pending)
                    .insert(grant_id, PendingWrite { payload, data_key: data_key.clone(), used, service });
                self.hold_lease_for_pending(&grant_id).await;
                self.spawn_pending_flusher(grant_id);
                Attempt::Done(Err(EngineError::StoreUnavailable { retry_after: STORE_RETRY_AFTER }))
            }
            Persisted::Failed => {
                // Nothing rotated: the stored refresh token still works, so the
                // fresh access token may be served; the next request refreshes
                // again if this one is not stored meanwhile.
                self.release(&grant_id).await;
                Attempt::Done(self.answer(&grant, &payload))
            }
        }
    }

    /// Writes the refreshed payload with compare-and-swap. On a version
    /// conflict, re-applies it if the stored refresh token is still the one
    /// used (someone changed something else), and stands down otherwise.
    async fn persist(
        &self,
        mut grant: Grant,
        payload: &GrantPayload,
        data_key: &DataKey,
        used: Option<&SecretString>,
    ) -> Persisted {
        let mut failures = 0;
        for _ in 0..16 {
            let now = self.now();
            grant.seal_payload(payload, data_key, now, self.rng.as_ref());
            grant.last_used_at = now;
            grant.state = GrantState::Active;
            match self.store.update(&mut grant).await {
                Ok(()) => return Persisted::Stored(grant),
                Err(StoreError::Conflict | StoreError::NotFound) => {
                    match self.store.load::<Grant>(grant.id.as_bytes()).await {
                        Ok(None) => return Persisted::Revoked,
                        Ok(Some(current)) if current.state == GrantState::Revoked => return Persisted::Revoked,
                        Ok(Some(current)) => match current.open_payload(data_key) {
                            Ok(stored) if decide::same_refresh_token(stored.refresh_token.as_ref(), used) => {
                                grant = current
                            }
                            Ok(_) => return Persisted::Superseded,
                            Err(_) => return Persisted::Failed,
                        },
                        Err(_) => {
                            failures += 1;
                            Metrics::bump(&self.metrics.persist_failures);
                            if failures >= self.config.persist_attempts {
                                return Persisted::Failed;
                            }
                        }
                    }
                }
                Err(_) => {
                    failures += 1;
                    Metrics::bump(&self.metrics.persist_failures);
                    if failures >= self.config.persist_attempts {
                        return Persisted::Failed;
                    }
                }
            }
        }
        Persisted::Failed
    }

    /// The provider refused the refresh token we hold. Marks the grant
    /// `reauth_required` (never deletes it) unless the store meanwhile holds
    /// another refresh token, which is then adopted.
    async fn after_invalid_grant(&self, mut grant: Grant, data_key: &DataKey, used: Option<&SecretString>) -> Attempt {
        for _ in 0..16 {
            grant.state = GrantState::ReauthRequired;
            grant.updated_at = self.now();
            match self.store.update(&mut grant).await {
                Ok(()) => {
                    self.grant_changed(&grant.id).await;
                    return Attempt::Done(Err(EngineError::ReauthRequired { service: grant.service.clone() }));
                }
                Err(StoreError::Conflict | StoreError::NotFound) => {
                    let current = match self.load_grant(&grant.id).await {
                        Ok(current) => current,
                        Err(e) => return Attempt::Done(Err(e)),
                    };
                    let stored = match self.open(&current, data_key) {
                        Ok(stored) => stored,
                        Err(e) => return Attempt::Done(Err(e)),
                    };
                    if current.state != GrantState::Active
                        || !decide::same_refresh_token(stored.refresh_token.as_ref(), used)
                    {
                        return Attempt::Again;
                    }
                    grant = current;
                }
                Err(e) => return Attempt::Done(Err(e.into())),
            }
        }
        Attempt::Done(Err(EngineError::StoreUnavailable { retry_after: STORE_RETRY_AFTER }))
    }

    /// Stores a pending write if there is one for the grant.
    ///
    /// The lease is renewed first: while the rotated token exists only here,
    /// no other instance may refresh with the old one. A pending write whose
    /// grant was revoked (or replaced) meanwhile is dropped, and its token is
    /// revoked at the provider, so no live token outlives its grant.
    pub(super) async fn flush_pending(&self, grant_id: &GrantId) -> Result<(), EngineError> {
        let Some(pending) = lock(&self.pending).get(grant_id).cloned() else { return Ok(()) };
        let unavailable = EngineError::StoreUnavailable { retry_after: STORE_RETRY_AFTER };
        self.hold_lease_for_pending(grant_id).await;
        let grant = match self.store.load::<Grant>(grant_id.as_bytes()).await {
            Ok(grant) => grant,
            Err(_) => return Err(unavailable),
        };
        let current = grant.as_ref().filter(|g| g.state != GrantState::Revoked).and_then(|g| {
            let stored = g.open_payload(&pending.data_key).ok()?;
            decide::same_refresh_token(stored.refresh_token.as_ref(), pending.used.as_ref()).then_some(g.clone())
        });
        let Some(grant) = current else {
            lock(&self.pending).remove(grant_id);
            self.release(grant_id).await;
            let revoked = grant.is_none_or(|g| g.state == GrantState::Revoked);
            if revoked {
                self.revoke_pending_token(&pending).await;
            }
            return Ok(());
        };
        match self.persist(grant, &pending.payload, &pending.data_key, pending.used.as_ref()).await {
            Persisted::Failed => Err(unavailable),
            outcome => {
                lock(&self.pending).remove(grant_id);
                self.release(grant_id).await;
                if matches!(outcome, Persisted::Revoked) {
                    // Revoked between the check above and the write.
                    self.revoke_pending_token(&pending).await;
                }
                if matches!(outcome, Persisted::Stored(_)) {
                    self.wake(grant_id);
                    let _ = self.store.publish(Notice::TokenRefreshed(*grant_id)).await;
                }
                Ok(())
            }
        }
    }

    /// Extends this instance's lease while it holds a pending write (best
    /// effort: a store that refuses writes refuses this one too).
    async fn hold_lease_for_pending(&self, grant_id: &GrantId) {
        let now = self.now();
        let deadline = now.saturating_add(self.config.pending_lease_ttl);
        let _ = self.store.acquire_lease(grant_id, &self.config.instance_id, deadline, now).await;
    }

    /// Revokes a dropped pending write's refresh token at the provider (best effort).
    async fn revoke_pending_token(&self, pending: &PendingWrite) {
        let Some(token) = &pending.payload.refresh_token else { return };
        if let Some(entry) = self.catalogue.provider_for(&pending.service) {
            let _ = entry.client.revoke(token, crate::provider::TokenKind::Refresh).await;
        }
    }

    /// Takes the pending write of a grant being revoked: its refresh token is
    /// the live one and must be revoked at the provider too.
    pub(super) fn take_pending_token(&self, grant_id: &GrantId) -> Option<SecretString> {
        lock(&self.pending).remove(grant_id).and_then(|p| p.payload.refresh_token)
    }

    fn spawn_pending_flusher(self: &Arc<Self>, grant_id: GrantId) {
        let me = Arc::clone(self);
        self.rt.spawn(Box::pin(async move {
            while lock(&me.pending).contains_key(&grant_id) {
                me.rt.sleep_until(me.now().saturating_add(me.config.pending_retry)).await;
                if me.flush_pending(&grant_id).await.is_ok() {
                    break;
                }
            }
        }));
    }
}
