//! The records the broker stores, and their explicit, versioned stored form.
//!
//! Each record encodes as `[kind: u8][format version: u8][fields…]` with the
//! `codec` primitives. Only what the store needs for lookups
//! and maintenance is clear (ids, service, state, timestamps); tokens, keys,
//! labels, verifiers and AuthIDs are [`SealedBlob`]s bound to their record.
//! The store-managed `version` is not part of the encoding.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::authid::{AuthId, AuthIdSecret, KeyId};
use crate::codec::{DecodeError, Reader, Writer};
use crate::envelope::{self, Field, OpenError, SealContext, SealedBlob};
use crate::keys::{
    DataKey, HANDLE_SALT_LEN, KEY_LEN, MasterKeyring, RecordKeys, SymmetricKey, derive_handle_key, derive_token_key,
};
use crate::random::{Random, array};
use crate::time::Timestamp;

/// The kinds of record; the code is the first byte of every stored record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// [`Grant`]
    Grant = 1,
    /// [`Handle`]
    Handle = 2,
    /// [`LoginTransaction`]
    LoginTransaction = 3,
    /// [`Handoff`]
    Handoff = 4,
    /// [`Lease`]
    Lease = 5,
    /// [`DeviceGrant`]
    DeviceGrant = 6,
}

impl RecordKind {
    /// Every kind, in code order.
    pub const ALL: [RecordKind; 6] = [
        RecordKind::Grant,
        RecordKind::Handle,
        RecordKind::LoginTransaction,
        RecordKind::Handoff,
        RecordKind::Lease,
        RecordKind::DeviceGrant,
    ];

    /// The kind for a stored code.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u8 == code)
    }

    /// A short lowercase name, for table names and logs.
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Grant => "grant",
            RecordKind::Handle => "handle",
            RecordKind::LoginTransaction => "login",
            RecordKind::Handoff => "handoff",
            RecordKind::Lease => "lease",
            RecordKind::DeviceGrant => "device",
        }
    }
}

/// Why a record could not be read from its stored form or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The stored bytes do not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A sealed field does not open.
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// A record the store keeps: knows its kind, its key, and its stored form.
pub trait Record: Sized + Send + Sync {
    /// The record kind.
    const KIND: RecordKind;
    /// Stored format version written by this build.
    const FORMAT: u8;
    /// The store key.
    fn key(&self) -> Vec<u8>;
    /// The secondary key the store lists by, if any (a handle's grant id).
    fn group(&self) -> Option<Vec<u8>> {
        None
    }
    /// The store-managed version (0 for a record never stored).
    fn version(&self) -> u64;
    /// Sets the version after a read or write.
    fn set_version(&mut self, version: u64);
    /// The stored form.
    fn encode(&self) -> Vec<u8>;
    /// Reads the stored form; `version` comes from the store.
    fn decode(bytes: &[u8], version: u64) -> Result<Self, DecodeError>;
}

/// The part of a [`Record`] impl every record writes the same way: its store
/// key, and the store-managed `version` field.
macro_rules! record_basics {
    ($self:ident => $key:expr) => {
        fn key(&$self) -> Vec<u8> {
            $key
        }
        fn version(&self) -> u64 {
            self.version
        }
        fn set_version(&mut self, version: u64) {
            self.version = version;
        }
    };
}

macro_rules! byte_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; $len]);

        impl $name {
            /// From raw bytes.
            pub const fn from_bytes(bytes: [u8; $len]) -> Self {
                $name(bytes)
            }
            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
            /// A fresh random id.
            pub fn generate(rng: &dyn Random) -> Self {
                $name(array(rng))
            }
            /// Parses the base64url text form `Display` writes; `None` for
            /// anything else.
            pub fn parse(text: &str) -> Option<Self> {
                let bytes = URL_SAFE_NO_PAD.decode(text.trim()).ok()?;
                Some($name(bytes.try_into().ok()?))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }
    };
}

byte_id!(
    /// A grant's id: 128 random bits.
    GrantId, 16
);
byte_id!(
    /// A login transaction's store key: a keyed hash of its `state`, so a
    /// store dump does not reveal the states of logins in flight.
    LoginId, 32
);
byte_id!(
    /// A hand-off's store key: a keyed hash of the hand-off token.
    HandoffId, 32
);
byte_id!(
    /// A device grant's store key: a keyed hash of the normalised user code
    /// (keyed, so the code's 34 bits cannot be searched offline).
    UserCodeId, 32
);

