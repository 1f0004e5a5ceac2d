// The refresh engine against a reference model (proptest).
//
// Random sequences of operations — token requests, concurrent token requests
// on a held ("slow") provider, mint / rotate / revoke of AuthIDs, revoking
// the grant, clock jumps, scripted provider answers (rotate, refuse, fail,
// rate-limit) and grant-write outages of the store — run on two broker
// instances sharing one store. After every step the brokers' answers, the
// store, the grant's lease, the provider and the metrics are compared with a
// small model, and three invariants are checked:
//
// 1. No token for a revoked handle: a revoked AuthID only ever gets
//    `AuthIdRevoked`, and a grant whose last AuthID is gone is revoked.
// 2. The provider never receives a refresh token it already rotated away.
// 3. The current refresh token is never lost: while the grant lives exactly
//    one refresh token is live at the provider, and it is the stored one (or,
//    while the store refuses grant writes, the one the refreshing instance
//    holds as a pending write); once the grant is revoked, none is and the
//    stored payload is erased. One bounded exception: a grant revoked on one
//    instance while the other still holds a pending write. The revoking
//    instance cannot know that token; the owner's flusher drops the write and
//    revokes its token at its next turn (`pending_retry`, 1 s), and the
//    model expects exactly that.
//
// How the engine keeps invariant 2 through a store outage: the instance that
// holds a pending write (a rotated refresh token the store refused) holds
// the grant's lease for `pending_lease_ttl` (600 s) and renews it on every
// flush attempt — every `pending_retry` (1 s) in the background, and on each
// of its own token requests. A request on the other instance that needs a
// refresh waits on that lease for as long as grant writes fail. The harness
// cannot wait for ever, so such a request ends the outage: after it has been
// seen waiting for `OUTAGE_TICKS` seconds (the flusher failing each second),
// grant writes work again, the flusher stores the pending write, and the
// request adopts its token. The model predicts which requests wait, and a
// step only passes if the harness had to end the outage exactly then.
//
// Clock jumps: an `Advance` may jump further than the pending lease (up to a
// day), and invariant 2 stays absolute. That is sound, not lucky: nothing
// runs between a jump and the flusher's turn that follows it (the harness
// waits for that turn, which renews the lease, before the next step), and
// requests that wait on a lease only ever see the clock move a second at a
// time. A real clock behaves like that: it does not jump, and the flusher
// renews the lease every second, so a lease of 600 s lapses only if its
// owner stalls for ten minutes. A jump past the lease while a request
// waits on it would let that request take the lapsed lease and refresh with
// the rotated-away token; the engine does not guard against that (it cannot
// tell a stalled owner from a dead one) and the generated sequences do not
// contain it. `check` asserts that while a write is pending its owner holds
// the lease with more than `lease_ttl` left.
//
// The regression tests at the end pin the four engine bugs this model found
// (A–D) with the smallest sequences that showed them, now asserting the
// fixed behaviour.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use latchkey_core::engine::{BreakerState, EngineError, GrantRevocation, ProviderRevocation, RefreshOutcome};
use latchkey_core::testing::{Behaviour, ScriptedProvider};
use latchkey_core::{
    AuthId, Broker, BrokerParts, Clock, EngineConfig, Grant, GrantId, GrantState, Handle, Lease, LeaseOutcome,
    ListQuery, Notice, NoticeStream, OsRandom, Page, RecordKind, Store, StoreError, StoreExt, StoredRecord, Timestamp,
    TokenGrant,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use secrecy::ExposeSecret;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::engine_world::{SERVICE, World, runtime, until};

/// The instances' names; ops pick one by index.
const INSTANCES: [&str; 2] = ["instance-a", "instance-b"];
/// The engine's "try again" hint after a store failure.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(5);
/// The clock jumps an `Advance` picks from: a tick, a minute, half a token
/// lifetime, into the last 300 s of a token, just past expiry, a day.
const ADVANCES: [u64; 6] = [1, 60, 1800, 3400, 3601, 86_400];
/// How many AuthIDs an op can name; indices wrap around the handles minted.
const HANDLE_INDICES: usize = 6;
/// Seconds a request waits on a pending write's lease, the flusher failing
/// once a second, before the harness ends the store outage.
const OUTAGE_TICKS: u32 = 3;
/// Lease periods a `SlowToken`'s provider call takes.
const SLOW_LEASE_PERIODS: u32 = 4;
/// The owner of a lease a crashed instance left behind.
const CRASHED: &str = "instance-crashed";

// ---------------------------------------------------------------------------
// Operations

/// Names one of the grant's AuthIDs: usually a live one, sometimes any
/// (revoked ones included). The index wraps around the AuthIDs there are.
#[derive(Debug, Clone, Copy)]
enum Pick {
    Live(usize),
    Any(usize),
}

#[derive(Debug, Clone)]
enum Op {
    /// A token request with one of the grant's AuthIDs on one instance (one
    /// that waits on the other instance's pending write ends a store outage).
    Token { handle: Pick, instance: usize },
    /// Two token requests at once, one on each instance, while the provider
    /// is held (slow) until both are in flight or one has finished.
    ConcurrentTokens { first: Pick, second: Pick },
    /// Another AuthID for the grant.
    Mint { by: Pick, instance: usize },
    /// Revoke `target` using `by`.
    Revoke { by: Pick, target: Pick, instance: usize },
    /// Replace an AuthID with a new one.
    Rotate { handle: Pick, instance: usize },
    /// Revoke the whole grant.
    RevokeGrant { by: Pick, instance: usize },
    /// Move the manual clock.
    Advance { secs: u64 },
    /// What the provider does with the next refresh it gets.
    ProviderNext(Behaviour),
    /// The store starts (or stops) refusing writes of grant records.
    GrantWrites { failing: bool },
    /// A token request during which (only) the store refuses grant writes.
    BlippedToken { handle: Pick, instance: usize },
    /// Lease renewal: a token request whose provider call takes
    /// `SLOW_LEASE_PERIODS` lease periods, while the other instance asks
    /// for the same grant's token. The first renews its lease every third of
    /// the TTL; the second never calls the provider (it is served from its
    /// cache, or gives up after one lease period).
    SlowToken { handle: Pick, instance: usize },
    /// Lease expiry: a crashed instance left the grant's lease behind; a
    /// token request that needs a refresh waits until it lapses, then refreshes.
    CrashedLease { handle: Pick, instance: usize },
}

fn behaviour() -> impl Strategy<Value = Behaviour> {
    prop_oneof![
        2 => Just(Behaviour::Succeed),
        2 => Just(Behaviour::Transient),
        1 => Just(Behaviour::RateLimited(None)),
        1 => Just(Behaviour::RateLimited(Some(Duration::from_secs(120)))),
        1 => Just(Behaviour::InvalidGrant),
    ]
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![3 => (0..HANDLE_INDICES).prop_map(Pick::Live), 1 => (0..HANDLE_INDICES).prop_map(Pick::Any)]
}

fn op() -> impl Strategy<Value = Op> {
    let instance = || 0..INSTANCES.len();
    // Earlier alternatives are simpler: failures shrink towards plain token requests.
    prop_oneof![
        12 => (pick(), instance()).prop_map(|(handle, instance)| Op::Token { handle, instance }),
        6 => prop::sample::select(ADVANCES.to_vec()).prop_map(|secs| Op::Advance { secs }),
        5 => behaviour().prop_map(Op::ProviderNext),
        4 => (pick(), pick()).prop_map(|(first, second)| Op::ConcurrentTokens { first, second }),
        3 => (pick(), instance()).prop_map(|(by, instance)| Op::Mint { by, instance }),
        2 => prop::bool::weighted(0.4).prop_map(|failing| Op::GrantWrites { failing }),
        2 => (pick(), instance()).prop_map(|(handle, instance)| Op::BlippedToken { handle, instance }),
        1 => (pick(), instance()).prop_map(|(handle, instance)| Op::SlowToken { handle, instance }),
        1 => (pick(), instance()).prop_map(|(handle, instance)| Op::CrashedLease { handle, instance }),
        2 => (pick(), instance()).prop_map(|(handle, instance)| Op::Rotate { handle, instance }),
        1 => (pick(), pick(), instance()).prop_map(|(by, target, instance)| Op::Revoke { by, target, instance }),
        1 => (pick(), instance()).prop_map(|(by, instance)| Op::RevokeGrant { by, instance }),
    ]
}

// ---------------------------------------------------------------------------
// The reference model

/// An access token the way the model expects it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tok {
    access: String,
    expires: Timestamp,
    refreshed: Timestamp,
}

impl Tok {
    fn left(&self, now: Timestamp) -> Duration {
        self.expires.duration_since(now)
    }

    /// Served as it is: some validity left, and at least the default minimum
    /// validity, or half the token's lifetime if that is less.
    fn good_enough(&self, now: Timestamp, config: &EngineConfig) -> bool {
        let left = self.left(now);
        let lifetime = self.expires.duration_since(self.refreshed);
        !left.is_zero() && left >= config.min_validity.min(lifetime / 2)
    }
}

