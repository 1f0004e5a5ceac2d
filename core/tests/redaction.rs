// No secret-bearing type prints its secret through Debug (or Display).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use latchkey_core::provider::{DeviceAuthorization, Pkce, TokenResponse};
use latchkey_core::testing::SeqRandom;
use latchkey_core::{
    AuthId, GrantPayload, MasterKey, MasterKeyId, MasterKeyring, PassphraseParams, SymmetricKey, Timestamp,
};
use secrecy::{ExposeSecret, SecretString};

/// Every way a byte secret might show up in text.
fn renderings(bytes: &[u8]) -> Vec<String> {
    vec![
        format!("{bytes:?}"),
        bytes.iter().map(|b| format!("{b:02x}")).collect(),
        STANDARD.encode(bytes),
        URL_SAFE_NO_PAD.encode(bytes),
        // A run of the decimal bytes is enough to leak.
        format!("{:?}", &bytes[..4]).trim_end_matches(']').to_owned(),
    ]
}

fn assert_hides(shown: &str, secret: &[u8]) {
    for r in renderings(secret) {
        assert!(!shown.contains(&r), "{shown:?} reveals the secret as {r:?}");
    }
}

fn assert_hides_text(shown: &str, secret: &str) {
    assert!(!shown.contains(secret), "{shown:?} reveals {secret:?}");
}

#[test]
fn key_types_hide_their_bytes() {
    let rng = SeqRandom::new(1);
    let key = SymmetricKey::generate(&rng);
    assert_hides(&format!("{key:?}"), key.expose_secret());
    let master = MasterKey::generate(MasterKeyId::new("k1").unwrap(), &rng);
    let text = master.expose_config_text();
    let raw = STANDARD.decode(text.split_once(':').unwrap().1).unwrap();
    let ring = MasterKeyring::single(master.clone());
    for shown in [format!("{master:?}"), format!("{ring:?}")] {
        assert_hides(&shown, &raw);
        assert!(shown.contains("k1"), "the id is shown: {shown}");
    }
}

#[test]
fn authid_types_hide_the_secret() {
    let id = AuthId::generate(&SeqRandom::new(2));
    let secret = id.secret().expose_secret().to_vec();
    for shown in [format!("{id:?}"), format!("{id}"), format!("{:?}", id.secret()), format!("{:#?}", id)] {
        assert_hides(&shown, &secret);
    }
}

#[test]
fn token_bearing_types_hide_tokens() {
    let refresh = "1//refresh-token-value";
    let access = "ya29.access-token-value";
    let payload = GrantPayload {
        refresh_token: Some(SecretString::from(refresh.to_owned())),
        access_token: Some(SecretString::from(access.to_owned())),
        access_expires_at: Some(Timestamp::EPOCH),
        refreshed_at: Timestamp::EPOCH,
        scopes: vec!["drive".into()],
        account_id: None,
        token_type: None,
        extra: vec![("hostname".into(), "secret-extra-value".into())],
    };
    let response = TokenResponse {
        access_token: SecretString::from(access.to_owned()),
        refresh_token: Some(SecretString::from(refresh.to_owned())),
        expires_in: Some(Duration::from_secs(3600)),
        scopes: None,
        token_type: Some("Bearer".into()),
        account_id: None,
        extra: vec![("hostname".into(), "secret-extra-value".into())],
    };
    let device = DeviceAuthorization {
        device_code: SecretString::from("device-code-value".to_owned()),
        user_code: "ABCD-EFGH".into(),
        verification_uri: "https://example.org/device".into(),
        verification_uri_complete: None,
        expires_in: Duration::from_secs(600),
        interval: Duration::from_secs(5),
    };
    let pkce = Pkce::generate(&SeqRandom::new(3));
    for shown in [format!("{payload:?}"), format!("{response:?}"), format!("{payload:#?}")] {
        assert_hides_text(&shown, refresh);
        assert_hides_text(&shown, access);
        assert_hides_text(&shown, "secret-extra-value");
    }
    assert_hides_text(&format!("{device:?}"), "device-code-value");
    assert_hides_text(&format!("{pkce:?}"), pkce.verifier.expose_secret());
}

#[test]
fn passphrase_params_show_no_passphrase_because_they_hold_none() {
    // The salt is not secret; the type holds no passphrase at all.
    let params = PassphraseParams::generate(&SeqRandom::new(4));
    assert!(format!("{params:?}").contains("m_kib"));
}
