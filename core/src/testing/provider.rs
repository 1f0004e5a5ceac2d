//! `ScriptedProvider`: an in-memory OAuth provider whose answers a test scripts.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures_channel::oneshot;
use secrecy::{ExposeSecret, SecretString};

use crate::provider::{
    AuthorizationRequest, CodeExchange, Pkce, Provider, ProviderError, RefreshRequest, TokenKind, TokenResponse,
};

/// A log that a test, a provider and a store wrapper append to, to prove ordering.
pub type EventLog = Arc<Mutex<Vec<String>>>;

/// What the provider does with the next refresh request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Answer normally (reuse detection still applies).
    Succeed,
    /// `invalid_grant`.
    InvalidGrant,
    /// A 5xx or timeout.
    Transient,
    /// HTTP 429.
    RateLimited(Option<Duration>),
    /// `invalid_client`.
    InvalidClient,
}

#[derive(Default)]
struct State {
    next: u64,
    live: BTreeSet<String>,
    rotated_away: BTreeSet<String>,
    reuse_detected: u64,
    script: VecDeque<Behaviour>,
    default: Option<Behaviour>,
    refresh_calls: u64,
    in_flight: usize,
    held: bool,
    gate: Vec<oneshot::Sender<()>>,
    states: HashMap<String, (Option<String>, String)>,
    codes: HashMap<String, (Option<String>, String)>,
    revoked: Vec<String>,
}

/// An OAuth provider in memory: issues and rotates tokens, detects reuse of
/// rotated-away refresh tokens, checks PKCE, and answers as scripted.
pub struct ScriptedProvider {
    state: Mutex<State>,
    rotates: bool,
    strict_reuse: bool,
    revocation: bool,
    expires_in: Option<Duration>,
    log: Option<EventLog>,
}

impl Default for ScriptedProvider {
    fn default() -> Self {
        ScriptedProvider {
            state: Mutex::default(),
            rotates: false,
            strict_reuse: false,
            revocation: true,
            expires_in: Some(Duration::from_secs(3600)),
            log: None,
        }
    }
}

impl ScriptedProvider {
    /// A provider that does not rotate, issues one-hour tokens and supports revocation.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rotate the refresh token on every refresh.
    pub fn rotating(mut self, rotates: bool) -> Self {
        self.rotates = rotates;
        self
    }

    /// On reuse of a rotated-away token, revoke the whole token family (as
    /// strict providers do).
    pub fn strict_reuse(mut self, strict: bool) -> Self {
        self.strict_reuse = strict;
        self
    }

    /// Whether RFC 7009 revocation is offered.
    pub fn revocation(mut self, supported: bool) -> Self {
        self.revocation = supported;
        self
    }

    /// Access token lifetime (`None`: tokens never expire).
    pub fn expires_in(mut self, lifetime: Option<Duration>) -> Self {
        self.expires_in = lifetime;
        self
    }

    /// Appends `provider.refresh` and `provider.answer` to `log`.
    pub fn with_log(mut self, log: EventLog) -> Self {
        self.log = Some(log);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note(&self, event: &str) {
        if let Some(log) = &self.log {
            log.lock().unwrap_or_else(|p| p.into_inner()).push(event.to_owned());
        }
    }

    /// A refresh token the provider accepts, as if a login had happened.
    pub fn issue_refresh_token(&self) -> String {
        let mut state = self.lock();
        state.next += 1;
        let token = format!("rt-{}", state.next);
        state.live.insert(token.clone());
        token
    }

    /// Queues behaviours for the next refreshes; after them, the default.
    pub fn script(&self, behaviours: impl IntoIterator<Item = Behaviour>) {
        self.lock().script.extend(behaviours);
    }

    /// What every refresh does once the script is used up (initially `Succeed`).
    pub fn set_default(&self, behaviour: Behaviour) {
        self.lock().default = Some(behaviour);
    }

    /// Makes refreshes wait until [`ScriptedProvider::release`].
    pub fn hold(&self) {
        self.lock().held = true;
    }

    /// Lets held refreshes (and later ones) proceed.
    pub fn release(&self) {
        let mut state = self.lock();
        state.held = false;
        for tx in state.gate.drain(..) {
            let _ = tx.send(());
        }
    }

    /// Refresh requests received.
    pub fn refresh_calls(&self) -> u64 {
        self.lock().refresh_calls
    }

    /// Refresh requests currently being answered (or held).
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Times a refresh token that had been rotated away was presented.
    pub fn reuse_detected(&self) -> u64 {
        self.lock().reuse_detected
    }

    /// Whether the provider would accept this refresh token now.
    pub fn is_live(&self, token: &str) -> bool {
        self.lock().live.contains(token)
    }

    /// Refresh tokens revoked through [`Provider::revoke`].
    pub fn revoked(&self) -> Vec<String> {
        self.lock().revoked.clone()
    }

    /// Invalidates every refresh token (the user revoked the app at the provider).
    pub fn forget_all(&self) {
        self.lock().live.clear();
    }

    /// The user logs in and consents at the provider: answers the code the
    /// provider redirects back with, for a `state` seen in an authorization URL.
    pub fn approve(&self, state: &str) -> Option<String> {
        let mut s = self.lock();
        let expected = s.states.remove(state)?;
        s.next += 1;
        let code = format!("code-{}", s.next);
        s.codes.insert(code.clone(), expected);
        Some(code)
    }

    fn issue(&self, state: &mut State, with_refresh: bool) -> TokenResponse {
        state.next += 1;
        let n = state.next;
        let refresh_token = with_refresh.then(|| {
            let token = format!("rt-{n}");
            state.live.insert(token.clone());
            SecretString::from(token)
        });
        TokenResponse {
            access_token: SecretString::from(format!("at-{n}")),
            refresh_token,
            expires_in: self.expires_in,
            scopes: None,
            token_type: Some("Bearer".into()),
            account_id: Some("user@example.test".into()),
            extra: Vec::new(),
        }
    }
}

fn transient() -> ProviderError {
    ProviderError::Transient { detail: "scripted outage".into(), source: None }
}

#[async_trait]
impl Provider for ScriptedProvider {
    fn authorization_url(&self, request: &AuthorizationRequest<'_>) -> Result<String, ProviderError> {
        let state = request.state.expose_secret().to_owned();
        let mut url = format!("https://provider.test/authorize?response_type=code&state={state}");
        if let Some(challenge) = request.pkce_challenge {
            url.push_str(&format!("&code_challenge={challenge}&code_challenge_method=S256"));
        }
        self.lock().states.insert(state, (request.pkce_challenge.map(str::to_owned), request.redirect_uri.to_owned()));
        Ok(url)
    }

