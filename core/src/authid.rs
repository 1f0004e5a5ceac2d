//! The AuthID: the credential a background client holds, `<keyid>:<secret>`.
//!
//! The keyid (128 random bits) names the handle record; the secret (256 random
//! bits) never reaches the store. Both travel as unpadded base64url, joined by
//! `:` because Duplicati treats a value without `:` as a raw access token.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::random::{Random, array};

/// Length of a keyid in bytes.
pub const KEYID_LEN: usize = 16;
/// Length of an AuthID secret in bytes.
pub const SECRET_LEN: usize = 32;
const KEYID_TEXT_LEN: usize = 22;
const SECRET_TEXT_LEN: usize = 43;
/// Anything longer than this is not an AuthID, whatever it contains.
const MAX_TEXT_LEN: usize = 256;

/// The public half of an AuthID: names one handle record. Not a secret.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId([u8; KEYID_LEN]);

impl KeyId {
    /// A keyid from its raw bytes.
    pub const fn from_bytes(bytes: [u8; KEYID_LEN]) -> Self {
        KeyId(bytes)
    }

    /// The raw bytes (the store's key for the handle).
    pub const fn as_bytes(&self) -> &[u8; KEYID_LEN] {
        &self.0
    }

    /// A fresh random keyid.
    pub fn generate(rng: &dyn Random) -> Self {
        KeyId(array(rng))
    }

    /// Parses the base64url text form of a keyid.
    pub fn parse(text: &str) -> Result<Self, AuthIdError> {
        decode_fixed::<KEYID_LEN>(text.trim(), KEYID_TEXT_LEN).map(KeyId).ok_or(AuthIdError::MalformedKeyId)
    }
}

impl KeyId {
    /// The keyid's base64url text, written on the stack: a request's log
    /// line names its keyid without allocating.
    pub fn text(&self) -> KeyIdText {
        KeyIdText(encode_fixed(&self.0))
    }
}

/// A keyid's text (22 base64url characters), from [`KeyId::text`].
#[derive(Clone, Copy)]
pub struct KeyIdText([u8; KEYID_TEXT_LEN]);

impl KeyIdText {
    /// The text's bytes (ASCII).
    pub fn as_bytes(&self) -> &[u8; KEYID_TEXT_LEN] {
        &self.0
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Every byte comes from the base64url alphabet, which is ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text().as_str())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// The secret half of an AuthID. Zeroized on drop; never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct AuthIdSecret([u8; SECRET_LEN]);

impl AuthIdSecret {
    /// A secret from raw bytes.
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        AuthIdSecret(bytes)
    }

    /// The raw secret bytes. The name says what the caller is doing.
    pub fn expose_secret(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }
}

impl PartialEq for AuthIdSecret {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for AuthIdSecret {}

impl fmt::Debug for AuthIdSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthIdSecret(<redacted>)")
    }
}

/// A whole AuthID: keyid and secret.
///
/// `Debug` and `Display` show only the keyid; the full text is available only
/// through [`AuthId::expose_text`].
#[derive(Clone, PartialEq, Eq)]
pub struct AuthId {
    keyid: KeyId,
    secret: AuthIdSecret,
}

impl AuthId {
    /// An AuthID from its parts.
    pub fn new(keyid: KeyId, secret: AuthIdSecret) -> Self {
        AuthId { keyid, secret }
    }

    /// A fresh AuthID: 128 random bits of keyid, 256 of secret.
    pub fn generate(rng: &dyn Random) -> Self {
        let keyid = KeyId::generate(rng);
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        rng.fill(secret.as_mut());
        AuthId::new(keyid, AuthIdSecret(*secret))
    }

