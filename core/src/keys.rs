//! The key hierarchy: master keyring, handle keys, data keys.
//!
//! ```text
//! master key (operator) ──seals──▶ [ handle key (AuthID secret) ──wraps──▶ data key ]
//!                                                                 data key ──seals──▶ grant payload
//! ```
//!
//! * A **data key** is random per grant and seals the grant's payload.
//! * A **handle key** is derived with HKDF-SHA256 from the AuthID secret, the
//!   handle's random salt and its keyid, and wraps the data key.
//! * A **master key** seals that wrap once more, so the store alone yields
//!   nothing, the store plus an AuthID yields nothing, and rotating the master
//!   key re-seals the outer layer without any AuthID.
//!
//! Why HKDF and not Argon2 for AuthIDs: the AuthID secret is 256 bits drawn
//! from the OS generator, not something a person chose. Guessing it is
//! hopeless with or without a slow KDF, so a memory-hard function would add
//! latency and a denial-of-service lever to every token request while adding
//! no security. Argon2id is used where it does help: deriving a master key
//! from an operator's passphrase, which is low-entropy human input.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::authid::{AuthIdSecret, KeyId};
use crate::random::{Random, array};

/// Length of every symmetric key in bytes (AES-256).
pub const KEY_LEN: usize = 32;
/// Length of a handle's HKDF salt in bytes.
pub const HANDLE_SALT_LEN: usize = 16;
const MAX_MASTER_KEY_ID_LEN: usize = 32;

/// 32 bytes of key material: zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SymmetricKey([u8; KEY_LEN]);

impl SymmetricKey {
    /// A key from raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        SymmetricKey(bytes)
    }

    /// A fresh random key.
    pub fn generate(rng: &dyn Random) -> Self {
        let mut key = SymmetricKey([0; KEY_LEN]);
        rng.fill(&mut key.0);
        key
    }

    /// The raw key bytes.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SymmetricKey(<redacted>)")
    }
}

/// A grant's random data key, which seals the grant payload.
pub type DataKey = SymmetricKey;

/// Derives the key that wraps a handle's data key from the AuthID secret.
///
/// HKDF-SHA256 with the handle's random salt, and the keyid bound into `info`
/// so a secret can never unlock a different handle's wrap.
pub fn derive_handle_key(secret: &AuthIdSecret, salt: &[u8; HANDLE_SALT_LEN], keyid: &KeyId) -> SymmetricKey {
    let mut info = Vec::with_capacity(32);
    info.extend_from_slice(b"latchkey/v1/handle-key/");
    info.extend_from_slice(keyid.as_bytes());
    hkdf_expand(salt, secret.expose_secret(), &info)
}

/// Derives a key from a secret that a client holds (a hand-off token), with a
/// purpose label so the same secret yields unrelated keys for unrelated uses.
pub fn derive_token_key(token: &[u8], purpose: &str) -> SymmetricKey {
    let mut info = Vec::with_capacity(32);
    info.extend_from_slice(b"latchkey/v1/token-key/");
    info.extend_from_slice(purpose.as_bytes());
    hkdf_expand(b"latchkey token key", token, &info)
}

pub(crate) fn hkdf_expand(salt: &[u8], ikm: &[u8], info: &[u8]) -> SymmetricKey {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut okm = SymmetricKey([0; KEY_LEN]);
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
    #[allow(clippy::expect_used)]
    hk.expand(info, &mut okm.0).expect("32-byte HKDF output is always valid");
    okm
}

/// The name of a master key: 1–32 characters of `A-Z a-z 0-9 - _ .`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MasterKeyId(String);

impl MasterKeyId {
    /// Validates a master key id.
    pub fn new(id: &str) -> Result<Self, KeyError> {
        let ok = !id.is_empty()
            && id.len() <= MAX_MASTER_KEY_ID_LEN
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok { Ok(MasterKeyId(id.to_owned())) } else { Err(KeyError::BadKeyId) }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MasterKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MasterKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKeyId({})", self.0)
    }
}

