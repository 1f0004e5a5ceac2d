// Sealed envelopes: round trips, tamper detection, context binding, hostile input.

use latchkey_core::envelope::{self, Field, OpenError, SealContext, SealedBlob};
use latchkey_core::testing::SeqRandom;
use latchkey_core::{MasterKey, MasterKeyId, MasterKeyring, RecordKind, SymmetricKey};
use proptest::prelude::*;

fn ctx<'a>(ids: &'a [&'a [u8]]) -> SealContext<'a> {
    SealContext { kind: RecordKind::Grant, field: Field::GrantPayload, format: 1, ids }
}

fn ring(id: &str, seed: u64) -> MasterKeyring {
    MasterKeyring::single(MasterKey::generate(MasterKeyId::new(id).unwrap(), &SeqRandom::new(seed)))
}

proptest! {
    #[test]
    fn direct_seal_round_trips(plain in proptest::collection::vec(any::<u8>(), 0..600), id in proptest::collection::vec(any::<u8>(), 0..40), seed: u64) {
        let rng = SeqRandom::new(seed);
        let key = SymmetricKey::generate(&rng);
        let ids: [&[u8]; 1] = [&id];
        let blob = envelope::seal(&key, &ctx(&ids), &plain, &rng);
        prop_assert_eq!(&envelope::open(&key, &ctx(&ids), &blob).unwrap()[..], &plain[..]);
        let header = blob.header().unwrap();
        prop_assert_eq!((header.version, header.algorithm, header.master_key_id), (1, 1, None));
    }

    #[test]
    fn master_seal_round_trips_and_names_its_key(plain in proptest::collection::vec(any::<u8>(), 0..300), seed: u64) {
        let ring = ring("mk-2026", seed);
        let ids: [&[u8]; 2] = [b"keyid", b"grant"];
        let blob = ring.seal(&ctx(&ids), &plain, &SeqRandom::new(seed ^ 1));
        let named = blob.master_key_id().unwrap().unwrap();
        prop_assert_eq!(named.as_str(), "mk-2026");
        prop_assert_eq!(&ring.open(&ctx(&ids), &blob).unwrap()[..], &plain[..]);
    }

    #[test]
    fn flipping_any_single_bit_fails_to_open(plain in proptest::collection::vec(any::<u8>(), 0..100), bit in any::<prop::sample::Index>(), master: bool, seed: u64) {
        let rng = SeqRandom::new(seed);
        let key = SymmetricKey::generate(&rng);
        let ring = ring("k1", seed);
        let ids: [&[u8]; 1] = [b"record"];
        let blob = if master { ring.seal(&ctx(&ids), &plain, &rng) } else { envelope::seal(&key, &ctx(&ids), &plain, &rng) };
        let mut bytes = blob.as_bytes().to_vec();
        let bit = bit.index(bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        let tampered = SealedBlob::from_bytes(bytes);
        let opened = if master { ring.open(&ctx(&ids), &tampered) } else { envelope::open(&key, &ctx(&ids), &tampered) };
        prop_assert!(opened.is_err());
    }

    #[test]
    fn any_bytes_open_to_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let key = SymmetricKey::from_bytes([7; 32]);
        let ids: [&[u8]; 1] = [b"x"];
        let blob = SealedBlob::from_bytes(bytes);
        let _ = blob.header();
        let _ = blob.master_key_id();
        prop_assert!(envelope::open(&key, &ctx(&ids), &blob).is_err());
        prop_assert!(ring("k1", 1).open(&ctx(&ids), &blob).is_err());
    }
}

#[test]
fn a_blob_opens_only_in_the_context_it_was_sealed_for() {
    let rng = SeqRandom::new(42);
    let key = SymmetricKey::generate(&rng);
    let ids: [&[u8]; 2] = [b"keyid-1", b"grant-1"];
    let sealed_ctx = SealContext { kind: RecordKind::Handle, field: Field::HandleLabel, format: 1, ids: &ids };
    let blob = envelope::seal(&key, &sealed_ctx, b"label", &rng);
    assert_eq!(&envelope::open(&key, &sealed_ctx, &blob).unwrap()[..], b"label");

    let other_ids: [&[u8]; 2] = [b"keyid-2", b"grant-1"];
    let swapped_ids: [&[u8]; 2] = [b"grant-1", b"keyid-1"];
    let joined_ids: [&[u8]; 1] = [b"keyid-1grant-1"];
    let variants = [
        SealContext { kind: RecordKind::Grant, ..sealed_ctx },
        SealContext { field: Field::GrantPayload, ..sealed_ctx },
        SealContext { format: 2, ..sealed_ctx },
        SealContext { ids: &other_ids, ..sealed_ctx },
        SealContext { ids: &swapped_ids, ..sealed_ctx },
        SealContext { ids: &joined_ids, ..sealed_ctx },
    ];
    for variant in variants {
        assert_eq!(envelope::open(&key, &variant, &blob).unwrap_err(), OpenError::Authentication, "{variant:?}");
    }
    let wrong_key = SymmetricKey::generate(&rng);
    assert_eq!(envelope::open(&wrong_key, &sealed_ctx, &blob).unwrap_err(), OpenError::Authentication);
}

#[test]
fn master_and_direct_blobs_are_not_interchangeable() {
    let rng = SeqRandom::new(5);
    let ring = ring("k1", 5);
    let key = SymmetricKey::generate(&rng);
    let ids: [&[u8]; 1] = [b"r"];
    let direct = envelope::seal(&key, &ctx(&ids), b"x", &rng);
    let master = ring.seal(&ctx(&ids), b"x", &rng);
    assert_eq!(ring.open(&ctx(&ids), &direct).unwrap_err(), OpenError::WrongKeyKind);
    assert_eq!(envelope::open(&key, &ctx(&ids), &master).unwrap_err(), OpenError::WrongKeyKind);
}

#[test]
fn unknown_versions_algorithms_and_master_keys_are_named() {
    let rng = SeqRandom::new(6);
    let ring_a = ring("key-a", 6);
    let ring_b = ring("key-b", 7);
    let ids: [&[u8]; 1] = [b"r"];
    let blob = ring_a.seal(&ctx(&ids), b"secret", &rng);
    assert_eq!(ring_b.open(&ctx(&ids), &blob).unwrap_err(), OpenError::UnknownMasterKey("key-a".into()));

    let mut bytes = blob.as_bytes().to_vec();
    bytes[0] = 9;
    assert_eq!(SealedBlob::from_bytes(bytes.clone()).header().unwrap_err(), OpenError::UnsupportedVersion(9));
    bytes[0] = 1;
    bytes[1] = 3;
    assert_eq!(SealedBlob::from_bytes(bytes).header().unwrap_err(), OpenError::UnsupportedAlgorithm(3));
    for len in 0..blob.as_bytes().len() {
        let cut = SealedBlob::from_bytes(blob.as_bytes()[..len].to_vec());
        assert!(ring_a.open(&ctx(&ids), &cut).is_err(), "truncated to {len}");
    }
}

#[test]
fn sealing_the_same_value_twice_gives_different_blobs() {
    let rng = SeqRandom::new(8);
    let key = SymmetricKey::generate(&rng);
    let ids: [&[u8]; 1] = [b"r"];
    let a = envelope::seal(&key, &ctx(&ids), b"same", &rng);
    let b = envelope::seal(&key, &ctx(&ids), b"same", &rng);
    assert_ne!(a.as_bytes(), b.as_bytes());
    assert_ne!(a.header().unwrap().nonce, b.header().unwrap().nonce);
}
