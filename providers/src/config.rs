//! The service catalogue as data: the built-in TOML merged with the
//! operator's configuration, validated, and built into a core [`Catalogue`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

pub use latchkey_core::CatalogueError;
use latchkey_core::{Catalogue, LoginMethod, ProviderSpec, ServiceSpec};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use url::Url;

use crate::classify::{AccountIdSource, ResponseRules};
use crate::client::{ClientAuth, OAuthProvider, ProviderSettings, Revocation};

/// The built-in catalogue.
pub const BUILT_IN: &str = include_str!("catalogue.toml");

/// `revocation`: how a provider revokes refresh tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RevocationStyle {
    /// RFC 7009 at `revocation_url` (the default when there is one).
    Rfc7009,
    /// A POST to `revocation_url` with the access token as bearer (Dropbox).
    Bearer,
    /// Not offered (the default without a `revocation_url`).
    None,
}

/// `handout`: what the user is handed after a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Handout {
    /// An AuthID; the broker keeps the grant (the default).
    Authid,
    /// The provider's access token itself; nothing is kept (pCloud).
    AccessToken,
}

/// `[providers.<id>]`: every field optional so the operator can override any.
/// `Debug` shows how many client secrets there are, never the secrets.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Authorization endpoint.
    pub authorize_url: Option<String>,
    /// Token endpoint.
    pub token_url: Option<String>,
    /// Revocation endpoint.
    pub revocation_url: Option<String>,
    /// `rfc7009`, `bearer` (Dropbox) or `none`.
    pub revocation: Option<RevocationStyle>,
    /// RFC 8628 device authorization endpoint.
    pub device_authorization_url: Option<String>,
    /// Issuer identifier, checked against the callback's RFC 9207 `iss`.
    pub issuer: Option<String>,
    /// `basic`, `post` or `none`.
    pub client_auth: Option<ClientAuth>,
    /// Send a PKCE S256 challenge.
    pub pkce: Option<bool>,
    /// Whether the provider issues a new refresh token on every refresh. The
    /// engine counts refreshes that contradict it (a metric, and a warning
    /// once per provider), so a provider that changed is noticed.
    pub rotates_refresh_tokens: Option<bool>,
    /// Idle lifetime of a refresh token, in days.
    pub refresh_idle_lifetime_days: Option<u64>,
    /// Lifetime assumed when a token response has no `expires_in`.
    pub default_expires_in_secs: Option<u64>,
    /// `false` when access tokens never expire (pCloud).
    pub access_tokens_expire: Option<bool>,
    /// The broker's client id at this provider.
    pub client_id: Option<String>,
    /// Client secrets, tried in order (rotation without downtime).
    pub client_secrets: Option<Vec<String>>,
    /// A file with one client secret per line, instead of `client_secrets`.
    pub client_secrets_file: Option<PathBuf>,
    /// Send `redirect_uri` with refresh requests.
    pub refresh_sends_redirect_uri: Option<bool>,
    /// A callback parameter naming the API host for token requests (pCloud's `hostname`).
    pub api_host_param: Option<String>,
    /// The API hosts that parameter may name.
    pub api_hosts: Option<Vec<String>>,
    /// Users log in with a pasted personal login token, not a browser
    /// redirect (Jottacloud).
    pub login_token: Option<bool>,
    /// What the user is handed after a login: `authid` (the default), or
    /// `access_token` — the provider's token itself, nothing kept (pCloud).
    pub handout: Option<Handout>,
    /// `id_token` or `field:<name>`.
    pub account_id: Option<AccountIdSource>,
    /// Total timeout of one provider request, in seconds.
    pub timeout_secs: Option<u64>,
}

/// `[services.<id>]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The provider's id.
    pub provider: Option<String>,
    /// Name shown to people.
    pub display_name: Option<String>,
    /// Scopes requested at login.
    pub scopes: Option<Vec<String>>,
    /// Extra authorization parameters.
    pub auth_params: Option<BTreeMap<String, String>>,
    /// Reachable only by `?type=`.
    pub hidden: Option<bool>,
    /// `false` withdraws a built-in service.
    pub enabled: Option<bool>,
}

/// Providers and services, as in the configuration file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CatalogueConfig {
    /// Providers by id.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Services by id.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
}