/// A per-instance circuit breaker: consecutive failures, or open until.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breaker {
    Closed(u32),
    Open(Timestamp),
}

impl Breaker {
    /// `Err(retry_after)` while open; once the cool-down is over one probe goes through.
    fn permit(self, now: Timestamp) -> Result<(), Duration> {
        match self {
            Breaker::Open(until) if now < until => Err(until.duration_since(now).max(Duration::from_secs(1))),
            _ => Ok(()),
        }
    }

    fn after_call(self, now: Timestamp, failed: bool, config: &EngineConfig) -> Breaker {
        match self {
            _ if !failed => Breaker::Closed(0),
            Breaker::Closed(failures) if failures + 1 < config.breaker.failure_threshold => {
                Breaker::Closed(failures + 1)
            }
            _ => Breaker::Open(now.saturating_add(config.breaker.cool_down)),
        }
    }

    fn matches(self, actual: BreakerState) -> bool {
        match (self, actual) {
            (Breaker::Closed(f), BreakerState::Closed { failures }) => f == failures,
            (Breaker::Open(until), BreakerState::Open { until: actual }) => until == actual,
            _ => false,
        }
    }
}

/// A rotated payload an instance holds because the store refused it. Its
/// owner holds the grant's lease meanwhile (`check` looks at it).
#[derive(Debug, Clone)]
struct Pending {
    owner: usize,
    tok: Tok,
    refresh: String,
}

/// A pending write the store would take now, not yet stored, and what the store still holds.
#[derive(Debug, Clone)]
struct Unflushed {
    pending: Pending,
    stored: Tok,
    refresh: String,
}

/// Provider refresh outcomes per instance, as the brokers' metrics count them.
type Counts = [BTreeMap<RefreshOutcome, u64>; 2];

/// What a token request should answer.
#[derive(Debug, Clone)]
enum Expect {
    Token(Tok),
    Error(EngineError),
}

impl Expect {
    fn matches(&self, got: &Result<TokenGrant, EngineError>) -> bool {
        match (self, got) {
            (Expect::Token(tok), Ok(grant)) => {
                grant.access_token.expose_secret() == tok.access && grant.expires_at == Some(tok.expires)
            }
            (Expect::Error(want), Err(got)) => same_error(want, got),
            _ => false,
        }
    }
}

fn same_error(want: &EngineError, got: &EngineError) -> bool {
    match (want, got) {
        (EngineError::StoreUnavailable { .. }, EngineError::StoreUnavailable { .. }) => true,
        _ => want == got,
    }
}

fn reauth() -> EngineError {
    EngineError::ReauthRequired { service: SERVICE.into() }
}

fn store_unavailable() -> EngineError {
    EngineError::StoreUnavailable { retry_after: STORE_RETRY_AFTER }
}

#[derive(Debug, Clone)]
struct Model {
    config: EngineConfig,
    rotating: bool,
    /// The provider's access-token lifetime.
    lifetime: Duration,
    /// Every AuthID minted for the grant, and whether it is still live.
    handles: Vec<(AuthId, bool)>,
    grant: GrantState,
    /// The stored access token (counting a pending write once the store takes writes again).
    stored: Tok,
    /// The stored refresh token, likewise.
    refresh: String,
    /// While grant writes fail: the rotated payload an instance keeps.
    pending: Option<Pending>,
    /// Grant writes work again but the owner has not stored its pending
    /// write yet. Counted as stored already, because every reader either
    /// flushes it first or waits on its lease.
    unflushed: Option<Unflushed>,
    /// The grant was revoked by the instance that does not hold the unflushed
    /// pending write: its owner still holds it, and its refresh token is
    /// live, until the owner's flusher drops it (and revokes that token) at
    /// its next turn.
    orphan: Option<Pending>,
    /// Per (instance, handle): the cached token and when it was cached.
    cache: BTreeMap<(usize, usize), (Tok, Timestamp)>,
    breakers: [Breaker; 2],
    /// Provider answers queued by `ProviderNext`; `Succeed` when empty.
    script: VecDeque<Behaviour>,
    /// The provider's token counter: it issued `at-N` / `rt-N` last.
    issued: u64,
    writes_failing: bool,
    /// Cache purges so far (revocations, re-auth): each needs the other instance's notice.
    purges: u64,
}

/// One way a step may have gone: the model after it, the answers, the refresh
/// outcomes, and whether a request waited on a pending write's lease until
/// the harness ended the store outage.
#[derive(Debug, Clone)]
struct Candidate {
    model: Model,
    expect: Vec<Expect>,
    counts: Counts,
    ends_outage: bool,
}

impl Model {
    /// The handle index a pick names.
    fn resolve(&self, pick: Pick) -> usize {
        let live: Vec<usize> = (0..self.handles.len()).filter(|&h| self.live(h)).collect();
        match pick {
            Pick::Live(i) if !live.is_empty() => live[i % live.len()],
            Pick::Live(i) | Pick::Any(i) => i % self.handles.len(),
        }
    }

    fn live(&self, handle: usize) -> bool {
        self.handles[handle].1
    }

    /// What minting or rotating with a handle answers: the handle must be
    /// live and its grant active.
    fn handle_change(&self, handle: usize) -> Result<(), EngineError> {
        match (self.live(handle), self.grant) {
            (false, _) => Err(EngineError::AuthIdRevoked),
            (true, GrantState::ReauthRequired) => Err(reauth()),
            (true, GrantState::Revoked) => Err(EngineError::AuthIdRevoked),
            (true, GrantState::Active) => Ok(()),
        }
    }

    fn live_count(&self) -> usize {
        self.handles.iter().filter(|(_, live)| *live).count()
    }

    /// The refresh token that must be live at the provider.
    fn current_refresh(&self) -> &str {
        self.pending.as_ref().map_or(self.refresh.as_str(), |p| p.refresh.as_str())
    }

    /// The instance that holds a pending write of the live grant (and so the
    /// grant's lease), whether or not the store would take the write now.
    fn lease_holder(&self) -> Option<usize> {
        self.pending.as_ref().or(self.unflushed.as_ref().map(|u| &u.pending)).map(|p| p.owner)
    }

    /// The store takes grant writes again and the pending write's flusher
    /// stores it (the harness ends an outage a request waits out).
    fn end_outage(&mut self) {
        self.writes_failing = false;
        self.unflushed = None;
        if let Some(p) = self.pending.take() {
            self.stored = p.tok;
            self.refresh = p.refresh;
        }
    }

    fn purge(&mut self) {
        self.cache.clear();
        self.purges += 1;
    }

    fn cached(&self, instance: usize, handle: usize, now: Timestamp) -> Option<Tok> {
        let (tok, at) = self.cache.get(&(instance, handle))?;
        (now.duration_since(*at) < self.config.cache_ttl && tok.good_enough(now, &self.config)).then(|| tok.clone())
    }

    fn serve(&mut self, instance: usize, handle: usize, now: Timestamp, tok: Tok) -> Expect {
        self.cache.insert((instance, handle), (tok.clone(), now));
        Expect::Token(tok)
    }

    fn provider_down(&mut self, instance: usize, handle: usize, now: Timestamp, retry_after: Duration) -> Expect {
        if self.stored.left(now).is_zero() {
            return Expect::Error(EngineError::ProviderUnavailable { retry_after });
        }
        self.serve(instance, handle, now, self.stored.clone())
    }

    /// The possible outcomes of one token request. Usually one; two when the
    /// request may or may not find its cached token: an insert can be fenced
    /// off by a late "grant changed" notice, which only matters for a token
    /// that is cached but not stored (refreshed while grant writes failed).
    fn token_candidates(&self, instance: usize, handle: usize, now: Timestamp) -> Vec<Candidate> {
        let mut candidates = Vec::new();
        let fragile = self.cached(instance, handle, now).is_some_and(|tok| tok != self.stored);
        for skip_cache in [false, true].into_iter().take(if fragile { 2 } else { 1 }) {
            let mut model = self.clone();
            let mut counts = Counts::default();
            let expect = model.token(instance, handle, now, skip_cache, &mut counts);
            let ends_outage = self.writes_failing && !model.writes_failing;
            candidates.push(Candidate { model, expect: vec![expect], counts, ends_outage });
        }
        candidates
    }