impl UserCodeId {
    /// The store key for a user code as typed: case, spaces and dashes do not matter.
    pub fn for_user_code(keys: &RecordKeys, code: &str) -> Self {
        UserCodeId(keys.lookup(b"latchkey/v1/user-code", Self::normalize(code).as_bytes()))
    }

    /// A user code as typed, without case, spaces or dashes: `bcdf ghjk` → `BCDFGHJK`.
    pub fn normalize(code: &str) -> String {
        code.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_uppercase()).collect()
    }
}

impl LoginId {
    /// The store key for a `state` value.
    pub fn for_state(keys: &RecordKeys, state: &str) -> Self {
        LoginId(keys.lookup(b"latchkey/v1/login-state", state.as_bytes()))
    }
}

impl HandoffId {
    /// The store key for a hand-off token.
    pub fn for_token(keys: &RecordKeys, token: &str) -> Self {
        HandoffId(keys.lookup(b"latchkey/v1/handoff-token", token.as_bytes()))
    }
}

/// A record whose stored bytes carry a MAC under the [`RecordKeys`] tag key:
/// the routing fields of logins, hand-offs and device codes, which decide
/// where an AuthID goes. The tag is the last 32 bytes of the stored form.
pub trait Tagged: Record {
    /// The stored tag.
    fn tag(&self) -> &[u8; 32];
    /// The tag, to set.
    fn tag_mut(&mut self) -> &mut [u8; 32];

    /// Computes and sets the tag over the record's current fields.
    fn sign(&mut self, keys: &RecordKeys) {
        *self.tag_mut() = [0; 32];
        let bytes = self.encode();
        *self.tag_mut() = keys.tag(Self::KIND as u8, &bytes[..bytes.len() - 32]);
    }

    /// Whether the stored tag matches the fields (constant time).
    fn verify(&self, keys: &RecordKeys) -> bool {
        let bytes = self.encode();
        let expected = keys.tag(Self::KIND as u8, &bytes[..bytes.len() - 32]);
        subtle::ConstantTimeEq::ct_eq(&expected[..], &self.tag()[..]).into()
    }
}

/// The life state of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GrantState {
    /// Usable.
    Active = 1,
    /// The provider rejected the refresh token (`invalid_grant`); kept, never deleted.
    ReauthRequired = 2,
    /// Revoked by its user.
    Revoked = 3,
}

impl GrantState {
    fn from_code(code: u8) -> Result<Self, DecodeError> {
        match code {
            1 => Ok(GrantState::Active),
            2 => Ok(GrantState::ReauthRequired),
            3 => Ok(GrantState::Revoked),
            _ => Err(DecodeError::Invalid("grant state")),
        }
    }

    /// The name used in APIs and statistics.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantState::Active => "active",
            GrantState::ReauthRequired => "reauth_required",
            GrantState::Revoked => "revoked",
        }
    }
}

/// The outcome of one login: clear bookkeeping plus a sealed [`GrantPayload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Id.
    pub id: GrantId,
    /// Store-managed version.
    pub version: u64,
    /// Service id (e.g. `onedrivev2`).
    pub service: String,
    /// Life state.
    pub state: GrantState,
    /// When the login completed.
    pub created_at: Timestamp,
    /// Last change of this record.
    pub updated_at: Timestamp,
    /// Last token request served for it.
    pub last_used_at: Timestamp,
    /// The [`GrantPayload`], sealed under the grant's data key.
    pub payload: SealedBlob,
}

/// What a grant keeps secret: tokens, scopes, the provider's account id.
#[derive(Clone)]
pub struct GrantPayload {
    /// The provider's refresh token; `None` for providers whose access
    /// tokens never expire and who issue none (pCloud).
    pub refresh_token: Option<SecretString>,
    /// The last access token obtained.
    pub access_token: Option<SecretString>,
    /// When that access token expires (`None`: it never does).
    pub access_expires_at: Option<Timestamp>,
    /// When the refresh token was last used successfully (or obtained).
    pub refreshed_at: Timestamp,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Account id at the provider, where it reports one.
    pub account_id: Option<String>,
    /// Token type the provider reported (usually `Bearer`).
    pub token_type: Option<String>,
    /// Provider-specific values needed for later refreshes (e.g. pCloud's API host).
    pub extra: Vec<(String, String)>,
}

