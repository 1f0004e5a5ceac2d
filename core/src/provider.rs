//! The `Provider` trait: what the broker asks of an OAuth authorization server.
//!
//! The trait speaks in OAuth terms and secrets travel as [`SecretString`]; the
//! `providers` crate implements it over HTTP, tests implement it in memory.
//! Every method has a default answering [`ProviderError::Unsupported`], so a
//! provider implements only what it has.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::SecretString;
use sha2::{Digest, Sha256};

use crate::random::{Random, array};

/// A boxed error from a provider client, kept as the `source`.
pub type ClientError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong at the provider, classified by what the broker does next.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The refresh token or code is no longer valid (`invalid_grant`): the user must log in again.
    #[error("the provider rejected the grant (invalid_grant){}", opt_detail(.description))]
    InvalidGrant {
        /// The provider's `error_description`, if safe to show.
        description: Option<String>,
    },
    /// The broker's app credentials were refused (`invalid_client`, `unauthorized_client`).
    #[error("the provider rejected the broker's app credentials{}", opt_detail(.description))]
    InvalidClient {
        /// The provider's `error_description`, if safe to show.
        description: Option<String>,
    },
    /// The provider asks us to slow down (HTTP 429).
    #[error("the provider is rate limiting the broker")]
    RateLimited {
        /// The provider's `Retry-After`, if given.
        retry_after: Option<Duration>,
    },
    /// Timeouts, connection failures, 5xx: trying again later may work.
    #[error("the provider is unavailable: {detail}")]
    Transient {
        /// What happened, without any secret.
        detail: String,
        /// The client's error.
        #[source]
        source: Option<ClientError>,
    },
    /// The provider answered something that is not a valid OAuth response.
    #[error("the provider answered an invalid response: {detail}")]
    Protocol {
        /// What was wrong, without any secret.
        detail: String,
        /// The client's error.
        #[source]
        source: Option<ClientError>,
    },
    /// The provider does not offer this operation.
    #[error("the provider does not support {0}")]
    Unsupported(&'static str),
}

fn opt_detail(d: &Option<String>) -> String {
    d.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
}

impl ProviderError {
    /// Whether a later retry of the same request may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, ProviderError::Transient { .. } | ProviderError::RateLimited { .. })
    }
}

/// A PKCE pair (RFC 7636, S256).
pub struct Pkce {
    /// The verifier: 43 characters of base64url (256 random bits).
    pub verifier: SecretString,
    /// `BASE64URL(SHA256(verifier))`.
    pub challenge: String,
}

impl Pkce {
    /// A fresh verifier and its S256 challenge.
    pub fn generate(rng: &dyn Random) -> Self {
        let verifier = URL_SAFE_NO_PAD.encode(array::<32>(rng));
        let challenge = Self::challenge_for(&verifier);
        Pkce { verifier: SecretString::from(verifier), challenge }
    }

    /// The S256 challenge for a verifier.
    pub fn challenge_for(verifier: &str) -> String {
        URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
    }
}

impl fmt::Debug for Pkce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkce").field("verifier", &"<redacted>").field("challenge", &self.challenge).finish()
    }
}

/// What goes into an authorization URL.
#[derive(Debug)]
pub struct AuthorizationRequest<'a> {
    /// The exact redirect URI registered with the provider.
    pub redirect_uri: &'a str,
    /// The `state` value.
    pub state: &'a SecretString,
    /// Scopes to request.
    pub scopes: &'a [String],
    /// The S256 PKCE challenge, where the provider supports PKCE.
    pub pkce_challenge: Option<&'a str>,
    /// The service's extra authorization parameters.
    pub extra_params: &'a [(String, String)],
}

/// A code to exchange for tokens.
#[derive(Debug)]
pub struct CodeExchange<'a> {
    /// The authorization code.
    pub code: &'a SecretString,
    /// The redirect URI used in the authorization request.
    pub redirect_uri: &'a str,
    /// The PKCE verifier, if a challenge was sent.
    pub pkce_verifier: Option<&'a SecretString>,
    /// Provider-specific callback parameters (e.g. pCloud's `hostname`).
    pub callback_params: &'a [(String, String)],
}

/// A refresh-token grant.
#[derive(Debug)]
pub struct RefreshRequest<'a> {
    /// The refresh token.
    pub refresh_token: &'a SecretString,
    /// Scopes of the grant.
    pub scopes: &'a [String],
    /// Provider-specific values stored with the grant.
    pub extra: &'a [(String, String)],
}

/// Which kind of token is being revoked (RFC 7009 `token_type_hint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A refresh token.
    Refresh,
    /// An access token.
    Access,
}