    /// One token request, step by step as the engine is specified.
    fn token(
        &mut self,
        instance: usize,
        handle: usize,
        now: Timestamp,
        skip_cache: bool,
        counts: &mut Counts,
    ) -> Expect {
        // Invariant 1: a revoked AuthID never gets a token.
        if !self.live(handle) {
            return Expect::Error(EngineError::AuthIdRevoked);
        }
        if !skip_cache {
            if let Some(tok) = self.cached(instance, handle, now) {
                return Expect::Token(tok);
            }
        }
        // The instance first tries to store its own pending write.
        if self.pending.as_ref().is_some_and(|p| p.owner == instance) {
            return Expect::Error(store_unavailable());
        }
        match self.grant {
            GrantState::Active => {}
            GrantState::ReauthRequired => return Expect::Error(reauth()),
            GrantState::Revoked => return Expect::Error(EngineError::AuthIdRevoked),
        }
        if self.stored.good_enough(now, &self.config) {
            return self.serve(instance, handle, now, self.stored.clone());
        }
        if self.pending.is_some() {
            // Another instance holds a pending write, and with it the lease
            // (bug A): this request waits instead of refreshing with the
            // rotated-away token, for as long as grant writes fail. The
            // harness then ends the outage, the owner's flusher stores the
            // write, and this request re-reads the grant.
            self.end_outage();
            if self.stored.good_enough(now, &self.config) {
                return self.serve(instance, handle, now, self.stored.clone());
            }
        }
        // A refresh, under the grant's lease.
        let mut count = |outcome| *counts[instance].entry(outcome).or_default() += 1;
        if let Err(retry_after) = self.breakers[instance].permit(now) {
            count(RefreshOutcome::BreakerOpen);
            return self.provider_down(instance, handle, now, retry_after);
        }
        let behaviour = self.script.pop_front().unwrap_or(Behaviour::Succeed);
        let failed = matches!(behaviour, Behaviour::Transient | Behaviour::RateLimited(_));
        self.breakers[instance] = self.breakers[instance].after_call(now, failed, &self.config);
        match behaviour {
            Behaviour::Succeed => {
                count(RefreshOutcome::Success);
                self.issued += 1;
                let n = self.issued;
                let tok = Tok { access: format!("at-{n}"), expires: now.saturating_add(self.lifetime), refreshed: now };
                if self.rotating {
                    let refresh = format!("rt-{n}");
                    if self.writes_failing {
                        // Kept in memory, lease kept; the caller is told to retry.
                        self.pending = Some(Pending { owner: instance, tok, refresh });
                        return Expect::Error(store_unavailable());
                    }
                    self.refresh = refresh;
                } else if self.writes_failing {
                    // Nothing rotated: answered (and cached), not stored.
                    return self.serve(instance, handle, now, tok);
                }
                self.stored = tok.clone();
                self.serve(instance, handle, now, tok)
            }
            Behaviour::InvalidGrant => {
                count(RefreshOutcome::InvalidGrant);
                if self.writes_failing {
                    return Expect::Error(store_unavailable());
                }
                self.grant = GrantState::ReauthRequired;
                self.purge();
                Expect::Error(reauth())
            }
            Behaviour::Transient | Behaviour::RateLimited(_) => {
                count(RefreshOutcome::Transient);
                let retry_after = match behaviour {
                    Behaviour::RateLimited(Some(d)) => d,
                    _ => self.config.provider_retry_after,
                };
                self.provider_down(instance, handle, now, retry_after)
            }
            Behaviour::InvalidClient => unreachable!("invalid_client is not generated"),
        }
    }

    /// `instance` revokes the grant (state, payload, every handle, the
    /// provider's token); answers how many handles that revoked. The grant
    /// write went through, so a pending write can only be unflushed: on the
    /// revoking instance it is taken and its (live) refresh token revoked
    /// first (bug C); on the other one it becomes an orphan, which the
    /// owner's flusher drops at its next turn, revoking its token (bug B).
    fn revoke_grant(&mut self, instance: usize) -> usize {
        assert!(self.pending.is_none(), "a grant write while grant writes fail");
        let revoked = self.live_count();
        self.grant = GrantState::Revoked;
        for (_, live) in &mut self.handles {
            *live = false;
        }
        if let Some(u) = self.unflushed.take() {
            if u.pending.owner != instance {
                self.orphan = Some(u.pending);
            }
        }
        self.purge();
        revoked
    }
}

// ---------------------------------------------------------------------------
// The harness: the real brokers beside the model

struct Harness {
    world: World,
    brokers: [Broker; 2],
    grant_id: GrantId,
    model: Model,
    /// "step N Op": prefixes every failure message.
    at: String,
    trace: Vec<String>,
}

fn refresh_counts(broker: &Broker) -> BTreeMap<RefreshOutcome, u64> {
    broker
        .metrics()
        .refreshes
        .into_iter()
        .filter(|((provider, _), _)| provider == "scripted")
        .map(|((_, outcome), n)| (outcome, n))
        .collect()
}

/// The refresh tokens the provider would accept now (it names them `rt-1`, `rt-2`, …).
fn live_refresh_tokens(world: &World, issued: u64) -> Vec<String> {
    (1..=issued + 2).map(|n| format!("rt-{n}")).filter(|t| world.provider.is_live(t)).collect()
}

fn describe(result: &Result<TokenGrant, EngineError>) -> String {
    match result {
        Ok(grant) => format!("Ok({})", grant.access_token.expose_secret()),
        Err(e) => format!("Err({e:?})"),
    }
}

impl Harness {
    async fn new(rotating: bool, lifetime: Duration, authids: usize) -> Self {
        let provider = ScriptedProvider::new().rotating(rotating).strict_reuse(true).expires_in(Some(lifetime));
        let world = World::new(provider);
        let brokers = [world.broker(INSTANCES[0], |_| {}).await, world.broker(INSTANCES[1], |_| {}).await];
        let login = world.login(&brokers[0]).await;
        let payload = world.payload(&login.authid).await;
        let refresh = payload.refresh_token.expect("a refresh token").expose_secret().to_owned();
        let issued = refresh.trim_start_matches("rt-").parse().expect("ScriptedProvider names tokens rt-N");
        let stored = Tok {
            access: payload.access_token.expect("an access token").expose_secret().to_owned(),
            expires: payload.access_expires_at.expect("an expiring token"),
            refreshed: payload.refreshed_at,
        };
        let mut handles = vec![(login.authid.clone(), true)];
        for i in 1..authids {
            let minted = brokers[0].mint_handle(&login.authid, &format!("machine-{i}")).await.expect("mint");
            handles.push((minted.authid, true));
        }
        let model = Model {
            config: EngineConfig::default(),
            rotating,
            lifetime,
            handles,
            grant: GrantState::Active,
            stored,
            refresh,
            pending: None,
            unflushed: None,
            orphan: None,
            cache: BTreeMap::new(),
            breakers: [Breaker::Closed(0); 2],
            script: VecDeque::new(),
            issued,
            writes_failing: false,
            purges: 0,
        };
        Harness { world, brokers, grant_id: login.grant_id, model, at: "set-up".into(), trace: Vec::new() }
    }

    fn now(&self) -> Timestamp {
        self.world.clock.now()
    }

    fn lease_waits(&self) -> u64 {
        self.brokers.iter().map(|b| b.metrics().lease_waits).sum()
    }

    fn counts(&self) -> Counts {
        [refresh_counts(&self.brokers[0]), refresh_counts(&self.brokers[1])]
    }

    fn note(&mut self, line: String) {
        self.trace.push(format!("{}: {line}", self.at));
    }

    /// The last steps, for failure messages.
    fn tail(&self) -> String {
        let start = self.trace.len().saturating_sub(12);
        format!("last steps:\n  {}", self.trace[start..].join("\n  "))
    }

    fn fail(&self, message: impl std::fmt::Display) -> TestCaseError {
        TestCaseError::fail(format!("{}: {message}\n{}", self.at, self.tail()))
    }

    fn spawn_token(&self, instance: usize, handle: usize) -> JoinHandle<Result<TokenGrant, EngineError>> {
        let broker = self.brokers[instance].clone();
        let authid = self.model.handles[handle].0.clone();
        tokio::spawn(async move { broker.token(&authid, None).await })
    }