impl fmt::Debug for GrantPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrantPayload")
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "<redacted>"))
            .field("access_token", &self.access_token.as_ref().map(|_| "<redacted>"))
            .field("access_expires_at", &self.access_expires_at)
            .field("refreshed_at", &self.refreshed_at)
            .field("scopes", &self.scopes)
            .field("account_id", &self.account_id)
            .field("token_type", &self.token_type)
            .field("extra_keys", &self.extra.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .finish()
    }
}

const PAYLOAD_FORMAT: u8 = 1;
const PAYLOAD_KIND: u8 = 0x81;

impl GrantPayload {
    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::new(PAYLOAD_KIND, PAYLOAD_FORMAT);
        w.opt_bytes(self.refresh_token.as_ref().map(|t| t.expose_secret().as_bytes()))
            .opt_bytes(self.access_token.as_ref().map(|t| t.expose_secret().as_bytes()))
            .opt_time(self.access_expires_at)
            .time(self.refreshed_at)
            .strings(&self.scopes)
            .opt_bytes(self.account_id.as_deref().map(str::as_bytes))
            .opt_bytes(self.token_type.as_deref().map(str::as_bytes))
            .u64(self.extra.len() as u64);
        for (k, v) in &self.extra {
            w.str(k).str(v);
        }
        Zeroizing::new(w.finish())
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::open(bytes, PAYLOAD_KIND, PAYLOAD_FORMAT)?;
        let secret = |s: String| SecretString::from(s);
        let opt_string = |b: Option<&[u8]>, field| {
            b.map(|b| std::str::from_utf8(b).map(str::to_owned).map_err(|_| DecodeError::Invalid(field))).transpose()
        };
        let payload = GrantPayload {
            refresh_token: opt_string(r.opt_bytes("refresh token")?, "refresh token")?.map(secret),
            access_token: opt_string(r.opt_bytes("access token")?, "access token")?.map(secret),
            access_expires_at: r.opt_time("access expiry")?,
            refreshed_at: r.time()?,
            scopes: r.strings("scopes")?,
            account_id: opt_string(r.opt_bytes("account id")?, "account id")?,
            token_type: opt_string(r.opt_bytes("token type")?, "token type")?,
            extra: {
                let n = r.u64()?;
                let mut extra = Vec::new();
                for _ in 0..n {
                    extra.push((r.string("extra key")?, r.string("extra value")?));
                }
                extra
            },
        };
        r.finish()?;
        Ok(payload)
    }
}

impl Grant {
    fn payload_context(id: &GrantId) -> [&[u8]; 1] {
        [id.as_bytes()]
    }

    /// A new active grant whose payload is sealed under `data_key`.
    pub fn new(
        id: GrantId,
        service: &str,
        payload: &GrantPayload,
        data_key: &DataKey,
        now: Timestamp,
        rng: &dyn Random,
    ) -> Self {
        let mut grant = Grant {
            id,
            version: 0,
            service: service.to_owned(),
            state: GrantState::Active,
            created_at: now,
            updated_at: now,
            last_used_at: now,
            payload: SealedBlob::from_bytes(Vec::new()),
        };
        grant.seal_payload(payload, data_key, now, rng);
        grant
    }

    /// Opens the payload with the grant's data key.
    pub fn open_payload(&self, data_key: &DataKey) -> Result<GrantPayload, RecordError> {
        let ids = Self::payload_context(&self.id);
        let plain = envelope::open(data_key, &self.payload_ctx(&ids), &self.payload)?;
        Ok(GrantPayload::decode(&plain)?)
    }

    /// Replaces the payload (e.g. after a refresh).
    pub fn seal_payload(&mut self, payload: &GrantPayload, data_key: &DataKey, now: Timestamp, rng: &dyn Random) {
        let ids = Self::payload_context(&self.id);
        self.payload = envelope::seal(data_key, &self.payload_ctx(&ids), &payload.encode(), rng);
        self.updated_at = now;
    }

    fn payload_ctx<'a>(&self, ids: &'a [&'a [u8]]) -> SealContext<'a> {
        SealContext { kind: RecordKind::Grant, field: Field::GrantPayload, format: Self::FORMAT, ids }
    }
}

impl Record for Grant {
    const KIND: RecordKind = RecordKind::Grant;
    const FORMAT: u8 = 1;

    record_basics!(self => self.id.0.to_vec());

    fn encode(&self) -> Vec<u8> {
        Writer::new(Self::KIND as u8, Self::FORMAT)
            .bytes(&self.id.0)
            .str(&self.service)
            .u8(self.state as u8)
            .time(self.created_at)
            .time(self.updated_at)
            .time(self.last_used_at)
            .blob(&self.payload)
            .finish()
    }

