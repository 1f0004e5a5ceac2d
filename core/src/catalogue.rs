//! Services and providers as the engine sees them: facts plus a [`Provider`].
//!
//! The `providers` crate builds a [`Catalogue`] from the built-in catalogue and
//! the operator's configuration; tests build one by hand.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::provider::Provider;

/// The facts about a provider the engine's decisions depend on.
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
}

impl ProviderSpec {
    /// A provider with PKCE, no known issuer and no known idle lifetime.
    pub fn new(id: &str) -> Self {
        ProviderSpec {
            id: id.to_owned(),
            pkce: true,
            issuer: None,
            refresh_idle_lifetime: None,
            hands_out_access_token: false,
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

/// Why a catalogue entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogueError {
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
}

impl std::fmt::Debug for Catalogue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalogue")
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .finish()
    }
}
