//! Sealed blobs: AEAD ciphertext with an explicit, versioned header.
//!
//! Layout of a sealed blob (format version 1), written and parsed by hand:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | envelope format version (`1`) |
//! | 1 | algorithm (`1` = AES-256-GCM under a per-blob HKDF-SHA256 subkey) |
//! | 1 | length `L` of the master key id; `0` when not sealed under a master key |
//! | L | master key id (ASCII) |
//! | 24 | nonce |
//! | rest | ciphertext and 16-byte tag |
//!
//! The associated data is the header itself followed by a [`SealContext`]:
//! record kind, field, record format version and the record's id(s). A blob
//! copied into another record or field, or whose header was edited, fails to
//! open.
//!
//! **Nonce budget.** AES-GCM with random 96-bit nonces must stay well below
//! 2^32 encryptions per key. No AES key here comes near that: every blob gets
//! its own subkey, `HKDF-SHA256(key, info = label || nonce[0..12])`, and is
//! encrypted under it with `nonce[12..24]` (the construction of XAES-256-GCM).
//! A subkey therefore encrypts one message, and the long-lived keys (master
//! keys, data keys) are only ever used as HKDF input. Collisions would need
//! two blobs to draw the same 192 random bits.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use crate::keys::{MasterKeyId, MasterKeyring, SymmetricKey, hkdf_expand};
use crate::random::{Random, array};
use crate::records::RecordKind;

/// The envelope format this code writes.
pub const ENVELOPE_VERSION: u8 = 1;
/// AES-256-GCM under a per-blob HKDF-SHA256 subkey, 192-bit nonce.
pub const ALG_AES256GCM_HKDF: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const SUBKEY_LABEL: &[u8] = b"latchkey/v1/blob-subkey/";
const AAD_LABEL: &[u8] = b"latchkey/v1/aad/";

/// Which field of a record a blob belongs to; part of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Field {
    /// A grant's payload (tokens, scopes, account), under the data key.
    GrantPayload = 1,
    /// A handle's data key wrapped under the handle key (the inner layer).
    WrappedDataKey = 2,
    /// A handle's wrapped data key sealed under a master key (the outer layer).
    MasterSealedWrap = 3,
    /// A handle's label, under the data key.
    HandleLabel = 4,
    /// A login transaction's PKCE verifier, under a master key.
    PkceVerifier = 5,
    /// A hand-off's AuthID, under a key derived from the hand-off token.
    HandoffAuthId = 6,
    /// A revoke page's ticket for revoking a whole grant, under a master key.
    RevokeTicket = 7,
}

/// What a blob is bound to: it opens only with the same context it was sealed with.
#[derive(Debug, Clone, Copy)]
pub struct SealContext<'a> {
    /// The kind of record holding the blob.
    pub kind: RecordKind,
    /// The field of that record.
    pub field: Field,
    /// The record's stored format version.
    pub format: u8,
    /// The record's identifying values (e.g. keyid and grant id).
    pub ids: &'a [&'a [u8]],
}

impl SealContext<'_> {
    fn write_aad(&self, header: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(AAD_LABEL);
        out.extend_from_slice(header);
        out.extend_from_slice(&[self.kind as u8, self.field as u8, self.format]);
        out.push(u8::try_from(self.ids.len()).unwrap_or(u8::MAX));
        for id in self.ids {
            out.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_be_bytes());
            out.extend_from_slice(id);
        }
    }
}

/// An encrypted value with its header. Holds no secret in the clear.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedBlob(Vec<u8>);

impl SealedBlob {
    /// Wraps stored bytes; they are checked when opened (see [`SealedBlob::header`]).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        SealedBlob(bytes)
    }

    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Parses the header, without opening.
    pub fn header(&self) -> Result<Header<'_>, OpenError> {
        Header::parse(&self.0)
    }

    /// The master key this blob is sealed under, if any.
    pub fn master_key_id(&self) -> Result<Option<MasterKeyId>, OpenError> {
        let header = self.header()?;
        match header.master_key_id {
            None => Ok(None),
            Some(id) => MasterKeyId::new(id).map(Some).map_err(|_| OpenError::Malformed),
        }
    }
}

impl fmt::Debug for SealedBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealedBlob({} bytes)", self.0.len())
    }
}

/// A parsed blob header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// Envelope format version.
    pub version: u8,
    /// Algorithm id.
    pub algorithm: u8,
    /// Master key id, when sealed under a master key.
    pub master_key_id: Option<&'a str>,
    /// The nonce.
    pub nonce: &'a [u8; NONCE_LEN],
    /// Length of the header in bytes.
    pub len: usize,
}

impl<'a> Header<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, OpenError> {
        let [version, algorithm, id_len, rest @ ..] = bytes else {
            return Err(OpenError::Malformed);
        };
        if *version != ENVELOPE_VERSION {
            return Err(OpenError::UnsupportedVersion(*version));
        }
        if *algorithm != ALG_AES256GCM_HKDF {
            return Err(OpenError::UnsupportedAlgorithm(*algorithm));
        }
        let id_len = usize::from(*id_len);
        let id = rest.get(..id_len).ok_or(OpenError::Malformed)?;
        let nonce = rest.get(id_len..id_len + NONCE_LEN).ok_or(OpenError::Malformed)?;
        if rest.len() < id_len + NONCE_LEN + TAG_LEN {
            return Err(OpenError::Malformed);
        }
        let master_key_id = match id_len {
            0 => None,
            _ => Some(std::str::from_utf8(id).map_err(|_| OpenError::Malformed)?),
        };
        Ok(Header {
            version: *version,
            algorithm: *algorithm,
            master_key_id,
            nonce: nonce.try_into().map_err(|_| OpenError::Malformed)?,
            len: 3 + id_len + NONCE_LEN,
        })
    }
}