/// Keys for the broker's short-lived records (login transactions, hand-offs,
/// device codes), derived with HKDF from the current master key.
///
/// * `lookup` turns a client-held value (a `state`, a hand-off token, a user
///   code) into its store key with HMAC-SHA256, so a store dump yields no
///   value to try, and a user code (34 bits) cannot be brute-forced offline.
/// * `tag` authenticates a record's routing fields (which hand-off a login
///   feeds, which key a hand-off seals to, which browser a login belongs to),
///   so a database writer without the master key cannot redirect an AuthID.
///
/// Both come from the current master key only: a restart with a new current
/// key ends the logins in flight (they live ten minutes), which is the price
/// of not trying every key on every lookup.
#[derive(Clone)]
pub struct RecordKeys {
    lookup: KeyedMac,
    tag: KeyedMac,
}

impl RecordKeys {
    /// The keys derived from `master`.
    pub fn derive(master: &MasterKey) -> Self {
        let salt = b"latchkey/v1/record-keys";
        RecordKeys {
            lookup: KeyedMac::new(&hkdf_expand(salt, master.key.expose_secret(), b"latchkey/v1/lookup")),
            tag: KeyedMac::new(&hkdf_expand(salt, master.key.expose_secret(), b"latchkey/v1/record-tag")),
        }
    }

    /// HMAC-SHA256 of `value` under the lookup key, separated by `domain`.
    pub fn lookup(&self, domain: &[u8], value: &[u8]) -> [u8; 32] {
        self.lookup.of(&[domain, &[0], value])
    }

    /// HMAC-SHA256 of a record's stored bytes under the tag key.
    pub fn tag(&self, kind: u8, body: &[u8]) -> [u8; 32] {
        self.tag.of(&[b"latchkey/v1/record-tag", &[kind], body])
    }
}

impl fmt::Debug for RecordKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecordKeys(<redacted>)")
    }
}

/// HMAC-SHA256 under one key, its inner and outer key blocks hashed once:
/// each use compresses only the message and the outer hash — two SHA-256
/// blocks for a short message instead of four. The cache key of every
/// request is one (`TokenCache::key_for`). The hashed key blocks are as
/// secret as the key; like the key, they are never printed.
#[derive(Clone)]
pub(crate) struct KeyedMac(hmac::Hmac<Sha256>);

impl KeyedMac {
    pub(crate) fn new(key: &SymmetricKey) -> Self {
        use hmac::Mac;
        // HMAC takes keys of any length; 32 bytes never fails.
        #[allow(clippy::expect_used)]
        KeyedMac(hmac::Hmac::<Sha256>::new_from_slice(key.expose_secret()).expect("HMAC accepts any key length"))
    }

    /// The HMAC of `parts`, one after another.
    pub(crate) fn of(&self, parts: &[&[u8]]) -> [u8; 32] {
        use hmac::Mac;
        let mut m = self.0.clone();
        for part in parts {
            m.update(part);
        }
        m.finalize().into_bytes().into()
    }
}

impl fmt::Debug for KeyedMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyedMac(<redacted>)")
    }
}

/// One master key with its id.
#[derive(Clone)]
pub struct MasterKey {
    id: MasterKeyId,
    key: SymmetricKey,
}

impl MasterKey {
    /// A master key from its parts.
    pub fn new(id: MasterKeyId, key: SymmetricKey) -> Self {
        MasterKey { id, key }
    }

    /// A fresh random master key.
    pub fn generate(id: MasterKeyId, rng: &dyn Random) -> Self {
        MasterKey::new(id, SymmetricKey::generate(rng))
    }