    /// Lets the tasks finish; answers their results and whether the store
    /// outage had to end for that. A request waiting on a lease whose holder
    /// will not wake it (a failed refresh, a pending write) re-polls on the
    /// manual clock: the clock moves a second at a time, and only when a
    /// request is known to wait (a lease wait counted since the last move) and
    /// nothing else is under way. One that still waits after `OUTAGE_TICKS`
    /// such seconds while grant writes fail waits on a pending write's lease:
    /// grant writes work again, and the next second the flusher stores it.
    async fn drive(
        &self,
        tasks: Vec<JoinHandle<Result<TokenGrant, EngineError>>>,
        mut seen_waits: u64,
    ) -> Result<(Vec<Result<TokenGrant, EngineError>>, bool), TestCaseError> {
        let give_up = std::time::Instant::now() + Duration::from_secs(20);
        let (mut waited, mut ended) = (0, false);
        loop {
            let unfinished = tasks.iter().filter(|t| !t.is_finished()).count();
            if unfinished == 0 {
                break;
            }
            if unfinished == 1 && self.lease_waits() > seen_waits {
                // A notice may be about to wake it; give it the chance first.
                for _ in 0..32 {
                    tokio::task::yield_now().await;
                }
                if tasks.iter().any(|t| !t.is_finished()) && self.lease_waits() > seen_waits {
                    // A pending write's flusher may be mid-attempt: the clock
                    // moves when it sleeps again, so it gets every turn.
                    self.settle_flushers().await;
                    seen_waits = self.lease_waits();
                    if self.model.writes_failing && !ended {
                        waited += 1;
                        if waited > OUTAGE_TICKS {
                            self.world.store.fail_next_grant_writes(0);
                            ended = true;
                        }
                    }
                    self.world.clock.advance(Duration::from_secs(1));
                }
            }
            if std::time::Instant::now() > give_up {
                return Err(self.fail("a token request never finished"));
            }
            tokio::task::yield_now().await;
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.map_err(|e| self.fail(format!("token task panicked: {e}")))?);
        }
        Ok((results, ended))
    }

    /// Waits until every pending write's flusher sleeps on the clock (or
    /// has stored its write), so that a clock move is its next turn.
    async fn settle_flushers(&self) {
        let what = format!("{}: the flushers are asleep", self.at);
        until(&what, || {
            let flushers = self.brokers.iter().filter(|b| b.metrics().pending_writes > 0).count();
            self.world.clock.sleepers() >= flushers
        })
        .await;
    }

    /// Picks the candidate the brokers' answers, refresh outcomes and the
    /// end of an outage (or not) match.
    fn choose(
        &mut self,
        candidates: Vec<Candidate>,
        results: &[Result<TokenGrant, EngineError>],
        before: &Counts,
        ended_outage: bool,
    ) -> Result<(), TestCaseError> {
        let after = self.counts();
        let mut observed = Counts::default();
        for (i, counts) in observed.iter_mut().enumerate() {
            for (outcome, n) in &after[i] {
                let d = n - before[i].get(outcome).copied().unwrap_or(0);
                if d > 0 {
                    counts.insert(*outcome, d);
                }
            }
        }
        let matching = candidates.iter().position(|c| {
            c.counts == observed
                && c.ends_outage == ended_outage
                && c.expect.iter().zip(results).all(|(want, got)| want.matches(got))
        });
        let got: Vec<String> = results.iter().map(describe).collect();
        let outage = if ended_outage { " after waiting out the store outage" } else { "" };
        match matching {
            Some(i) => {
                self.model = candidates.into_iter().nth(i).expect("found above").model;
                self.note(format!("{got:?}{outage}"));
                Ok(())
            }
            None => {
                let wanted: Vec<String> = candidates
                    .iter()
                    .map(|c| {
                        let outage = if c.ends_outage { " (waits out the outage)" } else { "" };
                        format!("{:?} {:?}{outage}", c.expect, c.counts)
                    })
                    .collect();
                Err(self.fail(format!(
                    "the brokers answered {got:?}{outage} with provider refreshes {observed:?}; the model allows one \
                     of:\n    {}",
                    wanted.join("\n    ")
                )))
            }
        }
    }

    /// After a revocation or re-auth: every instance's cache is purged (the
    /// acting one at once, the other through the store's notice).
    async fn await_purges(&self, purges_before: u64) {
        if self.model.purges > purges_before {
            let what = format!("{}: both instances purged their caches", self.at);
            until(&what, || self.brokers.iter().all(|b| b.metrics().cached_tokens == 0)).await;
        }
    }

    /// Before the next step may move the clock: a pending write's flusher
    /// sleeps on the clock, so that the move wakes it (unless it has stored
    /// the write already). At a step's end no request waits, so the only
    /// sleeper can be a flusher.
    async fn settle_flusher(&self) {
        if let Some(owner) = self.model.lease_holder() {
            let what = format!("{}: the pending write's flusher sleeps", self.at);
            let broker = &self.brokers[owner];
            until(&what, || self.world.clock.sleepers() >= 1 || broker.metrics().pending_writes == 0).await;
        }
    }

    /// After token requests: caches purged as the model says; when a request
    /// waited out the outage, the flusher has stored the pending write (the
    /// request may have read it before the flusher was done).
    async fn after_requests(&self, purges_before: u64, ended_outage: bool) {
        self.await_purges(purges_before).await;
        if ended_outage {
            let what = format!("{}: the flusher stored the pending write", self.at);
            until(&what, || self.brokers.iter().all(|b| b.metrics().pending_writes == 0)).await;
        }
        self.settle_flusher().await;
    }

    async fn token(&mut self, handle: Pick, instance: usize) -> Result<(), TestCaseError> {
        let handle = self.model.resolve(handle);
        let (before, seen, purges) = (self.counts(), self.lease_waits(), self.model.purges);
        let task = self.spawn_token(instance, handle);
        let (results, ended) = self.drive(vec![task], seen).await?;
        let candidates = self.model.token_candidates(instance, handle, self.now());
        self.note(format!("token h{handle}@{}", INSTANCES[instance]));
        self.choose(candidates, &results, &before, ended)?;
        self.after_requests(purges, ended).await;
        Ok(())
    }

    async fn concurrent_tokens(&mut self, first: Pick, second: Pick) -> Result<(), TestCaseError> {
        let handles = [self.model.resolve(first), self.model.resolve(second)];
        let (before, waits, purges) = (self.counts(), self.lease_waits(), self.model.purges);
        let t0 = self.now();
        let provider = self.world.provider.clone();
        provider.hold();
        let tasks = vec![self.spawn_token(0, handles[0]), self.spawn_token(1, handles[1])];
        let what = format!("{}: both requests in flight or one finished", self.at);
        until(&what, || {
            (provider.in_flight() == 1 && self.lease_waits() > waits) || tasks.iter().any(|t| t.is_finished())
        })
        .await;
        provider.release();
        let (results, ended) = self.drive(tasks, waits).await?;
        let t_end = self.now();
        // Whichever took the lease first went first; the other followed. A
        // request that waits out an outage is the last to finish: the
        // harness ends the outage only when nothing else is under way.
        let mut candidates = Vec::new();
        for (a, b) in [(0, 1), (1, 0)] {
            for first in self.model.token_candidates(a, handles[a], t0) {
                if first.ends_outage {
                    continue;
                }
                for second in first.model.token_candidates(b, handles[b], t_end) {
                    let mut counts = first.counts.clone();
                    for (i, c) in second.counts.iter().enumerate() {
                        for (outcome, n) in c {
                            *counts[i].entry(*outcome).or_default() += n;
                        }
                    }
                    let mut expect = vec![first.expect[0].clone(), second.expect[0].clone()];
                    if a == 1 {
                        expect.swap(0, 1);
                    }
                    candidates.push(Candidate { model: second.model, expect, counts, ends_outage: second.ends_outage });
                }
            }
        }
        self.note(format!("concurrent tokens h{}@{} h{}@{}", handles[0], INSTANCES[0], handles[1], INSTANCES[1]));
        self.choose(candidates, &results, &before, ended)?;
        self.after_requests(purges, ended).await;
        Ok(())
    }

    /// No write pending anywhere and grant writes working: the lease ops
    /// then only meet the lease they are about (else they are plain requests).
    fn leases_quiet(&self) -> bool {
        self.model.lease_holder().is_none() && self.model.orphan.is_none() && !self.model.writes_failing
    }

    fn lease_renewals(&self) -> u64 {
        self.brokers.iter().map(|b| b.metrics().lease_renewals).sum()
    }

    async fn slow_token(&mut self, handle: Pick, instance: usize) -> Result<(), TestCaseError> {
        if !self.leases_quiet() {
            return self.token(handle, instance).await;
        }
        let handle = self.model.resolve(handle);
        let other = 1 - instance;
        let (before, waits, purges, renewals) =
            (self.counts(), self.lease_waits(), self.model.purges, self.lease_renewals());
        let provider = self.world.provider.clone();
        provider.hold();
        let first = self.spawn_token(instance, handle);
        let what = format!("{}: the request calls the provider or finishes", self.at);
        until(&what, || provider.in_flight() == 1 || first.is_finished()).await;
        self.note(format!("slow token h{handle}@{}", INSTANCES[instance]));
        if first.is_finished() {
            // No refresh needed (or refused before the provider): a plain request.
            provider.release();
            let (results, ended) = self.drive(vec![first], waits).await?;
            let candidates = self.model.token_candidates(instance, handle, self.now());
            self.choose(candidates, &results, &before, ended)?;
            self.after_requests(purges, ended).await;
            return Ok(());
        }
        // The other instance asks while the provider call is open.
        let t_second = self.now();
        let other_waits = self.brokers[other].metrics().lease_waits;
        let second = self.spawn_token(other, handle);
        let what = format!("{}: {} waits on the lease or is served", self.at, INSTANCES[other]);
        until(&what, || self.brokers[other].metrics().lease_waits > other_waits || second.is_finished()).await;
        let ttl = self.model.config.lease_ttl;
        for step in 1..=u64::from(3 * SLOW_LEASE_PERIODS) {
            self.world.clock.advance(ttl / 3);
            let what = format!("{}: renewal {step} of the lease", self.at);
            // Renewed, and asleep again (the heartbeat, and the other
            // request while it waits), before the clock moves on.
            until(&what, || {
                let asleep = 1 + usize::from(!second.is_finished());
                (self.lease_renewals() >= renewals + step && self.world.clock.sleepers() >= asleep)
                    || provider.in_flight() > 1
            })
            .await;
            prop_assert_eq!(
                provider.in_flight(),
                1,
                "{}: a second refresh started while the first was open\n{}",
                self.at,
                self.tail()
            );
        }
        prop_assert_eq!(
            self.lease_renewals() - renewals,
            u64::from(3 * SLOW_LEASE_PERIODS),
            "{}: the lease is renewed every third of its TTL, by its holder only\n{}",
            self.at,
            self.tail()
        );
        let what = format!("{}: {} is answered", self.at, INSTANCES[other]);
        until(&what, || second.is_finished()).await;
        let got = second.await.map_err(|e| self.fail(format!("token task panicked: {e}")))?;
        // Served from its own cache, or gave up waiting after one lease
        // period, told the provider is slow: never a refresh of its own.
        let cached = self.model.cached(other, handle, t_second);
        let gave_up = EngineError::ProviderUnavailable { retry_after: self.model.config.provider_retry_after };
        let ok = match (&cached, &got) {
            (Some(tok), Ok(_)) => Expect::Token(tok.clone()).matches(&got),
            (_, Err(e)) => same_error(&gave_up, e),
            (None, Ok(_)) => false,
        };
        prop_assert!(
            ok,
            "{}: {} answered {} while the other instance refreshed (cached: {:?})\n{}",
            self.at,
            INSTANCES[other],
            describe(&got),
            cached,
            self.tail()
        );
        if cached.is_some() && got.is_err() {
            // Its cache had evicted the token: it waited like an uncached request.
            self.model.cache.remove(&(other, handle));
        }
        provider.release();
        let waits = self.lease_waits();
        let (results, ended) = self.drive(vec![first], waits).await?;
        let candidates = self.model.token_candidates(instance, handle, self.now());
        self.choose(candidates, &results, &before, ended)?;
        self.after_requests(purges, ended).await;
        Ok(())
    }

    async fn crashed_lease(&mut self, handle: Pick, instance: usize) -> Result<(), TestCaseError> {
        if !self.leases_quiet() {
            return self.token(handle, instance).await;
        }
        let handle = self.model.resolve(handle);
        let (before, seen, purges) = (self.counts(), self.lease_waits(), self.model.purges);
        let now = self.now();
        let lapses = now.saturating_add(self.model.config.lease_ttl / 2);
        let planted = self.world.memory.acquire_lease(&self.grant_id, CRASHED, lapses, now).await;
        prop_assert!(matches!(planted, Ok(LeaseOutcome::Acquired { .. })), "{}: planting {:?}", self.at, planted);
        self.note(format!("{CRASHED} holds the lease until {lapses:?}; token h{handle}@{}", INSTANCES[instance]));
        let task = self.spawn_token(instance, handle);
        let (results, ended) = self.drive(vec![task], seen).await?;
        let refreshed = self.counts()[instance] != before[instance];
        prop_assert!(
            !refreshed || self.now() >= lapses,
            "{}: the provider was asked at {:?}, before the crashed instance's lease lapsed at {:?}\n{}",
            self.at,
            self.now(),
            lapses,
            self.tail()
        );
        let candidates = self.model.token_candidates(instance, handle, self.now());
        self.choose(candidates, &results, &before, ended)?;
        // A request that needed no refresh left the lease where it was.
        let left: Option<Lease> = self.world.memory.load(self.grant_id.as_bytes()).await.unwrap_or(None);
        if left.is_some_and(|l| l.owner == CRASHED) {
            let _ = self.world.memory.delete(RecordKind::Lease, self.grant_id.as_bytes(), None).await;
        }
        self.after_requests(purges, ended).await;
        Ok(())
    }

    async fn mint(&mut self, by: Pick, instance: usize) -> Result<(), TestCaseError> {
        let by = self.model.resolve(by);
        let result = self.brokers[instance].mint_handle(&self.model.handles[by].0, "machine").await;
        self.note(format!("mint by h{by}@{}: {:?}", INSTANCES[instance], result.as_ref().map(|_| "minted")));
        let want = self.model.handle_change(by);
        match (want, result) {
            (Ok(()), Ok(minted)) => self.model.handles.push((minted.authid, true)),
            (Err(want), Err(got)) if same_error(&want, &got) => {}
            (want, got) => {
                return Err(self.fail(format!("mint answered {:?}, the model wants {want:?}", got.map(|_| ()))));
            }
        }
        Ok(())
    }

    async fn rotate(&mut self, handle: Pick, instance: usize) -> Result<(), TestCaseError> {
        let handle = self.model.resolve(handle);
        let purges = self.model.purges;
        let result = self.brokers[instance].rotate_handle(&self.model.handles[handle].0).await;
        self.note(format!("rotate h{handle}@{}: {:?}", INSTANCES[instance], result.as_ref().map(|_| "rotated")));
        let want = self.model.handle_change(handle);
        match (want, result) {
            (Ok(()), Ok(minted)) => {
                self.model.handles.push((minted.authid, true));
                self.model.handles[handle].1 = false;
                self.model.purge();
            }
            (Err(want), Err(got)) if same_error(&want, &got) => {}
            (want, got) => {
                return Err(self.fail(format!("rotate answered {:?}, the model wants {want:?}", got.map(|_| ()))));
            }
        }
        self.await_purges(purges).await;
        Ok(())
    }

    async fn revoke(&mut self, by: Pick, target: Pick, instance: usize) -> Result<(), TestCaseError> {
        let (by, target) = (self.model.resolve(by), self.model.resolve(target));
        let purges = self.model.purges;
        let target_keyid = self.model.handles[target].0.keyid();
        let result = self.brokers[instance].revoke_handle(&self.model.handles[by].0, target_keyid).await;
        self.note(format!("revoke h{target} by h{by}@{}: {result:?}", INSTANCES[instance]));
        let want = if !self.model.live(by) {
            Err(EngineError::AuthIdRevoked)
        } else if self.model.live(target) && self.model.live_count() == 1 {
            // The last live AuthID (bug D): the grant is revoked first, and
            // if the store refuses that, nothing changes, so the caller can
            // retry with the same AuthID.
            if self.model.writes_failing {
                Err(store_unavailable())
            } else {
                let handles_revoked = self.model.revoke_grant(instance);
                Ok(Some(GrantRevocation { handles_revoked, provider: ProviderRevocation::Revoked }))
            }
        } else {
            // Another live AuthID remains (`by` itself, if it is not the target).
            self.model.handles[target].1 = false;
            self.model.purge();
            Ok(None)
        };
        let ok = match (&want, &result) {
            (Ok(want), Ok(got)) => want == got,
            (Err(want), Err(got)) => same_error(want, got),
            _ => false,
        };
        prop_assert!(ok, "{}: revoke answered {:?}, the model wants {:?}\n{}", self.at, result, want, self.tail());
        self.await_purges(purges).await;
        Ok(())
    }

    async fn revoke_grant(&mut self, by: Pick, instance: usize) -> Result<(), TestCaseError> {
        let by = self.model.resolve(by);
        let purges = self.model.purges;
        let result = self.brokers[instance].revoke_grant(&self.model.handles[by].0).await;
        self.note(format!("revoke grant by h{by}@{}: {result:?}", INSTANCES[instance]));
        let want = if !self.model.live(by) {
            Err(EngineError::AuthIdRevoked)
        } else if self.model.writes_failing {
            Err(store_unavailable())
        } else {
            let handles_revoked = self.model.revoke_grant(instance);
            Ok(GrantRevocation { handles_revoked, provider: ProviderRevocation::Revoked })
        };
        let ok = match (&want, &result) {
            (Ok(want), Ok(got)) => want == got,
            (Err(want), Err(got)) => same_error(want, got),
            _ => false,
        };
        prop_assert!(
            ok,
            "{}: revoke_grant answered {:?}, the model wants {:?}\n{}",
            self.at,
            result,
            want,
            self.tail()
        );
        self.await_purges(purges).await;
        Ok(())
    }

    /// Moves the clock. Nothing else runs until a pending write's flusher has
    /// taken its turn (renewing the lease first), however far the clock
    /// jumped: see "Clock jumps" at the top.
    async fn advance(&mut self, secs: u64) {
        let failures_before = self.model.pending.as_ref().map(|p| self.brokers[p.owner].metrics().persist_failures);
        self.world.clock.advance(Duration::from_secs(secs));
        self.note(format!("advance {secs} s"));
        // A pending write's flusher wakes: it renews the lease, then stores
        // the write if it can, else it tries (and fails) once more.
        if let (Some(p), Some(before)) = (&self.model.pending, failures_before) {
            let (broker, attempts) = (&self.brokers[p.owner], u64::from(self.model.config.persist_attempts));
            let what = format!("{}: the flusher tried again", self.at);
            until(&what, || broker.metrics().persist_failures >= before + attempts).await;
            self.settle_flusher().await;
        }
        if let Some(owner) = self.model.unflushed.as_ref().map(|u| u.pending.owner) {
            let what = format!("{}: the flusher stored the pending write", self.at);
            until(&what, || self.brokers[owner].metrics().pending_writes == 0).await;
            self.model.unflushed = None;
        }
        // An orphaned pending write: the flusher finds its grant revoked,
        // drops it and revokes its refresh token at the provider (bug B).
        if let Some(p) = self.model.orphan.take() {
            let (broker, provider) = (&self.brokers[p.owner], &self.world.provider);
            let what = format!("{}: the flusher dropped the orphaned pending write and revoked {}", self.at, p.refresh);
            until(&what, || broker.metrics().pending_writes == 0 && !provider.is_live(&p.refresh)).await;
            self.note(format!("{} dropped its pending write; {} revoked", INSTANCES[p.owner], p.refresh));
        }
    }

    async fn grant_writes(&mut self, failing: bool) {
        self.world.store.fail_next_grant_writes(if failing { usize::MAX } else { 0 });
        self.model.writes_failing = failing;
        self.note(format!("grant writes {}", if failing { "fail" } else { "work" }));
        if failing {
            // A pending write not stored yet is pending again.
            if let Some(u) = self.model.unflushed.take() {
                self.model.stored = u.stored;
                self.model.refresh = u.refresh;
                self.model.pending = Some(u.pending);
            }
            return;
        }
        // The owner keeps the lease until its flusher's next turn stores the
        // write; every reader before that waits on the lease or, on the
        // owner, stores it first.
        if let Some(p) = self.model.pending.take() {
            let stored = std::mem::replace(&mut self.model.stored, p.tok.clone());
            let refresh = std::mem::replace(&mut self.model.refresh, p.refresh.clone());
            self.model.unflushed = Some(Unflushed { pending: p, stored, refresh });
        }
    }

    async fn step(&mut self, index: usize, op: &Op) -> Result<(), TestCaseError> {
        self.at = format!("step {index} {op:?}");
        match op {
            Op::Token { handle, instance } => self.token(*handle, *instance).await?,
            Op::ConcurrentTokens { first, second } => self.concurrent_tokens(*first, *second).await?,
            Op::Mint { by, instance } => self.mint(*by, *instance).await?,
            Op::Revoke { by, target, instance } => self.revoke(*by, *target, *instance).await?,
            Op::Rotate { handle, instance } => self.rotate(*handle, *instance).await?,
            Op::RevokeGrant { by, instance } => self.revoke_grant(*by, *instance).await?,
            Op::Advance { secs } => self.advance(*secs).await,
            Op::ProviderNext(behaviour) => {
                self.note(format!("the provider's next refresh: {behaviour:?}"));
                self.world.provider.script([behaviour.clone()]);
                self.model.script.push_back(behaviour.clone());
            }
            Op::GrantWrites { failing } => self.grant_writes(*failing).await,
            Op::SlowToken { handle, instance } => self.slow_token(*handle, *instance).await?,
            Op::CrashedLease { handle, instance } => self.crashed_lease(*handle, *instance).await?,
            Op::BlippedToken { handle, instance } => {
                let failing = self.model.writes_failing;
                self.grant_writes(true).await;
                self.token(*handle, *instance).await?;
                self.grant_writes(failing).await;
            }
        }
        self.check().await
    }

    /// The invariants, and the store, provider and metrics against the model.
    async fn check(&mut self) -> Result<(), TestCaseError> {
        let at = self.at.clone();
        prop_assert_eq!(
            self.world.provider.reuse_detected(),
            0,
            "{}: invariant 2: the provider received a refresh token it had rotated away\n{}",
            at,
            self.tail()
        );
        for (i, broker) in self.brokers.iter().enumerate() {
            let actual = broker.metrics().pending_writes;
            let unflushed = self.model.unflushed.as_ref().is_some_and(|u| u.pending.owner == i);
            let holds = |p: &Option<Pending>| p.as_ref().is_some_and(|p| p.owner == i);
            let expected = match () {
                _ if holds(&self.model.pending) || holds(&self.model.orphan) => 1,
                _ if unflushed => actual.min(1),
                _ => 0,
            };
            prop_assert_eq!(actual, expected, "{}: pending writes on {}\n{}", at, INSTANCES[i], self.tail());
            if unflushed && actual == 0 {
                self.model.unflushed = None;
            }
        }
        for (k, (authid, live)) in self.model.handles.iter().enumerate() {
            let handle: Handle = self
                .world
                .memory
                .load(authid.keyid().as_bytes())
                .await
                .ok()
                .flatten()
                .ok_or_else(|| self.fail(format!("handle h{k} is not stored")))?;
            prop_assert_eq!(
                handle.revoked_at.is_none(),
                *live,
                "{}: h{} live as the model says\n{}",
                at,
                k,
                self.tail()
            );
        }
        let grant: Grant = self.world.grant(&self.grant_id).await;
        prop_assert_eq!(grant.state, self.model.grant, "{}: the grant's state\n{}", at, self.tail());
        if self.model.live_count() == 0 {
            prop_assert_eq!(
                grant.state,
                GrantState::Revoked,
                "{}: invariant 1: the grant has no live AuthID left but is not revoked\n{}",
                at,
                self.tail()
            );
        }
        let live_at_provider = live_refresh_tokens(&self.world, self.model.issued);
        let want_live = match self.model.grant {
            // Until its owner's flusher drops it, an orphaned pending write's token.
            GrantState::Revoked => self.model.orphan.iter().map(|p| p.refresh.clone()).collect(),
            _ => vec![self.model.current_refresh().to_owned()],
        };
        prop_assert_eq!(
            &live_at_provider,
            &want_live,
            "{}: invariant 3: refresh tokens live at the provider (pending: {:?})\n{}",
            at,
            self.model.pending,
            self.tail()
        );
        if self.model.grant != GrantState::Revoked {
            self.check_lease().await?;
        }
        if self.model.grant == GrantState::Revoked {
            prop_assert!(
                grant.payload.as_bytes().is_empty(),
                "{}: invariant 3: a revoked grant's payload is erased\n{}",
                at,
                self.tail()
            );
        } else if self.model.unflushed.is_none() {
            if let Some((authid, _)) = self.model.handles.iter().find(|(_, live)| *live) {
                let payload = self.world.payload(authid).await;
                let stored_refresh = payload.refresh_token.as_ref().map(|t| t.expose_secret().to_owned());
                prop_assert_eq!(
                    stored_refresh.as_deref(),
                    Some(self.model.refresh.as_str()),
                    "{}: invariant 3: the stored refresh token\n{}",
                    at,
                    self.tail()
                );
                let stored = payload.access_token.as_ref().map(|t| Tok {
                    access: t.expose_secret().to_owned(),
                    expires: payload.access_expires_at.unwrap_or_default(),
                    refreshed: payload.refreshed_at,
                });
                prop_assert_eq!(
                    stored.as_ref(),
                    Some(&self.model.stored),
                    "{}: the stored access token\n{}",
                    at,
                    self.tail()
                );
            }
        }
        for (i, broker) in self.brokers.iter().enumerate() {
            let actual = broker.breaker_state("scripted");
            prop_assert!(
                self.model.breakers[i].matches(actual),
                "{}: {}'s circuit breaker is {:?}, the model says {:?}\n{}",
                at,
                INSTANCES[i],
                actual,
                self.model.breakers[i],
                self.tail()
            );
            let cached = broker.metrics().cached_tokens;
            let model_cached = self.model.cache.keys().filter(|(instance, _)| *instance == i).count() as u64;
            prop_assert!(
                cached <= model_cached,
                "{}: {} caches {} tokens, the model at most {}\n{}",
                at,
                INSTANCES[i],
                cached,
                model_cached,
                self.tail()
            );
        }
        Ok(())
    }
}

