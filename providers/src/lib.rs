//! latchkey's providers: OAuth 2.0 over reqwest, and the built-in service
//! catalogue as data.
//!
//! [`OAuthProvider`] implements `latchkey_core::Provider` with plain RFC 6749
//! requests written here rather than through the `oauth2` crate. The reason
//! is the quirks: Dropbox wants no `redirect_uri` on refresh, pCloud names the
//! API host in its callback, Jottacloud trades a pasted login token through a
//! password grant, Dropbox revokes with a bearer token, and client secrets are
//! tried in order for rotation without downtime. Each of those needs exact
//! control over the request; a typed OAuth client would have to be worked
//! around at every turn, and PKCE, revocation and device authorization are a
//! few lines each.
//!
//! The catalogue ([`config`]) is TOML embedded in the binary and merged with
//! the operator's configuration; any field can be overridden, which is also
//! how tests point a built-in service at a local server.
//!
//! Errors are classified ([`classify`]) from status and OAuth error JSON into
//! core's `ProviderError`; a provider's body never reaches a log or a user
//! verbatim.
//!
//! [`TokioRuntime`] is the engine's clock, timers and spawning on tokio,
//! here so that a program embedding the engine needs this crate, a store and
//! `latchkey-core`, and no web framework.
//!
//! # Embedding the engine
//!
//! A catalogue from TOML (the broker's `[providers.<id>]` and
//! `[services.<id>]` tables; see `docs/providers.md`), built into HTTP
//! providers, and a [`latchkey_core::Broker`] on a store. The application's
//! own handlers then trade AuthIDs for access tokens. `docs/embedding.md`
//! walks through it; `examples/src/hyper_app.rs` is a whole application.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use latchkey_core::{AuthId, Broker, BrokerParts, EngineConfig, EngineError, MasterKeyring, MemoryStore, OsRandom};
//! use latchkey_providers::{BuildOptions, CatalogueConfig, TokioRuntime};
//! use secrecy::ExposeSecret;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let public_url = "https://app.example.org";
//! let catalogue = CatalogueConfig::parse(
//!     r#"
//!     [providers.acme]
//!     authorize_url = "https://id.acme.example/oauth2/authorize"
//!     token_url = "https://id.acme.example/oauth2/token"
//!     client_id = "my-app"
//!     client_secrets = ["…"]
//!     [services.acmedrive]
//!     provider = "acme"
//!     scopes = ["drive", "offline_access"]
//!     "#,
//! )?;
//! let options = BuildOptions {
//!     redirect_uri: latchkey_core::redirect_uri(public_url), // <public_url>/logged-in
//!     default_timeout: Duration::from_secs(15),
//! };
//! let built = latchkey_providers::build(&catalogue, &options)?;
//! let keyring = MasterKeyring::parse(&["k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="])?; // from your secrets
//! let broker = Broker::new(BrokerParts {
//!     store: Arc::new(MemoryStore::new()), // or latchkey_storage_sled::SledStore, PostgresStore, your own
//!     catalogue: built.catalogue,
//!     keyring,
//!     runtime: Arc::new(TokioRuntime),
//!     rng: Arc::new(OsRandom),
//!     config: EngineConfig { public_url: public_url.into(), ..EngineConfig::default() },
//! });
//! tokio::runtime::Runtime::new()?.block_on(broker.start())?; // follow the store's notices
//! assert!(broker.catalogue().service("acmedrive").is_some());
//!
//! /// What an application's handler does with the AuthID a client presents.
//! async fn access_token(broker: &Broker, presented: &str) -> Result<String, EngineError> {
//!     let authid = AuthId::parse(presented).map_err(EngineError::AuthIdMalformed)?;
//!     let token = broker.token(&authid, None).await?; // cached, or refreshed once and stored first
//!     Ok(token.access_token.expose_secret().to_owned())
//! }
//! # let _ = access_token;
//! # Ok(())
//! # }
//! ```

pub mod classify;
pub mod client;
pub mod config;
pub mod runtime;

pub use client::{ClientAuth, OAuthProvider, ProviderSettings, Revocation};
pub use config::{
    BuildOptions, BuiltCatalogue, CatalogueConfig, CatalogueError, Handout, KeyedError, RevocationStyle, Withheld,
    build, from_toml,
};
pub use runtime::TokioRuntime;

/// The access token lifetime assumed when a provider omits `expires_in`
/// (one hour, the common default; Dropbox's 4 hours is set in the catalogue).
pub const DEFAULT_EXPIRES_IN_SECS: u64 = 3600;