    fn decode(bytes: &[u8], version: u64) -> Result<Self, DecodeError> {
        let mut r = Reader::open(bytes, Self::KIND as u8, Self::FORMAT)?;
        let grant = Grant {
            id: GrantId(r.array("grant id")?),
            version,
            service: r.string("service")?,
            state: GrantState::from_code(r.u8()?)?,
            created_at: r.time()?,
            updated_at: r.time()?,
            last_used_at: r.time()?,
            payload: r.blob()?,
        };
        r.finish()?;
        Ok(grant)
    }
}

/// One AuthID's record: the grant's data key, wrapped twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    /// The AuthID's keyid (the store key).
    pub keyid: KeyId,
    /// Store-managed version.
    pub version: u64,
    /// The grant this handle opens.
    pub grant_id: GrantId,
    /// HKDF salt for the handle key.
    pub salt: [u8; HANDLE_SALT_LEN],
    /// The data key sealed under the handle key, then under a master key.
    pub wrapped_data_key: SealedBlob,
    /// The label, sealed under the grant's data key.
    pub label: SealedBlob,
    /// When minted.
    pub created_at: Timestamp,
    /// Last token request made with it.
    pub last_used_at: Timestamp,
    /// When revoked, if it is.
    pub revoked_at: Option<Timestamp>,
}

impl Handle {
    /// A handle for `authid` that unlocks `data_key`, wrapped under the
    /// AuthID-derived handle key and then the current master key.
    pub fn new(
        authid: &AuthId,
        grant_id: GrantId,
        data_key: &DataKey,
        label: &str,
        ring: &MasterKeyring,
        now: Timestamp,
        rng: &dyn Random,
    ) -> Self {
        let keyid = authid.keyid();
        let salt = array(rng);
        let ids: [&[u8]; 2] = [keyid.as_bytes(), grant_id.as_bytes()];
        let handle_key = derive_handle_key(authid.secret(), &salt, &keyid);
        let inner = envelope::seal(&handle_key, &Self::ctx(Field::WrappedDataKey, &ids), data_key.expose_secret(), rng);
        let outer = ring.seal(&Self::ctx(Field::MasterSealedWrap, &ids), inner.as_bytes(), rng);
        let label = envelope::seal(data_key, &Self::ctx(Field::HandleLabel, &ids), label.as_bytes(), rng);
        Handle {
            keyid,
            version: 0,
            grant_id,
            salt,
            wrapped_data_key: outer,
            label,
            created_at: now,
            last_used_at: now,
            revoked_at: None,
        }
    }

    fn ctx<'a>(field: Field, ids: &'a [&'a [u8]]) -> SealContext<'a> {
        SealContext { kind: RecordKind::Handle, field, format: Self::FORMAT, ids }
    }

    /// Unwraps the grant's data key: needs both the master keyring and the
    /// AuthID's secret. A wrong secret yields [`OpenError::Authentication`].
    pub fn unwrap_data_key(&self, secret: &AuthIdSecret, ring: &MasterKeyring) -> Result<DataKey, OpenError> {
        let ids: [&[u8]; 2] = [self.keyid.as_bytes(), self.grant_id.as_bytes()];
        let inner = ring.open(&Self::ctx(Field::MasterSealedWrap, &ids), &self.wrapped_data_key)?;
        let inner = SealedBlob::from_bytes(inner.to_vec());
        let handle_key = derive_handle_key(secret, &self.salt, &self.keyid);
        let dek = envelope::open(&handle_key, &Self::ctx(Field::WrappedDataKey, &ids), &inner)?;
        let bytes: [u8; KEY_LEN] = dek.as_slice().try_into().map_err(|_| OpenError::Malformed)?;
        Ok(SymmetricKey::from_bytes(bytes))
    }

    /// Re-seals the outer layer under the ring's current master key. Needs no
    /// AuthID. Answers whether anything changed.
    pub fn reseal(&mut self, ring: &MasterKeyring, rng: &dyn Random) -> Result<bool, OpenError> {
        let ids: [&[u8]; 2] = [self.keyid.as_bytes(), self.grant_id.as_bytes()];
        match ring.reseal(&Self::ctx(Field::MasterSealedWrap, &ids), &self.wrapped_data_key, rng)? {
            None => Ok(false),
            Some(blob) => {
                self.wrapped_data_key = blob;
                Ok(true)
            }
        }
    }

    /// Opens the label with the grant's data key.
    pub fn open_label(&self, data_key: &DataKey) -> Result<String, RecordError> {
        let ids: [&[u8]; 2] = [self.keyid.as_bytes(), self.grant_id.as_bytes()];
        let plain = envelope::open(data_key, &Self::ctx(Field::HandleLabel, &ids), &self.label)?;
        String::from_utf8(plain.to_vec()).map_err(|_| RecordError::Decode(DecodeError::Invalid("label")))
    }
}

impl Record for Handle {
    const KIND: RecordKind = RecordKind::Handle;
    const FORMAT: u8 = 1;

