// The refresh engine's required behaviour, one section per concern (a–k), on
// MemoryStore, a scripted provider and a manual clock.

use std::time::Duration;

use futures_util::future::join_all;
use latchkey_core::engine::{
    BreakerState, Callback, DevicePoll, EngineError, GrantRevocation, HandoffFetch, HandoffState, ProviderRevocation,
    RefreshOutcome,
};
use latchkey_core::records::LoginTransaction;
use latchkey_core::testing::{Behaviour, ScriptedProvider};
use latchkey_core::{
    Clock, GrantState, LoginId, MasterKey, MasterKeyId, MasterKeyring, OsRandom, Record, Store, StoreExt,
};
use secrecy::ExposeSecret;

use crate::engine_world::{ISSUER, OTHER_SERVICE, SERVICE, World, begin, spawn_token, until};

fn access(token: &latchkey_core::TokenGrant) -> String {
    token.access_token.expose_secret().to_owned()
}

// a. In-process single flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_share_one_refresh() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let login = world.login(&broker).await;
    world.expire_tokens();
    world.provider.hold();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (broker, authid) = (broker.clone(), login.authid.clone());
            tokio::spawn(async move { broker.token(&authid, None).await })
        })
        .collect();
    until("199 requests joined the one refresh", || broker.metrics().single_flight_joins == 199).await;
    assert_eq!(world.provider.in_flight(), 1);
    world.provider.release();
    let results = join_all(tasks).await;
    let tokens: Vec<String> = results.into_iter().map(|r| access(&r.unwrap().unwrap())).collect();
    assert_eq!(world.provider.refresh_calls(), 1, "exactly one provider refresh");
    assert!(tokens.iter().all(|t| *t == tokens[0]), "everyone got the same fresh token");
    assert_ne!(tokens[0], "at-1", "and it is not the expired one");
}

