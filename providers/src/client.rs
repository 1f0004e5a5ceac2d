//! `OAuthProvider`: core's [`Provider`] over reqwest, written as plain
//! RFC 6749 requests so each provider's quirks stay under exact control.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use latchkey_core::provider::{
    AuthorizationRequest, CodeExchange, DeviceAuthorization, Provider, ProviderError, RefreshRequest, TokenKind,
    TokenResponse,
};
use reqwest::header::{AUTHORIZATION, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::classify::{ResponseRules, classify_error, parse_token_response};

/// Responses larger than this are refused.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per provider host: enough for every refresh a busy
/// broker has in flight at once to find one kept alive.
const IDLE_CONNECTIONS_PER_HOST: usize = 256;
/// How long an idle provider connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The grant extra under which a provider-named API host is kept (pCloud).
pub const API_HOST_EXTRA: &str = "api_host";

/// How the broker authenticates at the token endpoint (`client_auth`:
/// `basic`, `post` or `none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// HTTP Basic, id and secret form-urlencoded first (RFC 6749 §2.3.1).
    Basic,
    /// `client_id` and `client_secret` in the body.
    Post,
    /// A public client: `client_id` only.
    None,
}

/// Where and how refresh tokens are revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// Not offered.
    None,
    /// RFC 7009 with `token_type_hint`.
    Rfc7009(Url),
    /// A POST with an access token as bearer (Dropbox).
    Bearer(Url),
}

/// Everything one provider client needs.
#[derive(Clone)]
pub struct ProviderSettings {
    /// Provider id.
    pub id: String,
    /// Authorization endpoint (absent for login-token providers).
    pub authorize_url: Option<Url>,
    /// Token endpoint.
    pub token_url: Url,
    /// Revocation.
    pub revocation: Revocation,
    /// Device authorization endpoint.
    pub device_url: Option<Url>,
    /// Client id.
    pub client_id: String,
    /// Client secrets, tried in order.
    pub client_secrets: Vec<String>,
    /// Client authentication.
    pub client_auth: ClientAuth,
    /// The broker's redirect URI.
    pub redirect_uri: String,
    /// Quirk: send `redirect_uri` with refreshes.
    pub refresh_sends_redirect_uri: bool,
    /// Quirk: callback parameter naming the API host.
    pub api_host_param: Option<String>,
    /// Hosts that parameter may name.
    pub api_hosts: Vec<String>,
    /// How token responses are read.
    pub rules: ResponseRules,
    /// Total timeout of one request.
    pub timeout: Duration,
}

impl std::fmt::Debug for ProviderSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderSettings")
            .field("id", &self.id)
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .field("client_secrets", &format_args!("<{} redacted>", self.client_secrets.len()))
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

/// An OAuth 2.0 provider reached over HTTPS.
pub struct OAuthProvider {
    settings: ProviderSettings,
    http: reqwest::Client,
    /// The secret that worked last, tried first.
    preferred_secret: AtomicUsize,
}

impl std::fmt::Debug for OAuthProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthProvider").field("settings", &self.settings).finish_non_exhaustive()
    }
}

fn transient(detail: &str, source: reqwest::Error) -> ProviderError {
    ProviderError::Transient { detail: detail.to_owned(), source: Some(Box::new(source.without_url())) }
}

