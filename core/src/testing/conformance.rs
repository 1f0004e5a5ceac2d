//! The store conformance suite: the behaviour every [`Store`] adapter must show.
//!
//! Each case takes an **empty** store. Adapters run the whole suite with
//! [`store_conformance_tests!`](crate::store_conformance_tests), which makes
//! one `#[tokio::test]` per case:
//!
//! ```text
//! latchkey_core::store_conformance_tests!(async { MyStore::open_fresh().await });
//! ```
//!
//! The cases are listed once, in that macro. Each is a private function here,
//! reached only through [`cases`], which the same list generates; this module
//! denies dead code, so a case missing from the list does not compile rather
//! than silently not run.
//!
//! Concurrency is exercised by polling many operations at once from one task
//! (`join_all`); against a real backend those requests are in flight together.

// A case left out of `store_conformance_tests!`'s list is an error, not a warning.
#![deny(dead_code)]

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use secrecy::{ExposeSecret, SecretString};

use crate::authid::AuthId;
use crate::engine::{SweepCursor, sweep_pass};
use crate::keys::{MasterKey, MasterKeyId, MasterKeyring, SymmetricKey};
use crate::random::{OsRandom, Random};
use crate::records::{
    DeviceGrant, Grant, GrantId, GrantPayload, Handle, Handoff, HandoffId, Lease, LoginId, LoginTransaction, Record,
    RecordKind, Tagged, UserCodeId,
};
use crate::store::{LeaseOutcome, ListQuery, Notice, Store, StoreError, StoreExt};
use crate::time::Timestamp;

/// How many operations race in the concurrency cases.
pub const RACERS: usize = 16;

fn now() -> Timestamp {
    Timestamp::from_unix_secs(1_767_225_600)
}

fn ring() -> MasterKeyring {
    MasterKeyring::single(MasterKey::generate(MasterKeyId::new("conformance").expect("valid id"), &OsRandom))
}

fn payload() -> GrantPayload {
    GrantPayload {
        refresh_token: Some(SecretString::from("refresh-token".to_owned())),
        access_token: Some(SecretString::from("access-token".to_owned())),
        access_expires_at: Some(now().saturating_add(Duration::from_secs(3600))),
        refreshed_at: now(),
        scopes: vec!["files.readwrite".into(), "offline_access".into()],
        account_id: Some("account-1".into()),
        token_type: Some("Bearer".into()),
        extra: vec![("hostname".into(), "eapi.example".into())],
    }
}

/// `get_with_group` answers a handle with its grant, at their current
/// versions; a handle whose grant is gone without it; nothing for a missing
/// id; and a record without a group alone.
async fn a_record_reads_with_its_group(store: &dyn Store) {
    let rng = OsRandom;
    let ring = ring();
    let dek = SymmetricKey::generate(&rng);
    let mut grant = Grant::new(GrantId::generate(&rng), "onedrivev2", &payload(), &dek, now(), &rng);
    store.create(&mut grant).await.expect("insert grant");
    let mut handle = Handle::new(&AuthId::generate(&rng), grant.id, &dek, "laptop", &ring, now(), &rng);
    store.create(&mut handle).await.expect("insert handle");
    grant.state = crate::records::GrantState::ReauthRequired;
    store.update(&mut grant).await.expect("update grant");

    let (h, g) = store.load_with_group::<Handle, Grant>(&handle.key()).await.expect("read").expect("handle present");
    assert_eq!(h, handle);
    assert_eq!(g.as_ref(), Some(&grant), "the grant at its current version");
    let raw = store.get_with_group(Handle::KIND, &handle.key(), Grant::KIND).await.expect("read").expect("present");
    assert_eq!(raw.1.map(|g| g.version), Some(2));

    // Only the group's record of the named kind: a lease shares the grant's id.
    let lease = Lease { grant_id: grant.id, version: 0, owner: "a".into(), deadline: now() };
    store.insert(Lease::KIND, &lease.key(), None, &lease.encode()).await.expect("insert lease");
    let (_, g) = store.load_with_group::<Handle, Grant>(&handle.key()).await.expect("read").expect("present");
    assert_eq!(g.map(|g| g.version), Some(2));

    store.remove(&grant).await.expect("delete grant");
    let (h, g) = store.load_with_group::<Handle, Grant>(&handle.key()).await.expect("read").expect("handle present");
    assert_eq!(h, handle);
    assert!(g.is_none(), "the grant is gone");

    assert!(store.load_with_group::<Handle, Grant>(b"missing-id").await.expect("read").is_none());
    let mut other = Grant::new(GrantId::generate(&rng), "onedrivev2", &payload(), &dek, now(), &rng);
    store.create(&mut other).await.expect("insert grant");
    let (alone, grouped) =
        store.get_with_group(Grant::KIND, &other.key(), Handle::KIND).await.expect("read").expect("present");
    assert_eq!((alone.group, alone.version, grouped), (None, 1, None), "a grant has no group");
}

