// Stored records: round trips of every kind, hostile bytes, blobs moved between records.

use latchkey_core::records::{DeviceGrant, SealedAuthId, Tagged, UserCodeId};
use latchkey_core::testing::SeqRandom;
use latchkey_core::{
    AuthId, Grant, GrantId, GrantPayload, GrantState, Handle, Handoff, HandoffId, KeyId, Lease, LoginId,
    LoginTransaction, Record, SealedBlob, SymmetricKey, Timestamp,
};
use latchkey_core::{MasterKey, MasterKeyId, MasterKeyring};
use proptest::prelude::*;
use secrecy::{ExposeSecret, SecretString};

fn ts() -> impl Strategy<Value = Timestamp> {
    any::<u64>().prop_map(Timestamp::from_unix_millis)
}

fn blob() -> impl Strategy<Value = SealedBlob> {
    proptest::collection::vec(any::<u8>(), 0..80).prop_map(SealedBlob::from_bytes)
}

fn state() -> impl Strategy<Value = GrantState> {
    prop_oneof![Just(GrantState::Active), Just(GrantState::ReauthRequired), Just(GrantState::Revoked)]
}

prop_compose! {
    fn grant()(id: [u8; 16], version: u64, service in ".{0,20}", state in state(), c in ts(), u in ts(), l in ts(), payload in blob()) -> Grant {
        Grant { id: GrantId::from_bytes(id), version, service, state, created_at: c, updated_at: u, last_used_at: l, payload }
    }
}

prop_compose! {
    fn handle()(keyid: [u8; 16], version: u64, grant: [u8; 16], salt: [u8; 16], wrap in blob(), label in blob(), c in ts(), l in ts(), r in proptest::option::of(ts())) -> Handle {
        Handle { keyid: KeyId::from_bytes(keyid), version, grant_id: GrantId::from_bytes(grant), salt, wrapped_data_key: wrap, label, created_at: c, last_used_at: l, revoked_at: r }
    }
}

prop_compose! {
    fn login()(id: [u8; 32], version: u64, service in ".{0,20}", v in proptest::option::of(blob()), h in proptest::option::of(any::<[u8; 32]>()), b in proptest::option::of(any::<[u8; 32]>()), label in ".{0,20}", c in ts(), e in ts(), done in proptest::option::of(ts()), tag: [u8; 32]) -> LoginTransaction {
        LoginTransaction { id: LoginId::from_bytes(id), version, service, pkce_verifier: v, handoff: h.map(HandoffId::from_bytes), browser: b, label, created_at: c, expires_at: e, completed_at: done, tag }
    }
}

prop_compose! {
    fn handoff()(id: [u8; 32], version: u64, recipient: [u8; 32], a in proptest::option::of((any::<[u8; 32]>(), blob())), c in ts(), e in ts(), d in proptest::option::of(ts()), n in proptest::option::of(ts()), tag: [u8; 32]) -> Handoff {
        let authid = a.map(|(ephemeral, blob)| SealedAuthId { ephemeral, blob });
        Handoff { id: HandoffId::from_bytes(id), version, recipient, authid, created_at: c, expires_at: e, delivered_at: d, denied_at: n, tag }
    }
}

prop_compose! {
    fn device()(id: [u8; 32], version: u64, service in ".{0,20}", handoff: [u8; 32], label in ".{0,20}", c in ts(), e in ts(), tag: [u8; 32]) -> DeviceGrant {
        DeviceGrant { id: UserCodeId::from_bytes(id), version, service, handoff: HandoffId::from_bytes(handoff), label, created_at: c, expires_at: e, tag }
    }
}

prop_compose! {
    fn lease()(grant: [u8; 16], version: u64, owner in ".{0,30}", d in ts()) -> Lease {
        Lease { grant_id: GrantId::from_bytes(grant), version, owner, deadline: d }
    }
}

