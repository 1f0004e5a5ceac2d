//! The checks behind latchkey's fuzz targets.
//!
//! Each public function takes libFuzzer's raw input and panics on a failed
//! check, so the same code runs under libFuzzer (`fuzz_targets/*.rs`,
//! `cargo fuzz run`) and under plain `cargo test` (`tests/replay.rs` replays
//! `corpus/` and `regressions/` on stable Rust, without libFuzzer).
//!
//! Beyond "never panics", every target checks properties of what it parsed:
//! round trips, canonical forms, and that no planted secret survives into an
//! error message or a header.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use latchkey_core::envelope::{self, ALG_AES256GCM_HKDF, ENVELOPE_VERSION};
// Core's deterministic random source (splitmix64): seeds are reproducible
// and a crash replays exactly.
use latchkey_core::testing::SeqRandom;
use latchkey_core::{
    AuthId, AuthIdSecret, DataKey, DeviceGrant, EngineError, Field, Grant, GrantId, GrantPayload, GrantState, Handle,
    Handoff, KeyId, Lease, LoginTransaction, MasterKey, MasterKeyId, MasterKeyring, PassphraseParams, Record,
    RecordKind, SealContext, SealedBlob, SymmetricKey, Timestamp,
};
use latchkey_providers::classify::{
    AccountIdSource, ResponseRules, classify_error, id_token_subject, parse_token_response, retry_after, sanitize,
};
use latchkey_providers::{BuildOptions, CatalogueConfig};
use latchkey_server::config::{Cidr, Config, parse_duration};
use latchkey_server::http::reply::{Failure, Surface, error, one_line};
use latchkey_server::http::{client_address, duplicati_authid, fields, query_map};
use latchkey_server::limits::{self, AddressKey};
use secrecy::{ExposeSecret, SecretString};

pub mod seeds;

/// A target: its name (the directory under `corpus/` and `regressions/`) and its check.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, in the order `run.sh` fuzzes them.
pub const TARGETS: [Target; 7] = [
    ("envelope_open", envelope_open),
    ("record_decode", record_decode),
    ("authid_parse", authid_parse),
    ("token_response", token_response),
    ("config_parse", config_parse),
    ("duplicati_request", duplicati_request),
    ("forwarded_for", forwarded_for),
];

// ---------------------------------------------------------------------------
// Fixtures shared by the targets and the seed generator.
// ---------------------------------------------------------------------------

/// The data key every target opens grant payloads and labels with.
pub const DATA_KEY: [u8; 32] = [0x11; 32];
/// The current master key (id [`CURRENT_KEY_ID`]).
pub const CURRENT_KEY: [u8; 32] = [0x22; 32];
/// The older master key (id [`OLD_KEY_ID`]), still in the ring.
pub const OLD_KEY: [u8; 32] = [0x33; 32];
/// Id of the current master key.
pub const CURRENT_KEY_ID: &str = "k2026";
/// Id of the older master key.
pub const OLD_KEY_ID: &str = "k2025";
/// The keyid of the fixed AuthID.
pub const KEYID: [u8; 16] = [0x44; 16];
/// The secret of the fixed AuthID.
pub const SECRET: [u8; 32] = [0x66; 32];
/// The grant id sealed blobs are bound to.
pub const GRANT_ID: [u8; 16] = [0x55; 16];
/// The hand-off token hand-off seeds are sealed to.
pub const HANDOFF_TOKEN: &str = "handoff-token-for-fuzzing";

/// The fixed data key.
pub fn data_key() -> DataKey {
    SymmetricKey::from_bytes(DATA_KEY)
}

fn master_key(id: &str, key: [u8; 32]) -> MasterKey {
    // The ids are constants that satisfy MasterKeyId's rules.
    #[allow(clippy::unwrap_used)]
    MasterKey::new(MasterKeyId::new(id).unwrap(), SymmetricKey::from_bytes(key))
}

/// The fixed keyring: [`CURRENT_KEY_ID`] current, [`OLD_KEY_ID`] also known.
pub fn keyring() -> MasterKeyring {
    MasterKeyring::new(vec![master_key(CURRENT_KEY_ID, CURRENT_KEY), master_key(OLD_KEY_ID, OLD_KEY)])
        .unwrap_or_else(|e| panic!("fixed keyring: {e}"))
}