fn expect_conflict<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    assert!(matches!(result, Err(StoreError::Conflict)), "{what}: expected Conflict, got {result:?}");
}

fn expect_not_found<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    assert!(matches!(result, Err(StoreError::NotFound)), "{what}: expected NotFound, got {result:?}");
}

/// Every record kind survives a write and a read unchanged, at version 1,
/// and its sealed fields still open.
async fn round_trip_every_record_kind(store: &dyn Store) {
    let rng = OsRandom;
    let ring = ring();
    let dek = SymmetricKey::generate(&rng);
    let mut grant = Grant::new(GrantId::generate(&rng), "onedrivev2", &payload(), &dek, now(), &rng);
    store.create(&mut grant).await.expect("insert grant");
    assert_eq!(grant.version, 1);
    let loaded: Grant = store.load(&grant.key()).await.expect("get grant").expect("grant present");
    assert_eq!(loaded, grant);
    let opened = loaded.open_payload(&dek).expect("payload opens");
    assert_eq!(opened.refresh_token.as_ref().map(|t| t.expose_secret()), Some("refresh-token"));
    assert_eq!(opened.extra, payload().extra);

    let authid = AuthId::generate(&rng);
    let mut handle = Handle::new(&authid, grant.id, &dek, "laptop", &ring, now(), &rng);
    store.create(&mut handle).await.expect("insert handle");
    let loaded: Handle = store.load(&handle.key()).await.expect("get handle").expect("handle present");
    assert_eq!(loaded, handle);
    let unwrapped = loaded.unwrap_data_key(authid.secret(), &ring).expect("data key unwraps");
    assert_eq!(unwrapped.expose_secret(), dek.expose_secret());
    assert_eq!(loaded.open_label(&dek).expect("label opens"), "laptop");

    let keys = ring.record_keys();
    let mut tx = LoginTransaction {
        id: LoginId::for_state(&keys, "state-value"),
        version: 0,
        service: "googledrive".into(),
        pkce_verifier: None,
        handoff: Some(HandoffId::for_token(&keys, "handoff-token")),
        browser: Some([7; 32]),
        label: "first login".into(),
        created_at: now(),
        expires_at: now().saturating_add(Duration::from_secs(600)),
        completed_at: None,
        tag: [0; 32],
    };
    tx.seal_verifier(&SecretString::from("verifier".to_owned()), &ring, &rng);
    tx.sign(&keys);
    store.create(&mut tx).await.expect("insert login");
    let loaded: LoginTransaction = store.load(&tx.key()).await.expect("get login").expect("login present");
    assert_eq!(loaded, tx);
    assert!(loaded.verify(&keys), "a stored login keeps its tag");
    assert_eq!(loaded.open_verifier(&ring).expect("verifier opens").expect("has verifier").expose_secret(), "verifier");

    let mut handoff = Handoff::new(&keys, "handoff-token", now(), now().saturating_add(Duration::from_secs(600)));
    handoff.seal_authid(&authid, &rng);
    handoff.sign(&keys);
    store.create(&mut handoff).await.expect("insert handoff");
    let loaded: Handoff = store.load(&handoff.key()).await.expect("get handoff").expect("handoff present");
    assert_eq!(loaded, handoff);
    assert!(loaded.verify(&keys), "a stored hand-off keeps its tag");
    assert_eq!(loaded.open_authid("handoff-token").expect("opens"), Some(authid));

    let mut device = DeviceGrant {
        id: UserCodeId::for_user_code(&keys, "BCDF-GHJK"),
        version: 0,
        service: "dropbox".into(),
        handoff: handoff.id,
        label: "backup job".into(),
        created_at: now(),
        expires_at: now().saturating_add(Duration::from_secs(600)),
        tag: [0; 32],
    };
    device.sign(&keys);
    store.create(&mut device).await.expect("insert device grant");
    let loaded: DeviceGrant = store.load(&device.key()).await.expect("get device").expect("device present");
    assert_eq!(loaded, device);

    let mut lease = Lease { grant_id: grant.id, version: 0, owner: "instance-a".into(), deadline: now() };
    store.create(&mut lease).await.expect("insert lease");
    let loaded: Lease = store.load(&lease.key()).await.expect("get lease").expect("lease present");
    assert_eq!(loaded, lease);

    for kind in RecordKind::ALL {
        assert!(store.get(kind, b"absent").await.expect("get absent").is_none(), "{kind:?}");
    }
}