    /// Parses the configuration form `<id>:<base64 of 32 bytes>`.
    ///
    /// Standard and URL-safe base64, padded or not, are accepted, since
    /// operators produce keys with whatever tool is at hand.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let (id, b64) = text.trim().split_once(':').ok_or(KeyError::MissingSeparator)?;
        let id = MasterKeyId::new(id)?;
        let decoded = [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(b64.trim()).ok())
            .map(Zeroizing::new)
            .ok_or(KeyError::BadEncoding)?;
        let bytes: [u8; KEY_LEN] = decoded.as_slice().try_into().map_err(|_| KeyError::WrongLength)?;
        Ok(MasterKey::new(id, SymmetricKey(bytes)))
    }

    /// Derives a master key from an operator's passphrase with Argon2id.
    pub fn derive_from_passphrase(
        id: MasterKeyId,
        passphrase: &[u8],
        params: &PassphraseParams,
    ) -> Result<Self, KeyError> {
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(params.m_kib, params.t, params.p, Some(KEY_LEN))
                .map_err(|_| KeyError::BadPassphraseParams)?,
        );
        let mut key = SymmetricKey([0; KEY_LEN]);
        argon.hash_password_into(passphrase, &params.salt, &mut key.0).map_err(|_| KeyError::BadPassphraseParams)?;
        Ok(MasterKey::new(id, key))
    }

    /// The configuration form `<id>:<base64>`, for writing a generated key to
    /// a file the operator keeps.
    pub fn expose_config_text(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(format!("{}:", self.id));
        STANDARD.encode_string(self.key.0, &mut text);
        text
    }

    /// The key's id.
    pub fn id(&self) -> &MasterKeyId {
        &self.id
    }

    pub(crate) fn key(&self) -> &SymmetricKey {
        &self.key
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({}, <redacted>)", self.id)
    }
}

/// Argon2id parameters and salt for a passphrase-derived master key.
///
/// They are recorded (as [`PassphraseParams::to_text`]) beside the data so the
/// same passphrase yields the same key on every start.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PassphraseParams {
    /// Memory cost in KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Lanes.
    pub p: u32,
    /// Random salt.
    pub salt: [u8; 16],
}

impl PassphraseParams {
    /// OWASP's Argon2id minimum: m = 19 MiB, t = 2, p = 1, with a fresh salt.
    pub fn generate(rng: &dyn Random) -> Self {
        PassphraseParams { m_kib: 19 * 1024, t: 2, p: 1, salt: array(rng) }
    }

    /// Text form: `argon2id$v=19$m=19456,t=2,p=1$<base64 salt>`.
    pub fn to_text(&self) -> String {
        format!("argon2id$v=19$m={},t={},p={}${}", self.m_kib, self.t, self.p, STANDARD_NO_PAD.encode(self.salt))
    }

    /// Parses [`PassphraseParams::to_text`]'s form.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let bad = KeyError::BadPassphraseParams;
        let mut parts = text.trim().split('$');
        if parts.next() != Some("argon2id") || parts.next() != Some("v=19") {
            return Err(bad);
        }
        let costs = parts.next().ok_or(bad)?;
        let salt = parts.next().ok_or(bad)?;
        if parts.next().is_some() {
            return Err(bad);
        }
        let mut values = BTreeMap::new();
        for kv in costs.split(',') {
            let (k, v) = kv.split_once('=').ok_or(bad)?;
            let v: u32 = v.parse().map_err(|_| bad)?;
            if values.insert(k, v).is_some() {
                return Err(bad);
            }
        }
        let (Some(&m_kib), Some(&t), Some(&p), 3) = (values.get("m"), values.get("t"), values.get("p"), values.len())
        else {
            return Err(bad);
        };
        let salt: [u8; 16] = STANDARD_NO_PAD.decode(salt).ok().and_then(|s| s.try_into().ok()).ok_or(bad)?;
        // Reject what Argon2 itself would reject, before anyone waits on it.
        argon2::Params::new(m_kib, t, p, Some(KEY_LEN)).map_err(|_| bad)?;
        Ok(PassphraseParams { m_kib, t, p, salt })
    }
}

/// The master keys the broker knows; one of them is current.
///
/// New seals use the current key; opening looks the key up by the id recorded
/// in the sealed blob's header, so old blobs open until they are re-sealed.
#[derive(Clone)]
pub struct MasterKeyring {
    current: MasterKeyId,
    keys: BTreeMap<MasterKeyId, MasterKey>,
}

impl MasterKeyring {
    /// A keyring of one key, which is current.
    pub fn single(key: MasterKey) -> Self {
        let current = key.id.clone();
        MasterKeyring { current, keys: BTreeMap::from([(key.id.clone(), key)]) }
    }