/// A keyring whose current key is the old one, to seal blobs that need re-sealing.
pub fn old_keyring() -> MasterKeyring {
    MasterKeyring::single(master_key(OLD_KEY_ID, OLD_KEY))
}

/// The fixed AuthID.
pub fn authid() -> AuthId {
    AuthId::new(KeyId::from_bytes(KEYID), AuthIdSecret::from_bytes(SECRET))
}

/// The ids a handle's blobs are bound to: keyid, then grant id.
pub const HANDLE_IDS: [&[u8]; 2] = [&KEYID, &GRANT_ID];
/// The ids a grant's payload is bound to.
pub const GRANT_IDS: [&[u8]; 1] = [&GRANT_ID];

/// The context of a handle's master-sealed wrap ([`MasterKeyring::open`] in `envelope_open`).
pub fn master_context() -> SealContext<'static> {
    SealContext { kind: RecordKind::Handle, field: Field::MasterSealedWrap, format: 1, ids: &HANDLE_IDS }
}

/// The context of a grant's payload ([`envelope::open`] in `envelope_open`).
pub fn payload_context() -> SealContext<'static> {
    SealContext {
        kind: RecordKind::Grant,
        field: Field::GrantPayload,
        format: <Grant as Record>::FORMAT,
        ids: &GRANT_IDS,
    }
}

fn rng(data: &[u8]) -> SeqRandom {
    SeqRandom::new(data.iter().fold(data.len() as u64, |h, b| h.rotate_left(5) ^ u64::from(*b)))
}

fn now() -> Timestamp {
    Timestamp::from_unix_millis(1_790_000_000_000)
}

/// A position in `0..len` picked from the input, for tampering.
fn pick(data: &[u8], len: usize) -> usize {
    let h = data.iter().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(*b)));
    h % len.max(1)
}

// ---------------------------------------------------------------------------
// 1. envelope_open
// ---------------------------------------------------------------------------