/// The same id under two kinds names two records.
async fn kinds_are_separate(store: &dyn Store) {
    let id = b"shared-id";
    for kind in RecordKind::ALL {
        store.insert(kind, id, None, &[kind as u8]).await.expect("insert");
    }
    for kind in RecordKind::ALL {
        let r = store.get(kind, id).await.expect("get").expect("present");
        assert_eq!(r.body, [kind as u8]);
    }
    store.delete(RecordKind::Grant, id, None).await.expect("delete");
    assert!(store.get(RecordKind::Handle, id).await.expect("get").is_some());
}

/// Many concurrent inserts of one id: exactly one succeeds, the rest see
/// `Conflict`, and the stored body is the winner's.
async fn insert_if_absent_has_one_winner(store: &dyn Store) {
    let id = GrantId::generate(&OsRandom);
    let bodies: Vec<Vec<u8>> = (0..RACERS).map(|i| format!("body-{i}").into_bytes()).collect();
    let results = join_all(bodies.iter().map(|b| store.insert(RecordKind::Grant, id.as_bytes(), None, b))).await;
    let winners: Vec<usize> = results.iter().enumerate().filter(|(_, r)| r.is_ok()).map(|(i, _)| i).collect();
    assert_eq!(winners.len(), 1, "exactly one insert wins: {results:?}");
    for (i, r) in results.into_iter().enumerate() {
        if i != winners[0] {
            expect_conflict(r, "losing insert");
        }
    }
    let stored = store.get(RecordKind::Grant, id.as_bytes()).await.expect("get").expect("present");
    assert_eq!(stored.version, 1);
    assert_eq!(stored.body, bodies[winners[0]]);
}

/// A compare-and-swap against a stale version fails and changes nothing;
/// against a missing record it answers `NotFound`.
async fn compare_and_swap_rejects_stale_versions(store: &dyn Store) {
    let id = b"cas-record";
    store.insert(RecordKind::Grant, id, Some(b"g1"), b"v1").await.expect("insert");
    assert_eq!(store.compare_and_swap(RecordKind::Grant, id, 1, Some(b"g2"), b"v2").await.expect("cas"), 2);
    expect_conflict(store.compare_and_swap(RecordKind::Grant, id, 1, None, b"stale").await, "stale cas");
    expect_conflict(store.compare_and_swap(RecordKind::Grant, id, 3, None, b"future").await, "future cas");
    let stored = store.get(RecordKind::Grant, id).await.expect("get").expect("present");
    assert_eq!((stored.version, stored.body.as_slice(), stored.group.as_deref()), (2, &b"v2"[..], Some(&b"g2"[..])));
    expect_not_found(store.compare_and_swap(RecordKind::Grant, b"missing", 1, None, b"x").await, "cas on missing");
    expect_conflict(store.insert(RecordKind::Grant, id, None, b"again").await, "insert over existing");
}

