//! The token path: cache, authentication, single flight, lease, refresh,
//! persist-before-answer, pending writes.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_channel::oneshot;
use futures_util::FutureExt;
use futures_util::future::{Shared, select};
use secrecy::SecretString;

use super::cache::CacheKey;
use super::decide::{self, TokenDecision};
use super::error::STORE_RETRY_AFTER;
use super::metrics::{Metrics, RefreshOutcome};
use super::refresh::{
    Action, Answer, Bounds, Called, Event, LEASE_RENEW_FRACTION, LeaseEnd, Refresh, Stored, WRITE_CONFLICTS, Written,
};
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

/// "Retry after" for requests whose refresh task ended without an answer
/// (the runtime shutting down under it).
const FLIGHT_LOST_RETRY: Duration = Duration::from_secs(1);

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

/// A pending write and the lease kept for it.
pub(crate) struct Pending {
    pub(crate) write: PendingWrite,
    lease: Option<LeaseGuard>,
}

impl Broker {
    /// Parses an AuthID as a client sent it and answers a token.
    pub async fn token_for(&self, authid: &str, min_validity: Option<Duration>) -> Result<TokenGrant, EngineError> {
        let authid = AuthId::parse(authid)?;
        self.token(&authid, min_validity).await
    }

    /// Whether `authid`'s secret is right, serving nothing: a token cached
    /// for it (the cache is keyed by the whole AuthID, and purged on
    /// revocation), or else its handle's data key unwrapped. For a front end
    /// that must not refuse the right secret for others' wrong ones.
    pub async fn secret_is_right(&self, authid: &AuthId) -> Result<bool, EngineError> {
        let inner = &self.inner;
        if inner.cache.lookup(&inner.cache.key_for(authid), inner.now(), Duration::ZERO).is_ok() {
            return Ok(true);
        }
        match inner.authenticate(authid).await {
            Ok(_) => Ok(true),
            Err(EngineError::AuthIdInvalid) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// An access token for `authid` with at least `min_validity` left (the
    /// configured default when `None`; capped at half the token's lifetime).
    pub async fn token(&self, authid: &AuthId, min_validity: Option<Duration>) -> Result<TokenGrant, EngineError> {
        self.shared_token(authid, min_validity).await.map(Arc::unwrap_or_clone)
    }

    /// [`Broker::token`], sharing the token with the cache instead of copying
    /// it: a cache hit allocates nothing. For a server answering the same
    /// AuthIDs many times a second.
    pub async fn shared_token(
        &self,
        authid: &AuthId,
        min_validity: Option<Duration>,
    ) -> Result<Arc<TokenGrant>, EngineError> {
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
        // The miss (store, provider, lease) is a large future of its own,
        // boxed only when it runs: a hit's future stays small enough for
        // the allocator's fast path when a server boxes it per request.
        Box::pin(inner.cache_miss(authid, key, epoch, min_validity)).await
    }
}

impl Inner {
    /// [`Broker::shared_token`] past a cache miss: authenticates, finds or
    /// refreshes the grant's token, and caches it under `key` unless a purge
    /// happened since `epoch`.
    async fn cache_miss(
        self: &Arc<Self>,
        authid: &AuthId,
        key: CacheKey,
        epoch: u64,
        min_validity: Duration,
    ) -> Result<Arc<TokenGrant>, EngineError> {
        let (handle, data_key, grant) = self.authenticate_with_grant(authid).await?;
        let grant_id = handle.grant_id;
        self.touch(handle);
        let (token, lifetime) = self.token_for_grant(grant_id, &data_key, min_validity, grant).await?;
        let token = Arc::new(token);
        self.cache.insert(key, grant_id, Arc::clone(&token), lifetime, self.now(), epoch);
        Ok(token)
    }

    /// Loads the handle and unwraps the grant's data key with the AuthID's secret.
    pub(super) async fn authenticate(&self, authid: &AuthId) -> Result<(Handle, DataKey), EngineError> {
        let handle: Handle = self.store.load(authid.keyid().as_bytes()).await?.ok_or(EngineError::AuthIdInvalid)?;
        let data_key = self.unwrap(&handle, authid)?;
        Ok((handle, data_key))
    }

    /// [`Inner::authenticate`], reading the handle's grant in the same store
    /// call (one round trip on PostgreSQL): the warm path's only read.
    async fn authenticate_with_grant(&self, authid: &AuthId) -> Result<(Handle, DataKey, Option<Grant>), EngineError> {
        let (handle, grant) = self
            .store
            .load_with_group::<Handle, Grant>(authid.keyid().as_bytes())
            .await?
            .ok_or(EngineError::AuthIdInvalid)?;
        let data_key = self.unwrap(&handle, authid)?;
        Ok((handle, data_key, grant))
    }

    /// The grant's data key, unwrapped from `handle` with the AuthID's secret.
    fn unwrap(&self, handle: &Handle, authid: &AuthId) -> Result<DataKey, EngineError> {
        if handle.revoked_at.is_some() {
            return Err(EngineError::AuthIdRevoked);
        }
        match handle.unwrap_data_key(authid.secret(), &self.keyring) {
            Ok(data_key) => Ok(data_key),
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
        preloaded: Option<Grant>,
    ) -> FlightResult {
        // A grant read with its handle is as good as one read now, unless a
        // refresh of it is waiting to be stored: then it is stored first and
        // the grant read again.
        let preloaded = preloaded.filter(|_| !lock(&self.pending).contains_key(&grant_id));
        self.flush_pending(&grant_id).await?;
        let (grant, payload, stored) = self.read_grant(&grant_id, data_key, min_validity, preloaded).await?;
        match stored {
            Stored::Usable => self.answer(&grant, &payload),
            Stored::Stale => self.join_flight(grant_id, data_key, min_validity).await,
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
                    let lost = EngineError::ProviderUnavailable { retry_after: FLIGHT_LOST_RETRY };
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

    /// Reads the grant and judges its stored token against `min_validity`;
    /// a revoked grant or one that needs a new login is refused.
    async fn read_grant(
        &self,
        grant_id: &GrantId,
        data_key: &DataKey,
        min_validity: Duration,
        preloaded: Option<Grant>,
    ) -> Result<(Grant, GrantPayload, Stored), EngineError> {
        let grant = match preloaded {
            Some(grant) => grant,
            None => self.load_grant(grant_id).await?,
        };
        let payload = self.open(&grant, data_key)?;
        let stored = match decide::decide(self.now(), grant.state, &payload, min_validity) {
            TokenDecision::Serve => Stored::Usable,
            TokenDecision::Refresh => Stored::Stale,
            refused => return Err(self.refuse(&grant, refused)),
        };
        Ok((grant, payload, stored))
    }

    /// Drives one grant's [`Refresh`] machine: performs each action it
    /// names and feeds the outcome back, until it finishes. The caller has
    /// just read the grant and found its token stale.
    async fn refresh_grant(
        self: &Arc<Self>,
        grant_id: GrantId,
        data_key: &DataKey,
        min_validity: Duration,
    ) -> FlightResult {
        let bounds = Bounds {
            lease_ttl: self.config.lease_ttl,
            lease_poll: self.config.lease_poll,
            retry_after: self.config.provider_retry_after,
        };
        let (mut machine, mut action) = Refresh::after_stale_read(self.now(), bounds);
        // Registered now, so a notice before the first wait is not lost.
        let mut woken = Some(self.waiter(&grant_id));
        let mut lease: Option<LeaseGuard> = None;
        // The grant as last read (and, after a write, as stored) and its payload.
        let mut read: Option<(Grant, GrantPayload)> = None;
        // The payload the provider's answer made.
        let mut refreshed: Option<GrantPayload> = None;
        loop {
            let event = match action {
                Action::Read { watch } => {
                    if watch {
                        woken = Some(self.waiter(&grant_id));
                    }
                    Event::Read(self.read_grant(&grant_id, data_key, min_validity, None).await.map(
                        |(grant, payload, stored)| {
                            read = Some((grant, payload));
                            stored
                        },
                    ))
                }
                Action::TakeLease { deadline } => {
                    let (outcome, taken) = self.take_lease(&grant_id, deadline).await;
                    lease = taken;
                    Event::Lease(outcome)
                }
                Action::Wait { until } => {
                    Metrics::bump(&self.metrics.lease_waits);
                    let woken = woken.take().unwrap_or_else(|| self.waiter(&grant_id));
                    let _ = select(woken, self.rt.sleep_until(until)).await;
                    Event::Woken
                }
                Action::CallProvider { retries_until } => match (&lease, &read) {
                    (Some(lease), Some((grant, payload))) => {
                        let (called, payload) = self.refresh_at_provider(lease, grant, payload, retries_until).await;
                        refreshed = payload;
                        Event::Called(called)
                    }
                    _ => Event::Called(Called::Refused(out_of_order("provider call without lease or grant"))),
                },
                Action::Persist => match (&mut read, &refreshed) {
                    (Some((grant, old)), Some(payload)) => {
                        let used = old.refresh_token.clone();
                        Event::Written(self.persist(grant, payload, data_key, used.as_ref()).await)
                    }
                    _ => Event::Marked(Err(out_of_order("write without a refreshed grant"))),
                },
                Action::MarkReauth => match &read {
                    Some((grant, old)) => {
                        let used = old.refresh_token.clone();
                        Event::Marked(self.mark_reauth(grant.clone(), data_key, used.as_ref()).await)
                    }
                    None => Event::Marked(Err(out_of_order("re-login mark without a grant"))),
                },
                Action::Release => {
                    Metrics::bump(&self.metrics.adopted_tokens);
                    if let Some(lease) = lease.take() {
                        lease.release().await;
                    }
                    Event::Released
                }
                Action::Finish(end, answer) => {
                    let pending = match (end, lease.take()) {
                        (LeaseEnd::KeepForPending, Some(lease)) => Some(lease),
                        (_, Some(lease)) => {
                            lease.release().await;
                            None
                        }
                        (_, None) => None,
                    };
                    return self.finish_refresh(answer, read, refreshed, data_key, pending).await;
                }
            };
            action = machine.step(self.now(), event);
        }
    }

    /// Takes the grant's lease until `deadline` if it is free; the guard is
    /// the only way this instance's lease leaves again.
    async fn take_lease(
        self: &Arc<Self>,
        grant_id: &GrantId,
        deadline: Timestamp,
    ) -> (Result<LeaseOutcome, EngineError>, Option<LeaseGuard>) {
        let outcome = self.store.acquire_lease(grant_id, &self.config.instance_id, deadline, self.now()).await;
        let guard = matches!(outcome, Ok(LeaseOutcome::Acquired { .. })).then(|| LeaseGuard {
            grant: *grant_id,
            inner: Arc::downgrade(self),
            armed: true,
        });
        (outcome.map_err(EngineError::from), guard)
    }

    /// Carries out a finished refresh's answer.
    async fn finish_refresh(
        self: &Arc<Self>,
        answer: Answer,
        read: Option<(Grant, GrantPayload)>,
        refreshed: Option<GrantPayload>,
        data_key: &DataKey,
        kept_lease: Option<LeaseGuard>,
    ) -> FlightResult {
        let Some((grant, old)) = read else {
            return Err(match answer {
                Answer::Fail(e) => e,
                _ => out_of_order("finished without a grant"),
            });
        };
        match (answer, refreshed) {
            (Answer::Fail(e), _) => Err(e),
            (Answer::Adopted, _) => {
                Metrics::bump(&self.metrics.adopted_tokens);
                self.answer(&grant, &old)
            }
            (Answer::ProviderDown { retry_after }, _) => self.provider_down(&grant, &old, retry_after),
            (Answer::ReauthRequired, _) => Err(EngineError::ReauthRequired { service: grant.service.clone() }),
            (Answer::Refreshed { stored }, Some(payload)) => {
                if stored {
                    self.wake(&grant.id);
                    let _ = self.store.publish(Notice::TokenRefreshed(grant.id)).await;
                }
                self.answer(&grant, &payload)
            }
            (Answer::Revoked { revoke_new }, refreshed) => {
                // Revoked while we refreshed: the token just obtained must not outlive it.
                if let Some(token) = refreshed.and_then(|p| p.refresh_token).filter(|_| revoke_new) {
                    self.revoke_at_provider(&grant.service, &token).await;
                }
                Err(EngineError::AuthIdRevoked)
            }
            (Answer::Pending, Some(payload)) => {
                // The rotated token exists only here now. Keep it, keep the
                // lease (nobody may refresh with the old token), keep trying.
                let used = old.refresh_token.clone();
                let write = PendingWrite { payload, data_key: data_key.clone(), used, service: grant.service.clone() };
                lock(&self.pending).insert(grant.id, Pending { write, lease: kept_lease });
                self.hold_lease_for_pending(&grant.id).await;
                self.spawn_pending_flusher(grant.id);
                Err(EngineError::StoreUnavailable { retry_after: STORE_RETRY_AFTER })
            }
            (Answer::Refreshed { .. } | Answer::Pending, None) => {
                Err(out_of_order("finished without a refreshed grant"))
            }
        }
    }

    /// Asks the provider for a new token while keeping the lease alive. The
    /// breaker and the per-provider metrics see every call; the answer is
    /// the machine's [`Called`] and, on success, the refreshed payload.
    async fn refresh_at_provider(
        &self,
        lease: &LeaseGuard,
        grant: &Grant,
        payload: &GrantPayload,
        retries_until: Timestamp,
    ) -> (Called, Option<GrantPayload>) {
        let Some(entry) = self.catalogue.provider_for(&grant.service) else {
            let detail = format!("service '{}' is no longer configured", grant.service);
            return (Called::Refused(EngineError::ProviderMisconfigured { detail }), None);
        };
        let provider = entry.spec.id.as_str();
        if let Err(retry_after) = self.with_breaker(provider, |b, now| b.permit(now)) {
            self.metrics.refresh(provider, RefreshOutcome::BreakerOpen);
            return (Called::Unavailable { retry_after }, None);
        }
        let result = match self.call_refresh_leased(lease, entry, payload, retries_until).await {
            Ok(result) => result,
            Err(lost) => {
                // Another instance holds the lease now: it refreshes; this
                // attempt's answer, whatever it was, is not ours to store.
                self.metrics.refresh(provider, RefreshOutcome::LeaseLost);
                return (Called::LeaseLost(lost), None);
            }
        };
        self.with_breaker(provider, |breaker, now| match &result {
            // Whatever it said, the provider answered: it is alive.
            Ok(_) | Err(ProviderError::InvalidGrant { .. } | ProviderError::InvalidClient { .. }) => {
                breaker.on_success()
            }
            Err(ProviderError::Unsupported(_)) => {}
            Err(_) => breaker.on_failure(now),
        });
        match result {
            Ok(response) => {
                self.metrics.refresh(provider, RefreshOutcome::Success);
                let (payload, rotated) = decide::apply_refresh(self.now(), payload, response);
                self.metrics.refresh_rotation(Some(&entry.spec), rotated);
                (Called::Refreshed { rotated }, Some(payload))
            }
            Err(ProviderError::InvalidGrant { .. }) => {
                self.metrics.refresh(provider, RefreshOutcome::InvalidGrant);
                (Called::InvalidGrant, None)
            }
            Err(e @ (ProviderError::InvalidClient { .. } | ProviderError::Unsupported(_))) => {
                self.metrics.refresh(provider, RefreshOutcome::Misconfigured);
                (Called::Refused(EngineError::ProviderMisconfigured { detail: e.to_string() }), None)
            }
            Err(e) => {
                self.metrics.refresh(provider, RefreshOutcome::Transient);
                let retry_after = match e {
                    ProviderError::RateLimited { retry_after: Some(d) } => d,
                    _ => self.config.provider_retry_after,
                };
                (Called::Unavailable { retry_after }, None)
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
        lease: &LeaseGuard,
        entry: &ProviderEntry,
        payload: &GrantPayload,
        retries_until: Timestamp,
    ) -> Result<Result<TokenResponse, ProviderError>, EngineError> {
        let call = std::pin::pin!(self.call_refresh(entry, payload, retries_until));
        let heartbeat = std::pin::pin!(self.heartbeat(&lease.grant));
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
    /// no retry starts at or after `retries_until`.
    async fn call_refresh(
        &self,
        entry: &ProviderEntry,
        payload: &GrantPayload,
        retries_until: Timestamp,
    ) -> Result<TokenResponse, ProviderError> {
        let Some(refresh_token) = &payload.refresh_token else {
            return Err(ProviderError::InvalidGrant { description: Some("no refresh token stored".into()) });
        };
        let request = RefreshRequest { refresh_token, scopes: &payload.scopes, extra: &payload.extra };
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

    /// Writes the refreshed payload with compare-and-swap; on success `grant`
    /// is the stored record. On a version conflict, re-applies it if the
    /// stored refresh token is still the one used (someone changed something
    /// else), and stands down otherwise.
    async fn persist(
        &self,
        grant: &mut Grant,
        payload: &GrantPayload,
        data_key: &DataKey,
        used: Option<&SecretString>,
    ) -> Written {
        let mut failures = 0;
        for _ in 0..WRITE_CONFLICTS {
            let now = self.now();
            grant.seal_payload(payload, data_key, now, self.rng.as_ref());
            grant.last_used_at = now;
            grant.state = GrantState::Active;
            let failed = match self.store.update(grant).await {
                Ok(()) => return Written::Stored,
                Err(StoreError::Conflict | StoreError::NotFound) => {
                    match self.store.load::<Grant>(grant.id.as_bytes()).await {
                        Ok(None) => return Written::Revoked,
                        Ok(Some(current)) if current.state == GrantState::Revoked => return Written::Revoked,
                        Ok(Some(current)) => match current.open_payload(data_key) {
                            Ok(stored) if decide::same_refresh_token(stored.refresh_token.as_ref(), used) => {
                                *grant = current;
                                false
                            }
                            Ok(_) => return Written::Superseded,
                            Err(_) => return Written::Failed,
                        },
                        Err(_) => true,
                    }
                }
                Err(_) => true,
            };
            if failed {
                failures += 1;
                Metrics::bump(&self.metrics.persist_failures);
                if failures >= self.config.persist_attempts {
                    return Written::Failed;
                }
            }
        }
        Written::Failed
    }

    /// The provider refused the refresh token we hold. Marks the grant
    /// `reauth_required` (never deletes it) and answers `true`, or answers
    /// `false` when the store meanwhile holds another refresh token (which
    /// the next round adopts).
    async fn mark_reauth(
        &self,
        mut grant: Grant,
        data_key: &DataKey,
        used: Option<&SecretString>,
    ) -> Result<bool, EngineError> {
        for _ in 0..WRITE_CONFLICTS {
            grant.state = GrantState::ReauthRequired;
            grant.updated_at = self.now();
            match self.store.update(&mut grant).await {
                Ok(()) => {
                    self.grant_changed(&grant.id).await;
                    return Ok(true);
                }
                Err(StoreError::Conflict | StoreError::NotFound) => {
                    let current = self.load_grant(&grant.id).await?;
                    let stored = self.open(&current, data_key)?;
                    if current.state != GrantState::Active
                        || !decide::same_refresh_token(stored.refresh_token.as_ref(), used)
                    {
                        return Ok(false);
                    }
                    grant = current;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(EngineError::StoreUnavailable { retry_after: STORE_RETRY_AFTER })
    }

    /// Stores a pending write if there is one for the grant.
    ///
    /// The lease is renewed first: while the rotated token exists only here,
    /// no other instance may refresh with the old one. A pending write whose
    /// grant was revoked (or replaced) meanwhile is dropped, and its token is
    /// revoked at the provider, so no live token outlives its grant.
    pub(super) async fn flush_pending(&self, grant_id: &GrantId) -> Result<(), EngineError> {
        let Some(pending) = lock(&self.pending).get(grant_id).map(|p| p.write.clone()) else { return Ok(()) };
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
        let Some(mut grant) = current else {
            self.end_pending(grant_id).await;
            if grant.is_none_or(|g| g.state == GrantState::Revoked) {
                self.revoke_pending_token(&pending).await;
            }
            return Ok(());
        };
        match self.persist(&mut grant, &pending.payload, &pending.data_key, pending.used.as_ref()).await {
            Written::Failed => Err(unavailable),
            written => {
                self.end_pending(grant_id).await;
                if written == Written::Revoked {
                    // Revoked between the check above and the write.
                    self.revoke_pending_token(&pending).await;
                }
                if written == Written::Stored {
                    self.wake(grant_id);
                    let _ = self.store.publish(Notice::TokenRefreshed(*grant_id)).await;
                }
                Ok(())
            }
        }
    }

    /// Drops a grant's pending write (stored, or no longer wanted) and gives
    /// its lease back.
    async fn end_pending(&self, grant_id: &GrantId) {
        let ended = lock(&self.pending).remove(grant_id);
        if let Some(lease) = ended.and_then(|p| p.lease) {
            lease.release().await;
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
        if let Some(token) = &pending.payload.refresh_token {
            self.revoke_at_provider(&pending.service, token).await;
        }
    }

    /// Revokes a refresh token at the service's provider (best effort).
    async fn revoke_at_provider(&self, service: &str, token: &SecretString) {
        if let Some(entry) = self.catalogue.provider_for(service) {
            let _ = entry.client.revoke(token, crate::provider::TokenKind::Refresh).await;
        }
    }

    /// Takes the pending write of a grant being revoked: its refresh token is
    /// the live one and must be revoked at the provider too. (Its lease goes
    /// with the guard's drop.)
    pub(super) fn take_pending_token(&self, grant_id: &GrantId) -> Option<SecretString> {
        let taken = lock(&self.pending).remove(grant_id);
        taken.and_then(|p| p.write.payload.refresh_token)
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

/// An engine error for an action the refresh machine never asks for in
/// that state (answered as corrupt, never panicked on).
fn out_of_order(what: &str) -> EngineError {
    EngineError::Corrupt { detail: format!("refresh driver: {what}") }
}

/// This instance's lease on a grant. It leaves only through
/// [`LeaseGuard::release`], or with the pending write it was kept for;
/// dropped otherwise (a task cancelled, an early return), it schedules its
/// own release.
#[must_use = "a lease leaves through `release`, or is kept with a pending write"]
pub(crate) struct LeaseGuard {
    grant: GrantId,
    inner: Weak<Inner>,
    armed: bool,
}

impl LeaseGuard {
    /// Gives the lease back (best effort: one that cannot be released
    /// lapses at its deadline).
    pub(crate) async fn release(mut self) {
        self.armed = false;
        if let Some(inner) = self.inner.upgrade() {
            let _ = inner.store.release_lease(&self.grant, &inner.config.instance_id).await;
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade().filter(|_| self.armed) else { return };
        let guard = LeaseGuard { grant: self.grant, inner: self.inner.clone(), armed: false };
        inner.rt.spawn(Box::pin(guard.release()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Catalogue;
    use crate::keys::{MasterKey, MasterKeyId, MasterKeyring};
    use crate::random::OsRandom;
    use crate::testing::{ManualClock, ManualRuntime};
    use crate::time::Clock;
    use crate::{Broker, BrokerParts, EngineConfig, MemoryStore, Store};

    fn broker(store: Arc<MemoryStore>, clock: &ManualClock) -> Broker {
        let runtime = ManualRuntime::new(
            clock.clone(),
            Arc::new(|task| {
                tokio::spawn(task);
            }),
        );
        Broker::new(BrokerParts {
            store,
            catalogue: Catalogue::new(),
            keyring: MasterKeyring::single(MasterKey::generate(MasterKeyId::new("k1").unwrap(), &OsRandom)),
            runtime: Arc::new(runtime),
            rng: Arc::new(OsRandom),
            config: EngineConfig { instance_id: "a".into(), ..EngineConfig::default() },
        })
    }

    async fn held_by(store: &MemoryStore, grant: &GrantId, now: Timestamp) -> Option<String> {
        match store.acquire_lease(grant, "probe", now.saturating_add(Duration::from_secs(1)), now).await.unwrap() {
            LeaseOutcome::Held { owner, .. } => Some(owner),
            LeaseOutcome::Acquired { .. } => {
                store.release_lease(grant, "probe").await.unwrap();
                None
            }
        }
    }

    #[tokio::test]
    async fn a_lease_guard_releases_when_told_and_when_dropped_but_not_while_kept() {
        let (store, clock) = (Arc::new(MemoryStore::new()), ManualClock::default());
        let broker = broker(store.clone(), &clock);
        let inner = &broker.inner;
        let grant = GrantId::generate(&OsRandom);
        let now = clock.now();
        let deadline = now.saturating_add(Duration::from_secs(30));

        let (outcome, guard) = inner.take_lease(&grant, deadline).await;
        assert!(matches!(outcome, Ok(LeaseOutcome::Acquired { .. })) && guard.is_some());
        assert_eq!(held_by(&store, &grant, now).await.as_deref(), Some("a"));
        let (outcome, again) = inner.take_lease(&grant, deadline).await;
        assert!(matches!(outcome, Ok(LeaseOutcome::Acquired { .. })), "re-taking our own lease renews it");
        again.expect("a guard").release().await;
        assert_eq!(held_by(&store, &grant, now).await, None, "release gives it back");
        guard.expect("a guard").release().await; // (already given back: a no-op)

        let (_, guard) = inner.take_lease(&grant, deadline).await;
        drop(guard);
        // The drop schedules the release on the runtime.
        for _ in 0..1000 {
            if held_by(&store, &grant, now).await.is_none() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(held_by(&store, &grant, now).await, None, "a dropped guard releases its lease");

        // Kept with a pending write, the lease stays until the write ends.
        let (_, guard) = inner.take_lease(&grant, deadline).await;
        lock(&inner.pending).insert(grant, Pending { write: pending_write(), lease: guard });
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(held_by(&store, &grant, now).await.as_deref(), Some("a"), "kept for the pending write");
        inner.end_pending(&grant).await;
        assert_eq!(held_by(&store, &grant, now).await, None, "given back with the write");
    }

    fn pending_write() -> PendingWrite {
        let payload = GrantPayload {
            refresh_token: None,
            access_token: None,
            access_expires_at: None,
            refreshed_at: Timestamp::from_unix_secs(0),
            scopes: vec![],
            account_id: None,
            token_type: None,
            extra: vec![],
        };
        PendingWrite { payload, data_key: DataKey::generate(&OsRandom), used: None, service: "svc".into() }
    }
}