impl Harness {
    /// The grant's lease (bug A): while a write is pending, its owner holds
    /// the lease, renewed recently enough that it is far from lapsing (more
    /// than `lease_ttl` left of the `pending_lease_ttl`); otherwise nobody
    /// holds it once the step is over.
    async fn check_lease(&self) -> Result<(), TestCaseError> {
        let now = self.now();
        let lease = || async {
            let lease: Option<Lease> = self.world.memory.load(self.grant_id.as_bytes()).await.unwrap_or(None);
            lease.filter(|l| l.deadline > now)
        };
        match self.model.lease_holder() {
            Some(owner) => {
                let held = lease().await;
                // The flusher may store an unflushed write (and release the
                // lease) any time; it drops the write before it releases.
                if self.model.unflushed.is_some() && self.brokers[owner].metrics().pending_writes == 0 {
                    return Ok(());
                }
                let ok = held.as_ref().is_some_and(|l| {
                    l.owner == INSTANCES[owner] && l.deadline.duration_since(now) > self.model.config.lease_ttl
                });
                prop_assert!(
                    ok,
                    "{}: {} holds a pending write; the grant's lease is {:?} at {:?}\n{}",
                    self.at,
                    INSTANCES[owner],
                    held,
                    now,
                    self.tail()
                );
            }
            None => {
                // A flusher that just stored its write releases the lease right after.
                let give_up = std::time::Instant::now() + Duration::from_secs(20);
                while let Some(held) = lease().await {
                    if std::time::Instant::now() > give_up {
                        return Err(self.fail(format!("no write is pending, yet the grant's lease is held: {held:?}")));
                    }
                    tokio::task::yield_now().await;
                }
            }
        }
        Ok(())
    }
}