    record_basics!(self => self.keyid.as_bytes().to_vec());

    fn group(&self) -> Option<Vec<u8>> {
        Some(self.grant_id.0.to_vec())
    }

    fn encode(&self) -> Vec<u8> {
        Writer::new(Self::KIND as u8, Self::FORMAT)
            .bytes(self.keyid.as_bytes())
            .bytes(&self.grant_id.0)
            .bytes(&self.salt)
            .blob(&self.wrapped_data_key)
            .blob(&self.label)
            .time(self.created_at)
            .time(self.last_used_at)
            .opt_time(self.revoked_at)
            .finish()
    }

    fn decode(bytes: &[u8], version: u64) -> Result<Self, DecodeError> {
        let mut r = Reader::open(bytes, Self::KIND as u8, Self::FORMAT)?;
        let handle = Handle {
            keyid: KeyId::from_bytes(r.array("keyid")?),
            version,
            grant_id: GrantId(r.array("grant id")?),
            salt: r.array("salt")?,
            wrapped_data_key: r.blob()?,
            label: r.blob()?,
            created_at: r.time()?,
            last_used_at: r.time()?,
            revoked_at: r.opt_time("revoked at")?,
        };
        r.finish()?;
        Ok(handle)
    }
}

/// The short-lived record behind a login's `state` parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginTransaction {
    /// SHA-256 of the state (the store key).
    pub id: LoginId,
    /// Store-managed version.
    pub version: u64,
    /// The service being logged into.
    pub service: String,
    /// The PKCE verifier, sealed under a master key (absent without PKCE).
    pub pkce_verifier: Option<SealedBlob>,
    /// The hand-off waiting for this login's AuthID, if any.
    pub handoff: Option<HandoffId>,
    /// A keyed hash of the cookie of the browser that began the login; the
    /// callback must come with the same cookie. `None`: not bound (a login
    /// begun by an embedding program rather than a browser).
    pub browser: Option<[u8; 32]>,
    /// The label the first AuthID gets (the device flow's program label).
    pub label: String,
    /// When the login began.
    pub created_at: Timestamp,
    /// When the state stops being accepted.
    pub expires_at: Timestamp,
    /// When the callback completed it; kept until expiry so the same
    /// browser proof cannot begin a second login.
    pub completed_at: Option<Timestamp>,
    /// MAC over the fields above ([`Tagged`]).
    pub tag: [u8; 32],
}

impl LoginTransaction {
    fn ctx<'a>(ids: &'a [&'a [u8]]) -> SealContext<'a> {
        SealContext { kind: RecordKind::LoginTransaction, field: Field::PkceVerifier, format: Self::FORMAT, ids }
    }

    /// Seals a PKCE verifier into this transaction.
    pub fn seal_verifier(&mut self, verifier: &SecretString, ring: &MasterKeyring, rng: &dyn Random) {
        let ids: [&[u8]; 1] = [&self.id.0];
        self.pkce_verifier = Some(ring.seal(&Self::ctx(&ids), verifier.expose_secret().as_bytes(), rng));
    }

    /// Re-seals the verifier under the ring's current master key; answers
    /// whether anything changed.
    pub fn reseal(&mut self, ring: &MasterKeyring, rng: &dyn Random) -> Result<bool, OpenError> {
        let Some(blob) = &self.pkce_verifier else { return Ok(false) };
        let ids: [&[u8]; 1] = [&self.id.0];
        match ring.reseal(&Self::ctx(&ids), blob, rng)? {
            None => Ok(false),
            Some(blob) => {
                self.pkce_verifier = Some(blob);
                Ok(true)
            }
        }
    }

    /// Opens the PKCE verifier, if the transaction has one.
    pub fn open_verifier(&self, ring: &MasterKeyring) -> Result<Option<SecretString>, RecordError> {
        let Some(blob) = &self.pkce_verifier else { return Ok(None) };
        let ids: [&[u8]; 1] = [&self.id.0];
        let plain = ring.open(&Self::ctx(&ids), blob)?;
        let text = std::str::from_utf8(&plain).map_err(|_| DecodeError::Invalid("pkce verifier"))?;
        Ok(Some(SecretString::from(text.to_owned())))
    }
}

impl Record for LoginTransaction {
    const KIND: RecordKind = RecordKind::LoginTransaction;
    const FORMAT: u8 = 2;