// b. Two instances: the second waits on the lease and adopts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_waits_on_the_lease_and_adopts_the_stored_token() {
    let world = World::new(ScriptedProvider::new().rotating(true).strict_reuse(true));
    let a = world.broker("instance-a", |_| {}).await;
    let b = world.broker("instance-b", |_| {}).await;
    let login = world.login(&a).await;
    world.expire_tokens();
    world.provider.hold();
    let first = spawn_token(&a, &login.authid);
    until("a is refreshing", || world.provider.in_flight() == 1).await;
    let second = spawn_token(&b, &login.authid);
    until("b waits on a's lease", || b.metrics().lease_waits >= 1).await;
    world.provider.release();
    let (first, second) = (first.await.unwrap().unwrap(), second.await.unwrap().unwrap());
    assert_eq!(access(&first), access(&second));
    assert_eq!(world.provider.refresh_calls(), 1, "one provider refresh for both instances");
    assert_eq!(world.provider.reuse_detected(), 0);
    assert!(b.metrics().adopted_tokens >= 1, "b adopted a's stored token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lease_holder_loses_the_lease_at_its_deadline() {
    let world = World::new(ScriptedProvider::new());
    let b = world.broker("instance-b", |c| c.lease_poll = Duration::from_secs(60)).await;
    let login = world.login(&b).await;
    world.expire_tokens();
    let now = world.clock.now();
    // An instance took the lease and died.
    world.store.acquire_lease(&login.grant_id, "dead", now.saturating_add(Duration::from_secs(30)), now).await.unwrap();
    let waiting = spawn_token(&b, &login.authid);
    until("b waits on the dead lease", || b.metrics().lease_waits >= 1 && world.clock.sleepers() >= 1).await;
    assert_eq!(world.provider.refresh_calls(), 0, "nobody refreshes while the lease is held");
    world.clock.advance(Duration::from_secs(30));
    let token = waiting.await.unwrap().unwrap();
    assert_eq!(world.provider.refresh_calls(), 1, "b took over at the deadline");
    assert_ne!(access(&token), "at-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_slower_than_the_lease_never_lets_a_second_instance_refresh() {
    // Strict rotation: a second refresh with the same token would end the grant.
    let world = World::new(ScriptedProvider::new().rotating(true).strict_reuse(true));
    let lease = Duration::from_secs(30);
    let a = world.broker("instance-a", |c| c.lease_ttl = lease).await;
    let b = world
        .broker("instance-b", |c| {
            c.lease_ttl = lease;
            c.provider_retry_after = Duration::from_secs(7);
        })
        .await;
    let login = world.login(&a).await;
    world.expire_tokens();
    world.provider.hold(); // the provider answers only when released: far slower than the lease
    let first = spawn_token(&a, &login.authid);
    until("a is refreshing", || world.provider.in_flight() == 1).await;
    let second = spawn_token(&b, &login.authid);
    until("b waits on a's lease", || b.metrics().lease_waits >= 1).await;
    // Four lease periods pass with a's provider call still open. Each step
    // ends when a has renewed its lease or b has called the provider too
    // (which, without renewals, happens when a's lease lapses at 30 s).
    for step in 1..=12u64 {
        world.clock.advance(lease / 3);
        let give_up = std::time::Instant::now() + Duration::from_secs(2);
        while a.metrics().lease_renewals < step && world.provider.in_flight() < 2 && std::time::Instant::now() < give_up
        {
            tokio::task::yield_now().await;
        }
        assert_eq!(world.provider.in_flight(), 1, "nobody else calls the provider while a's call is open");
    }
    assert!(a.metrics().lease_renewals >= 12, "a renewed its lease every third of its TTL");
    let waited = second.await.unwrap().unwrap_err();
    // b gave up waiting after one lease period: its store answered all
    // along, so it says the provider is slow, with the provider's retry.
    assert_eq!(waited, EngineError::ProviderUnavailable { retry_after: Duration::from_secs(7) });
    assert!(!waited.to_string().contains("store"), "{waited}");
    world.provider.release();
    let token = first.await.unwrap().unwrap();
    assert_eq!(world.provider.reuse_detected(), 0, "the provider never saw a refresh token twice");
    let adopted = b.token(&login.authid, None).await.unwrap();
    assert_eq!(access(&adopted), access(&token), "b adopts a's stored token");
    assert_eq!(world.provider.refresh_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_whose_lease_was_taken_is_given_up() {
    let world = World::new(ScriptedProvider::new().rotating(true));
    let lease = Duration::from_secs(30);
    let a = world.broker("instance-a", |c| c.lease_ttl = lease).await;
    let login = world.login(&a).await;
    world.expire_tokens();
    world.provider.hold();
    let first = spawn_token(&a, &login.authid);
    until("a is refreshing", || world.provider.in_flight() == 1).await;
    // The store lost a's lease (an operator, a clock jump): another instance holds it.
    let now = world.clock.now();
    world.memory.delete(latchkey_core::Lease::KIND, login.grant_id.as_bytes(), None).await.unwrap();
    let taken = world.memory.acquire_lease(&login.grant_id, "instance-b", now.saturating_add(lease), now).await;
    assert!(matches!(taken, Ok(latchkey_core::LeaseOutcome::Acquired { .. })));
    world.clock.advance(lease / 3);
    let lost = first.await.unwrap().unwrap_err();
    assert_eq!(lost.code().as_str(), "store_unavailable", "{lost:?}");
    let refreshes = a.metrics().refreshes;
    assert_eq!(refreshes.get(&("scripted".to_owned(), RefreshOutcome::LeaseLost)).copied(), Some(1), "{refreshes:?}");
    world.provider.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_the_catalogue_did_not_announce_is_counted() {
    let mut world = World::new(ScriptedProvider::new().rotating(true));
    world.rotation_claim = Some(false);
    let broker = world.broker("a", |_| {}).await;
    let login = world.login(&broker).await;
    world.expire_tokens();
    broker.token(&login.authid, None).await.unwrap();
    let mismatches = broker.metrics().rotation_mismatches;
    assert_eq!(mismatches.get(&("scripted".to_owned(), true)), Some(&1), "{mismatches:?}");
}

// c. Persist before answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_refresh_token_is_stored_before_the_access_token_is_returned() {
    let world = World::new(ScriptedProvider::new().rotating(true).strict_reuse(true));
    let broker = world.broker("a", |_| {}).await;
    let login = world.login(&broker).await;
    let before = world.stored_refresh_token(&login.authid).await;
    world.expire_tokens();
    world.log.lock().unwrap().clear();
    let token = broker.token(&login.authid, None).await.unwrap();
    world.log.lock().unwrap().push("caller.received".into());
    let events = world.events();
    let at = |e: &str| events.iter().position(|x| x == e).unwrap_or_else(|| panic!("{e} missing from {events:?}"));
    assert!(at("provider.answer") < at("store.cas grant"), "{events:?}");
    assert!(at("store.cas grant") < at("caller.received"), "{events:?}");
    let after = world.stored_refresh_token(&login.authid).await;
    assert_ne!(before, after, "the rotated token is stored");
    assert!(world.provider.is_live(&after) && !world.provider.is_live(&before));
    assert_eq!(world.payload(&login.authid).await.access_token.unwrap().expose_secret(), access(&token));
}

// d. A failed write after a rotation: retried, kept pending, visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_after_rotation_is_kept_pending_until_stored() {
    let world = World::new(ScriptedProvider::new().rotating(true).strict_reuse(true));
    let broker = world.broker("a", |c| c.persist_attempts = 3).await;
    let login = world.login(&broker).await;
    world.expire_tokens();
    // Three immediate attempts fail, and so do the next request's three.
    world.store.fail_next_grant_writes(6);
    let err = broker.token(&login.authid, None).await.unwrap_err();
    assert!(matches!(err, EngineError::StoreUnavailable { .. }), "{err:?}");
    let metrics = broker.metrics();
    assert_eq!((metrics.pending_writes, world.provider.refresh_calls()), (1, 1));
    assert!(metrics.persist_failures >= 3, "the failure is visible: {metrics:?}");
    let err = broker.token(&login.authid, None).await.unwrap_err();
    assert!(matches!(err, EngineError::StoreUnavailable { .. }), "{err:?}");
    assert_eq!(world.provider.refresh_calls(), 1, "no second refresh with the rotated-away token");
    // The store is back: the pending payload is written and its token served.
    let token = broker.token(&login.authid, None).await.unwrap();
    assert_eq!(world.provider.refresh_calls(), 1);
    assert_eq!(broker.metrics().pending_writes, 0);
    let stored = world.stored_refresh_token(&login.authid).await;
    assert!(world.provider.is_live(&stored), "the live refresh token reached the store");
    assert_eq!(world.payload(&login.authid).await.access_token.unwrap().expose_secret(), access(&token));
    world.expire_tokens();
    broker.token(&login.authid, None).await.unwrap();
    assert_eq!(world.provider.reuse_detected(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_write_is_flushed_in_the_background() {
    let world = World::new(ScriptedProvider::new().rotating(true).strict_reuse(true));
    let broker = world.broker("a", |c| c.persist_attempts = 2).await;
    let login = world.login(&broker).await;
    world.expire_tokens();
    world.store.fail_next_grant_writes(2);
    assert!(broker.token(&login.authid, None).await.is_err());
    assert_eq!(broker.metrics().pending_writes, 1);
    until("the flusher sleeps", || world.clock.sleepers() >= 1).await;
    world.clock.advance(Duration::from_secs(1));
    until("the flusher stored the pending write", || broker.metrics().pending_writes == 0).await;
    assert!(world.provider.is_live(&world.stored_refresh_token(&login.authid).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_without_rotation_still_answers() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |c| c.persist_attempts = 2).await;
    let login = world.login(&broker).await;
    world.expire_tokens();
    world.store.fail_next_grant_writes(2);
    let token = broker.token(&login.authid, None).await.unwrap();
    assert_eq!(broker.metrics().pending_writes, 0, "nothing that could be lost");
    assert_ne!(access(&token), "at-1");
}

// e. invalid_grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_after_another_instance_rotated_adopts_the_newer_token() {
    let world = World::new(ScriptedProvider::new().rotating(true));
    let broker = world.broker("a", |_| {}).await;
    let login = world.login(&broker).await;
    world.expire_tokens();
    world.provider.hold();
    world.provider.script([Behaviour::InvalidGrant]);
    let pending = spawn_token(&broker, &login.authid);
    until("a is refreshing", || world.provider.in_flight() == 1).await;
    // Meanwhile "another instance" stores a newer token (its lease lapsed ours).
    let handle: latchkey_core::Handle = world.memory.load(login.authid.keyid().as_bytes()).await.unwrap().unwrap();
    let key = handle.unwrap_data_key(login.authid.secret(), &world.ring).unwrap();
    let mut grant = world.grant(&login.grant_id).await;
    let mut payload = grant.open_payload(&key).unwrap();
    payload.refresh_token = Some(world.provider.issue_refresh_token().into());
    payload.access_token = Some("at-from-elsewhere".to_owned().into());
    payload.access_expires_at = Some(world.clock.now().saturating_add(Duration::from_secs(3600)));
    payload.refreshed_at = world.clock.now();
    grant.seal_payload(&payload, &key, world.clock.now(), &OsRandom);
    world.memory.update(&mut grant).await.unwrap();
    world.provider.release();
    let token = pending.await.unwrap().unwrap();
    assert_eq!(access(&token), "at-from-elsewhere", "adopted, not reauth");
    assert_eq!(world.grant(&login.grant_id).await.state, GrantState::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_on_the_current_token_marks_reauth_and_stops_calling_the_provider() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let login = world.login(&broker).await;
    world.expire_tokens();
    world.provider.script([Behaviour::InvalidGrant]);
    let err = broker.token(&login.authid, None).await.unwrap_err();
    assert_eq!(err, EngineError::ReauthRequired { service: SERVICE.into() });
    assert_eq!(world.grant(&login.grant_id).await.state, GrantState::ReauthRequired, "kept, not deleted");
    for _ in 0..3 {
        let err = broker.token(&login.authid, None).await.unwrap_err();
        assert_eq!(err.code().as_str(), "reauth_required");
    }
    assert_eq!(world.provider.refresh_calls(), 1, "later calls never reach the provider");
}

// f. Transient failures, retries, and the circuit breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_serves_a_still_valid_stored_token() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let login = world.login(&broker).await;
    world.clock.advance(Duration::from_secs(3400)); // 200 s left: below the 300 s wanted
    world.provider.script([Behaviour::Transient]);
    let token = broker.token(&login.authid, None).await.unwrap();
    assert_eq!(access(&token), "at-2", "the stored token, still valid");
    assert_eq!(broker.metrics().stale_served, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_without_a_valid_token_answers_provider_unavailable() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let login = world.login(&broker).await;
    world.expire_tokens();
    world.provider.script([Behaviour::Transient, Behaviour::RateLimited(Some(Duration::from_secs(120)))]);
    let err = broker.token(&login.authid, None).await.unwrap_err();
    assert_eq!(err, EngineError::ProviderUnavailable { retry_after: Duration::from_secs(30) });
    let err = broker.token(&login.authid, None).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(120)), "the provider's Retry-After is passed on");
    assert_eq!(err.code().as_str(), "provider_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_with_backoff_within_a_request() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |c| c.provider_retries = 2).await;
    let login = world.login(&broker).await;
    world.expire_tokens();
    world.provider.script([Behaviour::Transient, Behaviour::Transient]);
    let task = spawn_token(&broker, &login.authid);
    for round in 1..=2 {
        // Two sleepers: the retry's back-off and the lease heartbeat.
        until("the retry waits on the clock", || {
            world.clock.sleepers() >= 2 && world.provider.refresh_calls() == round
        })
        .await;
        world.clock.advance(Duration::from_secs(1));
    }
    assert!(task.await.unwrap().is_ok());
    assert_eq!(world.provider.refresh_calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_breaker_opens_after_repeated_failures_and_half_opens_after_cool_down() {
    let world = World::new(ScriptedProvider::new());
    let broker = world
        .broker("a", |c| {
            c.breaker.failure_threshold = 3;
            c.breaker.cool_down = Duration::from_secs(30);
        })
        .await;
    let login = world.login(&broker).await;
    world.expire_tokens();
    world.provider.set_default(Behaviour::Transient);
    for _ in 0..3 {
        assert!(broker.token(&login.authid, None).await.is_err());
    }
    assert_eq!(world.provider.refresh_calls(), 3);
    assert!(matches!(broker.breaker_state("scripted"), BreakerState::Open { .. }));
    let err = broker.token(&login.authid, None).await.unwrap_err();
    assert_eq!(world.provider.refresh_calls(), 3, "an open breaker does not call the provider");
    assert_eq!(err.code().as_str(), "provider_unavailable");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    world.clock.advance(Duration::from_secs(30));
    assert!(broker.token(&login.authid, None).await.is_err(), "the probe fails");
    assert_eq!(world.provider.refresh_calls(), 4, "one probe after the cool-down");
    assert!(matches!(broker.breaker_state("scripted"), BreakerState::Open { .. }));
    world.provider.set_default(Behaviour::Succeed);
    world.clock.advance(Duration::from_secs(30));
    assert!(broker.token(&login.authid, None).await.is_ok());
    assert_eq!(broker.breaker_state("scripted"), BreakerState::Closed { failures: 0 });
}

// g. Revocation purges the cache, here and on other instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_handle_or_the_grant_purges_the_cache() {
    let world = World::new(ScriptedProvider::new());
    let a = world.broker("a", |_| {}).await;
    let b = world.broker("b", |_| {}).await;
    let login = world.login(&a).await;
    let second = a.mint_handle(&login.authid, "nas").await.unwrap().authid;
    for broker in [&a, &b] {
        broker.token(&login.authid, None).await.unwrap();
        broker.token(&login.authid, None).await.unwrap();
        assert_eq!(broker.metrics().cache_hits, 1, "the second call was a cache hit");
    }
    a.revoke_handle(&login.authid, login.authid.keyid()).await.unwrap();
    assert_eq!(a.token(&login.authid, None).await.unwrap_err(), EngineError::AuthIdRevoked);
    until("b's cache was purged by the notice", || b.metrics().cached_tokens == 0).await;
    assert_eq!(b.token(&login.authid, None).await.unwrap_err(), EngineError::AuthIdRevoked);
    a.token(&second, None).await.unwrap();
    a.token(&second, None).await.unwrap();
    a.revoke_grant(&second).await.unwrap();
    assert_eq!(a.token(&second, None).await.unwrap_err(), EngineError::AuthIdRevoked);
}

// g2. A cache hit shares the cached token; `token` answers a copy of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_hit_shares_the_token_the_cache_holds() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let login = world.login(&broker).await;
    let first = broker.shared_token(&login.authid, None).await.unwrap();
    let second = broker.shared_token(&login.authid, None).await.unwrap();
    let third = broker.shared_token(&login.authid, None).await.unwrap();
    assert_eq!(broker.metrics().cache_misses, 1);
    assert_eq!(broker.metrics().cache_hits, 2);
    assert!(std::sync::Arc::ptr_eq(&first, &second), "the token the miss cached is the one a hit answers");
    assert!(std::sync::Arc::ptr_eq(&second, &third), "hits share one token");
    let copy = broker.token(&login.authid, None).await.unwrap();
    assert_eq!(access(&copy), access(&third));
    assert_eq!((copy.expires_at, &copy.service), (third.expires_at, &third.service));
    // Shared or not, a revoked AuthID is no longer answered from the cache.
    broker.revoke_handle(&login.authid, login.authid.keyid()).await.unwrap();
    assert_eq!(broker.shared_token(&login.authid, None).await.unwrap_err(), EngineError::AuthIdRevoked);
}

/// A server boxes the token future of every request: the miss path (store,
/// provider, lease) is boxed apart, so the future a hit builds stays small
/// enough for the allocator's per-thread cache (glibc's ends at 1,032 bytes;
/// with the miss inside, it was 1,232).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_future_holds_the_cache_miss_only_boxed() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let login = world.login(&broker).await;
    let future = broker.shared_token(&login.authid, None);
    assert!(std::mem::size_of_val(&future) <= 256, "{} bytes", std::mem::size_of_val(&future));
    assert!(future.await.is_ok(), "and the boxed miss still answers");
    assert_eq!(broker.metrics().cache_misses, 1);
}

// h. min_validity and the refresh deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_validity_is_respected_and_the_refresh_deadline_follows_the_idle_lifetime() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let login = world.login(&broker).await;
    let logged_in_at = world.clock.now();
    let first = broker.token(&login.authid, None).await.unwrap();
    assert_eq!(first.refresh_deadline, Some(logged_in_at.saturating_add(crate::engine_world::IDLE)));
    assert_eq!(broker.expires_in(&first), Some(Duration::from_secs(3600)), "by the engine's clock");
    world.clock.advance(Duration::from_secs(3000)); // 600 s left
    let same = broker.token(&login.authid, Some(Duration::from_secs(300))).await.unwrap();
    assert_eq!(access(&same), access(&first));
    assert_eq!(broker.expires_in(&same), Some(Duration::from_secs(600)));
    assert_eq!(world.provider.refresh_calls(), 0);
    let refreshed_at = world.clock.now();
    let longer = broker.token(&login.authid, Some(Duration::from_secs(900))).await.unwrap();
    assert_ne!(access(&longer), access(&first), "900 s wanted, 600 s left: refreshed");
    assert_eq!(world.provider.refresh_calls(), 1);
    assert_eq!(longer.refresh_deadline, Some(refreshed_at.saturating_add(crate::engine_world::IDLE)));
    assert_eq!(longer.expires_at, Some(refreshed_at.saturating_add(Duration::from_secs(3600))));
    // A client asking for more than half the lifetime still gets a fresh token, once.
    let greedy = broker.token(&login.authid, Some(Duration::from_secs(7200))).await.unwrap();
    assert_eq!(access(&greedy), access(&longer));
    assert_eq!(world.provider.refresh_calls(), 1);
}

// i. Login transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_states_are_single_use_and_expire() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let begun = begin(&broker, SERVICE, None).await;
    let start_url = broker.begin_login(SERVICE, None, broker.new_browser_proof().expose_secret()).await;
    assert!(start_url.unwrap().authorization_url.contains("code_challenge_method=S256"));
    let code = world.provider.approve(&begun.state).unwrap();
    let callback = begun.callback(Some(&code));
    let done = broker.complete_login(&callback).await.unwrap();
    assert!(broker.token(&done.authid, None).await.is_ok());
    let replay = broker.complete_login(&callback).await.unwrap_err();
    assert!(matches!(replay, EngineError::BadRequest(ref m) if m.contains("already")), "{replay:?}");
    // The same proof cannot begin a second login, even after the first completed.
    let again = broker.begin_login(SERVICE, None, &begun.proof).await.unwrap_err();
    assert!(matches!(again, EngineError::Forbidden(ref m) if m.contains("already used")), "{again:?}");
    assert!(!broker.browser_proof_reusable(&begun.proof).await, "a used proof is replaced by the page");

    let begun = begin(&broker, SERVICE, None).await;
    let code = world.provider.approve(&begun.state).unwrap();
    world.clock.advance(Duration::from_secs(601));
    let late = broker.complete_login(&begun.callback(Some(&code))).await.unwrap_err();
    assert!(matches!(late, EngineError::BadRequest(ref m) if m.contains("expired")), "{late:?}");
    let stale = broker.begin_login(SERVICE, None, &begun.proof).await.unwrap_err();
    assert!(matches!(stale, EngineError::Forbidden(ref m) if m.contains("expired")), "an old proof: {stale:?}");
    broker.gc(Duration::from_secs(365 * 86_400), false).await.unwrap();
    assert_eq!(world.memory.count(LoginTransaction::KIND), 0, "used and expired states are gone after gc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_completes_only_in_the_browser_that_began_it() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let forged = "x".repeat(latchkey_core::engine::BROWSER_PROOF_LEN);
    for proof in ["", "not-a-proof", forged.as_str()] {
        let refused = broker.begin_login(SERVICE, None, proof).await.unwrap_err();
        assert!(matches!(refused, EngineError::Forbidden(_)), "{proof:?}: {refused:?}");
    }
    let other_broker = World::new(ScriptedProvider::new()).broker("b", |_| {}).await;
    let foreign = other_broker.new_browser_proof();
    assert!(broker.begin_login(SERVICE, None, foreign.expose_secret()).await.is_err(), "another broker's proof");
    assert_eq!(world.memory.count(LoginTransaction::KIND), 0, "refused proofs create nothing");

    let begun = begin(&broker, SERVICE, None).await;
    let code = world.provider.approve(&begun.state).unwrap();
    let elsewhere = broker.new_browser_proof().expose_secret().to_owned();
    for browser in [None, Some(elsewhere.as_str())] {
        let callback = Callback { browser, ..begun.callback(Some(&code)) };
        let refused = broker.complete_login(&callback).await.unwrap_err();
        assert!(matches!(refused, EngineError::Forbidden(ref m) if m.contains("another browser")), "{refused:?}");
    }
    assert_eq!(world.memory.count(latchkey_core::Grant::KIND), 0, "nothing created in the other browser");
    // The real browser still completes it: the replay did not spend the login.
    assert!(broker.complete_login(&begun.callback(Some(&code))).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_for_another_service_a_wrong_or_missing_issuer_or_a_refusal_is_a_typed_error() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let attempt = |service: Option<&'static str>, iss: Option<&'static str>, error: Option<&'static str>| {
        let (broker, world) = (broker.clone(), &world);
        async move {
            let begun = begin(&broker, SERVICE, None).await;
            let code = world.provider.approve(&begun.state).unwrap();
            let code = error.is_none().then_some(code.as_str());
            broker.complete_login(&Callback { iss, service, error, ..begun.callback(code) }).await
        }
    };
    let cases = [
        (Some(OTHER_SERVICE), Some(ISSUER), None, "another service"),
        (None, Some("https://mix-up.example"), None, "unexpected issuer"),
        (None, None, None, "does not say which server issued it"),
        (None, Some(ISSUER), Some("access_denied"), "did not grant access (access_denied)"),
        (None, Some(ISSUER), Some("<script>alert(1)</script>"), "(scriptalert1script)"),
    ];
    for (service, iss, error, want) in cases {
        match attempt(service, iss, error).await {
            Err(EngineError::BadRequest(message)) => assert!(message.contains(want), "{message}"),
            other => panic!("expected a bad request containing {want:?}, got {other:?}"),
        }
    }
    assert!(attempt(Some(SERVICE), Some(ISSUER), None).await.is_ok());
    let proof = broker.new_browser_proof();
    let unknown = broker.begin_login("nope", None, proof.expose_secret()).await.unwrap_err();
    assert_eq!(unknown.code().as_str(), "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pkce_verifier_is_stored_only_sealed() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let begun = begin(&broker, SERVICE, None).await;
    let id = LoginId::for_state(&world.ring.record_keys(), &begun.state);
    let raw = world.memory.get(LoginTransaction::KIND, id.as_bytes()).await.unwrap().unwrap();
    let tx: LoginTransaction = world.memory.load(id.as_bytes()).await.unwrap().unwrap();
    let blob = tx.pkce_verifier.clone().expect("a verifier is kept");
    assert_eq!(blob.master_key_id().unwrap().unwrap().as_str(), "k1", "sealed under the master key");
    let verifier = tx.open_verifier(&world.ring).unwrap().unwrap();
    let verifier = verifier.expose_secret().as_bytes();
    assert!(!raw.body.windows(verifier.len()).any(|w| w == verifier), "never stored in the clear");
    for secret in [begun.state.as_bytes(), begun.proof.as_bytes()] {
        assert!(!raw.body.windows(secret.len()).any(|w| w == secret), "nor is the state or the proof");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pasted_login_token_logs_in_and_can_hand_off() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let proof = broker.new_browser_proof().expose_secret().to_owned();
    let with_token = |token: &'static str, handoff: Option<&'static str>| {
        let (broker, proof) = (broker.clone(), proof.clone());
        async move { broker.login_with_token(SERVICE, token, handoff, &proof).await }
    };
    let done = with_token(" valid-login-token\n", Some("cli-handoff-token-0123")).await.unwrap();
    assert!(done.handed_off);
    assert!(broker.token(&done.authid, None).await.is_ok());
    assert_eq!(broker.fetch_handoff("cli-handoff-token-0123").await.unwrap(), HandoffFetch::Ready(done.authid.clone()));
    let refused = with_token("expired-token", None).await.unwrap_err();
    assert!(matches!(refused, EngineError::BadRequest(ref m) if m.contains("did not accept")), "{refused:?}");
    assert_eq!(with_token("   ", None).await.unwrap_err().code().as_str(), "bad_request");
    assert_eq!(
        broker.login_with_token("nope", "valid-login-token", None, &proof).await.unwrap_err().code().as_str(),
        "bad_request"
    );
    let forged = broker.login_with_token(SERVICE, "valid-login-token", None, "forged").await.unwrap_err();
    assert!(matches!(forged, EngineError::Forbidden(_)), "{forged:?}");
}

// j. Hand-offs and the device flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_releases_its_authid_once_and_only_to_the_token_holder() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let token = "duplicati-handoff-token-0123456789";
    broker.start_handoff(token).await.unwrap();
    assert_eq!(broker.handoff_state(token).await.unwrap(), HandoffState::Pending);
    assert_eq!(broker.fetch_handoff(token).await.unwrap(), HandoffFetch::Pending);
    let begun = begin(&broker, SERVICE, Some(token)).await;
    let code = world.provider.approve(&begun.state).unwrap();
    let done = broker.complete_login(&begun.callback(Some(&code))).await.unwrap();
    assert!(done.handed_off);
    assert_eq!(broker.handoff_state(token).await.unwrap(), HandoffState::Ready);
    let key = latchkey_core::HandoffId::for_token(&world.ring.record_keys(), token);
    let stored = world.memory.get(latchkey_core::Handoff::KIND, key.as_bytes()).await.unwrap().unwrap();
    let text = done.authid.expose_text();
    assert!(!stored.body.windows(text.len()).any(|w| w == text.as_bytes()), "sealed at rest");
    assert_eq!(broker.fetch_handoff("someone-else-token-0123").await.unwrap(), HandoffFetch::Gone);
    assert_eq!(broker.fetch_handoff(token).await.unwrap(), HandoffFetch::Ready(done.authid.clone()));
    assert_eq!(broker.fetch_handoff(token).await.unwrap(), HandoffFetch::Gone, "once");
    assert_eq!(broker.handoff_state(token).await.unwrap(), HandoffState::Delivered);
    let proof = broker.new_browser_proof();
    assert!(
        broker.begin_login(SERVICE, Some(token), proof.expose_secret()).await.is_err(),
        "a used token cannot start another login"
    );

    broker.start_handoff("expiring-token-0123").await.unwrap();
    world.clock.advance(Duration::from_secs(901));
    assert_eq!(broker.fetch_handoff("expiring-token-0123").await.unwrap(), HandoffFetch::Gone);
    assert_eq!(broker.handoff_state("expiring-token-0123").await.unwrap(), HandoffState::Unknown);
    assert_eq!(broker.fetch_handoff("").await.unwrap_err().code().as_str(), "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_takes_one_authid_and_short_tokens_are_refused() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let token = "victims-handoff-token-0123";
    // Two logins name the same hand-off (the second could be anyone's who saw the token).
    let first = begin(&broker, SERVICE, Some(token)).await;
    let second = begin(&broker, SERVICE, Some(token)).await;
    let code = world.provider.approve(&first.state).unwrap();
    let done = broker.complete_login(&first.callback(Some(&code))).await.unwrap();
    assert!(done.handed_off && !done.handoff_refused);
    let code = world.provider.approve(&second.state).unwrap();
    let late = broker.complete_login(&second.callback(Some(&code))).await.unwrap();
    assert!(!late.handed_off && late.handoff_refused, "a second delivery is refused");
    assert_eq!(broker.fetch_handoff(token).await.unwrap(), HandoffFetch::Ready(done.authid.clone()), "the first stays");

    for short in ["a", "fifteen-chars-x"] {
        for result in [broker.start_handoff(short).await.map(|_| ()), broker.fetch_handoff(short).await.map(|_| ())] {
            match result {
                Err(EngineError::BadRequest(m)) => assert!(m.contains("too short"), "{m}"),
                other => panic!("{short:?}: {other:?}"),
            }
        }
    }
    assert!(broker.start_handoff("sixteen-chars-xx").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_writer_cannot_redirect_a_handoff_or_a_login() {
    use latchkey_core::{DeviceGrant, Handoff, HandoffId, Store};
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let keys = world.ring.record_keys();
    let victim = "victims-handoff-token-0123";
    let attacker = "attackers-handoff-token-0123";
    broker.start_handoff(victim).await.unwrap();
    broker.start_handoff(attacker).await.unwrap();
    let begun = begin(&broker, SERVICE, Some(victim)).await;
    // A writer without the master key points the victim's hand-off at the
    // attacker's recipient key (copied from the attacker's own record).
    let victim_id = HandoffId::for_token(&keys, victim);
    let attacker_id = HandoffId::for_token(&keys, attacker);
    let theirs: Handoff = world.memory.load(attacker_id.as_bytes()).await.unwrap().unwrap();
    let mut ours: Handoff = world.memory.load(victim_id.as_bytes()).await.unwrap().unwrap();
    ours.recipient = theirs.recipient;
    world.memory.update(&mut ours).await.unwrap();
    let code = world.provider.approve(&begun.state).unwrap();
    let refused = broker.complete_login(&begun.callback(Some(&code))).await.unwrap_err();
    assert!(matches!(refused, EngineError::Corrupt { ref detail } if detail.contains("integrity")), "{refused:?}");
    assert_eq!(broker.fetch_handoff(attacker).await.unwrap(), HandoffFetch::Pending, "nothing reached the attacker");
    assert!(broker.fetch_handoff(victim).await.is_err(), "the tampered record is refused, not served");

    // The same for a login's hand-off field, flipped to the attacker's hand-off.
    let begun = begin(&broker, SERVICE, Some("another-victim-token-0123")).await;
    let login_id = LoginId::for_state(&keys, &begun.state);
    let mut tx: LoginTransaction = world.memory.load(login_id.as_bytes()).await.unwrap().unwrap();
    tx.handoff = Some(attacker_id);
    world.memory.update(&mut tx).await.unwrap();
    let code = world.provider.approve(&begun.state).unwrap();
    assert!(matches!(broker.complete_login(&begun.callback(Some(&code))).await, Err(EngineError::Corrupt { .. })));
    assert_eq!(broker.fetch_handoff(attacker).await.unwrap(), HandoffFetch::Pending);

    // And a device code's hand-off.
    let device = broker.begin_device(SERVICE, Some("backup job")).await.unwrap();
    let user_id = latchkey_core::UserCodeId::for_user_code(&keys, &device.user_code);
    let mut record: DeviceGrant = world.memory.load(user_id.as_bytes()).await.unwrap().unwrap();
    record.handoff = attacker_id;
    world.memory.update(&mut record).await.unwrap();
    assert!(matches!(broker.device_confirmation(&device.user_code).await, Err(EngineError::Corrupt { .. })));
    // Untouched records still verify: the raw bytes differ only where written.
    let raw = world.memory.get(Handoff::KIND, attacker_id.as_bytes()).await.unwrap();
    assert!(raw.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_flow_delivers_the_authid_once() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |c| c.public_url = "https://broker.example/".into()).await;
    let device = broker.begin_device(SERVICE, Some("nightly backup")).await.unwrap();
    let code = device.device_code.expose_secret().to_owned();
    let letters = "BCDFGHJKLMNPQRSTVWXZ";
    let user = device.user_code.clone();
    assert_eq!(user.len(), 9);
    assert!(user.chars().enumerate().all(|(i, c)| if i == 4 { c == '-' } else { letters.contains(c) }), "{user}");
    assert_eq!(device.verification_uri, "https://broker.example/device");
    assert_eq!(device.interval, Duration::from_secs(5));
    assert_eq!(broker.poll_device(&code).await.unwrap(), DevicePoll::Pending);
    assert_eq!(broker.poll_device(&code).await.unwrap(), DevicePoll::SlowDown);
    // The user types the code, in any case and spacing, sees what asks, and logs in.
    let typed = format!(" {} ", user.to_lowercase().replace('-', " "));
    let shown = broker.device_confirmation(&typed).await.unwrap();
    assert_eq!(
        (shown.user_code.as_str(), shown.service.as_str(), shown.label.as_str()),
        (user.as_str(), SERVICE, "nightly backup")
    );
    let proof = broker.new_browser_proof().expose_secret().to_owned();
    let start = broker.begin_device_login(&typed, &proof).await.unwrap();
    let state = start.state.expose_secret().to_owned();
    let provider_code = world.provider.approve(&state).unwrap();
    let begun = crate::engine_world::Begun { state, proof };
    let done = broker.complete_login(&begun.callback(Some(&provider_code))).await.unwrap();
    assert!(done.handed_off);
    let handles = broker.list_handles(&done.authid).await.unwrap();
    assert_eq!(handles[0].label, "nightly backup", "the AuthID carries the program's label");
    world.clock.advance(Duration::from_secs(5));
    assert_eq!(broker.poll_device(&code).await.unwrap(), DevicePoll::Ready(done.authid.clone()));
    world.clock.advance(Duration::from_secs(5));
    assert_eq!(broker.poll_device(&code).await.unwrap(), DevicePoll::Expired, "delivered once");
    let proof = broker.new_browser_proof();
    assert!(broker.begin_device_login(&user, proof.expose_secret()).await.is_err(), "a used code starts nothing");
    assert!(broker.device_confirmation(&user).await.is_err());
    assert_eq!(broker.poll_device("no-such-device-code").await.unwrap(), DevicePoll::Invalid);
    assert!(broker.begin_device(SERVICE, Some("bad\nlabel")).await.is_err(), "labels are printable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_or_expired_device_login_is_reported() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let device = broker.begin_device(SERVICE, None).await.unwrap();
    assert_eq!(broker.device_confirmation(&device.user_code).await.unwrap().label, "a program");
    let proof = broker.new_browser_proof().expose_secret().to_owned();
    let start = broker.begin_device_login(&device.user_code, &proof).await.unwrap();
    let begun = crate::engine_world::Begun { state: start.state.expose_secret().to_owned(), proof };
    assert!(broker.complete_login(&Callback { error: Some("access_denied"), ..begun.callback(None) }).await.is_err());
    assert_eq!(broker.poll_device(device.device_code.expose_secret()).await.unwrap(), DevicePoll::Denied);
    let late = broker.begin_device(SERVICE, None).await.unwrap();
    world.clock.advance(Duration::from_secs(901));
    assert_eq!(broker.poll_device(late.device_code.expose_secret()).await.unwrap(), DevicePoll::Expired);
    let proof = broker.new_browser_proof();
    assert!(broker.begin_device_login(&late.user_code, proof.expose_secret()).await.is_err());
    assert_eq!(broker.begin_device("nope", None).await.unwrap_err().code().as_str(), "bad_request");
}

// k. Handles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_mint_revoke_rotate_and_the_last_revoke_revokes_the_grant() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let login = world.login(&broker).await;
    let refresh_token = world.stored_refresh_token(&login.authid).await;
    let mut ids = vec![login.authid.clone()];
    for i in 0..5 {
        ids.push(broker.mint_handle(&login.authid, &format!("machine-{i}")).await.unwrap().authid);
    }
    for id in &ids {
        broker.token(id, None).await.unwrap();
    }
    let listed = broker.list_handles(&ids[3]).await.unwrap();
    assert_eq!(listed.len(), 6);
    assert_eq!(listed.iter().filter(|h| h.is_caller).count(), 1);
    assert!(listed.iter().any(|h| h.label == "machine-4"));

    assert_eq!(broker.revoke_handle(&ids[0], ids[1].keyid()).await.unwrap(), None);
    assert_eq!(broker.token(&ids[1], None).await.unwrap_err(), EngineError::AuthIdRevoked);
    for id in [&ids[0], &ids[2], &ids[3], &ids[4], &ids[5]] {
        broker.token(id, None).await.unwrap();
    }
    let rotated = broker.rotate_handle(&ids[2]).await.unwrap();
    assert_eq!(rotated.label, "machine-1");
    assert_eq!(broker.token(&ids[2], None).await.unwrap_err(), EngineError::AuthIdRevoked);
    broker.token(&rotated.authid, None).await.unwrap();
    assert!(
        broker.revoke_handle(&ids[0], latchkey_core::KeyId::generate(&OsRandom)).await.is_err(),
        "only the grant's own handles"
    );

    let mut live = vec![ids[0].clone(), ids[3].clone(), ids[4].clone(), ids[5].clone(), rotated.authid];
    let last = live.pop().unwrap();
    for id in &live {
        assert_eq!(broker.revoke_handle(id, id.keyid()).await.unwrap(), None);
    }
    assert!(world.provider.revoked().is_empty());
    let outcome = broker.revoke_handle(&last, last.keyid()).await.unwrap();
    assert_eq!(outcome, Some(GrantRevocation { handles_revoked: 1, provider: ProviderRevocation::Revoked }));
    assert_eq!(world.provider.revoked(), vec![refresh_token]);
    assert_eq!(world.grant(&login.grant_id).await.state, GrantState::Revoked);
    assert_eq!(broker.token(&last, None).await.unwrap_err(), EngineError::AuthIdRevoked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_grant_reports_each_part() {
    let world = World::new(ScriptedProvider::new().revocation(false));
    let broker = world.broker("a", |_| {}).await;
    let login = world.login(&broker).await;
    broker.mint_handle(&login.authid, "second").await.unwrap();
    let report = broker.revoke_grant(&login.authid).await.unwrap();
    assert_eq!(report, GrantRevocation { handles_revoked: 2, provider: ProviderRevocation::Unsupported });
    let stored = world.grant(&login.grant_id).await;
    assert_eq!(stored.state, GrantState::Revoked);
    assert!(stored.payload.as_bytes().is_empty(), "the refresh token is erased, not kept");
    assert!(broker.mint_handle(&login.authid, "x").await.is_err());
}

// Maintenance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_lists_in_a_dry_run_and_removes_unused_grants_otherwise() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |c| c.touch_interval = Duration::from_secs(60)).await;
    let old = world.login(&broker).await;
    world.clock.advance(Duration::from_secs(200 * 86_400));
    let recent = world.login(&broker).await;
    begin(&broker, SERVICE, None).await; // expires long before the gc
    world.clock.advance(Duration::from_secs(100 * 86_400));
    let day = |n: u64| Duration::from_secs(n * 86_400);
    let dry = broker.gc(day(250), true).await.unwrap();
    assert_eq!(dry.grants.iter().map(|g| g.grant_id).collect::<Vec<_>>(), vec![old.grant_id]);
    assert_eq!(dry.expired_logins, 3, "the pending one and the two completed ones, kept until expiry");
    assert_eq!(world.memory.count(latchkey_core::RecordKind::Grant), 2, "a dry run deletes nothing");
    // Using the old grant now makes it recent.
    assert!(broker.token(&old.authid, None).await.is_ok());
    let report = broker.gc(day(250), false).await.unwrap();
    assert!(report.grants.is_empty(), "{report:?}");
    assert_eq!(report.expired_logins, 3);
    assert_eq!(world.memory.count(latchkey_core::RecordKind::LoginTransaction), 0);
    // 200 days on, `recent` has been idle 300 days and `old` 200.
    world.clock.advance(day(200));
    let report = broker.gc(day(250), false).await.unwrap();
    assert_eq!(report.grants.iter().map(|g| g.grant_id).collect::<Vec<_>>(), vec![recent.grant_id]);
    assert_eq!(broker.token(&recent.authid, None).await.unwrap_err(), EngineError::AuthIdInvalid);
    assert!(broker.token(&old.authid, None).await.is_ok());
    assert_eq!(world.memory.count(latchkey_core::RecordKind::Grant), 1);
    assert_eq!(world.memory.count(latchkey_core::RecordKind::Handle), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_by_service_and_state() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let a = world.login(&broker).await;
    let b = world.login(&broker).await;
    broker.mint_handle(&a.authid, "x").await.unwrap();
    broker.revoke_grant(&b.authid).await.unwrap();
    let stats = broker.stats().await.unwrap();
    assert_eq!(stats.grants.get(&(SERVICE.to_owned(), "active")), Some(&1));
    assert_eq!(stats.grants.get(&(SERVICE.to_owned(), "revoked")), Some(&1));
    assert_eq!((stats.handles_active, stats.handles_revoked), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_key_reseal_lets_the_old_key_go() {
    let world = World::new(ScriptedProvider::new());
    let broker = world.broker("a", |_| {}).await;
    let login = world.login(&broker).await;
    let pending = begin(&broker, SERVICE, None).await;
    let new = MasterKey::generate(MasterKeyId::new("k2").unwrap(), &OsRandom);
    let old = world.ring.current().clone();
    let rotating = world.broker_with_ring("b", MasterKeyring::new(vec![new.clone(), old]).unwrap(), |_| {}).await;
    let report = rotating.reseal().await.unwrap();
    // Two logins: the pending one and the completed one kept until it expires.
    assert_eq!((report.handles_resealed, report.logins_resealed, report.failed), (1, 2, 0));
    assert_eq!(rotating.reseal().await.unwrap().handles_current, 1, "idempotent");
    let only_new = world.broker_with_ring("c", MasterKeyring::single(new), |_| {}).await;
    assert!(only_new.token(&login.authid, None).await.is_ok(), "the AuthID works without the old key");
    // Logins are found by a hash keyed under the current master key, so a
    // login begun before the rotation must be started again (they live 10 min).
    let code = world.provider.approve(&pending.state).unwrap();
    let gone = only_new.complete_login(&pending.callback(Some(&code))).await.unwrap_err();
    assert!(matches!(gone, EngineError::BadRequest(ref m) if m.contains("start the login again")), "{gone:?}");
    let fresh = begin(&only_new, SERVICE, None).await;
    let code = world.provider.approve(&fresh.state).unwrap();
    assert!(only_new.complete_login(&fresh.callback(Some(&code))).await.is_ok());
}

#[test]
fn engine_errors_map_to_the_vocabulary() {
    let cases: [(EngineError, &str, Option<u64>); 6] = [
        (EngineError::AuthIdInvalid, "authid_invalid", None),
        (EngineError::AuthIdMalformed(latchkey_core::AuthIdError::Empty), "authid_invalid", None),
        (EngineError::AuthIdRevoked, "authid_revoked", None),
        (EngineError::StoreUnavailable { retry_after: Duration::from_secs(5) }, "store_unavailable", Some(5)),
        (EngineError::ProviderMisconfigured { detail: "x".into() }, "provider_misconfigured", None),
        (EngineError::BadRequest("x".into()), "bad_request", None),
    ];
    for (err, code, retry) in cases {
        assert_eq!(err.code().as_str(), code);
        assert_eq!(err.retry_after().map(|d| d.as_secs()), retry);
        assert!(!err.to_string().contains('\n'));
    }
}
