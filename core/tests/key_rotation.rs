// The key hierarchy end to end: who can open what, and master key rotation.

use latchkey_core::testing::SeqRandom;
use latchkey_core::{
    AuthId, AuthIdSecret, GrantId, Handle, MasterKey, MasterKeyId, MasterKeyring, OpenError, Random, SymmetricKey,
    Timestamp,
};

fn key(id: &str, rng: &dyn Random) -> MasterKey {
    MasterKey::generate(MasterKeyId::new(id).unwrap(), rng)
}

#[test]
fn a_handle_opens_only_with_its_own_authid_secret_and_a_known_master_key() {
    let rng = SeqRandom::new(1);
    let ring = MasterKeyring::single(key("k1", &rng));
    let authid = AuthId::generate(&rng);
    let dek = SymmetricKey::generate(&rng);
    let handle = Handle::new(&authid, GrantId::generate(&rng), &dek, "nas", &ring, Timestamp::EPOCH, &rng);
    assert_eq!(handle.unwrap_data_key(authid.secret(), &ring).unwrap().expose_secret(), dek.expose_secret());

    let mut wrong = *authid.secret().expose_secret();
    wrong[31] ^= 1;
    let wrong = AuthIdSecret::from_bytes(wrong);
    assert_eq!(handle.unwrap_data_key(&wrong, &ring).unwrap_err(), OpenError::Authentication);

    let other_ring = MasterKeyring::single(key("k2", &rng));
    assert_eq!(
        handle.unwrap_data_key(authid.secret(), &other_ring).unwrap_err(),
        OpenError::UnknownMasterKey("k1".into())
    );
    // Same id, different key material: the database plus a guessed key id opens nothing.
    let impostor = MasterKeyring::single(key("k1", &rng));
    assert_eq!(handle.unwrap_data_key(authid.secret(), &impostor).unwrap_err(), OpenError::Authentication);
}

#[test]
fn blobs_swapped_between_handles_fail() {
    let rng = SeqRandom::new(2);
    let ring = MasterKeyring::single(key("k1", &rng));
    let dek = SymmetricKey::generate(&rng);
    let grant = GrantId::generate(&rng);
    let (a_id, b_id) = (AuthId::generate(&rng), AuthId::generate(&rng));
    let a = Handle::new(&a_id, grant, &dek, "a", &ring, Timestamp::EPOCH, &rng);
    let b = Handle::new(&b_id, grant, &dek, "b", &ring, Timestamp::EPOCH, &rng);

    let mut a_with_b_wrap = a.clone();
    a_with_b_wrap.wrapped_data_key = b.wrapped_data_key.clone();
    assert!(a_with_b_wrap.unwrap_data_key(a_id.secret(), &ring).is_err());
    assert!(a_with_b_wrap.unwrap_data_key(b_id.secret(), &ring).is_err(), "b's secret cannot open it under a's keyid");

    let mut a_with_b_label = a.clone();
    a_with_b_label.label = b.label.clone();
    assert!(a_with_b_label.open_label(&dek).is_err());

    let mut moved_to_other_grant = a.clone();
    moved_to_other_grant.grant_id = GrantId::generate(&rng);
    assert!(moved_to_other_grant.unwrap_data_key(a_id.secret(), &ring).is_err());
}

#[test]
fn master_key_rotation_reseals_without_the_authid_and_the_old_key_can_go() {
    let rng = SeqRandom::new(3);
    let old = key("old", &rng);
    let new = key("new", &rng);
    let authid = AuthId::generate(&rng);
    let dek = SymmetricKey::generate(&rng);
    let mut handle = Handle::new(
        &authid,
        GrantId::generate(&rng),
        &dek,
        "x",
        &MasterKeyring::single(old.clone()),
        Timestamp::EPOCH,
        &rng,
    );

    // During rotation both keys are configured, the new one first (current).
    let both = MasterKeyring::new(vec![new.clone(), old.clone()]).unwrap();
    assert!(handle.reseal(&both, &rng).unwrap(), "re-sealed to the current key");
    assert!(!handle.reseal(&both, &rng).unwrap(), "already under the current key");
    assert_eq!(handle.wrapped_data_key.master_key_id().unwrap().unwrap().as_str(), "new");

    // The old key is dropped; the handle still opens with its AuthID.
    let only_new = MasterKeyring::single(new);
    assert_eq!(handle.unwrap_data_key(authid.secret(), &only_new).unwrap().expose_secret(), dek.expose_secret());
    assert_eq!(
        handle.unwrap_data_key(authid.secret(), &MasterKeyring::single(old)).unwrap_err(),
        OpenError::UnknownMasterKey("new".into())
    );
}

#[test]
fn passphrase_master_key_opens_what_it_sealed_after_restart() {
    let rng = SeqRandom::new(4);
    let params = latchkey_core::PassphraseParams::generate(&rng);
    let recorded = params.to_text();
    let id = MasterKeyId::new("passphrase").unwrap();
    let first = MasterKey::derive_from_passphrase(id.clone(), b"operator passphrase", &params).unwrap();
    let authid = AuthId::generate(&rng);
    let dek = SymmetricKey::generate(&rng);
    let handle =
        Handle::new(&authid, GrantId::generate(&rng), &dek, "x", &MasterKeyring::single(first), Timestamp::EPOCH, &rng);

    // "Restart": only the recorded parameters and the passphrase come back.
    let again = latchkey_core::PassphraseParams::parse(&recorded).unwrap();
    let second = MasterKey::derive_from_passphrase(id, b"operator passphrase", &again).unwrap();
    let ring = MasterKeyring::single(second);
    assert_eq!(handle.unwrap_data_key(authid.secret(), &ring).unwrap().expose_secret(), dek.expose_secret());
}