    record_basics!(self => self.id.0.to_vec());

    fn encode(&self) -> Vec<u8> {
        Writer::new(Self::KIND as u8, Self::FORMAT)
            .bytes(&self.id.0)
            .str(&self.service)
            .opt_blob(self.pkce_verifier.as_ref())
            .opt_bytes(self.handoff.as_ref().map(|h| &h.0[..]))
            .opt_bytes(self.browser.as_ref().map(|b| &b[..]))
            .str(&self.label)
            .time(self.created_at)
            .time(self.expires_at)
            .opt_time(self.completed_at)
            .bytes(&self.tag)
            .finish()
    }

    fn decode(bytes: &[u8], version: u64) -> Result<Self, DecodeError> {
        let (mut r, format) = Reader::open_any(bytes, Self::KIND as u8, 1..=Self::FORMAT)?;
        let id = LoginId(r.array("login id")?);
        let service = r.string("service")?;
        let pkce_verifier = r.opt_blob("pkce verifier")?;
        let handoff = r
            .opt_bytes("handoff")?
            .map(|b| b.try_into().map(HandoffId).map_err(|_| DecodeError::Invalid("handoff")))
            .transpose()?;
        // Format 1 (before logins were bound to browsers and tagged) still
        // decodes, so gc can remove it; its zero tag never verifies.
        let (browser, label) = if format >= 2 {
            let browser = r
                .opt_bytes("browser")?
                .map(|b| b.try_into().map_err(|_| DecodeError::Invalid("browser")))
                .transpose()?;
            (browser, r.string("label")?)
        } else {
            (None, String::new())
        };
        let created_at = r.time()?;
        let expires_at = r.time()?;
        let (completed_at, tag) =
            if format >= 2 { (r.opt_time("completed at")?, r.array("tag")?) } else { (None, [0; 32]) };
        r.finish()?;
        Ok(LoginTransaction {
            id,
            version,
            service,
            pkce_verifier,
            handoff,
            browser,
            label,
            created_at,
            expires_at,
            completed_at,
            tag,
        })
    }
}

impl Tagged for LoginTransaction {
    fn tag(&self) -> &[u8; 32] {
        &self.tag
    }
    fn tag_mut(&mut self) -> &mut [u8; 32] {
        &mut self.tag
    }
}

/// A one-time sealed delivery of a fresh AuthID to the holder of a hand-off
/// token (Duplicati's `/fetch?token=`, and the device flow's device code).
///
/// The AuthID is sealed to an X25519 public key derived from the token, so the
/// broker can seal it at login completion without knowing the token, and only
/// the token holder can open it. The store keeps the token's hash and that
/// public key, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    /// SHA-256 of the hand-off token (the store key).
    pub id: HandoffId,
    /// Store-managed version.
    pub version: u64,
    /// X25519 public key derived from the token; AuthIDs are sealed to it.
    pub recipient: [u8; 32],
    /// The sealed AuthID; `None` until the login completes, and again once delivered.
    pub authid: Option<SealedAuthId>,
    /// When the hand-off was requested.
    pub created_at: Timestamp,
    /// When it stops being deliverable.
    pub expires_at: Timestamp,
    /// When the AuthID was fetched; after that it is never released again.
    pub delivered_at: Option<Timestamp>,
    /// When the user refused the login at the provider.
    pub denied_at: Option<Timestamp>,
    /// MAC over the fields above ([`Tagged`]): binds the recipient key and
    /// the sealed AuthID to this hand-off.
    pub tag: [u8; 32],
}

/// An AuthID sealed to a hand-off's public key: the sender's ephemeral X25519
/// public key and the envelope under the agreed key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedAuthId {
    /// The ephemeral public key.
    pub ephemeral: [u8; 32],
    /// The AuthID text, sealed.
    pub blob: SealedBlob,
}

impl Handoff {
    const TOKEN_KEY_PURPOSE: &'static str = "handoff-x25519";