/// A configuration value its type refused (an unknown choice, a wrong type,
/// an unknown key), and the key it was given under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedError {
    /// The keys leading to it (`["providers", "microsoft", "client_auth"]`);
    /// empty when the top level itself was refused.
    pub key: Vec<String>,
    /// Why, as the type says it: for a choice, the values it allows.
    pub reason: String,
}

impl KeyedError {
    /// The key as written in a file (`providers.microsoft.client_auth`).
    pub fn dotted(&self) -> String {
        self.key.join(".")
    }
}

/// Deserializes configuration from TOML, naming the key of a value refused.
/// The catalogue and the server's configuration both read through it.
pub fn from_toml<T: DeserializeOwned>(value: toml::Value) -> Result<T, KeyedError> {
    serde_path_to_error::deserialize(value).map_err(|e| KeyedError {
        key: e.path().iter().map(ToString::to_string).collect(),
        reason: e.inner().message().to_owned(),
    })
}

impl From<KeyedError> for CatalogueError {
    fn from(e: KeyedError) -> Self {
        match e.key.as_slice() {
            [section, provider, field @ ..] if section == "providers" && !field.is_empty() => {
                CatalogueError::Invalid { provider: provider.clone(), field: field.join("."), reason: e.reason }
            }
            [] => CatalogueError::Syntax(e.reason),
            _ => CatalogueError::Syntax(format!("{}: {}", e.dotted(), e.reason)),
        }
    }
}

impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("authorize_url", &self.authorize_url)
            .field("token_url", &self.token_url)
            .field("revocation_url", &self.revocation_url)
            .field("client_id", &self.client_id)
            .field("client_secrets", &self.client_secrets.as_ref().map(|s| format!("<{} redacted>", s.len())))
            .field("client_secrets_file", &self.client_secrets_file)
            .finish_non_exhaustive()
    }
}

fn merge<T: Clone>(base: &mut Option<T>, over: &Option<T>) {
    if over.is_some() {
        base.clone_from(over);
    }
}

impl ProviderConfig {
    fn merge(&mut self, o: &ProviderConfig) {
        merge(&mut self.authorize_url, &o.authorize_url);
        merge(&mut self.token_url, &o.token_url);
        merge(&mut self.revocation_url, &o.revocation_url);
        merge(&mut self.revocation, &o.revocation);
        merge(&mut self.device_authorization_url, &o.device_authorization_url);
        merge(&mut self.issuer, &o.issuer);
        merge(&mut self.client_auth, &o.client_auth);
        merge(&mut self.pkce, &o.pkce);
        merge(&mut self.rotates_refresh_tokens, &o.rotates_refresh_tokens);
        merge(&mut self.refresh_idle_lifetime_days, &o.refresh_idle_lifetime_days);
        merge(&mut self.default_expires_in_secs, &o.default_expires_in_secs);
        merge(&mut self.access_tokens_expire, &o.access_tokens_expire);
        merge(&mut self.client_id, &o.client_id);
        merge(&mut self.client_secrets, &o.client_secrets);
        merge(&mut self.client_secrets_file, &o.client_secrets_file);
        merge(&mut self.refresh_sends_redirect_uri, &o.refresh_sends_redirect_uri);
        merge(&mut self.api_host_param, &o.api_host_param);
        merge(&mut self.api_hosts, &o.api_hosts);
        merge(&mut self.login_token, &o.login_token);
        merge(&mut self.handout, &o.handout);
        merge(&mut self.account_id, &o.account_id);
        merge(&mut self.timeout_secs, &o.timeout_secs);
    }
}

impl ServiceConfig {
    fn merge(&mut self, o: &ServiceConfig) {
        merge(&mut self.provider, &o.provider);
        merge(&mut self.display_name, &o.display_name);
        merge(&mut self.scopes, &o.scopes);
        merge(&mut self.auth_params, &o.auth_params);
        merge(&mut self.hidden, &o.hidden);
        merge(&mut self.enabled, &o.enabled);
    }
}