/// A provider's token endpoint answer.
#[derive(Clone)]
pub struct TokenResponse {
    /// The access token.
    pub access_token: SecretString,
    /// A new refresh token, if the provider issued (or rotated) one.
    pub refresh_token: Option<SecretString>,
    /// The access token's lifetime, if given.
    pub expires_in: Option<Duration>,
    /// Granted scopes, if reported.
    pub scopes: Option<Vec<String>>,
    /// The token type, usually `Bearer`.
    pub token_type: Option<String>,
    /// The account at the provider, if it can be told.
    pub account_id: Option<String>,
    /// Provider-specific values to keep with the grant.
    pub extra: Vec<(String, String)>,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"<redacted>")
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "<redacted>"))
            .field("expires_in", &self.expires_in)
            .field("scopes", &self.scopes)
            .field("token_type", &self.token_type)
            .field("account_id", &self.account_id)
            .finish_non_exhaustive()
    }
}

/// A provider's device authorization answer (RFC 8628).
#[derive(Clone)]
pub struct DeviceAuthorization {
    /// The device code to poll with.
    pub device_code: SecretString,
    /// The code the user types.
    pub user_code: String,
    /// Where the user types it.
    pub verification_uri: String,
    /// The same with the code filled in, if offered.
    pub verification_uri_complete: Option<String>,
    /// How long the codes live.
    pub expires_in: Duration,
    /// Minimum polling interval.
    pub interval: Duration,
}

impl fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("device_code", &"<redacted>")
            .field("user_code", &self.user_code)
            .field("verification_uri", &self.verification_uri)
            .field("expires_in", &self.expires_in)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// An OAuth authorization server with the broker's app credentials for it.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The URL to send the user's browser to.
    fn authorization_url(&self, _request: &AuthorizationRequest<'_>) -> Result<String, ProviderError> {
        Err(ProviderError::Unsupported("browser login"))
    }

    /// Exchanges an authorization code for tokens.
    async fn exchange_code(&self, _request: &CodeExchange<'_>) -> Result<TokenResponse, ProviderError> {
        Err(ProviderError::Unsupported("authorization codes"))
    }

    /// Trades a refresh token for a fresh access token (and maybe a rotated refresh token).
    async fn refresh(&self, _request: &RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        Err(ProviderError::Unsupported("refresh"))
    }

    /// Revokes a token at the provider.
    async fn revoke(&self, _token: &SecretString, _kind: TokenKind) -> Result<(), ProviderError> {
        Err(ProviderError::Unsupported("revocation"))
    }

    /// Starts a provider-side device authorization.
    async fn device_authorization(&self, _scopes: &[String]) -> Result<DeviceAuthorization, ProviderError> {
        Err(ProviderError::Unsupported("device authorization"))
    }

    /// Polls for the tokens of a device authorization.
    async fn device_token(&self, _device_code: &SecretString) -> Result<TokenResponse, ProviderError> {
        Err(ProviderError::Unsupported("device authorization"))
    }

    /// Trades a login token the user pasted (Jottacloud's personal login
    /// token) for tokens.
    async fn exchange_login_token(
        &self,
        _login_token: &SecretString,
        _scopes: &[String],
    ) -> Result<TokenResponse, ProviderError> {
        Err(ProviderError::Unsupported("login tokens"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SeqRandom;
    use secrecy::ExposeSecret;

    fn expose(s: &SecretString) -> &str {
        s.expose_secret()
    }

    #[test]
    fn pkce_matches_rfc7636_appendix_b() {
        assert_eq!(
            Pkce::challenge_for("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let pkce = Pkce::generate(&SeqRandom::new(1));
        assert_eq!(expose(&pkce.verifier).len(), 43);
        assert_eq!(pkce.challenge, Pkce::challenge_for(expose(&pkce.verifier)));
        assert!(!format!("{pkce:?}").contains(expose(&pkce.verifier)));
    }

    struct Nothing;
    impl Provider for Nothing {}

    #[tokio::test]
    async fn defaults_answer_unsupported() {
        let p = Nothing;
        let token = SecretString::from("t".to_owned());
        let refresh = RefreshRequest { refresh_token: &token, scopes: &[], extra: &[] };
        assert!(matches!(p.refresh(&refresh).await, Err(ProviderError::Unsupported(_))));
        assert!(matches!(p.revoke(&token, TokenKind::Refresh).await, Err(ProviderError::Unsupported(_))));
        assert!(matches!(p.device_authorization(&[]).await, Err(ProviderError::Unsupported(_))));
        assert!(!ProviderError::Unsupported("x").is_transient());
        assert!(ProviderError::RateLimited { retry_after: None }.is_transient());
    }
}