/// Rounds of concurrent compare-and-swaps from the same version: exactly
/// one wins each round, and no write is lost or doubled.
async fn racing_compare_and_swap_has_one_winner_per_round(store: &dyn Store) {
    let id = b"race-record";
    store.insert(RecordKind::Grant, id, None, b"start").await.expect("insert");
    let rounds = 8u64;
    let mut history = Vec::new();
    for round in 0..rounds {
        let version = round + 1;
        let bodies: Vec<Vec<u8>> = (0..RACERS).map(|i| format!("round-{round}-racer-{i}").into_bytes()).collect();
        let results =
            join_all(bodies.iter().map(|b| store.compare_and_swap(RecordKind::Grant, id, version, None, b))).await;
        let wins: Vec<usize> = results.iter().enumerate().filter(|(_, r)| r.is_ok()).map(|(i, _)| i).collect();
        assert_eq!(wins.len(), 1, "round {round}: exactly one CAS wins: {results:?}");
        assert_eq!(results[wins[0]].as_ref().ok(), Some(&(version + 1)));
        for (i, r) in results.into_iter().enumerate() {
            if i != wins[0] {
                expect_conflict(r, "losing cas");
            }
        }
        history.push(bodies[wins[0]].clone());
    }
    let stored = store.get(RecordKind::Grant, id).await.expect("get").expect("present");
    assert_eq!(stored.version, rounds + 1);
    assert_eq!(Some(&stored.body), history.last());
}

/// Delete answers `NotFound` for a missing record and `Conflict` for a wrong
/// version (keeping the record); a deleted id can be inserted again at version 1.
async fn delete_semantics(store: &dyn Store) {
    let id = b"to-delete";
    expect_not_found(store.delete(RecordKind::Handoff, id, None).await, "delete missing");
    store.insert(RecordKind::Handoff, id, None, b"a").await.expect("insert");
    store.compare_and_swap(RecordKind::Handoff, id, 1, None, b"b").await.expect("cas");
    expect_conflict(store.delete(RecordKind::Handoff, id, Some(1)).await, "delete stale");
    assert!(store.get(RecordKind::Handoff, id).await.expect("get").is_some(), "stale delete kept the record");
    store.delete(RecordKind::Handoff, id, Some(2)).await.expect("delete at version");
    assert!(store.get(RecordKind::Handoff, id).await.expect("get").is_none());
    expect_not_found(store.delete(RecordKind::Handoff, id, Some(2)).await, "delete twice");
    store.insert(RecordKind::Handoff, id, None, b"c").await.expect("re-insert");
    assert_eq!(store.get(RecordKind::Handoff, id).await.expect("get").expect("present").version, 1);
    store.delete(RecordKind::Handoff, id, None).await.expect("unconditional delete");
    assert!(store.get(RecordKind::Handoff, id).await.expect("get").is_none());

    // Single use: of many concurrent consumers of one version, one deletes.
    store.insert(RecordKind::LoginTransaction, id, None, b"once").await.expect("insert");
    let results = join_all((0..RACERS).map(|_| store.delete(RecordKind::LoginTransaction, id, Some(1)))).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "one consumer wins: {results:?}");
}