impl CatalogueConfig {
    /// Parses catalogue TOML (the built-in file, or tests' own).
    pub fn parse(text: &str) -> Result<Self, CatalogueError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| CatalogueError::Syntax(e.message().to_owned()))?;
        Ok(from_toml(toml::Value::Table(table))?)
    }

    /// The built-in catalogue (parsed once per process).
    pub fn built_in() -> Result<Self, CatalogueError> {
        static PARSED: LazyLock<Result<CatalogueConfig, CatalogueError>> =
            LazyLock::new(|| CatalogueConfig::parse(BUILT_IN));
        PARSED.clone()
    }

    /// The built-in catalogue with the operator's entries laid over it:
    /// fields of existing entries are replaced, new entries added.
    pub fn with_overrides(mut self, over: &CatalogueConfig) -> Self {
        for (id, p) in &over.providers {
            self.providers.entry(id.clone()).or_default().merge(p);
        }
        for (id, s) in &over.services {
            self.services.entry(id.clone()).or_default().merge(s);
        }
        self
    }
}

/// A service that is configured but not offered, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withheld {
    /// The service.
    pub service: String,
    /// Why it is not offered.
    pub reason: String,
}

/// The result of building a catalogue.
pub struct BuiltCatalogue {
    /// What the engine serves.
    pub catalogue: Catalogue,
    /// Services left out, with the reason (for `latchkey services`).
    pub withheld: Vec<Withheld>,
}

/// What building needs besides the configuration.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The broker's redirect URI (`latchkey_core::redirect_uri`).
    pub redirect_uri: String,
    /// Request timeout when a provider sets none.
    pub default_timeout: Duration,
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

fn check_url(provider: &str, field: &'static str, value: &str) -> Result<Url, CatalogueError> {
    let invalid = |reason: &str| CatalogueError::Invalid {
        provider: provider.to_owned(),
        field: field.to_owned(),
        reason: reason.into(),
    };
    let url = Url::parse(value).map_err(|e| invalid(&e.to_string()))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(invalid("plain http is allowed only to a loopback host")),
        _ => Err(invalid("must be an https URL")),
    }
}

fn read_secrets(provider: &str, path: &PathBuf) -> Result<Vec<String>, CatalogueError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CatalogueError::SecretsFile { provider: provider.to_owned(), reason: e.kind().to_string() })?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect())
}

