//! latchkey's core: everything the broker decides and encrypts, with no I/O.
//!
//! This crate holds the AuthID, the key hierarchy, sealed envelopes, the
//! stored records, the [`Store`] and [`Provider`] traits that adapters
//! implement, and the refresh engine ([`engine`], driven through [`Broker`]).
//! It performs no I/O and depends on no runtime, HTTP client, web framework
//! or database: time comes in through [`Clock`] and randomness through
//! [`Random`], so every decision is testable without sockets.
//!
//! # Key design decisions
//!
//! * **What a stolen database yields: nothing.** A grant's payload is sealed
//!   under a random data key; each handle keeps that data key wrapped under a
//!   key derived from its AuthID secret, and the wrap sealed again under a
//!   master key (see [`keys`]).
//! * **HKDF, not Argon2, for AuthIDs.** The AuthID secret is 256 random bits,
//!   so a slow KDF would only slow every request and add a denial-of-service
//!   lever; Argon2id is kept for the one low-entropy input, an operator's
//!   passphrase.
//! * **Explicit stored formats.** Envelopes and records are written and read
//!   by hand with version bytes ([`envelope`], [`records`]), never by a
//!   derive whose output could change under us; decoding never panics.
//! * **Every ciphertext is bound to its place.** The associated data names
//!   record kind, ids, field and format version, so a blob moved elsewhere
//!   fails to open.
//!
//! # Embedding
//!
//! A [`Broker`] is built from [`BrokerParts`]: a [`Store`] (this crate's
//! [`MemoryStore`], `latchkey-storage-sled`, `latchkey-storage-postgres`, or
//! your own, checked by the conformance suite in `testing`), a [`Catalogue`]
//! of services and [`Provider`]s (`latchkey-providers` builds one from
//! catalogue TOML), a [`MasterKeyring`], a [`Runtime`]
//! (`latchkey_providers::TokioRuntime`), a [`Random`] source ([`OsRandom`])
//! and an [`EngineConfig`]. Its methods are the whole engine; an
//! application's own handlers call them:
//!
//! ```ignore
//! let broker = Broker::new(BrokerParts {
//!     store: Arc::new(SledStore::open("./latchkey-data").await?),
//!     catalogue: latchkey_providers::build(&catalogue_toml, &options)?.catalogue,
//!     keyring: MasterKeyring::parse(&configured_keys)?,
//!     runtime: Arc::new(TokioRuntime),
//!     rng: Arc::new(OsRandom),
//!     config: EngineConfig { public_url: "https://app.example.org".into(), ..EngineConfig::default() },
//! });
//! broker.start().await?; // follow the store's notices
//!
//! // A login: begin_login → the provider → complete_login gives the AuthID, once.
//! // Then, for each request that presents it:
//! let token = broker.token(&AuthId::parse(presented)?, None).await?;
//! ```
//!
//! (Not compiled here: this crate depends on none of those adapters. The
//! same construction compiles and runs in `latchkey_providers`' crate
//! documentation.) `docs/embedding.md` is the guide, and the `examples/`
//! crate has whole applications, a custom store and a custom provider.

pub mod authid;
pub mod catalogue;
mod codec;
pub mod engine;
pub mod envelope;
pub mod keys;
pub mod memory;
pub mod provider;
pub mod random;
pub mod records;
pub mod runtime;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod time;

pub use authid::{AuthId, AuthIdError, AuthIdSecret, KeyId, KeyIdText};
pub use catalogue::{Catalogue, CatalogueError, LoginMethod, ProviderSpec, ServiceSpec};
pub use codec::DecodeError;
pub use engine::{Broker, BrokerParts, EngineConfig, EngineError, ErrorCode, REDIRECT_PATH, TokenGrant, redirect_uri};
pub use envelope::{Field, OpenError, SealContext, SealedBlob};
pub use keys::{DataKey, KeyError, MasterKey, MasterKeyId, MasterKeyring, PassphraseParams, RecordKeys, SymmetricKey};
pub use memory::MemoryStore;
pub use provider::{Provider, ProviderError, TokenResponse};
pub use random::{OsRandom, Random};
pub use records::{
    DeviceGrant, Grant, GrantId, GrantPayload, GrantState, Handle, Handoff, HandoffId, Lease, LoginId,
    LoginTransaction, Record, RecordError, RecordKind, SealedAuthId, Tagged, UserCodeId,
};
pub use runtime::{BoxFuture, Runtime};
pub use store::{LeaseOutcome, ListQuery, Notice, NoticeStream, Page, Store, StoreError, StoreExt, StoredRecord};
pub use time::{Clock, SystemClock, Timestamp, UtcTime};
