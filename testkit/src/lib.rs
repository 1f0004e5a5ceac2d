//! A fake OAuth 2.0 provider on a real loopback socket, with fault injection.
//!
//! Tests, benchmarks and `latchkey demo` need an authorization server that
//! behaves like the real ones — rotating refresh tokens, detecting reuse of
//! rotated-out tokens, checking client authentication and PKCE — and that can
//! be told to misbehave: answer 500 or 429, hang past a client's timeout, or
//! commit a rotation and then drop the connection. [`FakeProvider`] binds
//! `127.0.0.1:0` and serves:
//!
//! | route | what |
//! |---|---|
//! | `GET /authorize` | authorization endpoint: auto-approves (or shows a small form) and redirects with `code`, `state`, `iss` |
//! | `POST /token` | `authorization_code`, `refresh_token`, `password`, device-code grants |
//! | `POST /revoke` | RFC 7009 revocation |
//! | `POST /2/auth/token/revoke` | Dropbox-style bearer revocation |
//! | `POST /introspect` | RFC 7662-shaped `{"active": …}` |
//! | `POST /device/code` | RFC 8628 device authorization |
//!
//! It records every request and counts refreshes and reuse attempts.
//!
//! Built on hyper directly rather than a framework, because dropping a
//! connection after committing a rotation needs control over the connection
//! that frameworks do not give.
//!
//! For interop tests against a real, certified authorization server, the
//! [`oidc`] module runs panva's oidc-provider (Node.js, `interop/oidc/`) on
//! loopback and drives its login, consent and device pages over HTTP.

pub mod oidc;
mod server;
mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use crate::state::State;

/// How the fake provider expects the client to authenticate at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic with form-urlencoded id and secret (RFC 6749 §2.3.1).
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Post,
    /// Either of the above.
    Any,
}

/// What one fake provider instance does.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// The only client id accepted.
    pub client_id: String,
    /// Accepted client secrets; empty for a public client (no secret at all).
    pub client_secrets: Vec<String>,
    /// Accepted client authentication.
    pub client_auth: ClientAuth,
    /// Refuse authorization requests without an S256 PKCE challenge.
    pub require_pkce: bool,
    /// Issue a new refresh token on every refresh.
    pub rotate: bool,
    /// A rotated-out refresh token presented again revokes its whole grant.
    pub strict_reuse: bool,
    /// Access token lifetime; `None` sends no `expires_in` (tokens never expire).
    pub access_lifetime: Option<Duration>,
    /// Issue refresh tokens at all.
    pub issue_refresh_tokens: bool,
    /// Added before every token endpoint answer.
    pub latency: Duration,
    /// Sent as `iss` on authorization responses (RFC 9207) when set.
    pub issuer: Option<String>,
    /// Redirect straight back (true) or show a login form first (false).
    pub auto_approve: bool,
    /// `(username, auth_token)` pairs the password grant accepts.
    pub password_logins: Vec<(String, String)>,
    /// Extra top-level fields added to every token response (e.g. `account_id`).
    pub extra_token_fields: Vec<(String, String)>,
    /// Extra parameters on every redirect back to the client (pCloud's `hostname`).
    pub extra_callback_params: Vec<(String, String)>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            client_id: "latchkey-test".into(),
            client_secrets: vec!["test-secret".into()],
            client_auth: ClientAuth::Any,
            require_pkce: false,
            rotate: false,
            strict_reuse: false,
            access_lifetime: Some(Duration::from_secs(3600)),
            issue_refresh_tokens: true,
            latency: Duration::ZERO,
            issuer: None,
            auto_approve: true,
            password_logins: Vec::new(),
            extra_token_fields: Vec::new(),
            extra_callback_params: Vec::new(),
        }
    }
}

/// A misbehaviour for one token-endpoint request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 500 with an HTML body, as a broken proxy would send.
    ServerError,
    /// HTTP 429 with `Retry-After`.
    RateLimited {
        /// The `Retry-After` value in seconds.
        retry_after_secs: u64,
    },
    /// Never answer (until the provider shuts down).
    Hang,
    /// Process the request (a refresh commits its rotation), then drop the
    /// connection without answering.
    DropAfterCommit,
    /// HTTP 200 with a body that is not a token response.
    Malformed,
    /// HTTP 200 with a 2 MiB body.
    Oversized,
    /// `invalid_grant`, whatever was sent.
    InvalidGrant,
}

/// One request as the fake provider received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Decoded query parameters.
    pub query: Vec<(String, String)>,
    /// Decoded form body parameters.
    pub form: Vec<(String, String)>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