/// A lease is exclusive until its holder releases it or its deadline passes;
/// the holder may extend it; of concurrent takers exactly one gets it.
async fn leases_are_exclusive_until_released_or_lapsed(store: &dyn Store) {
    let grant = GrantId::generate(&OsRandom);
    let t0 = now();
    let at = |s: u64| t0.saturating_add(Duration::from_secs(s));

    assert_eq!(
        store.acquire_lease(&grant, "a", at(30), t0).await.expect("a"),
        LeaseOutcome::Acquired { deadline: at(30) }
    );
    assert_eq!(
        store.acquire_lease(&grant, "b", at(40), at(10)).await.expect("b"),
        LeaseOutcome::Held { owner: "a".into(), deadline: at(30) }
    );
    // The holder extends its own lease.
    assert_eq!(
        store.acquire_lease(&grant, "a", at(45), at(20)).await.expect("a extends"),
        LeaseOutcome::Acquired { deadline: at(45) }
    );
    assert!(matches!(store.acquire_lease(&grant, "b", at(60), at(44)).await.expect("b"), LeaseOutcome::Held { .. }));
    // At its deadline the lease has lapsed.
    assert_eq!(
        store.acquire_lease(&grant, "b", at(75), at(45)).await.expect("b"),
        LeaseOutcome::Acquired { deadline: at(75) }
    );
    assert!(!store.release_lease(&grant, "a").await.expect("a release"), "a no longer holds it");
    assert!(matches!(store.acquire_lease(&grant, "a", at(80), at(50)).await.expect("a"), LeaseOutcome::Held { .. }));
    assert!(store.release_lease(&grant, "b").await.expect("b release"));
    assert!(!store.release_lease(&grant, "b").await.expect("b release twice"));
    assert!(matches!(
        store.acquire_lease(&grant, "a", at(80), at(50)).await.expect("a"),
        LeaseOutcome::Acquired { .. }
    ));

    // Leases of different grants are independent.
    let other = GrantId::generate(&OsRandom);
    assert!(matches!(
        store.acquire_lease(&other, "b", at(80), at(50)).await.expect("b"),
        LeaseOutcome::Acquired { .. }
    ));

    // Concurrent takers of a free lease: exactly one wins.
    let fresh = GrantId::generate(&OsRandom);
    let owners: Vec<String> = (0..RACERS).map(|i| format!("instance-{i}")).collect();
    let results = join_all(owners.iter().map(|o| store.acquire_lease(&fresh, o, at(30), t0))).await;
    let acquired = results.iter().filter(|r| matches!(r, Ok(LeaseOutcome::Acquired { .. }))).count();
    assert_eq!(acquired, 1, "exactly one taker wins: {results:?}");
    assert!(results.iter().all(|r| r.is_ok()));

    // Concurrent takers of a lapsed lease: exactly one wins too.
    let results = join_all(owners.iter().map(|o| store.acquire_lease(&fresh, o, at(90), at(60)))).await;
    let acquired = results.iter().filter(|r| matches!(r, Ok(LeaseOutcome::Acquired { .. }))).count();
    assert_eq!(acquired, 1, "exactly one taker of a lapsed lease wins: {results:?}");
}

/// Listing pages through one kind in ascending id order, honours `after`,
/// `limit` and `group`, and never mixes kinds.
async fn listing_pages_in_id_order(store: &dyn Store) {
    let rng = OsRandom;
    let mut ids = BTreeSet::new();
    for i in 0..25u8 {
        let mut id = [0u8; 8];
        rng.fill(&mut id);
        let group: &[u8] = if i % 2 == 0 { b"even" } else { b"odd" };
        store.insert(RecordKind::Handle, &id, Some(group), &[i]).await.expect("insert");
        ids.insert(id.to_vec());
    }
    store.insert(RecordKind::Grant, b"\x00", None, b"other kind").await.expect("insert");
    store.insert(RecordKind::Handoff, b"\xff", None, b"other kind").await.expect("insert");

    let mut seen = Vec::new();
    let mut query = ListQuery::all(RecordKind::Handle, 10);
    let mut pages = 0;
    loop {
        let page = store.list(&query).await.expect("list");
        pages += 1;
        assert!(page.items.len() <= 10);
        seen.extend(page.items.iter().map(|(id, _)| id.clone()));
        match page.next {
            Some(next) => {
                assert_eq!(Some(&next), page.items.last().map(|(id, _)| id), "next is the last id of the page");
                query.after = Some(next);
            }
            None => break,
        }
        assert!(pages < 10, "listing does not terminate");
    }
    assert_eq!(seen, ids.iter().cloned().collect::<Vec<_>>(), "every id once, ascending");
    assert!(pages >= 3);

    let evens = store
        .list(&ListQuery { kind: RecordKind::Handle, group: Some(b"even".to_vec()), after: None, limit: 100 })
        .await
        .expect("list group");
    assert_eq!(evens.items.len(), 13);
    assert!(evens.next.is_none());
    assert!(evens.items.iter().all(|(_, r)| r.group.as_deref() == Some(&b"even"[..]) && r.body[0] % 2 == 0));
    assert!(evens.items.windows(2).all(|w| w[0].0 < w[1].0), "group listing ascends");

    let empty = store
        .list(&ListQuery { kind: RecordKind::Handle, group: Some(b"none".to_vec()), after: None, limit: 5 })
        .await
        .expect("list empty");
    assert!(empty.items.is_empty() && empty.next.is_none());
    let leases = store.list(&ListQuery::all(RecordKind::Lease, 5)).await.expect("list leases");
    assert!(leases.items.is_empty());

    // Typed group listing pages through everything.
    let rng = OsRandom;
    let ring = ring();
    let dek = SymmetricKey::generate(&rng);
    let grant = GrantId::generate(&rng);
    for i in 0..300 {
        let mut h = Handle::new(&AuthId::generate(&rng), grant, &dek, &format!("h{i}"), &ring, now(), &rng);
        store.create(&mut h).await.expect("insert handle");
    }
    let handles: Vec<Handle> = store.load_group(grant.as_bytes()).await.expect("load group");
    assert_eq!(handles.len(), 300);
    assert!(handles.iter().all(|h| h.grant_id == grant));
}