/// Sealed blobs: `SealedBlob::from_bytes` → `header`, `master_key_id`,
/// `envelope::open` with a fixed key and context, `MasterKeyring::open` and
/// `reseal`; then seal the input as plaintext and check it opens only
/// unaltered and in its own context. The input as text also goes through
/// `MasterKey::parse`, `MasterKeyring::parse` and `PassphraseParams::parse`.
pub fn envelope_open(data: &[u8]) {
    let blob = SealedBlob::from_bytes(data.to_vec());
    let header = blob.header();
    if let Ok(h) = &header {
        assert_eq!(h.version, ENVELOPE_VERSION);
        assert_eq!(h.algorithm, ALG_AES256GCM_HKDF);
        assert!(h.len + 16 <= data.len(), "header of {} bytes in a blob of {}", h.len, data.len());
        let id_len = h.master_key_id.map_or(0, str::len);
        assert_eq!(h.len, 3 + id_len + 24);
        assert_eq!(&h.nonce[..], &data[3 + id_len..h.len]);
    }
    let master_id = blob.master_key_id();
    if master_id.is_ok() {
        assert!(header.is_ok(), "master_key_id answered for a blob whose header does not parse");
    }

    let dk = data_key();
    let ring = keyring();
    let rng = rng(data);

    if envelope::open(&dk, &payload_context(), &blob).is_ok() {
        assert_eq!(master_id, Ok(None), "a data-key blob opened but names a master key");
        // Bound to its place: another field or another id does not open it.
        let moved = SealContext { field: Field::HandleLabel, ..payload_context() };
        assert!(envelope::open(&dk, &moved, &blob).is_err(), "blob opened in another field");
        let other_ids: [&[u8]; 1] = [&KEYID];
        let moved = SealContext { ids: &other_ids, ..payload_context() };
        assert!(envelope::open(&dk, &moved, &blob).is_err(), "blob opened under another record id");
        assert!(ring.open(&payload_context(), &blob).is_err(), "a data-key blob opened under the keyring");
    }

    match ring.open(&master_context(), &blob) {
        Ok(plain) => {
            let Ok(Some(id)) = &master_id else { panic!("a master-sealed blob opened without a master key id") };
            assert!(ring.get(id).is_some());
            assert!(envelope::open(&dk, &master_context(), &blob).is_err());
            match ring.reseal(&master_context(), &blob, &rng) {
                Ok(None) => assert_eq!(id.as_str(), CURRENT_KEY_ID, "not re-sealed, yet not under the current key"),
                Ok(Some(resealed)) => {
                    assert_ne!(id.as_str(), CURRENT_KEY_ID, "re-sealed a blob already under the current key");
                    let again = ring.open(&master_context(), &resealed).expect("a re-sealed blob opens");
                    assert_eq!(again.as_slice(), plain.as_slice());
                    let current = resealed.master_key_id().expect("re-sealed header parses");
                    assert_eq!(current.as_ref().map(MasterKeyId::as_str), Some(CURRENT_KEY_ID));
                }
                Err(e) => panic!("a blob that opens does not re-seal: {e}"),
            }
        }
        Err(_) => {
            let _ = ring.reseal(&master_context(), &blob, &rng);
        }
    }

    // The input as plaintext: seal, open, and tamper.
    let sealed = envelope::seal(&dk, &payload_context(), data, &rng);
    let opened = envelope::open(&dk, &payload_context(), &sealed).expect("a fresh seal opens");
    assert_eq!(opened.as_slice(), data);
    let mut tampered = sealed.as_bytes().to_vec();
    let at = pick(data, tampered.len());
    tampered[at] ^= 1 << (data.len() % 8);
    assert!(
        envelope::open(&dk, &payload_context(), &SealedBlob::from_bytes(tampered)).is_err(),
        "a blob with byte {at} altered still opens"
    );
    let sealed = ring.seal(&master_context(), data, &rng);
    assert_eq!(ring.open(&master_context(), &sealed).expect("a fresh master seal opens").as_slice(), data);
    let truncated = SealedBlob::from_bytes(sealed.as_bytes()[..sealed.as_bytes().len() - 1].to_vec());
    assert!(ring.open(&master_context(), &truncated).is_err(), "a truncated blob opens");

    // Key material as configuration text.
    let text = String::from_utf8_lossy(data);
    if let Ok(key) = MasterKey::parse(&text) {
        let again = MasterKey::parse(&key.expose_config_text()).expect("a key's own config text parses");
        assert_eq!(again.id(), key.id());
        let ring = MasterKeyring::single(key);
        let sealed = ring.seal(&master_context(), b"x", &rng);
        assert_eq!(sealed.master_key_id(), Ok(Some(again.id().clone())));
    }
    if let Ok(params) = PassphraseParams::parse(&text) {
        assert_eq!(PassphraseParams::parse(&params.to_text()), Ok(params));
    }
    let lines: Vec<&str> = text.lines().take(8).collect();
    if let Ok(parsed) = MasterKeyring::parse(&lines) {
        assert_eq!(parsed.ids().len(), lines.len());
        assert_eq!(parsed.ids()[0], parsed.current().id());
    }
}

// ---------------------------------------------------------------------------
// 2. record_decode
// ---------------------------------------------------------------------------