    async fn exchange_code(&self, request: &CodeExchange<'_>) -> Result<TokenResponse, ProviderError> {
        let mut state = self.lock();
        let invalid = || ProviderError::InvalidGrant { description: Some("bad code".into()) };
        let (challenge, redirect_uri) = state.codes.remove(request.code.expose_secret()).ok_or_else(invalid)?;
        if redirect_uri != request.redirect_uri {
            return Err(invalid());
        }
        let verified = match (&challenge, request.pkce_verifier) {
            (None, None) => true,
            (Some(c), Some(v)) => Pkce::challenge_for(v.expose_secret()) == *c,
            _ => false,
        };
        if !verified {
            return Err(invalid());
        }
        Ok(self.issue(&mut state, true))
    }

    async fn refresh(&self, request: &RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        self.note("provider.refresh");
        let gate = {
            let mut state = self.lock();
            state.refresh_calls += 1;
            state.in_flight += 1;
            state.held.then(|| {
                let (tx, rx) = oneshot::channel();
                state.gate.push(tx);
                rx
            })
        };
        if let Some(gate) = gate {
            let _ = gate.await;
        }
        let mut state = self.lock();
        state.in_flight -= 1;
        let behaviour = state.script.pop_front().or_else(|| state.default.clone()).unwrap_or(Behaviour::Succeed);
        let result = match behaviour {
            Behaviour::InvalidGrant => Err(ProviderError::InvalidGrant { description: None }),
            Behaviour::Transient => Err(transient()),
            Behaviour::RateLimited(retry_after) => Err(ProviderError::RateLimited { retry_after }),
            Behaviour::InvalidClient => Err(ProviderError::InvalidClient { description: None }),
            Behaviour::Succeed => {
                let token = request.refresh_token.expose_secret().to_owned();
                if !state.live.contains(&token) {
                    if state.rotated_away.contains(&token) {
                        state.reuse_detected += 1;
                        if self.strict_reuse {
                            state.live.clear();
                        }
                    }
                    Err(ProviderError::InvalidGrant { description: None })
                } else if self.rotates {
                    state.live.remove(&token);
                    state.rotated_away.insert(token);
                    Ok(self.issue(&mut state, true))
                } else {
                    let mut response = self.issue(&mut state, false);
                    response.refresh_token = None;
                    Ok(response)
                }
            }
        };
        drop(state);
        self.note("provider.answer");
        result
    }

    /// Accepts the login token `valid-login-token` only.
    async fn exchange_login_token(
        &self,
        login_token: &SecretString,
        _scopes: &[String],
    ) -> Result<TokenResponse, ProviderError> {
        if login_token.expose_secret() != "valid-login-token" {
            return Err(ProviderError::InvalidGrant { description: None });
        }
        let mut state = self.lock();
        Ok(self.issue(&mut state, true))
    }

    async fn revoke(&self, token: &SecretString, _kind: TokenKind) -> Result<(), ProviderError> {
        if !self.revocation {
            return Err(ProviderError::Unsupported("revocation"));
        }
        let mut state = self.lock();
        state.live.remove(token.expose_secret());
        state.revoked.push(token.expose_secret().to_owned());
        Ok(())
    }
}