    /// Parses an AuthID as a client sends it.
    ///
    /// Accepts surrounding whitespace and a URL-encoded separator (`%3A`),
    /// because both appear when users paste AuthIDs through web forms and
    /// command lines; everything else is rejected with a specific error.
    pub fn parse(text: &str) -> Result<Self, AuthIdError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(AuthIdError::Empty);
        }
        if text.len() > MAX_TEXT_LEN {
            return Err(AuthIdError::TooLong);
        }
        let (keyid, secret) = split_separator(text).ok_or(AuthIdError::MissingSeparator)?;
        if keyid.eq_ignore_ascii_case("v2") {
            return Err(AuthIdError::DuplicatiV2);
        }
        let Some(keyid) = decode_fixed::<KEYID_LEN>(keyid, KEYID_TEXT_LEN).map(KeyId) else {
            // Duplicati's hosted OAuth service issues `<hex keyid>:<secret>`;
            // ours are 22 base64url characters. Say where it came from.
            let hex = (16..=64).contains(&keyid.len()) && keyid.bytes().all(|b| b.is_ascii_hexdigit());
            return Err(if hex && !secret.is_empty() {
                AuthIdError::IssuedElsewhere
            } else {
                AuthIdError::MalformedKeyId
            });
        };
        let secret = decode_fixed::<SECRET_LEN>(secret, SECRET_TEXT_LEN)
            .map(AuthIdSecret)
            .ok_or(AuthIdError::MalformedSecret)?;
        Ok(AuthId { keyid, secret })
    }

    /// The keyid: safe to log and to use as a store key.
    pub fn keyid(&self) -> KeyId {
        self.keyid
    }

    /// The secret half.
    pub fn secret(&self) -> &AuthIdSecret {
        &self.secret
    }

    /// The full `keyid:secret` text, for handing to the user exactly once.
    pub fn expose_text(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::with_capacity(KEYID_TEXT_LEN + 1 + SECRET_TEXT_LEN));
        text.push_str(self.keyid.text().as_str());
        text.push(':');
        URL_SAFE_NO_PAD.encode_string(self.secret.0, &mut text);
        text
    }
}

impl fmt::Debug for AuthId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthId({}:<redacted>)", self.keyid)
    }
}

impl fmt::Display for AuthId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:<redacted>", self.keyid)
    }
}

/// Why a string is not an AuthID. The messages are meant for the user who
/// pasted it, and never repeat the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthIdError {
    /// Nothing was given.
    #[error("no AuthID was given")]
    Empty,
    /// Far longer than any AuthID.
    #[error("the AuthID is too long; paste exactly the AuthID the login page showed")]
    TooLong,
    /// No `:` — a raw access token, or a truncated paste.
    #[error("the AuthID has no ':' separator; it looks like an access token or a truncated paste, not an AuthID")]
    MissingSeparator,
    /// A token of Duplicati's newer (v2) OAuth service.
    #[error(
        "this AuthID was issued by another OAuth service (Duplicati's v2 service), not by this broker; log in again here to get an AuthID"
    )]
    DuplicatiV2,
    /// An AuthID in the shape of Duplicati's hosted OAuth service (hex key id).
    #[error("this AuthID was issued by another OAuth service, not by this broker; log in again here to get an AuthID")]
    IssuedElsewhere,
    /// The part before `:` is not a keyid.
    #[error("the AuthID's key id (before ':') is malformed; copy the whole AuthID again")]
    MalformedKeyId,
    /// The part after `:` is not a secret.
    #[error("the AuthID's secret (after ':') is malformed; copy the whole AuthID again")]
    MalformedSecret,
}

fn split_separator(text: &str) -> Option<(&str, &str)> {
    if let Some(parts) = text.split_once(':') {
        return Some(parts);
    }
    let at = text.find("%3A").or_else(|| text.find("%3a"))?;
    Some((&text[..at], &text[at + 3..]))
}