    /// A keyring whose first key is current (the configuration's order).
    pub fn new(keys: Vec<MasterKey>) -> Result<Self, KeyError> {
        let mut iter = keys.into_iter();
        let first = iter.next().ok_or(KeyError::EmptyKeyring)?;
        let mut ring = MasterKeyring::single(first);
        for key in iter {
            if ring.keys.contains_key(&key.id) {
                return Err(KeyError::DuplicateKeyId);
            }
            ring.keys.insert(key.id.clone(), key);
        }
        Ok(ring)
    }

    /// Parses the configuration's list of `<id>:<base64>` entries.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, KeyError> {
        let keys = entries.iter().map(|e| MasterKey::parse(e.as_ref())).collect::<Result<_, _>>()?;
        MasterKeyring::new(keys)
    }

    /// The key new seals use.
    pub fn current(&self) -> &MasterKey {
        // `current` is always a member: every constructor inserts it.
        &self.keys[&self.current]
    }

    /// A key by id, for opening.
    pub fn get(&self, id: &MasterKeyId) -> Option<&MasterKey> {
        self.keys.get(id)
    }

    /// The record keys of the current master key.
    pub fn record_keys(&self) -> RecordKeys {
        RecordKeys::derive(self.current())
    }

    /// Every key id, current first.
    pub fn ids(&self) -> Vec<&MasterKeyId> {
        let mut ids = vec![&self.current];
        ids.extend(self.keys.keys().filter(|id| **id != self.current));
        ids
    }
}

impl fmt::Debug for MasterKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKeyring").field("current", &self.current).field("ids", &self.ids()).finish()
    }
}