/// Every `Record::decode` (Grant, Handle, LoginTransaction, Handoff, Lease,
/// DeviceGrant) on the input. When one succeeds: the kind byte matches, the
/// encoding is canonical (`encode` gives back the input) and decodes to the
/// same value; the record's sealed fields are then opened with the fixed
/// keys. The input is also sealed as a grant payload and opened through
/// `Grant::open_payload`, which reaches the private payload decoder.
pub fn record_decode(data: &[u8]) {
    let dk = data_key();
    let ring = keyring();
    let rng = rng(data);
    let secret = AuthIdSecret::from_bytes(SECRET);

    if let Some(grant) = check_record::<Grant>(data) {
        if let Ok(payload) = grant.open_payload(&dk) {
            check_payload_round_trip(&grant, &payload);
        }
    }
    if let Some(handle) = check_record::<Handle>(data) {
        let unwrapped = handle.unwrap_data_key(&secret, &ring);
        let _ = handle.open_label(&dk);
        let mut resealed = handle.clone();
        match resealed.reseal(&ring, &rng) {
            Ok(changed) => {
                assert_eq!(changed, resealed != handle, "reseal's answer disagrees with what it did");
                let again = resealed.unwrap_data_key(&secret, &ring);
                assert_eq!(
                    again.map(|k| *k.expose_secret()).ok(),
                    unwrapped.map(|k| *k.expose_secret()).ok(),
                    "re-sealing changed what the handle unwraps to"
                );
            }
            Err(_) => assert!(unwrapped.is_err(), "the data key unwraps but the handle does not re-seal"),
        }
    }
    if let Some(tx) = check_record::<LoginTransaction>(data) {
        let text = |v: Option<SecretString>| v.map(|v| v.expose_secret().to_owned());
        let verifier = tx.open_verifier(&ring).map(text);
        let mut resealed = tx.clone();
        if resealed.reseal(&ring, &rng).is_ok() {
            let again = resealed.open_verifier(&ring).map(text);
            assert_eq!(again.ok(), verifier.ok(), "re-sealing changed the verifier");
        }
    }
    if let Some(handoff) = check_record::<Handoff>(data) {
        if let Ok(Some(id)) = handoff.open_authid(HANDOFF_TOKEN) {
            assert_eq!(AuthId::parse(&id.expose_text()).as_ref(), Ok(&id));
        }
        let _ = handoff.open_authid("another token");
    }
    check_record::<Lease>(data);
    check_record::<DeviceGrant>(data);

    // The private GrantPayload decoder, reached through a payload that opens.
    let mut grant = Grant {
        id: GrantId::from_bytes(GRANT_ID),
        version: 1,
        service: "onedrivev2".to_owned(),
        state: GrantState::Active,
        created_at: now(),
        updated_at: now(),
        last_used_at: now(),
        payload: envelope::seal(&dk, &payload_context(), data, &rng),
    };
    if let Ok(payload) = grant.open_payload(&dk) {
        check_payload_round_trip(&grant, &payload);
        // Canonical: the payload encodes back to exactly the input.
        grant.seal_payload(&payload, &dk, now(), &rng);
        let plain = envelope::open(&dk, &payload_context(), &grant.payload).expect("a sealed payload opens");
        assert_eq!(plain.as_slice(), data, "the payload decoder accepted a non-canonical encoding");
    }
}

fn check_record<R: Record + PartialEq + Debug>(data: &[u8]) -> Option<R> {
    const VERSION: u64 = 42;
    let record = R::decode(data, VERSION).ok()?;
    assert_eq!(data.first(), Some(&(R::KIND as u8)), "decoded a record of another kind");
    assert_eq!(record.version(), VERSION);
    let encoded = record.encode();
    // An older format still decodes (logins, hand-offs and device codes of
    // format 1) and re-encodes in the current one; the current one is canonical.
    if data.get(1) == Some(&R::FORMAT) {
        assert_eq!(encoded, data, "{:?} decoded from a non-canonical encoding", R::KIND);
    } else {
        assert_eq!(encoded.get(1), Some(&R::FORMAT), "{:?} re-encodes in the current format", R::KIND);
    }
    let again = R::decode(&encoded, VERSION).unwrap_or_else(|e| panic!("{:?} re-decode failed: {e}", R::KIND));
    assert_eq!(again, record);
    let _ = (record.key(), record.group());
    Some(record)
}

fn payload_fields(p: &GrantPayload) -> impl PartialEq + Debug {
    (
        p.refresh_token.as_ref().map(|t| t.expose_secret().to_owned()),
        p.access_token.as_ref().map(|t| t.expose_secret().to_owned()),
        p.access_expires_at,
        p.refreshed_at,
        p.scopes.clone(),
        p.account_id.clone(),
        p.token_type.clone(),
        p.extra.clone(),
    )
}

fn check_payload_round_trip(grant: &Grant, payload: &GrantPayload) {
    let mut copy = grant.clone();
    copy.seal_payload(payload, &data_key(), now(), &SeqRandom::new(9));
    let again = copy.open_payload(&data_key()).expect("a re-sealed payload opens");
    assert_eq!(payload_fields(&again), payload_fields(payload));
    // Debug does not depend on the tokens: it cannot show them.
    let mut masked = payload.clone();
    masked.refresh_token = masked.refresh_token.map(|_| SecretString::from("R"));
    masked.access_token = masked.access_token.map(|_| SecretString::from("A"));
    assert_eq!(format!("{payload:?}"), format!("{masked:?}"), "GrantPayload's Debug shows a token");
}

// ---------------------------------------------------------------------------
// 3. authid_parse
// ---------------------------------------------------------------------------

