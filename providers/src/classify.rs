//! Turning a token endpoint's answer into a [`TokenResponse`] or a classified
//! [`ProviderError`]. Pure functions of status, headers and body, so the
//! classification is tested as a table.
//!
//! A provider's body never travels on verbatim: only its OAuth `error` code
//! and a sanitised, length-limited `error_description` survive, and the
//! description is dropped if it contains anything the request carried.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use latchkey_core::{ProviderError, TokenResponse};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::Value;

/// How a provider reports the account behind a grant. In the catalogue
/// (`account_id`): `id_token` or `field:<name>`; no entry means `None`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum AccountIdSource {
    /// Not reported.
    None,
    /// The `oid` (Microsoft) or `sub` claim of the `id_token`.
    IdToken,
    /// A top-level field of the token response (e.g. Dropbox's `account_id`).
    Field(String),
}

impl TryFrom<String> for AccountIdSource {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if text == "id_token" {
            return Ok(AccountIdSource::IdToken);
        }
        match text.strip_prefix("field:") {
            Some(field) if !field.is_empty() => Ok(AccountIdSource::Field(field.to_owned())),
            _ => Err(format!("'{text}' is not `id_token` or `field:<name>`")),
        }
    }
}

/// What a token response is read with.
#[derive(Debug, Clone)]
pub struct ResponseRules {
    /// Lifetime assumed when `expires_in` is missing (`None`: tokens never expire).
    pub default_expires_in: Option<Duration>,
    /// Where the account id comes from.
    pub account_id: AccountIdSource,
}

#[derive(Deserialize)]
struct RawToken {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<Value>,
    scope: Option<String>,
    token_type: Option<String>,
    id_token: Option<String>,
}

#[derive(Deserialize)]
struct RawError {
    error: Option<String>,
    error_description: Option<String>,
}

/// Parses a successful (2xx) token endpoint body.
pub fn parse_token_response(body: &[u8], rules: &ResponseRules) -> Result<TokenResponse, ProviderError> {
    let protocol = |detail: &str| ProviderError::Protocol { detail: detail.to_owned(), source: None };
    let value: Value = serde_json::from_slice(body).map_err(|_| protocol("the token response is not JSON"))?;
    let raw: RawToken = serde_json::from_value(value.clone())
        .map_err(|_| protocol("the token response has fields of the wrong type"))?;
    let access_token =
        raw.access_token.filter(|t| !t.is_empty()).ok_or_else(|| protocol("the token response has no access_token"))?;
    let expires_in = match raw.expires_in {
        None | Some(Value::Null) => rules.default_expires_in,
        // Some providers send the number as a string.
        Some(Value::String(s)) => Some(Duration::from_secs(s.trim().parse().map_err(|_| protocol("bad expires_in"))?)),
        Some(Value::Number(n)) => Some(Duration::from_secs(n.as_u64().ok_or_else(|| protocol("bad expires_in"))?)),
        Some(_) => return Err(protocol("bad expires_in")),
    };
    let account_id = match &rules.account_id {
        AccountIdSource::None => None,
        AccountIdSource::IdToken => raw.id_token.as_deref().and_then(id_token_subject),
        AccountIdSource::Field(name) => match value.get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        },
    };
    Ok(TokenResponse {
        access_token: SecretString::from(access_token),
        refresh_token: raw.refresh_token.filter(|t| !t.is_empty()).map(SecretString::from),
        expires_in,
        scopes: raw.scope.map(|s| s.split_whitespace().map(str::to_owned).collect()),
        token_type: raw.token_type,
        account_id,
        extra: Vec::new(),
    })
}

/// The `oid` (preferred, stable across Microsoft apps) or `sub` claim of an
/// ID token. The token came straight from the provider's token endpoint over
/// TLS, and the id only labels the grant, so the signature is not checked.
pub fn id_token_subject(id_token: &str) -> Option<String> {
    let payload = id_token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    ["oid", "sub"].iter().find_map(|c| claims.get(*c).and_then(Value::as_str)).map(str::to_owned)
}

/// Parses `Retry-After` in seconds (an HTTP date is treated as absent).
pub fn retry_after(header: Option<&str>) -> Option<Duration> {
    header?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Classifies a non-2xx answer. `sent` lists every secret the request
/// carried, so a description echoing one of them is dropped.
pub fn classify_error(status: u16, retry_after_header: Option<&str>, body: &[u8], sent: &[&str]) -> ProviderError {
    let raw: Option<RawError> = serde_json::from_slice(body).ok();
    let error = raw.as_ref().and_then(|r| r.error.as_deref()).unwrap_or_default();
    let description = raw.as_ref().and_then(|r| r.error_description.as_deref()).and_then(|d| sanitize(d, sent));
    if status == 429 {
        return ProviderError::RateLimited { retry_after: retry_after(retry_after_header) };
    }
    match error {
        "invalid_grant" => return ProviderError::InvalidGrant { description },
        "invalid_client" | "unauthorized_client" | "invalid_scope" | "unsupported_grant_type" => {
            return ProviderError::InvalidClient { description };
        }
        "temporarily_unavailable" | "server_error" => {
            return ProviderError::Transient { detail: format!("the provider answered {error}"), source: None };
        }
        // RFC 8628 polling answers: keep polling, or slow down.
        "authorization_pending" => {
            return ProviderError::Transient { detail: "authorization_pending".into(), source: None };
        }
        "slow_down" => {
            return ProviderError::RateLimited {
                retry_after: retry_after(retry_after_header).or(Some(Duration::from_secs(5))),
            };
        }
        "expired_token" | "access_denied" => return ProviderError::InvalidGrant { description },
        _ => {}
    }
    match status {
        500..=599 => ProviderError::Transient { detail: format!("the provider answered HTTP {status}"), source: None },
        401 | 403 => ProviderError::InvalidClient { description },
        // Only codes RFC 6749 defines are named; anything else a provider put
        // there is body content and is not repeated.
        _ => ProviderError::Protocol {
            detail: match error {
                "" => format!("the provider answered HTTP {status} without an OAuth error"),
                code @ ("invalid_request"
                | "access_denied"
                | "unsupported_response_type"
                | "unsupported_token_type") => {
                    format!("the provider answered HTTP {status} with error {code}")
                }
                _ => format!("the provider answered HTTP {status} with an unknown OAuth error"),
            },
            source: None,
        },
    }
}

/// The shortest run of a secret's bytes that counts as echoing it: a
/// provider that quotes part of a token (truncated, or cut by its own
/// formatting) must not get that part through either.
const SECRET_PIECE: usize = 12;

/// One line of printable text, at most 200 characters, or nothing if it
/// contains any of the secrets sent, or any `SECRET_PIECE` bytes of one.
pub fn sanitize(text: &str, sent: &[&str]) -> Option<String> {
    // Control characters go first, and the check runs on what remains: a
    // secret split by a control character must not reappear whole.
    let clean: String = text.chars().filter(|c| !c.is_control()).collect();
    if sent.iter().any(|s| !s.is_empty() && (clean.contains(s) || text.contains(s))) {
        return None;
    }
    let clean: String = clean.chars().take(200).collect();
    // Every SECRET_PIECE-byte run of the answer, once; a secret shorter than
    // that has no run to match and was checked whole above.
    let pieces: std::collections::HashSet<&[u8]> = clean.as_bytes().windows(SECRET_PIECE).collect();
    if sent.iter().any(|s| s.as_bytes().windows(SECRET_PIECE).any(|piece| pieces.contains(piece))) {
        return None;
    }
    (!clean.trim().is_empty()).then_some(clean)
}
