//! A [`Provider`] of your own, for a service the catalogue cannot describe.
//!
//! Most providers are data: a `[providers.<id>]` entry (endpoints, client
//! authentication, PKCE, revocation style, …; see `docs/providers.md`). A
//! service whose token endpoint is not OAuth 2.0 at all needs code instead.
//! This one has the shape of Backblaze B2's `b2_authorize_account`: the user
//! holds a long-lived *application key* (`<key id>:<key>`), and a GET with
//! that key as HTTP Basic credentials answers a session token valid for a
//! day, with the API host to use it at:
//!
//! ```text
//! GET /b2api/v3/b2_authorize_account     Authorization: Basic base64(<key id>:<key>)
//! 200 {"authorizationToken": "…", "apiInfo": {"storageApi": {"apiUrl": "https://…"}}}
//! ```
//!
//! Mapped onto the engine: the user pastes the key once (a login by token,
//! [`LoginMethod::LoginToken`], as Jottacloud's), the engine keeps it sealed
//! under the AuthID as the grant's "refresh token", and a refresh trades it
//! for a new session token. Programs then ask the broker for tokens with
//! their AuthID and never hold the key. [`catalogue`] puts it in a
//! [`Catalogue`] as service `b2`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use latchkey_core::provider::RefreshRequest;
use latchkey_core::{
    Catalogue, CatalogueError, LoginMethod, Provider, ProviderError, ProviderSpec, ServiceSpec, TokenResponse,
};
use secrecy::{ExposeSecret, SecretString};

/// How long a session token lives (B2: 24 hours).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The extra value kept with the grant: the API host the token is for.
pub const API_URL: &str = "api_url";

/// A provider whose "refresh" is a GET with the user's application key.
pub struct ApiKeyProvider {
    http: reqwest::Client,
    authorize_url: String,
}

impl ApiKeyProvider {
    /// A provider asking `authorize_url` (e.g.
    /// `https://api.backblazeb2.com/b2api/v3/b2_authorize_account`).
    pub fn new(authorize_url: &str) -> Result<Self, reqwest::Error> {
        // No redirects (the key must go nowhere else), a deadline on every call.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(15))
            .build()?;
        Ok(ApiKeyProvider { http, authorize_url: authorize_url.to_owned() })
    }

    /// One `b2_authorize_account` call with `key` (`<key id>:<key>`).
    async fn authorize(&self, key: &SecretString) -> Result<TokenResponse, ProviderError> {
        let credentials = SecretString::from(STANDARD.encode(key.expose_secret().trim()));
        let answer = self
            .http
            .get(&self.authorize_url)
            .header("authorization", format!("Basic {}", credentials.expose_secret()))
            .send()
            .await
            .map_err(|e| ProviderError::Transient {
                detail: "cannot reach the service".into(),
                source: Some(e.into()),
            })?;
        // Classify by status; the body of a refusal is never passed on (it could echo what was sent).
        match answer.status().as_u16() {
            200 => {}
            401 | 403 => return Err(ProviderError::InvalidGrant { description: None }),
            429 => return Err(ProviderError::RateLimited { retry_after: None }),
            500..=599 => {
                return Err(ProviderError::Transient { detail: format!("HTTP {}", answer.status()), source: None });
            }
            _ => {
                return Err(ProviderError::Protocol { detail: format!("HTTP {}", answer.status()), source: None });
            }
        }
        let body: serde_json::Value = answer
            .json()
            .await
            .map_err(|e| ProviderError::Protocol { detail: "not JSON".into(), source: Some(e.into()) })?;
        let token = body["authorizationToken"].as_str().filter(|t| !t.is_empty()).ok_or_else(|| {
            ProviderError::Protocol { detail: "no authorizationToken in the answer".into(), source: None }
        })?;
        let api_url = body["apiInfo"]["storageApi"]["apiUrl"].as_str();
        Ok(TokenResponse {
            access_token: SecretString::from(token.to_owned()),
            refresh_token: None,
            expires_in: Some(SESSION_LIFETIME),
            scopes: None,
            token_type: None,
            account_id: body["accountId"].as_str().map(str::to_owned),
            extra: api_url.map(|url| vec![(API_URL.to_owned(), url.to_owned())]).unwrap_or_default(),
        })
    }
}

#[async_trait]
impl Provider for ApiKeyProvider {
    /// The login: the key the user pasted, checked by using it once. The
    /// engine keeps it (sealed) as the grant's refresh token.
    async fn exchange_login_token(
        &self,
        key: &SecretString,
        _scopes: &[String],
    ) -> Result<TokenResponse, ProviderError> {
        let mut tokens = self.authorize(key).await?;
        tokens.refresh_token = Some(key.clone());
        Ok(tokens)
    }

    /// A new session token for the stored key. No refresh token in the
    /// answer: the engine keeps the one it has.
    async fn refresh(&self, request: &RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        self.authorize(request.refresh_token).await
    }

    // authorization_url, exchange_code, revoke and the device flow keep
    // their defaults (Unsupported): there is no browser login and no
    // revocation endpoint; the user deletes the key at the service.
}

/// A catalogue with service `b2` on an [`ApiKeyProvider`] at `authorize_url`.
pub fn catalogue(authorize_url: &str) -> Result<Catalogue, CatalogueError> {
    let provider = ApiKeyProvider::new(authorize_url).map_err(|e| CatalogueError::Invalid {
        provider: "b2".into(),
        field: "client".into(),
        reason: e.to_string(),
    })?;
    let spec = ProviderSpec {
        pkce: false,
        login: LoginMethod::LoginToken,
        rotates_refresh_tokens: Some(false),
        ..ProviderSpec::new("b2")
    };
    let mut catalogue = Catalogue::new();
    catalogue.add_provider(spec, Arc::new(provider))?;
    catalogue.add_service(ServiceSpec { display_name: "Backblaze B2".into(), ..ServiceSpec::new("b2", "b2") })?;
    Ok(catalogue)
}