prop_compose! {
    fn payload()(
        refresh in proptest::option::of(".{1,60}"), access in proptest::option::of(".{1,60}"), exp in proptest::option::of(ts()), refreshed in ts(),
        scopes in proptest::collection::vec(".{0,20}", 0..5), account in proptest::option::of(".{0,20}"),
        token_type in proptest::option::of(".{0,10}"), extra in proptest::collection::vec((".{0,10}", ".{0,20}"), 0..3)
    ) -> GrantPayload {
        GrantPayload {
            refresh_token: refresh.map(SecretString::from), access_token: access.map(SecretString::from), access_expires_at: exp,
            refreshed_at: refreshed, scopes, account_id: account, token_type, extra,
        }
    }
}

fn round_trips<R: Record + PartialEq + std::fmt::Debug>(record: &R) -> Result<(), TestCaseError> {
    let bytes = record.encode();
    prop_assert_eq!(&R::decode(&bytes, record.version()).unwrap(), record);
    // Every strict prefix and every extension is rejected, never misread.
    for len in 0..bytes.len() {
        prop_assert!(R::decode(&bytes[..len], 0).is_err());
    }
    let mut longer = bytes.clone();
    longer.push(0);
    prop_assert!(R::decode(&longer, 0).is_err());
    Ok(())
}

fn same_payload(a: &GrantPayload, b: &GrantPayload) -> bool {
    a.refresh_token.as_ref().map(|t| t.expose_secret().to_owned())
        == b.refresh_token.as_ref().map(|t| t.expose_secret().to_owned())
        && a.access_token.as_ref().map(|t| t.expose_secret().to_owned())
            == b.access_token.as_ref().map(|t| t.expose_secret().to_owned())
        && a.access_expires_at == b.access_expires_at
        && a.refreshed_at == b.refreshed_at
        && a.scopes == b.scopes
        && a.account_id == b.account_id
        && a.token_type == b.token_type
        && a.extra == b.extra
}