async fn run(rotating: bool, lifetime: Duration, authids: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut harness = Harness::new(rotating, lifetime, authids).await;
    harness.check().await?;
    for (index, op) in ops.iter().enumerate() {
        harness.step(index, op).await?;
    }
    Ok(())
}

proptest! {
    // About a second; run more with `PROPTEST_CASES`.
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_engine_follows_the_model(
        rotating in prop::bool::weighted(0.75),
        // One-hour tokens, or two-minute ones (served down to half their lifetime).
        lifetime in prop_oneof![3 => Just(3600u64), 1 => Just(120u64)].prop_map(Duration::from_secs),
        authids in 1..=3usize,
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(run(rotating, lifetime, authids, ops))?;
    }
}

// ---------------------------------------------------------------------------
// Regression tests: the smallest sequences that showed the four engine bugs
// the model found (A–D), asserting the fixed behaviour.

/// The grant's lease as stored: its holder and deadline.
async fn lease_of(world: &World, grant: &GrantId) -> Option<(String, Timestamp)> {
    let lease: Option<Lease> = world.memory.load(grant.as_bytes()).await.unwrap();
    lease.map(|l| (l.owner, l.deadline))
}

/// Spawns a token request.
fn spawn_token(broker: &Broker, authid: &AuthId) -> JoinHandle<Result<TokenGrant, EngineError>> {
    let (broker, authid) = (broker.clone(), authid.clone());
    tokio::spawn(async move { broker.token(&authid, None).await })
}

