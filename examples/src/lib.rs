//! Worked examples of using latchkey as a library; `docs/embedding.md` is
//! the guide that walks through them.
//!
//! * [`warp_app`] — a warp application that mounts the whole broker (pages,
//!   Duplicati's protocol, `/v1`, `/oauth2/token`) under `/oauth/`, beside
//!   its own routes. Run it: `cargo run -p latchkey-examples --bin warp-app`.
//! * [`hyper_app`] — a plain hyper application that embeds only the engine
//!   ([`latchkey_core::Broker`] with a store and the providers crate) and
//!   hands out access tokens from its own handler. Run it:
//!   `cargo run -p latchkey-examples --bin hyper-app`.
//! * [`btree_store`] — a custom [`latchkey_core::Store`] that passes the
//!   store conformance suite.
//! * [`api_key_provider`] — a custom [`latchkey_core::Provider`], for a
//!   service the catalogue cannot describe as data.
//!
//! The binaries log in at the testkit's fake OAuth provider on loopback
//! ([`standin`]), so they run without a cloud account. `tests/examples.rs`
//! starts each application in-process against it and checks what it does.

pub mod api_key_provider;
pub mod btree_store;
pub mod hyper_app;
pub mod standin;
pub mod warp_app;

pub use api_key_provider::ApiKeyProvider;
pub use btree_store::BTreeStore;