    /// A pending hand-off for `token`, deliverable until `expires_at`
    /// (untagged: [`Tagged::sign`] it before storing).
    pub fn new(keys: &RecordKeys, token: &str, now: Timestamp, expires_at: Timestamp) -> Self {
        let secret = Self::recipient_secret(token);
        Handoff {
            id: HandoffId::for_token(keys, token),
            version: 0,
            recipient: x25519_dalek::PublicKey::from(&secret).to_bytes(),
            authid: None,
            created_at: now,
            expires_at,
            delivered_at: None,
            denied_at: None,
            tag: [0; 32],
        }
    }

    fn recipient_secret(token: &str) -> x25519_dalek::StaticSecret {
        let key = derive_token_key(token.as_bytes(), Self::TOKEN_KEY_PURPOSE);
        x25519_dalek::StaticSecret::from(*key.expose_secret())
    }

    fn ctx<'a>(ids: &'a [&'a [u8]]) -> SealContext<'a> {
        SealContext { kind: RecordKind::Handoff, field: Field::HandoffAuthId, format: Self::FORMAT, ids }
    }

    fn agreed_key(shared: &x25519_dalek::SharedSecret, ephemeral: &[u8; 32], recipient: &[u8; 32]) -> SymmetricKey {
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(ephemeral);
        salt[32..].copy_from_slice(recipient);
        crate::keys::hkdf_expand(&salt, shared.as_bytes(), b"latchkey/v1/handoff-seal")
    }

    /// Seals `authid` to this hand-off's public key. Needs no token.
    pub fn seal_authid(&mut self, authid: &AuthId, rng: &dyn Random) {
        self.seal_text(&authid.expose_text(), rng);
    }

    /// Seals a credential's text (an AuthID, or a handed-out access token)
    /// to this hand-off's public key. Needs no token.
    pub fn seal_text(&mut self, text: &str, rng: &dyn Random) {
        let ephemeral = x25519_dalek::StaticSecret::from(array::<32>(rng));
        let ephemeral_public = x25519_dalek::PublicKey::from(&ephemeral).to_bytes();
        let shared = ephemeral.diffie_hellman(&x25519_dalek::PublicKey::from(self.recipient));
        let key = Self::agreed_key(&shared, &ephemeral_public, &self.recipient);
        let ids: [&[u8]; 1] = [&self.id.0];
        let blob = envelope::seal(&key, &Self::ctx(&ids), text.as_bytes(), rng);
        self.authid = Some(SealedAuthId { ephemeral: ephemeral_public, blob });
    }

    /// Opens the sealed text with the hand-off token; `None` while pending.
    pub fn open_text(&self, token: &str) -> Result<Option<Zeroizing<String>>, RecordError> {
        let Some(sealed) = &self.authid else { return Ok(None) };
        let shared = Self::recipient_secret(token).diffie_hellman(&x25519_dalek::PublicKey::from(sealed.ephemeral));
        let key = Self::agreed_key(&shared, &sealed.ephemeral, &self.recipient);
        let ids: [&[u8]; 1] = [&self.id.0];
        let plain = envelope::open(&key, &Self::ctx(&ids), &sealed.blob)?;
        let text = std::str::from_utf8(&plain).map_err(|_| DecodeError::Invalid("handoff authid"))?;
        Ok(Some(Zeroizing::new(text.to_owned())))
    }

    /// Opens the sealed AuthID with the hand-off token; `None` while pending.
    pub fn open_authid(&self, token: &str) -> Result<Option<AuthId>, RecordError> {
        let Some(text) = self.open_text(token)? else { return Ok(None) };
        AuthId::parse(&text).map(Some).map_err(|_| RecordError::Decode(DecodeError::Invalid("handoff authid")))
    }
}

impl Record for Handoff {
    const KIND: RecordKind = RecordKind::Handoff;
    const FORMAT: u8 = 2;

    record_basics!(self => self.id.0.to_vec());

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(Self::KIND as u8, Self::FORMAT);
        w.bytes(&self.id.0).bytes(&self.recipient);
        match &self.authid {
            None => w.u8(0),
            Some(sealed) => w.u8(1).bytes(&sealed.ephemeral).blob(&sealed.blob),
        };
        w.time(self.created_at)
            .time(self.expires_at)
            .opt_time(self.delivered_at)
            .opt_time(self.denied_at)
            .bytes(&self.tag)
            .finish()
    }

