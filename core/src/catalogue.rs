//! Services and providers as the engine sees them: facts plus a [`Provider`].
//!
//! The `providers` crate builds a [`Catalogue`] from the built-in catalogue and
//! the operator's configuration; tests build one by hand.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::provider::Provider;

/// How a user logs in at a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginMethod {
    /// A browser redirect to the provider's authorization endpoint and back
    /// to the broker's redirect URI (the OAuth authorization code flow).
    Redirect,
    /// The user pastes a personal login token the provider issued them, which
    /// the broker trades for tokens directly (Jottacloud's CLI token).
    LoginToken,
}

/// The facts about a provider the engine and the front end depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderSpec {
    /// Provider id (`microsoft`, `google`, …).
    pub id: String,
    /// Whether to send a PKCE S256 challenge.
    pub pkce: bool,
    /// The issuer identifier the callback's RFC 9207 `iss` must equal when present.
    pub issuer: Option<String>,
    /// How long a refresh token lives unused, where known (Microsoft: 90 days).
    pub refresh_idle_lifetime: Option<Duration>,
    /// The login hands the user the provider's access token itself and keeps
    /// nothing (pCloud: tokens never expire, there is no refresh token, and
    /// Duplicati's backend sends what it is given straight to the provider).
    pub hands_out_access_token: bool,
    /// How users log in.
    pub login: LoginMethod,
    /// The origin of the authorization endpoint (`https://accounts.google.com`):
    /// where the broker's login form sends the browser. `None` when users do
    /// not log in by a redirect.
    pub authorize_origin: Option<String>,
    /// Whether the catalogue says the provider issues a new refresh token on
    /// every refresh (`None`: it does not say). The engine counts refreshes
    /// that contradict it.
    pub rotates_refresh_tokens: Option<bool>,
}

impl ProviderSpec {
    /// A redirect-login provider with PKCE, no known issuer, no known idle
    /// lifetime and no known authorization origin.
    pub fn new(id: &str) -> Self {
        ProviderSpec {
            id: id.to_owned(),
            pkce: true,
            issuer: None,
            refresh_idle_lifetime: None,
            hands_out_access_token: false,
            login: LoginMethod::Redirect,
            authorize_origin: None,
            rotates_refresh_tokens: None,
        }
    }
}

/// What a user picks: a provider plus scopes and authorization parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Service id (`onedrivev2`, `googledrive`, …).
    pub id: String,
    /// The provider's id.
    pub provider: String,
    /// Name shown to people.
    pub display_name: String,
    /// Scopes requested at login.
    pub scopes: Vec<String>,
    /// Extra authorization URL parameters (e.g. `access_type=offline`).
    pub auth_params: Vec<(String, String)>,
    /// Reachable only by id, not listed.
    pub hidden: bool,
}

impl ServiceSpec {
    /// A visible service with no scopes or parameters.
    pub fn new(id: &str, provider: &str) -> Self {
        ServiceSpec {
            id: id.to_owned(),
            provider: provider.to_owned(),
            display_name: id.to_owned(),
            scopes: Vec::new(),
            auth_params: Vec::new(),
            hidden: false,
        }
    }
}

/// A provider's facts and its client.
#[derive(Clone)]
pub struct ProviderEntry {
    /// Facts.
    pub spec: ProviderSpec,
    /// The client that talks to it.
    pub client: Arc<dyn Provider>,
}

/// Every service the broker offers and the providers behind them.
#[derive(Clone, Default)]
pub struct Catalogue {
    providers: BTreeMap<String, ProviderEntry>,
    services: BTreeMap<String, ServiceSpec>,
}

/// Why a catalogue cannot be used: its text, an entry, or the building of a
/// provider. Every message names the entry and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogueError {
    /// The text does not parse, or a value outside a provider entry is
    /// refused (an unknown key, a wrong type: the message names the key).
    #[error("catalogue: {0}")]
    Syntax(String),
    /// Two entries share an id.
    #[error("'{0}' is defined twice")]
    Duplicate(String),
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
    /// A provider's field is refused: an unknown choice (`client_auth =
    /// "jwt"`: the reason lists the allowed ones), a wrong type, a bad URL, a
    /// number out of range, or a field that does not exist.
    #[error("provider '{provider}': {field} is invalid: {reason}")]
    Invalid {
        /// The provider.
        provider: String,
        /// The field.
        field: String,
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

impl Catalogue {
    /// An empty catalogue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a provider.
    pub fn add_provider(&mut self, spec: ProviderSpec, client: Arc<dyn Provider>) -> Result<(), CatalogueError> {
        if self.providers.contains_key(&spec.id) {
            return Err(CatalogueError::Duplicate(spec.id));
        }
        self.providers.insert(spec.id.clone(), ProviderEntry { spec, client });
        Ok(())
    }

    /// Adds a service whose provider is already present.
    pub fn add_service(&mut self, spec: ServiceSpec) -> Result<(), CatalogueError> {
        if !self.providers.contains_key(&spec.provider) {
            return Err(CatalogueError::UnknownProvider { service: spec.id, provider: spec.provider });
        }
        if self.services.contains_key(&spec.id) {
            return Err(CatalogueError::Duplicate(spec.id));
        }
        self.services.insert(spec.id.clone(), spec);
        Ok(())
    }

    /// A service by id, hidden ones included.
    pub fn service(&self, id: &str) -> Option<&ServiceSpec> {
        self.services.get(id)
    }

    /// The provider behind a service.
    pub fn provider_for(&self, service: &str) -> Option<&ProviderEntry> {
        self.services.get(service).and_then(|s| self.providers.get(&s.provider))
    }

    /// A provider by id.
    pub fn provider(&self, id: &str) -> Option<&ProviderEntry> {
        self.providers.get(id)
    }

    /// Every service, hidden ones too, by id.
    pub fn services(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.services.values()
    }

    /// The services offered in listings (hidden ones left out), by id.
    pub fn listed_services(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.services.values().filter(|s| !s.hidden)
    }

    /// How users log into a service (`None`: no such service).
    pub fn login_method(&self, service: &str) -> Option<LoginMethod> {
        self.provider_for(service).map(|p| p.spec.login)
    }

    /// The origins a login sends browsers to, sorted, each once.
    pub fn authorize_origins(&self) -> Vec<&str> {
        let mut origins: Vec<&str> =
            self.providers.values().filter_map(|p| p.spec.authorize_origin.as_deref()).collect();
        origins.sort_unstable();
        origins.dedup();
        origins
    }
}

impl std::fmt::Debug for Catalogue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalogue")
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .finish()
    }
}