/// A published notice reaches every subscriber, in order.
async fn notices_reach_every_subscriber(store: &dyn Store) {
    let mut first = store.subscribe().await.expect("subscribe");
    let mut second = store.subscribe().await.expect("subscribe");
    let a = GrantId::generate(&OsRandom);
    let b = GrantId::generate(&OsRandom);
    store.publish(Notice::GrantChanged(a)).await.expect("publish");
    store.publish(Notice::GrantChanged(b)).await.expect("publish");
    for stream in [&mut first, &mut second] {
        assert_eq!(stream.next().await, Some(Notice::GrantChanged(a)));
        assert_eq!(stream.next().await, Some(Notice::GrantChanged(b)));
    }
    drop(first);
    store.publish(Notice::GrantChanged(a)).await.expect("publish after a subscriber left");
    assert_eq!(second.next().await, Some(Notice::GrantChanged(a)));
    // Resync is local, but this store's own subscribers get it.
    store.publish(Notice::Resync).await.expect("publish resync");
    assert_eq!(second.next().await, Some(Notice::Resync));
}

/// Stores a login transaction, a hand-off and a device code named by `name`,
/// each expiring at `expires` (what a sweep deletes once they expire).
pub async fn short_lived_records(store: &dyn Store, name: &str, expires: Timestamp) {
    let keys = ring().record_keys();
    let handoff = HandoffId::for_token(&keys, &format!("handoff-{name}"));
    let mut tx = LoginTransaction {
        id: LoginId::for_state(&keys, &format!("state-{name}")),
        version: 0,
        service: "googledrive".into(),
        pkce_verifier: None,
        handoff: Some(handoff),
        browser: None,
        label: String::new(),
        created_at: now(),
        expires_at: expires,
        completed_at: None,
        tag: [0; 32],
    };
    tx.sign(&keys);
    store.create(&mut tx).await.expect("insert login");
    let mut h = Handoff::new(&keys, &format!("handoff-{name}"), now(), expires);
    h.sign(&keys);
    store.create(&mut h).await.expect("insert handoff");
    let mut device = DeviceGrant {
        id: UserCodeId::for_user_code(&keys, &format!("CODE-{name}")),
        version: 0,
        service: "dropbox".into(),
        handoff,
        label: String::new(),
        created_at: now(),
        expires_at: expires,
        tag: [0; 32],
    };
    device.sign(&keys);
    store.create(&mut device).await.expect("insert device grant");
}

/// How many login transactions, hand-offs and device codes the store holds.
async fn short_lived_counts(store: &dyn Store) -> [usize; 3] {
    let mut counts = [0; 3];
    for (count, kind) in
        counts.iter_mut().zip([RecordKind::LoginTransaction, RecordKind::Handoff, RecordKind::DeviceGrant])
    {
        let page = store.list(&ListQuery::all(kind, 1000)).await.expect("list");
        assert!(page.next.is_none());
        *count = page.items.len();
    }
    counts
}