/// Bug A (`core/src/engine/token.rs`): a pending write took the grant's lease
/// once, for `lease_ttl` (30 s), and never renewed it. When grant writes
/// failed for longer, another instance took the lapsed lease and refreshed
/// with the rotated-away token it read from the store: a strict provider saw
/// the reuse and revoked the whole token family. Now the owner holds the
/// lease for `pending_lease_ttl` and renews it on every flush attempt
/// (`hold_lease_for_pending`). Here the outage outlasts even that lease; the
/// other instance's request waits it out without calling the provider and
/// then serves the token the owner obtained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_write_holds_the_lease_through_a_long_outage_and_the_other_instance_adopts_its_token() {
    let world = World::new(ScriptedProvider::new().rotating(true).strict_reuse(true));
    let a = world.broker(INSTANCES[0], |_| {}).await;
    let b = world.broker(INSTANCES[1], |_| {}).await;
    let pending_lease = EngineConfig::default().pending_lease_ttl;
    let login = world.login(&a).await;
    world.expire_tokens();
    world.store.fail_next_grant_writes(usize::MAX);
    let err = a.token(&login.authid, None).await.unwrap_err();
    assert!(matches!(err, EngineError::StoreUnavailable { .. }), "{err:?}");
    assert_eq!(a.metrics().pending_writes, 1, "a holds the rotated refresh token");
    let held_by_a = || Some((INSTANCES[0].to_owned(), world.clock.now().saturating_add(pending_lease)));
    assert_eq!(lease_of(&world, &login.grant_id).await, held_by_a());
    // 900 s of outage: far past the old 30 s lease, and past the pending
    // lease too. Every flusher turn renews it.
    for _ in 0..3 {
        until("a's flusher sleeps", || world.clock.sleepers() == 1).await;
        let failures = a.metrics().persist_failures;
        world.clock.advance(Duration::from_secs(300));
        until("a's flusher tried again", || a.metrics().persist_failures >= failures + 3).await;
        assert_eq!(lease_of(&world, &login.grant_id).await, held_by_a(), "renewed on the flusher's turn");
    }
    // A request on b needs a refresh: it waits on a's lease, re-polling every
    // second, while a's flusher keeps failing.
    let refreshes = world.provider.refresh_calls();
    let waiting = spawn_token(&b, &login.authid);
    for polls in 1..=3 {
        until("b waits on a's lease", || b.metrics().lease_waits >= polls).await;
        until("a's flusher and b sleep", || world.clock.sleepers() == 2).await;
        let failures = a.metrics().persist_failures;
        world.clock.advance(Duration::from_secs(1));
        until("a's flusher tried again", || a.metrics().persist_failures >= failures + 3).await;
    }
    until("b waits on a's lease", || b.metrics().lease_waits >= 4).await;
    assert!(!waiting.is_finished(), "b waits as long as the write is pending");
    assert_eq!(world.provider.refresh_calls(), refreshes, "b did not refresh");
    // The store recovers: a's flusher stores the rotated token, b adopts it.
    world.store.fail_next_grant_writes(0);
    until("a's flusher and b sleep", || world.clock.sleepers() == 2).await;
    world.clock.advance(Duration::from_secs(1));
    until("b answered", || waiting.is_finished()).await;
    let answer = waiting.await.unwrap().expect("b serves the token a obtained");
    assert_eq!(answer.access_token.expose_secret(), "at-3");
    assert_eq!(world.provider.refresh_calls(), refreshes, "b did not refresh");
    assert_eq!(world.provider.reuse_detected(), 0);
    assert_eq!(a.metrics().pending_writes, 0);
    assert_eq!(world.stored_refresh_token(&login.authid).await, "rt-3");
    assert_eq!(live_refresh_tokens(&world, 3), vec!["rt-3".to_owned()]);
    let lease = lease_of(&world, &login.grant_id).await;
    assert!(lease.as_ref().is_none_or(|(_, deadline)| *deadline <= world.clock.now()), "released: {lease:?}");
}

/// Bug B (`core/src/engine/token.rs`, `flush_pending`): the flusher stored a
/// pending write over whatever the grant had become (`persist` writes on its
/// first attempt without looking, and sets the state to `Active`), so a grant
/// revoked on another instance meanwhile came back to life, holding a refresh
/// token nobody had revoked at the provider. Now the flusher re-reads the
/// grant first and drops a pending write whose grant is gone or revoked,
/// revoking its refresh token at the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_write_whose_grant_was_revoked_on_another_instance_is_dropped_and_its_token_revoked() {
    let world = World::new(ScriptedProvider::new().rotating(true).strict_reuse(true));
    let a = world.broker(INSTANCES[0], |_| {}).await;
    let b = world.broker(INSTANCES[1], |_| {}).await;
    let login = world.login(&a).await;
    world.expire_tokens();
    // A blip: a's three attempts to store the rotated token fail.
    world.store.fail_next_grant_writes(3);
    assert!(a.token(&login.authid, None).await.is_err());
    assert_eq!(a.metrics().pending_writes, 1);
    until("a's flusher sleeps", || world.clock.sleepers() == 1).await;
    // b knows only the stored, rotated-away token.
    let revocation = b.revoke_grant(&login.authid).await.unwrap();
    assert_eq!(revocation, GrantRevocation { handles_revoked: 1, provider: ProviderRevocation::Revoked });
    assert_eq!(world.provider.revoked(), vec!["rt-2".to_owned()]);
    assert_eq!(live_refresh_tokens(&world, 3), vec!["rt-3".to_owned()], "until a's flusher's next turn");
    world.clock.advance(Duration::from_secs(1));
    until("a's flusher gave up the write", || a.metrics().pending_writes == 0).await;
    let grant = world.grant(&login.grant_id).await;
    assert_eq!(grant.state, GrantState::Revoked, "the flusher left the revoked grant alone");
    assert!(grant.payload.as_bytes().is_empty());
    until("a's flusher revoked the dropped token", || !world.provider.is_live("rt-3")).await;
    assert_eq!(world.provider.revoked(), vec!["rt-2".to_owned(), "rt-3".to_owned()]);
    assert_eq!(live_refresh_tokens(&world, 3), Vec::<String>::new());
    assert_eq!(world.provider.reuse_detected(), 0);
}

/// Bug C (`core/src/engine/handles.rs`, `Inner::revoke_grant`): revoking a
/// grant revoked at the provider the refresh token it found in the store and
/// dropped this instance's pending write. While a write is pending, the
/// stored token is the rotated-away one and the live one is the pending
/// write's, so the live token was discarded unrevoked. Now the pending
/// write's token is revoked first (its outcome is the report's `provider`),
/// then the stored one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_grant_with_a_pending_write_revokes_the_pending_token_first() {
    let world = World::new(ScriptedProvider::new().rotating(true).strict_reuse(true));
    let a = world.broker(INSTANCES[0], |_| {}).await;
    let login = world.login(&a).await;
    world.expire_tokens();
    world.store.fail_next_grant_writes(3);
    assert!(a.token(&login.authid, None).await.is_err());
    assert_eq!(a.metrics().pending_writes, 1);
    assert_eq!(world.stored_refresh_token(&login.authid).await, "rt-2", "the store holds the rotated-away token");
    let revocation = a.revoke_grant(&login.authid).await.unwrap();
    assert_eq!(revocation, GrantRevocation { handles_revoked: 1, provider: ProviderRevocation::Revoked });
    assert_eq!(world.provider.revoked(), vec!["rt-3".to_owned(), "rt-2".to_owned()], "the live token first");
    assert_eq!(live_refresh_tokens(&world, 3), Vec::<String>::new());
    assert_eq!(a.metrics().pending_writes, 0);
    let grant = world.grant(&login.grant_id).await;
    assert_eq!(grant.state, GrantState::Revoked);
    assert!(grant.payload.as_bytes().is_empty());
}