    fn decode(bytes: &[u8], version: u64) -> Result<Self, DecodeError> {
        let (mut r, format) = Reader::open_any(bytes, Self::KIND as u8, 1..=Self::FORMAT)?;
        let mut handoff = Handoff {
            id: HandoffId(r.array("handoff id")?),
            version,
            recipient: r.array("recipient")?,
            authid: match r.u8()? {
                0 => None,
                1 => Some(SealedAuthId { ephemeral: r.array("ephemeral key")?, blob: r.blob()? }),
                _ => return Err(DecodeError::Invalid("authid tag")),
            },
            created_at: r.time()?,
            expires_at: r.time()?,
            delivered_at: r.opt_time("delivered at")?,
            denied_at: r.opt_time("denied at")?,
            tag: [0; 32],
        };
        // Format 1 had no tag: it decodes (for gc) and never verifies.
        if format >= 2 {
            handoff.tag = r.array("tag")?;
        }
        r.finish()?;
        Ok(handoff)
    }
}

impl Tagged for Handoff {
    fn tag(&self) -> &[u8; 32] {
        &self.tag
    }
    fn tag_mut(&mut self) -> &mut [u8; 32] {
        &mut self.tag
    }
}

/// A device authorization waiting for its user: the user code typed on the
/// broker's `/device` page leads here, and from here to the hand-off the
/// polling device waits on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceGrant {
    /// SHA-256 of the normalised user code (the store key).
    pub id: UserCodeId,
    /// Store-managed version.
    pub version: u64,
    /// The service the device asked for.
    pub service: String,
    /// The hand-off keyed by the device code.
    pub handoff: HandoffId,
    /// The program's own name for itself, shown before the user continues
    /// (RFC 8628 §5.4) and given to the AuthID as its label.
    pub label: String,
    /// When the device asked.
    pub created_at: Timestamp,
    /// When the codes expire.
    pub expires_at: Timestamp,
    /// MAC over the fields above ([`Tagged`]).
    pub tag: [u8; 32],
}

impl Record for DeviceGrant {
    const KIND: RecordKind = RecordKind::DeviceGrant;
    const FORMAT: u8 = 2;

    record_basics!(self => self.id.0.to_vec());

    fn encode(&self) -> Vec<u8> {
        Writer::new(Self::KIND as u8, Self::FORMAT)
            .bytes(&self.id.0)
            .str(&self.service)
            .bytes(&self.handoff.0)
            .str(&self.label)
            .time(self.created_at)
            .time(self.expires_at)
            .bytes(&self.tag)
            .finish()
    }

    fn decode(bytes: &[u8], version: u64) -> Result<Self, DecodeError> {
        let (mut r, format) = Reader::open_any(bytes, Self::KIND as u8, 1..=Self::FORMAT)?;
        let id = UserCodeId(r.array("user code id")?);
        let service = r.string("service")?;
        let handoff = HandoffId(r.array("handoff id")?);
        // Format 1 had no label and no tag: it decodes (for gc) and never verifies.
        let label = if format >= 2 { r.string("label")? } else { String::new() };
        let created_at = r.time()?;
        let expires_at = r.time()?;
        let tag = if format >= 2 { r.array("tag")? } else { [0; 32] };
        r.finish()?;
        Ok(DeviceGrant { id, version, service, handoff, label, created_at, expires_at, tag })
    }
}

impl Tagged for DeviceGrant {
    fn tag(&self) -> &[u8; 32] {
        &self.tag
    }
    fn tag_mut(&mut self) -> &mut [u8; 32] {
        &mut self.tag
    }
}

/// Who is refreshing a grant, until when. Kept beside the grant under the
/// same id, so taking a lease never changes the grant's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The grant leased.
    pub grant_id: GrantId,
    /// Store-managed version.
    pub version: u64,
    /// The holder (an instance id).
    pub owner: String,
    /// When the lease lapses if not released.
    pub deadline: Timestamp,
}

impl Record for Lease {
    const KIND: RecordKind = RecordKind::Lease;
    const FORMAT: u8 = 1;

    record_basics!(self => self.grant_id.0.to_vec());

    fn encode(&self) -> Vec<u8> {
        Writer::new(Self::KIND as u8, Self::FORMAT)
            .bytes(&self.grant_id.0)
            .str(&self.owner)
            .time(self.deadline)
            .finish()
    }

    fn decode(bytes: &[u8], version: u64) -> Result<Self, DecodeError> {
        let mut r = Reader::open(bytes, Self::KIND as u8, Self::FORMAT)?;
        let lease =
            Lease { grant_id: GrantId(r.array("grant id")?), version, owner: r.string("owner")?, deadline: r.time()? };
        r.finish()?;
        Ok(lease)
    }
}