/// The engine's sweep deletes expired login transactions, hand-offs and
/// device codes and nothing else, reads at most its limit of each kind per
/// pass, goes on where the last pass stopped, and two passes at once delete
/// each record once between them.
async fn sweeps_delete_expired_records_a_page_at_a_time(store: &dyn Store) {
    let expired = now().saturating_add(Duration::from_secs(30));
    let live = now().saturating_add(Duration::from_secs(600));
    let at = now().saturating_add(Duration::from_secs(60));
    for i in 0..7 {
        short_lived_records(store, &format!("a{i}"), if i < 5 { expired } else { live }).await;
    }
    let mut cursor = SweepCursor::default();
    let mut removed = 0;
    for pass in 1..=3 {
        let report = sweep_pass(store, at, 3, &mut cursor).await.expect("sweep");
        assert!(report.examined <= 9, "at most 3 of each kind per pass: {report:?}");
        assert!(report.expired_logins <= 3 && report.expired_handoffs <= 3 && report.expired_devices <= 3);
        assert_eq!(report.more, pass < 3, "pass {pass}: {report:?}");
        removed += report.removed();
    }
    assert_eq!(removed, 15);
    assert_eq!(short_lived_counts(store).await, [2, 2, 2], "only the live records are left");
    let report = sweep_pass(store, at, 3, &mut cursor).await.expect("sweep from the start again");
    assert_eq!((report.removed(), report.examined), (0, 6));

    for round in 0..3 {
        for i in 0..RACERS {
            short_lived_records(store, &format!("r{round}-{i}"), expired).await;
        }
        let (mut first, mut second) = (SweepCursor::default(), SweepCursor::default());
        let (a, b) =
            futures_util::join!(sweep_pass(store, at, 1000, &mut first), sweep_pass(store, at, 1000, &mut second));
        let (a, b) = (a.expect("first sweep"), b.expect("second sweep"));
        assert_eq!(a.expired_logins + b.expired_logins, RACERS, "{a:?} {b:?}");
        assert_eq!(a.expired_handoffs + b.expired_handoffs, RACERS, "{a:?} {b:?}");
        assert_eq!(a.expired_devices + b.expired_devices, RACERS, "{a:?} {b:?}");
        assert_eq!(short_lived_counts(store).await, [2, 2, 2]);
    }
}

/// A running conformance case.
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

// `cases::<name>(store)` for every case in the macro's list.
crate::store_conformance_tests!(@each cases);

/// Generates one `#[tokio::test]` per conformance case. `$make` is an
/// expression whose value is a future yielding a fresh, empty store; it is
/// evaluated once per case. Each case is bounded by a generous timeout so a
/// hung backend fails instead of stalling the run. Needs `tokio` with the
/// `macros`, `rt-multi-thread` and `time` features in the calling crate.
///
/// The `@each` arm holds the one list of cases; it expands both these tests
/// and [`testing::conformance::cases`](crate::testing::conformance::cases).
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::store_conformance_tests!(@each tests $make);
    };
    (@each $what:ident $($arg:tt)*) => {
        $crate::store_conformance_tests!(@$what $($arg)* ;
            round_trip_every_record_kind,
            kinds_are_separate,
            insert_if_absent_has_one_winner,
            compare_and_swap_rejects_stale_versions,
            racing_compare_and_swap_has_one_winner_per_round,
            delete_semantics,
            leases_are_exclusive_until_released_or_lapsed,
            listing_pages_in_id_order,
            notices_reach_every_subscriber,
            sweeps_delete_expired_records_a_page_at_a_time,
            a_record_reads_with_its_group,
        );
    };
    (@tests $make:expr ; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let store = $make.await;
                let run = $crate::testing::conformance::cases::$case(&store);
                ::tokio::time::timeout(::std::time::Duration::from_secs(120), run)
                    .await
                    .expect(concat!(stringify!($case), " did not finish within 120 s"));
            }
        )*
    };
    (@cases ; $($case:ident),* $(,)?) => {
        /// The cases, one function each, named as in the macro's list.
        pub mod cases {
            use super::CaseFuture;
            use $crate::store::Store;
            $(
                #[doc = concat!("Runs the `", stringify!($case), "` case against `store`, which must be empty.")]
                pub fn $case(store: &dyn Store) -> CaseFuture<'_> {
                    Box::pin(super::$case(store))
                }
            )*
        }
    };
}