/// Bug D (`core/src/engine/handles.rs`, `Broker::revoke_handle`): revoking the
/// last live AuthID revoked the handle first and the grant afterwards. When
/// the grant write failed, the grant stayed active with no AuthID left and
/// its refresh token live at the provider, and the caller could not retry:
/// its AuthID was already revoked. Now the grant goes first, so a failed
/// write changes nothing and the same AuthID retries; and the report counts
/// the AuthID among the handles revoked (it said 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_last_authid_revokes_the_grant_first_so_a_failed_write_can_be_retried() {
    let world = World::new(ScriptedProvider::new());
    let a = world.broker(INSTANCES[0], |_| {}).await;
    let login = world.login(&a).await;
    let handle_revoked = || async {
        let handle: Handle = world.memory.load(login.authid.keyid().as_bytes()).await.unwrap().unwrap();
        handle.revoked_at.is_some()
    };
    world.store.fail_next_grant_writes(1);
    let err = a.revoke_handle(&login.authid, login.authid.keyid()).await.unwrap_err();
    assert!(matches!(err, EngineError::StoreUnavailable { .. }), "{err:?}");
    // Nothing changed: the AuthID still works.
    assert!(!handle_revoked().await);
    assert_eq!(world.grant(&login.grant_id).await.state, GrantState::Active);
    assert_eq!(live_refresh_tokens(&world, 2), vec!["rt-2".to_owned()]);
    assert!(a.token(&login.authid, None).await.is_ok());
    // The caller retries with the same AuthID.
    let outcome = a.revoke_handle(&login.authid, login.authid.keyid()).await.unwrap();
    assert_eq!(outcome, Some(GrantRevocation { handles_revoked: 1, provider: ProviderRevocation::Revoked }));
    assert!(handle_revoked().await);
    let grant = world.grant(&login.grant_id).await;
    assert_eq!(grant.state, GrantState::Revoked);
    assert!(grant.payload.as_bytes().is_empty());
    assert_eq!(world.provider.revoked(), vec!["rt-2".to_owned()]);
    assert_eq!(live_refresh_tokens(&world, 2), Vec::<String>::new());
    assert_eq!(a.token(&login.authid, None).await.unwrap_err(), EngineError::AuthIdRevoked);
}

// ---------------------------------------------------------------------------
// Engine bugs still open: the fixes for B and D leave a race each, and a
// sibling of B and C was found while modelling them. Each needs two
// operations to interleave, which the model (one operation at a time) never
// does; these tests force the interleaving.

/// A store that holds back chosen calls of the brokers built on it, to
/// interleave two operations exactly: once told to, the next
/// compare-and-swap of a grant waits until the test lets it go.
struct GateStore {
    inner: Arc<dyn Store>,
    hold_grant_write: AtomicBool,
    grant_write_waiting: AtomicBool,
    grant_write_go: Notify,
}

impl GateStore {
    fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(GateStore {
            inner,
            hold_grant_write: AtomicBool::new(false),
            grant_write_waiting: AtomicBool::new(false),
            grant_write_go: Notify::new(),
        })
    }

    fn hold_next_grant_write(&self) {
        self.hold_grant_write.store(true, Ordering::SeqCst);
    }

    fn grant_write_waiting(&self) -> bool {
        self.grant_write_waiting.load(Ordering::SeqCst)
    }

    fn let_grant_write_go(&self) {
        self.grant_write_go.notify_one();
    }
}

#[async_trait]
impl Store for GateStore {
    async fn get(&self, kind: RecordKind, id: &[u8]) -> Result<Option<StoredRecord>, StoreError> {
        self.inner.get(kind, id).await
    }

    async fn insert(&self, kind: RecordKind, id: &[u8], group: Option<&[u8]>, body: &[u8]) -> Result<(), StoreError> {
        self.inner.insert(kind, id, group, body).await
    }

    async fn compare_and_swap(
        &self,
        kind: RecordKind,
        id: &[u8],
        expected: u64,
        group: Option<&[u8]>,
        body: &[u8],
    ) -> Result<u64, StoreError> {
        if kind == RecordKind::Grant && self.hold_grant_write.swap(false, Ordering::SeqCst) {
            self.grant_write_waiting.store(true, Ordering::SeqCst);
            self.grant_write_go.notified().await;
        }
        self.inner.compare_and_swap(kind, id, expected, group, body).await
    }

    async fn delete(&self, kind: RecordKind, id: &[u8], expected: Option<u64>) -> Result<(), StoreError> {
        self.inner.delete(kind, id, expected).await
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        self.inner.list(query).await
    }

    async fn publish(&self, notice: Notice) -> Result<(), StoreError> {
        self.inner.publish(notice).await
    }

    async fn subscribe(&self) -> Result<NoticeStream, StoreError> {
        self.inner.subscribe().await
    }
}

/// A broker like `World::broker`'s, on another store (a `GateStore` over the world's).
async fn broker_on(world: &World, store: Arc<dyn Store>, name: &str) -> Broker {
    let config = EngineConfig { instance_id: name.into(), provider_retries: 0, ..EngineConfig::default() };
    let broker = Broker::new(BrokerParts {
        store,
        catalogue: world.catalogue(),
        keyring: world.ring.clone(),
        runtime: runtime(&world.clock),
        rng: Arc::new(OsRandom),
        config,
    });
    broker.start().await.unwrap();
    broker
}

/// (`core/src/engine/token.rs`, `flush_pending`) The flusher checks that the
/// grant is live and still holds the refresh token the pending refresh used,
/// then stores the write with `persist`. If the grant is revoked (on another
/// instance) between the check and the write, the write's compare-and-swap
/// conflicts and `persist` answers `Persisted::Revoked`; the pending token
/// must then be revoked at the provider too, as when the check finds the
/// grant revoked — else the revoked grant keeps one live refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_revoked_between_the_flushers_check_and_write_still_gets_the_pending_token_revoked() {
    let world = World::new(ScriptedProvider::new().rotating(true).strict_reuse(true));
    let gate = GateStore::new(world.store.clone());
    let a = broker_on(&world, gate.clone(), INSTANCES[0]).await;
    let b = world.broker(INSTANCES[1], |_| {}).await;
    let login = world.login(&a).await;
    world.expire_tokens();
    world.store.fail_next_grant_writes(3);
    assert!(a.token(&login.authid, None).await.is_err());
    assert_eq!(a.metrics().pending_writes, 1);
    until("a's flusher sleeps", || world.clock.sleepers() == 1).await;
    // a's flusher finds the grant live, holding rt-2, and goes to write rt-3.
    gate.hold_next_grant_write();
    world.clock.advance(Duration::from_secs(1));
    until("a's flusher is about to write the grant", || gate.grant_write_waiting()).await;
    let revocation = b.revoke_grant(&login.authid).await.unwrap();
    assert_eq!(revocation, GrantRevocation { handles_revoked: 1, provider: ProviderRevocation::Revoked });
    gate.let_grant_write_go();
    until("a's flusher dropped the write", || a.metrics().pending_writes == 0).await;
    // A fixed flusher revokes the token right after dropping the write.
    let give_up = std::time::Instant::now() + Duration::from_secs(2);
    while world.provider.is_live("rt-3") && std::time::Instant::now() < give_up {
        tokio::task::yield_now().await;
    }
    assert_eq!(world.grant(&login.grant_id).await.state, GrantState::Revoked);
    assert_eq!(live_refresh_tokens(&world, 3), Vec::<String>::new(), "the pending write's token outlives its grant");
}

/// (`core/src/engine/token.rs`, `after_success`) A grant revoked while a
/// refresh is being stored: the refreshing instance holds a rotated refresh
/// token, its write conflicts with the revocation, and `persist` answers
/// `Persisted::Revoked`. The revoking instance revoked the stored token,
/// rotated away by then, so the new one must be revoked here — else the
/// revoked grant keeps one live refresh token (invariant 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_revoked_while_a_refresh_is_stored_gets_the_rotated_token_revoked() {
    let world = World::new(ScriptedProvider::new().rotating(true).strict_reuse(true));
    let gate = GateStore::new(world.store.clone());
    let a = broker_on(&world, gate.clone(), INSTANCES[0]).await;
    let b = world.broker(INSTANCES[1], |_| {}).await;
    let login = world.login(&a).await;
    world.expire_tokens();
    // a refreshes (the provider rotates rt-2 to rt-3) and goes to store rt-3.
    gate.hold_next_grant_write();
    let refreshing = spawn_token(&a, &login.authid);
    until("a is about to store the refreshed grant", || gate.grant_write_waiting()).await;
    let revocation = b.revoke_grant(&login.authid).await.unwrap();
    assert_eq!(revocation, GrantRevocation { handles_revoked: 1, provider: ProviderRevocation::Revoked });
    gate.let_grant_write_go();
    assert_eq!(refreshing.await.unwrap().unwrap_err(), EngineError::AuthIdRevoked);
    assert_eq!(world.grant(&login.grant_id).await.state, GrantState::Revoked);
    assert_eq!(
        live_refresh_tokens(&world, 3),
        Vec::<String>::new(),
        "the token the refresh obtained outlives its grant"
    );
}