/// Why a key or keyring could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The entry has no `:` between id and key.
    #[error("a master key must be written as <id>:<base64 of 32 bytes>")]
    MissingSeparator,
    /// The id has characters outside the allowed set or is too long.
    #[error("a master key id must be 1-32 characters of A-Z, a-z, 0-9, '-', '_' or '.'")]
    BadKeyId,
    /// The key is not base64.
    #[error("the master key is not valid base64")]
    BadEncoding,
    /// The key does not decode to 32 bytes.
    #[error("a master key must be exactly 32 bytes (44 base64 characters)")]
    WrongLength,
    /// No keys were configured.
    #[error("no master key is configured")]
    EmptyKeyring,
    /// Two keys share an id.
    #[error("two master keys share one id")]
    DuplicateKeyId,
    /// The recorded Argon2id parameters are unreadable or out of range.
    #[error("the recorded passphrase parameters are malformed or out of range")]
    BadPassphraseParams,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SeqRandom;

    #[test]
    fn a_keyed_mac_is_hmac_sha256_every_time_it_is_used() {
        // Python: hmac.new(b"\x0b" * 32, b"Hi There", hashlib.sha256).hexdigest()
        let expected = "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7";
        let mac = KeyedMac::new(&SymmetricKey::from_bytes([0x0b; KEY_LEN]));
        let hex = |bytes: [u8; 32]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        // The parts are one message; a use leaves nothing behind for the next.
        assert_eq!(hex(mac.of(&[b"Hi There"])), expected);
        assert_eq!(hex(mac.of(&[b"Hi ", b"There"])), expected);
        assert_ne!(hex(mac.of(&[b"Hi There!"])), expected);
        assert_eq!(hex(mac.of(&[b"Hi There"])), expected);
        assert_eq!(format!("{mac:?}"), "KeyedMac(<redacted>)");
    }

    #[test]
    fn master_key_config_text_round_trips_in_every_base64_flavour() {
        let key = MasterKey::generate(MasterKeyId::new("k1").unwrap(), &SeqRandom::new(9));
        let text = key.expose_config_text();
        let parsed = MasterKey::parse(&text).unwrap();
        assert_eq!(parsed.key().expose_secret(), key.key().expose_secret());
        let b64 = text.split_once(':').unwrap().1;
        let raw = STANDARD.decode(b64).unwrap();
        for engine in [&STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            let alt = format!(" k1:{} ", engine.encode(&raw));
            assert_eq!(MasterKey::parse(&alt).unwrap().key().expose_secret(), key.key().expose_secret());
        }
    }

    #[test]
    fn master_key_parse_errors_are_specific() {
        let cases = [
            ("nokey", KeyError::MissingSeparator),
            (":AAAA", KeyError::BadKeyId),
            ("bad id:AAAA", KeyError::BadKeyId),
            ("k1:!!!!", KeyError::BadEncoding),
            ("k1:AAAA", KeyError::WrongLength),
        ];
        for (input, want) in cases {
            assert_eq!(MasterKey::parse(input).unwrap_err(), want, "{input}");
        }
        assert_eq!(MasterKeyring::parse::<&str>(&[]).unwrap_err(), KeyError::EmptyKeyring);
        let k = MasterKey::generate(MasterKeyId::new("a").unwrap(), &SeqRandom::new(1));
        let text = k.expose_config_text();
        assert_eq!(MasterKeyring::parse(&[text.as_str(), text.as_str()]).unwrap_err(), KeyError::DuplicateKeyId);
    }

    #[test]
    fn keyring_first_entry_is_current() {
        let rng = SeqRandom::new(5);
        let a = MasterKey::generate(MasterKeyId::new("new").unwrap(), &rng);
        let b = MasterKey::generate(MasterKeyId::new("old").unwrap(), &rng);
        let ring = MasterKeyring::new(vec![a, b]).unwrap();
        assert_eq!(ring.current().id().as_str(), "new");
        assert!(ring.get(&MasterKeyId::new("old").unwrap()).is_some());
        assert_eq!(ring.ids().iter().map(|i| i.as_str()).collect::<Vec<_>>(), ["new", "old"]);
    }

    #[test]
    fn passphrase_derivation_is_repeatable_from_recorded_params() {
        let params = PassphraseParams::generate(&SeqRandom::new(11));
        assert_eq!((params.m_kib, params.t, params.p), (19 * 1024, 2, 1));
        let id = MasterKeyId::new("pass").unwrap();
        let a = MasterKey::derive_from_passphrase(id.clone(), b"correct horse", &params).unwrap();
        let reparsed = PassphraseParams::parse(&params.to_text()).unwrap();
        assert_eq!(reparsed, params);
        let b = MasterKey::derive_from_passphrase(id.clone(), b"correct horse", &reparsed).unwrap();
        assert_eq!(a.key().expose_secret(), b.key().expose_secret());
        let c = MasterKey::derive_from_passphrase(id, b"correct horsf", &reparsed).unwrap();
        assert_ne!(a.key().expose_secret(), c.key().expose_secret());
    }

    #[test]
    fn passphrase_params_parse_rejects_garbage() {
        for bad in [
            "",
            "argon2i$v=19$m=19456,t=2,p=1$AAAAAAAAAAAAAAAAAAAAAA",
            "argon2id$v=19$m=19456,t=2$AAAAAAAAAAAAAAAAAAAAAA",
            "argon2id$v=19$m=19456,t=2,p=1,p=1$AAAAAAAAAAAAAAAAAAAAAA",
            "argon2id$v=19$m=1,t=2,p=1$AAAAAAAAAAAAAAAAAAAAAA",
            "argon2id$v=19$m=19456,t=2,p=1$short",
            "argon2id$v=19$m=19456,t=2,p=1$AAAAAAAAAAAAAAAAAAAAAA$extra",
        ] {
            assert_eq!(PassphraseParams::parse(bad).unwrap_err(), KeyError::BadPassphraseParams, "{bad}");
        }
    }

    #[test]
    fn handle_key_depends_on_secret_salt_and_keyid() {
        let rng = SeqRandom::new(3);
        let secret = AuthIdSecret::from_bytes(array(&rng));
        let other_secret = AuthIdSecret::from_bytes(array(&rng));
        let salt = array(&rng);
        let other_salt = array(&rng);
        let keyid = KeyId::generate(&rng);
        let other_keyid = KeyId::generate(&rng);
        let base = derive_handle_key(&secret, &salt, &keyid);
        assert_eq!(base.expose_secret(), derive_handle_key(&secret, &salt, &keyid).expose_secret());
        for other in [
            derive_handle_key(&other_secret, &salt, &keyid),
            derive_handle_key(&secret, &other_salt, &keyid),
            derive_handle_key(&secret, &salt, &other_keyid),
        ] {
            assert_ne!(base.expose_secret(), other.expose_secret());
        }
    }
}