/// A form body that keeps its values out of `Debug`.
struct Form(Vec<(&'static str, String)>);

impl Form {
    fn new() -> Self {
        Form(Vec::new())
    }
    fn add(&mut self, key: &'static str, value: impl Into<String>) -> &mut Self {
        self.0.push((key, value.into()));
        self
    }
    fn encode(&self) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.0 {
            s.append_pair(k, v);
        }
        s.finish()
    }
    fn values(&self) -> Vec<&str> {
        self.0.iter().map(|(_, v)| v.as_str()).collect()
    }
}

#[derive(Deserialize)]
struct RawDevice {
    device_code: String,
    user_code: String,
    #[serde(alias = "verification_url")]
    verification_uri: String,
    verification_uri_complete: Option<String>,
    expires_in: u64,
    interval: Option<u64>,
}

#[derive(Deserialize)]
struct LoginToken {
    username: String,
    auth_token: String,
}

impl OAuthProvider {
    /// A client with redirects off, connect and total timeouts, rustls, and
    /// a pool of kept-alive connections (no Nagle delay) that refreshes reuse.
    pub fn new(settings: ProviderSettings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_HOST)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(settings.timeout)
            .user_agent(concat!("latchkey/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(OAuthProvider { settings, http, preferred_secret: AtomicUsize::new(0) })
    }

    /// The settings.
    pub fn settings(&self) -> &ProviderSettings {
        &self.settings
    }

    /// A form POST with the usual headers.
    fn form_post(&self, url: &Url, form: &Form) -> reqwest::RequestBuilder {
        self.http
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(form.encode())
    }

    /// Sends, reads at most [`MAX_RESPONSE_BYTES`], and classifies a non-2xx
    /// answer. `sent` lists the secrets the request carried.
    async fn send(&self, request: reqwest::RequestBuilder, sent: &[&str]) -> Result<Vec<u8>, ProviderError> {
        let mut response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                transient("the provider timed out", e)
            } else {
                transient("cannot reach the provider", e)
            }
        })?;
        let status = response.status().as_u16();
        let retry_after = response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| transient("the provider's answer broke off", e))? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(ProviderError::Protocol {
                    detail: "the provider's answer is too large".into(),
                    source: None,
                });
            }
            body.extend_from_slice(&chunk);
        }
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            Err(classify_error(status, retry_after.as_deref(), &body, sent))
        }
    }

    /// POSTs a form with client authentication, trying each client secret
    /// in turn while the provider answers `invalid_client`; answers the body.
    async fn authenticated_post(&self, url: &Url, base: &Form) -> Result<Vec<u8>, ProviderError> {
        let secrets = &self.settings.client_secrets;
        let attempts = match self.settings.client_auth {
            ClientAuth::None => 1,
            _ => secrets.len().max(1),
        };
        let start = self.preferred_secret.load(Ordering::Relaxed) % attempts;
        let mut last = None;
        for i in 0..attempts {
            let index = (start + i) % attempts;
            let secret = secrets.get(index).map(String::as_str).unwrap_or_default();
            let mut form = Form(base.0.clone());
            form.add("client_id", self.settings.client_id.clone());
            if self.settings.client_auth == ClientAuth::Post {
                form.add("client_secret", secret);
            }
            let mut request = self.form_post(url, &form);
            if self.settings.client_auth == ClientAuth::Basic {
                // RFC 6749 §2.3.1: both parts form-urlencoded before base64.
                let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let credentials = format!("{}:{}", encode(&self.settings.client_id), encode(secret));
                request = request.header(AUTHORIZATION, format!("Basic {}", STANDARD.encode(credentials)));
            }
            let mut sent = form.values();
            sent.push(secret);
            match self.send(request, &sent).await {
                Ok(body) => {
                    self.preferred_secret.store(index, Ordering::Relaxed);
                    return Ok(body);
                }
                Err(ProviderError::InvalidClient { description }) if i + 1 < attempts => {
                    last = Some(ProviderError::InvalidClient { description });
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(ProviderError::InvalidClient { description: None }))
    }

    /// A token request: authenticated POST, then a token response.
    async fn token_request(&self, url: &Url, form: &Form) -> Result<TokenResponse, ProviderError> {
        let body = self.authenticated_post(url, form).await?;
        parse_token_response(&body, &self.settings.rules)
    }

    /// The token URL for a grant: the provider-named API host where the
    /// provider has that quirk, else the configured one.
    fn token_url_for(&self, params: &[(String, String)]) -> Result<Url, ProviderError> {
        let Some(param) = &self.settings.api_host_param else { return Ok(self.settings.token_url.clone()) };
        let host = params.iter().find(|(k, _)| k == param || k == API_HOST_EXTRA).map(|(_, v)| v.as_str());
        match host {
            None => Ok(self.settings.token_url.clone()),
            // Only listed hosts: the request carries the client secret.
            Some(host) if self.settings.api_hosts.iter().any(|h| h == host) => {
                let mut url = self.settings.token_url.clone();
                url.set_host(Some(host)).map_err(|_| ProviderError::Protocol {
                    detail: "the provider named an unusable API host".into(),
                    source: None,
                })?;
                Ok(url)
            }
            Some(_) => Err(ProviderError::Protocol {
                detail: "the provider named an API host that is not configured".into(),
                source: None,
            }),
        }
    }
}

#[async_trait]
impl Provider for OAuthProvider {
    fn authorization_url(&self, request: &AuthorizationRequest<'_>) -> Result<String, ProviderError> {
        let mut url = self.settings.authorize_url.clone().ok_or(ProviderError::Unsupported("browser login"))?;
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("response_type", "code")
                .append_pair("client_id", &self.settings.client_id)
                .append_pair("redirect_uri", request.redirect_uri)
                .append_pair("state", request.state.expose_secret());
            if !request.scopes.is_empty() {
                query.append_pair("scope", &request.scopes.join(" "));
            }
            if let Some(challenge) = request.pkce_challenge {
                query.append_pair("code_challenge", challenge).append_pair("code_challenge_method", "S256");
            }
            for (k, v) in request.extra_params {
                query.append_pair(k, v);
            }
        }
        Ok(url.into())
    }

    async fn exchange_code(&self, request: &CodeExchange<'_>) -> Result<TokenResponse, ProviderError> {
        let url = self.token_url_for(request.callback_params)?;
        let mut form = Form::new();
        form.add("grant_type", "authorization_code")
            .add("code", request.code.expose_secret())
            .add("redirect_uri", request.redirect_uri);
        if let Some(verifier) = request.pkce_verifier {
            form.add("code_verifier", verifier.expose_secret());
        }
        let mut response = self.token_request(&url, &form).await?;
        if url != self.settings.token_url {
            if let Some(host) = url.host_str() {
                response.extra.push((API_HOST_EXTRA.to_owned(), host.to_owned()));
            }
        }
        Ok(response)
    }

    async fn refresh(&self, request: &RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        let url = self.token_url_for(request.extra)?;
        let mut form = Form::new();
        form.add("grant_type", "refresh_token").add("refresh_token", request.refresh_token.expose_secret());
        if self.settings.refresh_sends_redirect_uri {
            form.add("redirect_uri", self.settings.redirect_uri.clone());
        }
        self.token_request(&url, &form).await
    }

    async fn revoke(&self, token: &SecretString, kind: TokenKind) -> Result<(), ProviderError> {
        match &self.settings.revocation {
            Revocation::None => Err(ProviderError::Unsupported("revocation")),
            Revocation::Rfc7009(url) => {
                let mut form = Form::new();
                let hint = match kind {
                    TokenKind::Refresh => "refresh_token",
                    TokenKind::Access => "access_token",
                };
                form.add("token", token.expose_secret()).add("token_type_hint", hint);
                // Success is a 200 with nothing to read.
                self.authenticated_post(url, &form).await.map(|_| ())
            }
            Revocation::Bearer(url) => {
                // Dropbox revokes the grant behind an access token: get one first.
                let access = match kind {
                    TokenKind::Access => token.clone(),
                    TokenKind::Refresh => {
                        let request = RefreshRequest { refresh_token: token, scopes: &[], extra: &[] };
                        self.refresh(&request).await?.access_token
                    }
                };
                let request =
                    self.http.post(url.clone()).header(AUTHORIZATION, format!("Bearer {}", access.expose_secret()));
                self.send(request, &[access.expose_secret()]).await.map(|_| ())
            }
        }
    }

    async fn device_authorization(&self, scopes: &[String]) -> Result<DeviceAuthorization, ProviderError> {
        let url = self.settings.device_url.as_ref().ok_or(ProviderError::Unsupported("device authorization"))?;
        let mut form = Form::new();
        form.add("client_id", self.settings.client_id.clone()).add("scope", scopes.join(" "));
        let body = self.send(self.form_post(url, &form), &[]).await?;
        let raw: RawDevice = serde_json::from_slice(&body).map_err(|_| ProviderError::Protocol {
            detail: "the device authorization answer is not valid".into(),
            source: None,
        })?;
        Ok(DeviceAuthorization {
            device_code: SecretString::from(raw.device_code),
            user_code: raw.user_code,
            verification_uri: raw.verification_uri,
            verification_uri_complete: raw.verification_uri_complete,
            expires_in: Duration::from_secs(raw.expires_in),
            interval: Duration::from_secs(raw.interval.unwrap_or(5)),
        })
    }

    /// `authorization_pending` answers [`ProviderError::Transient`] and
    /// `slow_down` [`ProviderError::RateLimited`] (see [`classify_error`]);
    /// the caller keeps polling.
    async fn device_token(&self, device_code: &SecretString) -> Result<TokenResponse, ProviderError> {
        let mut form = Form::new();
        form.add("grant_type", "urn:ietf:params:oauth:grant-type:device_code")
            .add("device_code", device_code.expose_secret());
        self.token_request(&self.settings.token_url, &form).await
    }

    async fn exchange_login_token(
        &self,
        token: &SecretString,
        scopes: &[String],
    ) -> Result<TokenResponse, ProviderError> {
        let bad = || ProviderError::InvalidGrant {
            description: Some("the login token is not a valid personal login token".into()),
        };
        // Real tokens come URL-safe and unpadded; pasted ones may be wrapped
        // or re-encoded: accept both alphabets, padded or not, and line breaks.
        let text: String = token.expose_secret().chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let text = zeroize::Zeroizing::new(text);
        let bytes = [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(text.as_bytes()).ok())
            .map(zeroize::Zeroizing::new)
            .ok_or_else(bad)?;
        let login: LoginToken = serde_json::from_slice(&bytes).map_err(|_| bad())?;
        let mut form = Form::new();
        form.add("grant_type", "password").add("username", login.username).add("password", login.auth_token);
        if !scopes.is_empty() {
            form.add("scope", scopes.join(" "));
        }
        self.token_request(&self.settings.token_url, &form).await
    }
}