const BASE64URL: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// `AuthId::parse` and `KeyId::parse` on the input as (lossy) UTF-8. A parsed
/// AuthID's text is canonical (22-character keyid, `:`, 43-character secret,
/// base64url), re-parses to the same AuthID, and is the input up to
/// surrounding whitespace and a `%3A` separator; `Debug` and `Display` never
/// show the secret.
pub fn authid_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let parsed = AuthId::parse(&text);
    // Surrounding whitespace never changes the answer.
    assert_eq!(AuthId::parse(&format!(" \t{text}\r\n")), parsed);
    if let Ok(id) = &parsed {
        let canonical = id.expose_text();
        assert_eq!(canonical.len(), 22 + 1 + 43, "{:?}", canonical.as_str());
        let (keyid, secret) = canonical.split_once(':').expect("canonical text has ':'");
        assert_eq!((keyid.len(), secret.len()), (22, 43));
        assert!(keyid.chars().chain(secret.chars()).all(|c| BASE64URL.contains(c)));
        assert_eq!(AuthId::parse(&canonical).as_ref(), Ok(id));
        assert_eq!(KeyId::parse(keyid), Ok(id.keyid()));
        assert_eq!(id.keyid().to_string(), keyid);
        let trimmed = text.trim();
        assert!(
            trimmed == canonical.as_str()
                || trimmed == format!("{keyid}%3A{secret}")
                || trimmed == format!("{keyid}%3a{secret}"),
            "accepted a non-canonical AuthID"
        );
        // Debug and Display do not depend on the secret: they cannot show it.
        let other = AuthId::new(id.keyid(), AuthIdSecret::from_bytes(id.secret().expose_secret().map(|b| !b)));
        assert_eq!(format!("{id:?}"), format!("{other:?}"), "AuthId's Debug shows the secret");
        assert_eq!(id.to_string(), other.to_string(), "AuthId's Display shows the secret");
        assert_eq!(format!("{:?}", id.secret()), format!("{:?}", other.secret()));
    }
    if let Ok(keyid) = KeyId::parse(&text) {
        assert_eq!(keyid.to_string(), text.trim(), "accepted a non-canonical keyid");
        assert_eq!(KeyId::parse(&keyid.to_string()), Ok(keyid));
    }
}

// ---------------------------------------------------------------------------
// 4. token_response
// ---------------------------------------------------------------------------

/// Secrets a token request carried; no error built from a response may show them.
pub const PLANTED: [&str; 3] =
    ["1//0gPLANTEDrefreshTokenQw7-xYz", "PLANTED_client_secret_5tT9", "M.R3_PLANTED.authorization-code"];

#[track_caller]
fn assert_no_planted(shown: &str, what: &str) {
    for secret in PLANTED {
        assert!(!shown.contains(secret), "{what} shows a secret the request carried: {shown:?}");
    }
}

/// Input layout: 2 bytes status (big-endian), 1 flag byte (bit 0: the body's
/// first line is a `Retry-After` header; bits 1–2: where the account id comes
/// from; bit 3: no default lifetime), then the body.
///
/// `parse_token_response`, `classify_error` (with [`PLANTED`] as the secrets
/// sent), `sanitize`, `retry_after` and `id_token_subject` never panic; no
/// error's `Display` contains a planted secret; a parsed response is sane.
pub fn token_response(data: &[u8]) {
    let status = u16::from_be_bytes([data.first().copied().unwrap_or(0), data.get(1).copied().unwrap_or(0)]);
    let flags = data.get(2).copied().unwrap_or(0);
    let mut body = data.get(3..).unwrap_or_default();
    let mut header = None;
    if flags & 1 != 0 {
        let end = body.iter().position(|b| *b == b'\n').unwrap_or(body.len());
        header = Some(String::from_utf8_lossy(&body[..end]).into_owned());
        body = body.get(end + 1..).unwrap_or_default();
    }
    let account_id = match (flags >> 1) & 3 {
        0 => AccountIdSource::None,
        1 => AccountIdSource::IdToken,
        2 => AccountIdSource::Field("account_id".to_owned()),
        _ => AccountIdSource::Field("userid".to_owned()),
    };
    let rules = ResponseRules {
        default_expires_in: (flags & 8 == 0).then(|| Duration::from_secs(3600)),
        account_id: account_id.clone(),
    };

    match parse_token_response(body, &rules) {
        Ok(token) => {
            assert!(!token.access_token.expose_secret().is_empty());
            if let Some(refresh) = &token.refresh_token {
                assert!(!refresh.expose_secret().is_empty());
            }
            for scope in token.scopes.iter().flatten() {
                assert!(!scope.is_empty() && !scope.contains(char::is_whitespace), "scope {scope:?}");
            }
            if account_id == AccountIdSource::None {
                assert_eq!(token.account_id, None);
            }
            // Debug does not depend on the tokens: it cannot show them.
            let mut masked = token.clone();
            masked.access_token = SecretString::from("A");
            masked.refresh_token = masked.refresh_token.map(|_| SecretString::from("R"));
            assert_eq!(format!("{token:?}"), format!("{masked:?}"), "TokenResponse's Debug shows a token");
        }
        Err(e) => assert_no_planted(&e.to_string(), "a token response parse error"),
    }

    let e = classify_error(status, header.as_deref(), body, &PLANTED);
    let shown = e.to_string();
    assert_no_planted(&shown, "a classified provider error");
    assert_no_planted(&format!("{e:?}"), "a classified provider error's Debug");
    if status == 429 {
        assert!(matches!(e, latchkey_core::ProviderError::RateLimited { .. }), "429 classified as {e:?}");
    }
    if let latchkey_core::ProviderError::InvalidGrant { description: Some(d) }
    | latchkey_core::ProviderError::InvalidClient { description: Some(d) } = &e
    {
        check_sanitized(d);
    }

    let text = String::from_utf8_lossy(body);
    if let Some(clean) = sanitize(&text, &PLANTED) {
        check_sanitized(&clean);
        assert_no_planted(&clean, "sanitize's output");
    }
    if let Some(header) = &header {
        if let Some(wait) = retry_after(Some(header)) {
            assert_eq!(Some(wait.as_secs()), header.trim().parse().ok());
        }
    }
    let _ = id_token_subject(&text);
    for line in text.lines().take(4) {
        let _ = id_token_subject(line);
    }
}