/// Validates one provider and builds its client. `Ok(None)` when it has no
/// credentials (its services are then withheld, not an error).
fn build_provider(
    id: &str,
    p: &ProviderConfig,
    options: &BuildOptions,
) -> Result<Result<(ProviderSpec, OAuthProvider), String>, CatalogueError> {
    let invalid = |field: &str, reason: &str| CatalogueError::Invalid {
        provider: id.to_owned(),
        field: field.to_owned(),
        reason: reason.to_owned(),
    };
    let client_auth = p.client_auth.unwrap_or(ClientAuth::Basic);
    let token_url = check_url(
        id,
        "token_url",
        p.token_url.as_deref().ok_or(CatalogueError::Missing { provider: id.to_owned(), field: "token_url" })?,
    )?;
    let login = if p.login_token.unwrap_or(false) { LoginMethod::LoginToken } else { LoginMethod::Redirect };
    let authorize_url = match (&p.authorize_url, login) {
        (Some(u), _) => Some(check_url(id, "authorize_url", u)?),
        (None, LoginMethod::LoginToken) => None,
        (None, LoginMethod::Redirect) => {
            return Err(CatalogueError::Missing { provider: id.to_owned(), field: "authorize_url" });
        }
    };
    let default_style = if p.revocation_url.is_some() { RevocationStyle::Rfc7009 } else { RevocationStyle::None };
    let revocation = match p.revocation.unwrap_or(default_style) {
        RevocationStyle::None => Revocation::None,
        style => {
            let url = p
                .revocation_url
                .as_deref()
                .ok_or(CatalogueError::Missing { provider: id.to_owned(), field: "revocation_url" })?;
            let url = check_url(id, "revocation_url", url)?;
            if style == RevocationStyle::Bearer { Revocation::Bearer(url) } else { Revocation::Rfc7009(url) }
        }
    };
    let device_url =
        p.device_authorization_url.as_deref().map(|u| check_url(id, "device_authorization_url", u)).transpose()?;
    let account_id = p.account_id.clone().unwrap_or(AccountIdSource::None);
    let idle_lifetime = match p.refresh_idle_lifetime_days {
        None => None,
        Some(days) if days <= 36_500 => Some(Duration::from_secs(days * 86_400)),
        Some(_) => return Err(invalid("refresh_idle_lifetime_days", "must be at most 36500 (100 years)")),
    };
    if p.api_host_param.is_some() && p.api_hosts.as_ref().is_none_or(Vec::is_empty) {
        return Err(invalid("api_hosts", "api_host_param needs the list of hosts it may name"));
    }
    let secrets = match (&p.client_secrets, &p.client_secrets_file) {
        (Some(_), Some(_)) => {
            return Err(invalid("client_secrets", "give client_secrets or client_secrets_file, not both"));
        }
        (Some(s), None) => s.clone(),
        (None, Some(path)) => read_secrets(id, path)?,
        (None, None) => Vec::new(),
    };
    let Some(client_id) = p.client_id.clone().filter(|c| !c.is_empty()) else {
        return Ok(Err(format!("provider '{id}' has no client_id")));
    };
    if client_auth != ClientAuth::None && secrets.is_empty() {
        return Ok(Err(format!("provider '{id}' has no client secret")));
    }
    let access_expire = p.access_tokens_expire.unwrap_or(true);
    let settings = ProviderSettings {
        id: id.to_owned(),
        authorize_url,
        token_url,
        revocation,
        device_url,
        client_id,
        client_secrets: secrets,
        client_auth,
        redirect_uri: options.redirect_uri.clone(),
        refresh_sends_redirect_uri: p.refresh_sends_redirect_uri.unwrap_or(false),
        api_host_param: p.api_host_param.clone(),
        api_hosts: p.api_hosts.clone().unwrap_or_default(),
        rules: ResponseRules {
            default_expires_in: access_expire
                .then(|| Duration::from_secs(p.default_expires_in_secs.unwrap_or(crate::DEFAULT_EXPIRES_IN_SECS))),
            account_id,
        },
        timeout: p.timeout_secs.map(Duration::from_secs).unwrap_or(options.default_timeout),
    };
    // Only a redirect login sends the browser to the authorization endpoint.
    let authorize_origin = match (login, &settings.authorize_url) {
        (LoginMethod::Redirect, Some(url)) => Some(url.origin().ascii_serialization()).filter(|o| o != "null"),
        _ => None,
    };
    let spec = ProviderSpec {
        id: id.to_owned(),
        pkce: p.pkce.unwrap_or(true),
        issuer: p.issuer.clone(),
        refresh_idle_lifetime: idle_lifetime,
        hands_out_access_token: p.handout == Some(Handout::AccessToken),
        login,
        authorize_origin,
        rotates_refresh_tokens: p.rotates_refresh_tokens,
    };
    let client =
        OAuthProvider::new(settings).map_err(|e| invalid("client", &format!("cannot build the HTTP client: {e}")))?;
    Ok(Ok((spec, client)))
}

/// Validates the merged configuration and builds the engine's catalogue.
pub fn build(config: &CatalogueConfig, options: &BuildOptions) -> Result<BuiltCatalogue, CatalogueError> {
    let mut catalogue = Catalogue::new();
    let mut unavailable = BTreeMap::new();
    for (id, p) in &config.providers {
        match build_provider(id, p, options)? {
            Ok((spec, client)) => {
                catalogue.add_provider(spec, Arc::new(client))?;
            }
            Err(reason) => {
                unavailable.insert(id.clone(), reason);
            }
        }
    }
    let mut withheld = Vec::new();
    for (id, s) in &config.services {
        let provider = s.provider.clone().ok_or_else(|| CatalogueError::NoProvider(id.clone()))?;
        if !config.providers.contains_key(&provider) {
            return Err(CatalogueError::UnknownProvider { service: id.clone(), provider });
        }
        if s.enabled == Some(false) {
            withheld.push(Withheld { service: id.clone(), reason: "disabled in the configuration".into() });
            continue;
        }
        if let Some(reason) = unavailable.get(&provider) {
            withheld.push(Withheld { service: id.clone(), reason: reason.clone() });
            continue;
        }
        let spec = ServiceSpec {
            id: id.clone(),
            provider,
            display_name: s.display_name.clone().unwrap_or_else(|| id.clone()),
            scopes: s.scopes.clone().unwrap_or_default(),
            auth_params: s.auth_params.clone().unwrap_or_default().into_iter().collect(),
            hidden: s.hidden.unwrap_or(false),
        };
        catalogue.add_service(spec)?;
    }
    Ok(BuiltCatalogue { catalogue, withheld })
}
