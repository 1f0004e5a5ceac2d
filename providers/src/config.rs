//! The service catalogue as data: the built-in TOML merged with the
//! operator's configuration, validated, and built into a core [`Catalogue`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use latchkey_core::{Catalogue, ProviderSpec, ServiceSpec};
use serde::Deserialize;
use url::Url;

use crate::classify::{AccountIdSource, ResponseRules};
use crate::client::{ClientAuth, OAuthProvider, ProviderSettings, Revocation};

/// The built-in catalogue.
pub const BUILT_IN: &str = include_str!("catalogue.toml");

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
    pub revocation: Option<String>,
    /// RFC 8628 device authorization endpoint.
    pub device_authorization_url: Option<String>,
    /// Issuer identifier, checked against the callback's RFC 9207 `iss`.
    pub issuer: Option<String>,
    /// `basic`, `post` or `none`.
    pub client_auth: Option<String>,
    /// Send a PKCE S256 challenge.
    pub pkce: Option<bool>,
    /// Does the provider rotate refresh tokens.
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
    /// The provider takes a pasted personal login token (Jottacloud).
    pub login_token: Option<bool>,
    /// What the user is handed after a login: `authid` (the default), or
    /// `access_token` — the provider's token itself, nothing kept (pCloud).
    pub handout: Option<String>,
    /// `id_token` or `field:<name>`.
    pub account_id: Option<String>,
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

/// Why the catalogue is not usable. Every message names the entry and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogueError {
    /// The TOML does not parse or has unknown keys.
    #[error("catalogue: {0}")]
    Syntax(String),
    /// A service names a provider that does not exist.
    #[error("service '{service}' names unknown provider '{provider}'")]
    UnknownProvider {
        /// The service.
        service: String,
        /// The provider it names.
        provider: String,
    },
    /// A service has no provider at all.
    #[error("service '{0}' names no provider")]
    NoProvider(String),
    /// A field a provider needs is missing.
    #[error("provider '{provider}' has no {field}")]
    Missing {
        /// The provider.
        provider: String,
        /// The missing field.
        field: &'static str,
    },
    /// A field holds a value outside its domain.
    #[error("provider '{provider}': {field} is invalid: {reason}")]
    Invalid {
        /// The provider.
        provider: String,
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A secrets file cannot be read.
    #[error("provider '{provider}': cannot read client_secrets_file: {reason}")]
    SecretsFile {
        /// The provider.
        provider: String,
        /// Why (no secret content).
        reason: String,
    },
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
        toml::from_str(text).map_err(|e| CatalogueError::Syntax(e.message().to_owned()))
    }

    /// The built-in catalogue.
    pub fn built_in() -> Result<Self, CatalogueError> {
        Self::parse(BUILT_IN)
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
    /// The broker's redirect URI (`<public_url>/logged-in`).
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
    let invalid =
        |reason: &str| CatalogueError::Invalid { provider: provider.to_owned(), field, reason: reason.into() };
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
    let invalid = |field: &'static str, reason: &str| CatalogueError::Invalid {
        provider: id.to_owned(),
        field,
        reason: reason.to_owned(),
    };
    let client_auth = match p.client_auth.as_deref().unwrap_or("basic") {
        "basic" => ClientAuth::Basic,
        "post" => ClientAuth::Post,
        "none" => ClientAuth::None,
        other => return Err(invalid("client_auth", &format!("'{other}' is not basic, post or none"))),
    };
    let token_url = check_url(
        id,
        "token_url",
        p.token_url.as_deref().ok_or(CatalogueError::Missing { provider: id.to_owned(), field: "token_url" })?,
    )?;
    let login_token = p.login_token.unwrap_or(false);
    let authorize_url = match (&p.authorize_url, login_token) {
        (Some(u), _) => Some(check_url(id, "authorize_url", u)?),
        (None, true) => None,
        (None, false) => return Err(CatalogueError::Missing { provider: id.to_owned(), field: "authorize_url" }),
    };
    let revocation =
        match p.revocation.as_deref().unwrap_or(if p.revocation_url.is_some() { "rfc7009" } else { "none" }) {
            "none" => Revocation::None,
            style @ ("rfc7009" | "bearer") => {
                let url = p
                    .revocation_url
                    .as_deref()
                    .ok_or(CatalogueError::Missing { provider: id.to_owned(), field: "revocation_url" })?;
                let url = check_url(id, "revocation_url", url)?;
                if style == "bearer" { Revocation::Bearer(url) } else { Revocation::Rfc7009(url) }
            }
            other => return Err(invalid("revocation", &format!("'{other}' is not rfc7009, bearer or none"))),
        };
    let device_url =
        p.device_authorization_url.as_deref().map(|u| check_url(id, "device_authorization_url", u)).transpose()?;
    let account_id = match p.account_id.as_deref() {
        None => AccountIdSource::None,
        Some("id_token") => AccountIdSource::IdToken,
        Some(other) => match other.strip_prefix("field:") {
            Some(field) if !field.is_empty() => AccountIdSource::Field(field.to_owned()),
            _ => return Err(invalid("account_id", "must be id_token or field:<name>")),
        },
    };
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
    let hands_out_access_token = match p.handout.as_deref().unwrap_or("authid") {
        "authid" => false,
        "access_token" => true,
        other => return Err(invalid("handout", &format!("'{other}' is not authid or access_token"))),
    };
    let spec = ProviderSpec {
        id: id.to_owned(),
        pkce: p.pkce.unwrap_or(true),
        issuer: p.issuer.clone(),
        refresh_idle_lifetime: idle_lifetime,
        hands_out_access_token,
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
                catalogue.add_provider(spec, Arc::new(client)).map_err(|e| CatalogueError::Syntax(e.to_string()))?;
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
        catalogue.add_service(spec).map_err(|e| CatalogueError::Syntax(e.to_string()))?;
    }
    Ok(BuiltCatalogue { catalogue, withheld })
}