#[track_caller]
fn check_sanitized(text: &str) {
    assert!(!text.chars().any(char::is_control), "control character in {text:?}");
    assert!(text.chars().count() <= 200, "{} characters", text.chars().count());
    assert!(!text.trim().is_empty());
}

// ---------------------------------------------------------------------------
// 5. config_parse
// ---------------------------------------------------------------------------

/// What `build` is given: the broker's redirect URI and default timeout.
pub fn build_options() -> BuildOptions {
    BuildOptions {
        redirect_uri: "https://broker.example/logged-in".to_owned(),
        default_timeout: Duration::from_secs(30),
    }
}

/// `client_secrets_file` names a file to read: the one piece of I/O in
/// building a catalogue. Fuzzing must not read (or hang on) arbitrary paths.
fn without_secret_files(mut c: CatalogueConfig) -> CatalogueConfig {
    for p in c.providers.values_mut() {
        p.client_secrets_file = None;
    }
    c
}

/// The input as (lossy) UTF-8 through `Config::parse`, `Config::load` (lines
/// `LATCHKEY_…=value` as the environment), `CatalogueConfig::parse` and
/// `build` (alone and laid over the built-in catalogue, with fixed
/// [`build_options`]); each line through `parse_duration` and `Cidr::parse`.
pub fn config_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let options = build_options();

    if let Ok(config) = Config::parse(&text) {
        let public = config.public_url();
        assert!(!public.ends_with('/'), "public_url {public:?} keeps a trailing slash");
        assert!(url::Url::parse(&public).is_ok(), "validated public_url {public:?} does not parse");
        assert_eq!(config.trusted_proxies().len(), config.trusted_proxies.len(), "a validated proxy does not parse");
        let mut config = config;
        for p in config.providers.values_mut() {
            p.client_secrets_file = None;
        }
        let _ = format!("{config:?}");
        let _ = latchkey_providers::build(&config.catalogue(), &options);
    }

    let env: Vec<(String, String)> = text
        .lines()
        .take(16)
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("LATCHKEY_"))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if !env.is_empty() {
        if let Ok(mut config) = Config::load(None, env) {
            for p in config.providers.values_mut() {
                p.client_secrets_file = None;
            }
            let _ = latchkey_providers::build(&config.catalogue(), &options);
        }
    }

    if let Ok(catalogue) = CatalogueConfig::parse(&text) {
        let catalogue = without_secret_files(catalogue);
        let built = latchkey_providers::build(&catalogue, &options);
        if let Ok(built) = &built {
            for w in &built.withheld {
                assert!(catalogue.services.contains_key(&w.service));
            }
        }
        let merged = CatalogueConfig::built_in().expect("the built-in catalogue parses").with_overrides(&catalogue);
        let _ = latchkey_providers::build(&merged, &options);
    }

    for line in text.lines().take(32) {
        if let Some(d) = parse_duration(line) {
            assert_eq!(parse_duration(&format!("{}s", d.as_secs())), Some(d));
            assert_eq!(parse_duration(&d.as_secs().to_string()), Some(d));
        }
        if let Some(cidr) = Cidr::parse(line) {
            let addr = line.trim().split('/').next().unwrap_or_default();
            let addr: IpAddr = addr.parse().expect("a parsed CIDR's address parses");
            assert!(cidr.contains(addr), "{line:?} does not contain its own address");
        }
    }
}