proptest! {
    #[test]
    fn grants_round_trip(g in grant()) { round_trips(&g)?; }

    #[test]
    fn handles_round_trip(h in handle()) { round_trips(&h)?; }

    #[test]
    fn login_transactions_round_trip(t in login()) { round_trips(&t)?; }

    #[test]
    fn handoffs_round_trip(h in handoff()) { round_trips(&h)?; }

    #[test]
    fn leases_round_trip(l in lease()) { round_trips(&l)?; }

    #[test]
    fn device_grants_round_trip(d in device()) { round_trips(&d)?; }

    #[test]
    fn grant_payloads_round_trip_through_the_seal(p in payload(), seed: u64) {
        let rng = SeqRandom::new(seed);
        let dek = SymmetricKey::generate(&rng);
        let grant = Grant::new(GrantId::generate(&rng), "svc", &p, &dek, Timestamp::EPOCH, &rng);
        let opened = grant.open_payload(&dek).unwrap();
        prop_assert!(same_payload(&opened, &p), "{:?} != {:?}", opened, p);
    }

    #[test]
    fn arbitrary_bytes_decode_to_an_error_or_a_value(bytes in proptest::collection::vec(any::<u8>(), 0..200), version: u64) {
        let _ = Grant::decode(&bytes, version);
        let _ = Handle::decode(&bytes, version);
        let _ = LoginTransaction::decode(&bytes, version);
        let _ = Handoff::decode(&bytes, version);
        let _ = Lease::decode(&bytes, version);
        let _ = DeviceGrant::decode(&bytes, version);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(kind in 1u8..=6, body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut bytes = vec![kind, 1];
        bytes.extend(body);
        let _ = Grant::decode(&bytes, 1);
        let _ = Handle::decode(&bytes, 1);
        let _ = LoginTransaction::decode(&bytes, 1);
        let _ = Handoff::decode(&bytes, 1);
        let _ = Lease::decode(&bytes, 1);
        let _ = DeviceGrant::decode(&bytes, 1);
    }
}

#[test]
fn a_record_of_another_kind_or_version_is_rejected() {
    let rng = SeqRandom::new(1);
    let lease = Lease { grant_id: GrantId::generate(&rng), version: 1, owner: "a".into(), deadline: Timestamp::EPOCH };
    let bytes = lease.encode();
    assert!(matches!(Grant::decode(&bytes, 1), Err(latchkey_core::DecodeError::WrongKind { expected: 1, found: 5 })));
    let mut future = bytes.clone();
    future[1] = 2;
    assert_eq!(Lease::decode(&future, 1).unwrap_err(), latchkey_core::DecodeError::UnsupportedVersion(2));
}

#[test]
fn a_payload_swapped_between_grants_fails_to_open() {
    let rng = SeqRandom::new(2);
    let p = GrantPayload {
        refresh_token: Some(SecretString::from("r".to_owned())),
        access_token: None,
        access_expires_at: None,
        refreshed_at: Timestamp::EPOCH,
        scopes: vec![],
        account_id: None,
        token_type: None,
        extra: vec![],
    };
    let dek = SymmetricKey::generate(&rng);
    let a = Grant::new(GrantId::generate(&rng), "svc", &p, &dek, Timestamp::EPOCH, &rng);
    let mut b = Grant::new(GrantId::generate(&rng), "svc", &p, &dek, Timestamp::EPOCH, &rng);
    b.payload = a.payload.clone();
    assert!(b.open_payload(&dek).is_err(), "same data key, other grant id: must not open");
    assert!(a.open_payload(&SymmetricKey::generate(&rng)).is_err(), "wrong data key");
}

#[test]
fn a_handoff_releases_its_authid_only_to_the_token_holder() {
    let rng = SeqRandom::new(3);
    let authid = AuthId::generate(&rng);
    let ring = MasterKeyring::single(MasterKey::generate(MasterKeyId::new("k1").unwrap(), &rng));
    let keys = ring.record_keys();
    let mut h = Handoff::new(&keys, "the-token", Timestamp::EPOCH, Timestamp::EPOCH);
    assert_eq!(h.open_authid("the-token").unwrap(), None, "pending");
    h.seal_authid(&authid, &rng);
    assert_eq!(h.open_authid("the-token").unwrap(), Some(authid.clone()));
    assert!(h.open_authid("another-token").is_err());
    let plain = authid.expose_text();
    assert!(!h.encode().windows(plain.len()).any(|w| w == plain.as_bytes()), "the AuthID is not stored in the clear");
    assert_ne!(HandoffId::for_token(&keys, "the-token"), HandoffId::for_token(&keys, "another-token"));
    let x = HandoffId::for_token(&keys, "x");
    assert_ne!(x.as_bytes(), LoginId::for_state(&keys, "x").as_bytes(), "hashes are domain separated");
    let other_ring = MasterKeyring::single(MasterKey::generate(MasterKeyId::new("k2").unwrap(), &rng));
    assert_ne!(x, HandoffId::for_token(&other_ring.record_keys(), "x"), "keyed: a dump alone cannot test tokens");
}

#[test]
fn a_tag_covers_every_routing_field_of_a_handoff() {
    let rng = SeqRandom::new(4);
    let ring = MasterKeyring::single(MasterKey::generate(MasterKeyId::new("k1").unwrap(), &rng));
    let keys = ring.record_keys();
    let mut h = Handoff::new(&keys, "the-token", Timestamp::EPOCH, Timestamp::from_unix_secs(600));
    h.sign(&keys);
    assert!(h.verify(&keys));
    let mut moved = h.clone();
    moved.recipient[0] ^= 1;
    assert!(!moved.verify(&keys), "recipient key");
    let mut late = h.clone();
    late.expires_at = Timestamp::from_unix_secs(6000);
    assert!(!late.verify(&keys), "expiry");
    let mut planted = h.clone();
    planted.seal_authid(&AuthId::generate(&rng), &rng);
    assert!(!planted.verify(&keys), "a sealed AuthID planted without the key");
    let other = MasterKeyring::single(MasterKey::generate(MasterKeyId::new("k2").unwrap(), &rng));
    assert!(!h.verify(&other.record_keys()), "another master key");
    let decoded = Handoff::decode(&h.encode(), 0).unwrap();
    assert!(decoded.verify(&keys), "the tag survives the stored form");
}