impl Recorded {
    /// The first value of a form field.
    pub fn form(&self, name: &str) -> Option<&str> {
        self.form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The first value of a query parameter.
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

pub(crate) struct Shared {
    /// TCP connections accepted.
    pub(crate) connections: std::sync::atomic::AtomicU64,
    pub(crate) config: Mutex<FakeConfig>,
    pub(crate) state: Mutex<State>,
    pub(crate) shutdown: Notify,
    pub(crate) base_url: String,
}

impl Shared {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn config(&self) -> FakeConfig {
        self.config.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A running fake provider. Stops when dropped.
pub struct FakeProvider {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeProvider {
    /// Binds `127.0.0.1:0` and starts serving on the current tokio runtime.
    pub async fn start(config: FakeConfig) -> std::io::Result<FakeProvider> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            connections: Default::default(),
            config: Mutex::new(config),
            state: Mutex::new(State::default()),
            shutdown: Notify::new(),
            base_url: format!("http://{addr}"),
        });
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(server::serve(listener, Arc::clone(&shared), stopped));
        Ok(FakeProvider { shared, addr, stop: Some(stop) })
    }

    /// The socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The authorization endpoint.
    pub fn authorize_url(&self) -> String {
        format!("{}/authorize", self.shared.base_url)
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.shared.base_url)
    }

    /// The RFC 7009 revocation endpoint.
    pub fn revocation_url(&self) -> String {
        format!("{}/revoke", self.shared.base_url)
    }

    /// The Dropbox-style bearer revocation endpoint.
    pub fn bearer_revocation_url(&self) -> String {
        format!("{}/2/auth/token/revoke", self.shared.base_url)
    }

    /// The RFC 8628 device authorization endpoint.
    pub fn device_authorization_url(&self) -> String {
        format!("{}/device/code", self.shared.base_url)
    }

    /// The introspection endpoint.
    pub fn introspection_url(&self) -> String {
        format!("{}/introspect", self.shared.base_url)
    }

    /// Changes the configuration of the running provider.
    pub fn configure(&self, change: impl FnOnce(&mut FakeConfig)) {
        change(&mut self.shared.config.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Applies `fault` to the next token-endpoint request.
    pub fn inject(&self, fault: Fault) {
        let mut state = self.shared.state();
        let next = state.token_requests + 1;
        state.faults.insert(next, fault);
    }

    /// Applies `fault` to the `nth` token-endpoint request counted from the
    /// start (1-based).
    pub fn inject_at(&self, nth: u64, fault: Fault) {
        self.shared.state().faults.insert(nth, fault);
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.state().requests.clone()
    }

    /// Requests to the token endpoint, in order.
    pub fn token_requests(&self) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.path == "/token").collect()
    }

    /// TCP connections accepted so far (a client that keeps its
    /// connections alive opens few).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Successful refresh-token grants.
    pub fn refreshes(&self) -> u64 {
        self.shared.state().refreshes
    }

    /// Times a rotated-out refresh token was presented.
    pub fn reuse_attempts(&self) -> u64 {
        self.shared.state().reuse_attempts
    }

    /// Whether a refresh or access token would be accepted now.
    pub fn is_active(&self, token: &str) -> bool {
        self.shared.state().is_active(token)
    }

    /// `(grant, generation)` of a token this provider issued: the login it
    /// belongs to, and which token response issued it (1 = the login, +1 per
    /// refresh). Tests use it to check that no acknowledged rotation was lost.
    pub fn lineage(&self, token: &str) -> Option<(u64, u64)> {
        self.shared.state().lineage(token)
    }

    /// The latest generation issued for a grant (see [`FakeProvider::lineage`]).
    pub fn latest_generation(&self, grant: u64) -> Option<u64> {
        self.shared.state().latest_generation(grant)
    }

    /// Approves a device authorization by its user code. `false` if unknown.
    pub fn approve_device(&self, user_code: &str) -> bool {
        self.shared.state().approve_device(user_code)
    }

    /// Whether the next browser login is refused (`error=access_denied`).
    pub fn deny_logins(&self, deny: bool) {
        self.shared.state().deny_logins = deny;
    }

    /// Counts of requests by path.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for r in self.shared.state().requests.iter() {
            *counts.entry(r.path.clone()).or_default() += 1;
        }
        counts
    }

    /// Stops serving; hanging requests are released.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.shared.shutdown.notify_waiters();
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for FakeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProvider").field("addr", &self.addr).finish_non_exhaustive()
    }
}
