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