/// Why a blob did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Too short, or the header does not parse.
    #[error("sealed value is malformed")]
    Malformed,
    /// A format version this build does not know.
    #[error("sealed value has unsupported format version {0}")]
    UnsupportedVersion(u8),
    /// An algorithm this build does not know.
    #[error("sealed value uses unsupported algorithm {0}")]
    UnsupportedAlgorithm(u8),
    /// Sealed under a master key that is not in the keyring.
    #[error("sealed value needs master key '{0}', which is not configured")]
    UnknownMasterKey(String),
    /// Expected a master-key seal and found none, or the reverse.
    #[error("sealed value is not under the expected kind of key")]
    WrongKeyKind,
    /// Authentication failed: wrong key, tampered bytes, or a blob from another record.
    #[error("sealed value does not open: wrong key, altered, or moved from another record")]
    Authentication,
}

/// Seals `plaintext` under `key` (not a master key), bound to `ctx`.
pub fn seal(key: &SymmetricKey, ctx: &SealContext<'_>, plaintext: &[u8], rng: &dyn Random) -> SealedBlob {
    seal_raw(key, None, ctx, plaintext, rng)
}

/// Opens a blob sealed by [`seal`] with the same key and context.
pub fn open(key: &SymmetricKey, ctx: &SealContext<'_>, blob: &SealedBlob) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    let header = blob.header()?;
    if header.master_key_id.is_some() {
        return Err(OpenError::WrongKeyKind);
    }
    open_raw(key, &header, ctx, blob)
}

impl MasterKeyring {
    /// Seals `plaintext` under the current master key, recording its id.
    pub fn seal(&self, ctx: &SealContext<'_>, plaintext: &[u8], rng: &dyn Random) -> SealedBlob {
        let current = self.current();
        seal_raw(current.key(), Some(current.id()), ctx, plaintext, rng)
    }

    /// Opens a master-sealed blob with whichever key its header names.
    pub fn open(&self, ctx: &SealContext<'_>, blob: &SealedBlob) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let header = blob.header()?;
        let id = header.master_key_id.ok_or(OpenError::WrongKeyKind)?;
        let key = MasterKeyId::new(id)
            .ok()
            .and_then(|id| self.get(&id))
            .ok_or_else(|| OpenError::UnknownMasterKey(id.to_owned()))?;
        open_raw(key.key(), &header, ctx, blob)
    }

    /// Opens a master-sealed blob and seals it again under the current key.
    /// Answers `None` when it already is under the current key.
    pub fn reseal(
        &self,
        ctx: &SealContext<'_>,
        blob: &SealedBlob,
        rng: &dyn Random,
    ) -> Result<Option<SealedBlob>, OpenError> {
        let plain = self.open(ctx, blob)?;
        if blob.header()?.master_key_id == Some(self.current().id().as_str()) {
            return Ok(None);
        }
        Ok(Some(self.seal(ctx, &plain, rng)))
    }
}

fn subkey(key: &SymmetricKey, nonce: &[u8; NONCE_LEN]) -> SymmetricKey {
    let mut info = Vec::with_capacity(SUBKEY_LABEL.len() + 12);
    info.extend_from_slice(SUBKEY_LABEL);
    info.extend_from_slice(&nonce[..12]);
    hkdf_expand(b"", key.expose_secret(), &info)
}

fn seal_raw(
    key: &SymmetricKey,
    master_key_id: Option<&MasterKeyId>,
    ctx: &SealContext<'_>,
    plaintext: &[u8],
    rng: &dyn Random,
) -> SealedBlob {
    let nonce: [u8; NONCE_LEN] = array(rng);
    let id = master_key_id.map(|id| id.as_str().as_bytes()).unwrap_or_default();
    let mut out = Vec::with_capacity(3 + id.len() + NONCE_LEN + plaintext.len() + TAG_LEN);
    // MasterKeyId is at most 32 bytes, so the length always fits in a byte.
    out.extend_from_slice(&[ENVELOPE_VERSION, ALG_AES256GCM_HKDF, id.len() as u8]);
    out.extend_from_slice(id);
    out.extend_from_slice(&nonce);
    let mut aad = Vec::with_capacity(96);
    ctx.write_aad(&out, &mut aad);
    let cipher = Aes256Gcm::new(subkey(key, &nonce).expose_secret().into());
    // Encryption fails only for plaintexts beyond AES-GCM's 64 GiB limit.
    #[allow(clippy::expect_used)]
    let ciphertext = cipher
        .encrypt(Nonce::from_slice(&nonce[12..]), Payload { msg: plaintext, aad: &aad })
        .expect("plaintext within AES-GCM limits");
    out.extend_from_slice(&ciphertext);
    SealedBlob(out)
}

fn open_raw(
    key: &SymmetricKey,
    header: &Header<'_>,
    ctx: &SealContext<'_>,
    blob: &SealedBlob,
) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    let (head, ciphertext) = blob.0.split_at(header.len);
    let mut aad = Vec::with_capacity(96);
    ctx.write_aad(head, &mut aad);
    let cipher = Aes256Gcm::new(subkey(key, header.nonce).expose_secret().into());
    cipher
        .decrypt(Nonce::from_slice(&header.nonce[12..]), Payload { msg: ciphertext, aad: &aad })
        .map(Zeroizing::new)
        .map_err(|_| OpenError::Authentication)
}