// ---------------------------------------------------------------------------
// 6. duplicati_request
// ---------------------------------------------------------------------------

/// The trusted proxies of `duplicati_request`.
pub const PROXIES: [&str; 4] = ["127.0.0.1", "10.0.0.0/8", "::1", "fd00::/8"];

const PEERS: [Option<&str>; 8] = [
    None,
    Some("127.0.0.1"),
    Some("10.1.2.3"),
    Some("203.0.113.9"),
    Some("::1"),
    Some("::ffff:10.9.8.7"),
    Some("2001:db8::1"),
    Some("fd00::5"),
];

/// Input layout: 1 flag byte (bits 0–2: the peer address, from a fixed list
/// of trusted and untrusted ones; bit 3: an `X-AuthID` header is sent), then
/// `\n`-separated: the `X-Forwarded-For` value, the `X-AuthID` value (when
/// flagged), the query string, and the rest is the body.
///
/// Follows `/refresh` with the server's own functions: `http::fields(body)`,
/// `http::query_map`, `http::duplicati_authid` (header, then body, then
/// query), `AuthId::parse`, and for a bad one the Duplicati error response. Checks `client_address` (a forwarded address is
/// believed only through trusted proxies), `fields` (form round trip), and
/// `reply::one_line` / `X-Reason` (one printable ASCII line, always set).
pub fn duplicati_request(data: &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let rest = data.get(1..).unwrap_or_default();
    let mut parts = rest.splitn(if flags & 8 != 0 { 4 } else { 3 }, |b| *b == b'\n');
    let forwarded = parts.next().map(|p| String::from_utf8_lossy(p).into_owned());
    let header = if flags & 8 != 0 { parts.next().map(|p| String::from_utf8_lossy(p).into_owned()) } else { None };
    let query_raw = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();

    // Client address.
    let proxies: Vec<Cidr> = PROXIES.iter().map(|p| Cidr::parse(p).expect("fixed proxy parses")).collect();
    let trusted = |ip: IpAddr| proxies.iter().any(|c| c.contains(ip));
    let peer = PEERS[usize::from(flags & 7)].map(|p| SocketAddr::new(p.parse().expect("fixed peer parses"), 4242));
    let peer_ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
    assert_eq!(client_address(peer, None, &proxies), peer_ip);
    let client = client_address(peer, forwarded.as_deref(), &proxies);
    if !trusted(peer_ip) {
        assert_eq!(client, peer_ip, "an untrusted peer's X-Forwarded-For was believed");
    } else if client != peer_ip {
        let hops: Vec<IpAddr> =
            forwarded.as_deref().unwrap_or_default().split(',').filter_map(|h| h.trim().parse().ok()).collect();
        assert!(hops.contains(&client), "client {client} is neither the peer nor a forwarded hop");
    }

    // Body fields, and the query map as the route builds it.
    let form = fields(body);
    let is_json = matches!(serde_json::from_slice::<serde_json::Value>(body), Ok(serde_json::Value::Object(_)));
    if !is_json {
        let mut encoded = form_urlencoded::Serializer::new(String::new());
        let sorted: BTreeMap<_, _> = form.iter().collect();
        for (k, v) in sorted {
            encoded.append_pair(k, v);
        }
        assert_eq!(fields(encoded.finish().as_bytes()), form, "form fields do not survive re-encoding");
    }
    let raw = duplicati_authid(header, &form, &query_map(query_raw));
    match AuthId::parse(&raw) {
        Ok(id) => assert_eq!(AuthId::parse(&id.expose_text()).as_ref(), Ok(&id)),
        Err(e) => {
            let failure = Failure::from(&EngineError::from(e));
            check_error_responses(&failure);
        }
    }

    // Any text as a failure's reason.
    let text = String::from_utf8_lossy(data);
    let line = one_line(&text);
    check_one_line(&line);
    assert_eq!(one_line(&line), line, "one_line is not idempotent");
    check_error_responses(&Failure::bad_request(text.into_owned()));
}