/// The base64url alphabet (RFC 4648, section 5).
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// Marks a byte that is not in [`ALPHABET`].
const NOT_BASE64: u8 = 0xFF;
/// Each byte's 6-bit value in [`ALPHABET`], or [`NOT_BASE64`].
static VALUES: [u8; 256] = {
    let mut values = [NOT_BASE64; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        values[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    values
};

/// Decodes exactly `N` bytes from canonical unpadded base64url of `text_len`
/// characters: the length must be the one `N` bytes encode to, every
/// character in the alphabet, and the bits past the last byte zero (so each
/// value has one text). Written out for these fixed lengths: every token
/// request parses an AuthID, and a general decoder costs several times more.
fn decode_fixed<const N: usize>(text: &str, text_len: usize) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != text_len || text_len != (8 * N).div_ceil(6) {
        return None;
    }
    let mut out = [0u8; N];
    // Every value is OR-ed in here: a character outside the alphabet
    // (NOT_BASE64) sets bits that no value below 64 has.
    let mut seen = 0u8;
    let mut value = |c: &u8| {
        let v = VALUES[usize::from(*c)];
        seen |= v;
        u32::from(v)
    };
    // Four characters make three bytes; N bytes encode to as many whole
    // groups as N has whole threes, and a tail of 0, 2 or 3 characters.
    let mut quads = text.chunks_exact(4);
    let mut triples = out.chunks_exact_mut(3);
    for (quad, triple) in (&mut quads).zip(&mut triples) {
        let n = value(&quad[0]) << 18 | value(&quad[1]) << 12 | value(&quad[2]) << 6 | value(&quad[3]);
        triple.copy_from_slice(&n.to_be_bytes()[1..]);
    }
    let rest = quads.remainder();
    let n = rest.iter().fold(0u32, |n, c| n << 6 | value(c));
    let tail = triples.into_remainder();
    // The tail's bits past its last byte must be zero: one text per value.
    let spare = 6 * rest.len() - 8 * tail.len();
    if seen & !63 != 0 || n & ((1 << spare) - 1) != 0 {
        return None;
    }
    let (n, last) = (n >> spare, tail.len().saturating_sub(1));
    for (i, b) in tail.iter_mut().enumerate() {
        *b = (n >> (8 * (last - i))) as u8;
    }
    Some(out)
}

/// The unpadded base64url text of `bytes`; `T` is its length.
fn encode_fixed<const N: usize, const T: usize>(bytes: &[u8; N]) -> [u8; T] {
    const { assert!(T == (8 * N).div_ceil(6)) };
    let mut out = [0u8; T];
    let (mut acc, mut bits, mut at) = (0u32, 0u32, 0usize);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out[at] = ALPHABET[((acc >> bits) & 63) as usize];
            at += 1;
        }
    }
    if bits > 0 {
        out[at] = ALPHABET[((acc << (6 - bits)) & 63) as usize];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SeqRandom;

    proptest::proptest! {
        /// The fixed-length codec agrees with the base64 crate's unpadded
        /// base64url, canonical trailing bits included, both ways.
        #[test]
        fn fixed_length_base64url_agrees_with_the_base64_crate(
            keyid in proptest::array::uniform16(proptest::num::u8::ANY),
            secret in proptest::array::uniform32(proptest::num::u8::ANY),
            text in "[A-Za-z0-9_=+/:. -]{20,45}",
        ) {
            let keyid_text: [u8; KEYID_TEXT_LEN] = encode_fixed(&keyid);
            proptest::prop_assert_eq!(keyid_text.to_vec(), URL_SAFE_NO_PAD.encode(keyid).into_bytes());
            let secret_text: [u8; SECRET_TEXT_LEN] = encode_fixed(&secret);
            proptest::prop_assert_eq!(secret_text.to_vec(), URL_SAFE_NO_PAD.encode(secret).into_bytes());
            let keyid_text = std::str::from_utf8(&keyid_text).unwrap();
            proptest::prop_assert_eq!(decode_fixed::<KEYID_LEN>(keyid_text, KEYID_TEXT_LEN), Some(keyid));
            let secret_text = std::str::from_utf8(&secret_text).unwrap();
            proptest::prop_assert_eq!(decode_fixed::<SECRET_LEN>(secret_text, SECRET_TEXT_LEN), Some(secret));
            // Any text: accepted exactly when the crate decodes it to that many bytes.
            let by_crate = |n: usize| URL_SAFE_NO_PAD.decode(&text).ok().filter(|b| b.len() == n && text.len() == (8 * n).div_ceil(6));
            proptest::prop_assert_eq!(decode_fixed::<KEYID_LEN>(&text, KEYID_TEXT_LEN).map(Vec::from), by_crate(KEYID_LEN));
            proptest::prop_assert_eq!(decode_fixed::<SECRET_LEN>(&text, SECRET_TEXT_LEN).map(Vec::from), by_crate(SECRET_LEN));
        }
    }

    #[test]
    fn fixed_length_base64url_refuses_what_is_not_canonical() {
        let text = URL_SAFE_NO_PAD.encode([0xA5u8; KEYID_LEN]);
        assert!(decode_fixed::<KEYID_LEN>(&text, KEYID_TEXT_LEN).is_some());
        // The last character carries 2 bits of data and 4 that must be zero:
        // of the 64 characters, the 4 whose value ends in four zero bits
        // are accepted there (each another keyid), the other 60 refused.
        let accepted: Vec<u8> = ALPHABET
            .iter()
            .copied()
            .filter(|&c| {
                let mut other = text.clone().into_bytes();
                other[KEYID_TEXT_LEN - 1] = c;
                decode_fixed::<KEYID_LEN>(std::str::from_utf8(&other).unwrap(), KEYID_TEXT_LEN).is_some()
            })
            .collect();
        assert_eq!(accepted, b"AQgw", "the characters of values 0, 16, 32 and 48");
        for bad in [&text[..21], &format!("{text}A"), &format!("{}=", &text[..21]), &format!("{}+", &text[..21])] {
            assert_eq!(decode_fixed::<KEYID_LEN>(bad, KEYID_TEXT_LEN), None, "{bad}");
        }
        assert_eq!(KeyId::from_bytes([0xA5; KEYID_LEN]).to_string(), text);
    }

    #[test]
    fn generated_authid_round_trips_through_its_text() {
        let rng = SeqRandom::new(7);
        let id = AuthId::generate(&rng);
        let text = id.expose_text();
        assert_eq!(text.len(), KEYID_TEXT_LEN + 1 + SECRET_TEXT_LEN);
        assert!(text.contains(':'));
        assert_eq!(AuthId::parse(&text).unwrap(), id);
    }

    #[test]
    fn parse_accepts_whitespace_and_encoded_separator() {
        let id = AuthId::generate(&SeqRandom::new(1));
        let text = id.expose_text();
        let (k, s) = text.split_once(':').unwrap();
        for variant in
            [format!("  {}\n", text.as_str()), format!("{k}%3A{s}"), format!("{k}%3a{s}"), format!("\t{k}%3A{s} ")]
        {
            assert_eq!(AuthId::parse(&variant).unwrap(), id, "variant {variant:?}");
        }
    }

    #[test]
    fn parse_rejects_with_specific_errors() {
        let id = AuthId::generate(&SeqRandom::new(2));
        let text = id.expose_text();
        let (k, s) = text.split_once(':').unwrap();
        let cases: Vec<(String, AuthIdError)> = vec![
            (String::new(), AuthIdError::Empty),
            ("   ".into(), AuthIdError::Empty),
            ("x".repeat(300), AuthIdError::TooLong),
            ("ya29.a0AfH6SMBrawaccesstoken".into(), AuthIdError::MissingSeparator),
            ("v2:abcdef".into(), AuthIdError::DuplicatiV2),
            ("0123456789abcdef0123456789ABCDEF:Zm9vYmFyYmF6".into(), AuthIdError::IssuedElsewhere),
            (format!("{k}x:{s}"), AuthIdError::MalformedKeyId),
            (format!("{}:{s}", &k[1..]), AuthIdError::MalformedKeyId),
            (format!("{k}:{s}="), AuthIdError::MalformedSecret),
            (format!("{k}:{}", &s[1..]), AuthIdError::MalformedSecret),
            (format!("{k}:{}+", &s[1..]), AuthIdError::MalformedSecret),
            (format!("{k}::{s}"), AuthIdError::MalformedSecret),
            (format!("{k}%20:{s}"), AuthIdError::MalformedKeyId),
        ];
        for (input, want) in cases {
            assert_eq!(AuthId::parse(&input).unwrap_err(), want, "input {input:?}");
        }
    }

    #[test]
    fn non_canonical_base64_is_rejected() {
        // 22 characters encode 132 bits; the last 4 must be zero for 16 bytes.
        let id = AuthId::generate(&SeqRandom::new(3));
        let text = id.expose_text();
        let (k, s) = text.split_once(':').unwrap();
        let last = k.as_bytes()[21];
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let pos = alphabet.iter().position(|&c| c == last).unwrap();
        let bumped = alphabet[(pos & !0xF) | ((pos + 1) & 0xF)] as char;
        let noncanonical = format!("{}{}:{s}", &k[..21], bumped);
        assert_eq!(AuthId::parse(&noncanonical).unwrap_err(), AuthIdError::MalformedKeyId);
    }

    #[test]
    fn debug_and_display_never_show_the_secret() {
        let id = AuthId::generate(&SeqRandom::new(4));
        let text = id.expose_text();
        let secret_text = text.split_once(':').unwrap().1;
        for shown in [format!("{id:?}"), format!("{id}"), format!("{:?}", id.secret())] {
            assert!(!shown.contains(secret_text), "{shown}");
            assert!(shown.contains("redacted"), "{shown}");
        }
        assert!(format!("{id}").starts_with(&id.keyid().to_string()));
    }

    #[test]
    fn error_messages_never_echo_input() {
        let err = AuthId::parse("v2:supersecretvalue").unwrap_err();
        assert!(!err.to_string().contains("supersecretvalue"));
    }
}