#[track_caller]
fn check_one_line(line: &str) {
    assert!(line.is_ascii(), "non-ASCII in {line:?}");
    assert!(!line.bytes().any(|b| b.is_ascii_control()), "control character in {line:?}");
    assert!(line.len() <= 300);
    assert_eq!(line.trim(), line);
}

#[track_caller]
fn check_error_responses(failure: &Failure) {
    for surface in [Surface::Duplicati, Surface::V1, Surface::OAuth2] {
        let response = error(surface, failure);
        assert!(response.status().is_client_error() || response.status().is_server_error());
        let reason = response.headers().get("x-reason");
        if surface == Surface::Duplicati {
            let reason = reason.expect("a Duplicati error always carries X-Reason");
            let reason = reason.to_str().expect("X-Reason is visible ASCII");
            check_one_line(reason);
            assert_eq!(reason, one_line(&failure.text));
        } else {
            assert!(reason.is_none());
        }
    }
}

// ---------------------------------------------------------------------------
// 7. forwarded_for
// ---------------------------------------------------------------------------

/// Input layout: 1 flag byte (bits 0–2: the peer, from the same list as
/// `duplicati_request`), then `\n`-separated `X-Forwarded-For` lines.
///
/// Follows the limiter's address parsing: `limits::client_address` over
/// every line and `AddressKey::of`. Checks that an untrusted peer is never
/// overruled; that the answer is the peer or a hop of some line; that many
/// lines read as their concatenation (a proxy that adds a line is heard, not
/// only the first); that a trusted answer only comes out when every hop to
/// its right is trusted; and that the limiter's key groups an IPv6 /64.
pub fn forwarded_for(data: &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let text = String::from_utf8_lossy(data.get(1..).unwrap_or_default()).into_owned();
    let lines: Vec<&str> = if text.is_empty() { Vec::new() } else { text.split('\n').collect() };
    let proxies: Vec<Cidr> = PROXIES.iter().map(|p| Cidr::parse(p).expect("fixed proxy parses")).collect();
    let trusted = |ip: IpAddr| proxies.iter().any(|c| c.contains(ip));
    let peer = PEERS[usize::from(flags & 7)].map(|p| SocketAddr::new(p.parse().expect("fixed peer parses"), 80));
    let peer_ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());

    let client = limits::client_address(peer, lines.iter().copied(), &proxies);
    let joined = lines.join(",");
    assert_eq!(
        client,
        limits::client_address(peer, (!lines.is_empty()).then_some(joined.as_str()), &proxies),
        "several lines must read as one list"
    );
    let hops: Vec<&str> = joined.split(',').map(str::trim).collect();
    if !trusted(peer_ip) {
        assert_eq!(client, peer_ip, "an untrusted peer's X-Forwarded-For was believed");
    } else if client != peer_ip {
        let at = hops.iter().rposition(|h| h.parse::<IpAddr>().ok() == Some(client));
        let at = at.unwrap_or_else(|| panic!("client {client} is neither the peer nor a forwarded hop"));
        for hop in &hops[at + 1..] {
            let ip: IpAddr = hop.parse().expect("hops right of the answer are addresses");
            assert!(trusted(ip), "{ip} is right of the answer but not a trusted proxy");
        }
    }
    // The limiter's key: one /64 is one client; IPv4 (mapped or not) per address.
    let key = AddressKey::of(client);
    match client {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let sibling = std::net::Ipv6Addr::from(u128::from(v6) ^ 0xffff);
            assert_eq!(AddressKey::of(IpAddr::V6(sibling)), key, "one /64, one key");
            let neighbour = std::net::Ipv6Addr::from(u128::from(v6) ^ (1 << 64));
            assert_ne!(AddressKey::of(IpAddr::V6(neighbour)), key, "another /64, another key");
        }
        IpAddr::V6(v6) => assert_eq!(key, AddressKey::of(IpAddr::V4(v6.to_ipv4_mapped().expect("mapped")))),
        IpAddr::V4(v4) => assert_eq!(key, AddressKey::of(IpAddr::V6(v4.to_ipv6_mapped()))),
    }
}
