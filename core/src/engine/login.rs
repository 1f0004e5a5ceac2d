//! Logins, hand-offs and the broker-side device flow.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};

use super::decide::initial_payload;
use super::error::from_provider;
use super::{Broker, EngineError, Inner, lock};
use crate::authid::AuthId;
use crate::keys::SymmetricKey;
use crate::provider::{AuthorizationRequest, CodeExchange, Pkce};
use crate::random::array;
use crate::records::{
    DeviceGrant, Grant, GrantId, Handle, Handoff, HandoffId, LoginId, LoginTransaction, Tagged, UserCodeId,
};
use crate::store::{StoreError, StoreExt};
use crate::time::Timestamp;

/// The start of a browser login.
#[derive(Debug)]
pub struct LoginStart {
    /// Where to send the browser (carries `state` and the PKCE challenge).
    pub authorization_url: String,
    /// The `state` value (also inside the URL).
    pub state: SecretString,
    /// When the login stops being accepted.
    pub expires_at: Timestamp,
}

/// What the provider's redirect to `/logged-in` carried.
#[derive(Debug, Default, Clone, Copy)]
pub struct Callback<'a> {
    /// `state`.
    pub state: &'a str,
    /// `code`, on success.
    pub code: Option<&'a str>,
    /// `error`, on failure (e.g. `access_denied`).
    pub error: Option<&'a str>,
    /// RFC 9207 `iss`, when the provider sends it.
    pub iss: Option<&'a str>,
    /// The service the callback is for, when the front end knows it.
    pub service: Option<&'a str>,
    /// Other callback parameters a provider needs (pCloud's `hostname`).
    pub params: &'a [(String, String)],
    /// The browser proof cookie the callback arrived with.
    pub browser: Option<&'a str>,
}

/// A completed login: a new grant and its first AuthID.
#[derive(Debug)]
pub struct LoginComplete {
    /// The new AuthID, to show the user once.
    pub authid: AuthId,
    /// The new grant.
    pub grant_id: GrantId,
    /// The service.
    pub service: String,
    /// Whether the AuthID was also sealed into a waiting hand-off.
    pub handed_off: bool,
    /// A hand-off was named but already held (or had delivered) another
    /// login's AuthID: it keeps that one; this AuthID is only on the page.
    pub handoff_refused: bool,
}

/// The provider's access token itself, handed to the user (a provider whose
/// `hands_out_access_token` is set: pCloud). Nothing is stored.
pub struct TokenHandout {
    /// The access token, to show once.
    pub access_token: SecretString,
    /// The API host the provider named for this account (pCloud's `hostname`).
    pub api_host: Option<String>,
    /// The service.
    pub service: String,
    /// Whether the token was also sealed into a waiting hand-off.
    pub handed_off: bool,
    /// A hand-off was named but already held another credential: refused.
    pub handoff_refused: bool,
}

impl std::fmt::Debug for TokenHandout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenHandout")
            .field("access_token", &"<redacted>")
            .field("api_host", &self.api_host)
            .field("service", &self.service)
            .field("handed_off", &self.handed_off)
            .finish_non_exhaustive()
    }
}

/// What a completed login gave the user.
#[derive(Debug)]
pub enum Completed {
    /// A new grant and its first AuthID.
    Grant(LoginComplete),
    /// The provider's access token itself; nothing kept.
    Token(TokenHandout),
}

/// The prefix a handed-out access token carries inside a hand-off's sealed
/// text, so a fetch knows it from an AuthID.
const TOKEN_IN_HANDOFF: &str = "access_token\n";

/// What the device page shows before the user continues (RFC 8628 §5.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfirmation {
    /// The user code, normalised (`XXXX-XXXX`).
    pub user_code: String,
    /// The service the program asked for.
    pub service: String,
    /// The program's label for itself.
    pub label: String,
}

/// The answer to a hand-off fetch.
#[derive(Debug)]
pub enum HandoffFetch {
    /// The AuthID, released now and never again.
    Ready(AuthId),
    /// The login has not completed yet.
    Pending,
    /// The user refused access at the provider.
    Denied,
    /// Unknown, expired, or already delivered.
    Gone,
    /// A handed-out access token (pCloud), released now and never again.
    Token(SecretString),
}

impl PartialEq for HandoffFetch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (HandoffFetch::Ready(a), HandoffFetch::Ready(b)) => a == b,
            (HandoffFetch::Token(a), HandoffFetch::Token(b)) => a.expose_secret() == b.expose_secret(),
            (HandoffFetch::Pending, HandoffFetch::Pending)
            | (HandoffFetch::Denied, HandoffFetch::Denied)
            | (HandoffFetch::Gone, HandoffFetch::Gone) => true,
            _ => false,
        }
    }
}

/// Where a hand-off stands, without releasing anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffState {
    /// Waiting for the login.
    Pending,
    /// The AuthID is sealed and waiting to be fetched.
    Ready,
    /// Fetched.
    Delivered,
    /// The user refused access.
    Denied,
    /// Unknown or expired.
    Unknown,
}

/// A device authorization as the polling device receives it (RFC 8628 shape).
#[derive(Debug)]
pub struct DeviceStart {
    /// What the device polls with. Secret.
    pub device_code: SecretString,
    /// What the user types: `XXXX-XXXX`.
    pub user_code: String,
    /// Where the user types it.
    pub verification_uri: String,
    /// The same with the code filled in.
    pub verification_uri_complete: String,
    /// How long the codes live.
    pub expires_in: Duration,
    /// How often the device may poll.
    pub interval: Duration,
}

/// The answer to a device poll (RFC 8628 §3.5).
#[derive(Debug, PartialEq, Eq)]
pub enum DevicePoll {
    /// The AuthID, released once.
    Ready(AuthId),
    /// `authorization_pending`.
    Pending,
    /// `slow_down`: polled faster than the interval.
    SlowDown,
    /// `expired_token` (also after the AuthID was delivered).
    Expired,
    /// `access_denied`.
    Denied,
    /// The device code is unknown (`invalid_grant`).
    Invalid,
}

/// User codes use consonants only (RFC 8628 §6.1): no vowels to spell words,
/// no look-alikes such as 0/O or 1/I.
const USER_CODE_ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";
const MAX_TOKEN_LEN: usize = 512;
/// Hand-off tokens shorter than this are refused: a short token can be
/// guessed by whoever wants to fetch the AuthID first.
pub const MIN_HANDOFF_TOKEN_LEN: usize = 16;
/// Length of a browser proof's text (base64url of nonce ‖ issued at ‖ MAC).
pub const BROWSER_PROOF_LEN: usize = 54;
const PROOF_NONCE: usize = 16;
const PROOF_MAC: usize = 16;
/// Labels a program may give itself in the device flow, at most.
const MAX_DEVICE_LABEL_CHARS: usize = 64;

fn check_token(token: &str) -> Result<(), EngineError> {
    let well_formed = !token.is_empty() && token.len() <= MAX_TOKEN_LEN && token.bytes().all(|b| b.is_ascii_graphic());
    if !well_formed {
        return Err(EngineError::bad_request("the hand-off token is missing or malformed"));
    }
    if token.len() < MIN_HANDOFF_TOKEN_LEN {
        return Err(EngineError::bad_request(format!(
            "the hand-off token is too short (at least {MIN_HANDOFF_TOKEN_LEN} characters); the program must make a longer one"
        )));
    }
    Ok(())
}

fn login_gone() -> EngineError {
    EngineError::bad_request("this login is unknown or was already completed; start the login again")
}

/// Keeps a provider's `error` value printable and short: it is echoed to the user.
fn sanitize_error(error: &str) -> String {
    error.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(64).collect()
}

fn random_text(inner: &Inner) -> String {
    URL_SAFE_NO_PAD.encode(array::<32>(inner.rng.as_ref()))
}

/// A program's label as shown on the device page: printable, short.
fn device_label(label: Option<&str>) -> Result<String, EngineError> {
    let label = label.map(str::trim).filter(|l| !l.is_empty()).unwrap_or("a program");
    if label.chars().count() > MAX_DEVICE_LABEL_CHARS || label.chars().any(char::is_control) {
        return Err(EngineError::bad_request("the label is at most 64 characters, without control characters"));
    }
    Ok(label.to_owned())
}

impl Broker {
    /// A fresh browser proof: the value of the cookie a login page sets and
    /// its form repeats. It carries its issue time and a MAC under the record
    /// key, so the broker checks it without storing it.
    pub fn new_browser_proof(&self) -> SecretString {
        let inner = &self.inner;
        let mut bytes = Vec::with_capacity(PROOF_NONCE + 8 + PROOF_MAC);
        bytes.extend_from_slice(&array::<PROOF_NONCE>(inner.rng.as_ref()));
        bytes.extend_from_slice(&inner.now().unix_millis().to_be_bytes());
        let mac = inner.record_keys.lookup(b"latchkey/v1/browser-proof", &bytes);
        bytes.extend_from_slice(&mac[..PROOF_MAC]);
        SecretString::from(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Whether a page may keep showing a browser's proof: genuine, with at
    /// least half its lifetime left, and not used by a login yet.
    pub async fn browser_proof_reusable(&self, proof: &str) -> bool {
        let inner = &self.inner;
        let Ok(issued) = inner.check_proof(proof) else { return false };
        if inner.now().duration_since(issued) > inner.config.login_ttl / 2 {
            return false;
        }
        let id = LoginId::for_state(&inner.record_keys, &inner.state_for(proof));
        matches!(inner.store.load::<LoginTransaction>(id.as_bytes()).await, Ok(None))
    }

    /// Starts a browser login for `service` after the user clicked on the
    /// broker's page; `proof` is the browser's proof cookie (checked by the
    /// front end against the form). With `handoff_token`, the AuthID will also
    /// be sealed for the client holding that token.
    pub async fn begin_login(
        &self,
        service: &str,
        handoff_token: Option<&str>,
        proof: &str,
    ) -> Result<LoginStart, EngineError> {
        self.inner.check_proof(proof)?;
        let handoff = match handoff_token {
            Some(token) => Some(self.inner.ensure_handoff(token, self.inner.config.handoff_ttl).await?),
            None => None,
        };
        self.inner.begin_login(service, handoff, "first login", proof).await
    }

    /// Registers a hand-off token (Duplicati's `/?token=`) so a client can
    /// start polling before the login begins. Idempotent.
    pub async fn start_handoff(&self, token: &str) -> Result<(), EngineError> {
        self.inner.ensure_handoff(token, self.inner.config.handoff_ttl).await.map(|_| ())
    }

    /// Completes a login from the provider's redirect: checks the state
    /// (single use, not expired, same browser, service and issuer), exchanges
    /// the code, creates the grant and its first AuthID.
    pub async fn complete_login(&self, callback: &Callback<'_>) -> Result<LoginComplete, EngineError> {
        match self.complete_login_any(callback).await? {
            Completed::Grant(done) => Ok(done),
            Completed::Token(_) => {
                Err(EngineError::bad_request("this service hands out its access token, not an AuthID"))
            }
        }
    }

    /// [`Broker::complete_login`] for every kind of service: a provider that
    /// hands out its access token gives the user that token and stores nothing.
    pub async fn complete_login_any(&self, callback: &Callback<'_>) -> Result<Completed, EngineError> {
        let inner = &self.inner;
        let id = LoginId::for_state(&inner.record_keys, callback.state);
        let mut tx: LoginTransaction = inner.load_tagged(id.as_bytes()).await?.ok_or_else(login_gone)?;
        if tx.completed_at.is_some() {
            return Err(login_gone());
        }
        // Before consuming: a callback replayed into another browser must not
        // spend the real user's login.
        if let Some(bound) = tx.browser {
            let same = callback.browser.is_some_and(|proof| {
                bool::from(subtle::ConstantTimeEq::ct_eq(&inner.browser_binding(proof)[..], &bound[..]))
            });
            if !same {
                return Err(EngineError::Forbidden(
                    "this login was started in another browser; start it again here, from the broker's page".into(),
                ));
            }
        }
        // Consume first: of two concurrent completions, exactly one proceeds.
        // The record stays (completed) until it expires, so its proof cannot
        // begin another login.
        let now = inner.now();
        tx.completed_at = Some(now);
        match inner.update_tagged(&mut tx).await {
            Ok(()) => {}
            Err(StoreError::Conflict | StoreError::NotFound) => return Err(login_gone()),
            Err(e) => return Err(e.into()),
        }
        if now >= tx.expires_at {
            return Err(EngineError::bad_request("this login took too long and expired; start the login again"));
        }
        if callback.service.is_some_and(|s| s != tx.service) {
            return Err(EngineError::bad_request("this login was started for another service; start it again"));
        }
        let entry = inner.catalogue.provider_for(&tx.service).cloned().ok_or_else(|| {
            EngineError::ProviderMisconfigured { detail: format!("service '{}' is no longer configured", tx.service) }
        })?;
        if let Some(expected) = &entry.spec.issuer {
            // RFC 9207 §2.4: a client that knows the issuer sends `iss` must
            // refuse an answer without it (a mix-up attack strips it).
            match callback.iss {
                Some(iss) if iss == expected => {}
                Some(_) => {
                    return Err(EngineError::bad_request(
                        "the login answer came from an unexpected issuer; start again",
                    ));
                }
                None => {
                    return Err(EngineError::bad_request(
                        "the login answer does not say which server issued it; start again",
                    ));
                }
            }
        }
        if let Some(error) = callback.error {
            if let Some(handoff) = tx.handoff {
                inner.deny_handoff(&handoff).await;
            }
            let error = sanitize_error(error);
            return Err(EngineError::bad_request(format!("the provider did not grant access ({error})")));
        }
        let code = callback
            .code
            .filter(|c| !c.is_empty())
            .ok_or_else(|| EngineError::bad_request("the provider's answer carries no authorization code"))?;
        let verifier = tx
            .open_verifier(&inner.keyring)
            .map_err(|e| EngineError::Corrupt { detail: format!("login transaction: {e}") })?;
        let code = SecretString::from(code.to_owned());
        let redirect_uri = inner.redirect_uri();
        let exchange = CodeExchange {
            code: &code,
            redirect_uri: &redirect_uri,
            pkce_verifier: verifier.as_ref(),
            callback_params: callback.params,
        };
        let response = entry
            .client
            .exchange_code(&exchange)
            .await
            .map_err(|e| from_provider(&e, inner.config.provider_retry_after))?;
        if entry.spec.hands_out_access_token {
            return inner.hand_out(&tx.service, response, tx.handoff).await.map(Completed::Token);
        }
        inner.create_grant(&tx.service, response, tx.handoff, &tx.label).await.map(Completed::Grant)
    }

    /// Logs in with a token the user pasted (Jottacloud's personal login
    /// token, `/cli-token`): the provider trades it for tokens directly.
    /// `proof` is the browser's proof cookie, as for [`Broker::begin_login`].
    pub async fn login_with_token(
        &self,
        service: &str,
        login_token: &str,
        handoff_token: Option<&str>,
        proof: &str,
    ) -> Result<LoginComplete, EngineError> {
        let inner = &self.inner;
        inner.check_proof(proof)?;
        let entry = inner.service_entry(service)?.clone();
        let scopes = inner.catalogue.service(service).map(|s| s.scopes.clone()).unwrap_or_default();
        let login_token = login_token.trim();
        if login_token.is_empty() || login_token.len() > 8192 {
            return Err(EngineError::bad_request("paste the whole login token"));
        }
        let handoff = match handoff_token {
            Some(token) => Some(inner.ensure_handoff(token, inner.config.handoff_ttl).await?),
            None => None,
        };
        let response =
            entry.client.exchange_login_token(&SecretString::from(login_token.to_owned()), &scopes).await.map_err(
                |e| match e {
                    crate::provider::ProviderError::InvalidGrant { .. } => {
                        EngineError::bad_request("the provider did not accept this login token; create a new one")
                    }
                    e => from_provider(&e, inner.config.provider_retry_after),
                },
            )?;
        inner.create_grant(service, response, handoff, "first login").await
    }

    /// Releases a hand-off's AuthID to the token holder, exactly once.
    pub async fn fetch_handoff(&self, token: &str) -> Result<HandoffFetch, EngineError> {
        check_token(token)?;
        let inner = &self.inner;
        let id = HandoffId::for_token(&inner.record_keys, token);
        loop {
            let Some(mut handoff) = inner.load_tagged::<Handoff>(id.as_bytes()).await? else {
                return Ok(HandoffFetch::Gone);
            };
            if handoff.delivered_at.is_some() || inner.now() >= handoff.expires_at {
                return Ok(HandoffFetch::Gone);
            }
            if handoff.denied_at.is_some() {
                return Ok(HandoffFetch::Denied);
            }
            let corrupt = |detail: String| EngineError::Corrupt { detail: format!("hand-off: {detail}") };
            let Some(text) = handoff.open_text(token).map_err(|e| corrupt(e.to_string()))? else {
                return Ok(HandoffFetch::Pending);
            };
            let released = match text.strip_prefix(TOKEN_IN_HANDOFF) {
                Some(access_token) => HandoffFetch::Token(SecretString::from(access_token.to_owned())),
                None => HandoffFetch::Ready(AuthId::parse(&text).map_err(|e| corrupt(e.to_string()))?),
            };
            handoff.authid = None;
            handoff.delivered_at = Some(inner.now());
            match inner.update_tagged(&mut handoff).await {
                Ok(()) => return Ok(released),
                Err(StoreError::Conflict | StoreError::NotFound) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Where a hand-off stands (Duplicati's `/token-state`).
    pub async fn handoff_state(&self, token: &str) -> Result<HandoffState, EngineError> {
        check_token(token)?;
        let id = HandoffId::for_token(&self.inner.record_keys, token);
        let Some(handoff) = self.inner.load_tagged::<Handoff>(id.as_bytes()).await? else {
            return Ok(HandoffState::Unknown);
        };
        Ok(if handoff.delivered_at.is_some() {
            HandoffState::Delivered
        } else if self.inner.now() >= handoff.expires_at {
            HandoffState::Unknown
        } else if handoff.denied_at.is_some() {
            HandoffState::Denied
        } else if handoff.authid.is_some() {
            HandoffState::Ready
        } else {
            HandoffState::Pending
        })
    }

    /// Starts a broker-side device authorization for `service`; `label` is
    /// the program's name for itself, shown to the user before they continue.
    pub async fn begin_device(&self, service: &str, label: Option<&str>) -> Result<DeviceStart, EngineError> {
        let inner = &self.inner;
        if inner.service_entry(service)?.spec.hands_out_access_token {
            return Err(EngineError::bad_request(
                "this service hands out its access token on the login page; log in there in a browser",
            ));
        }
        let label = device_label(label)?;
        let now = inner.now();
        let expires_at = now.saturating_add(inner.config.device_ttl);
        let device_code = random_text(inner);
        let mut handoff = Handoff::new(&inner.record_keys, &device_code, now, expires_at);
        inner.create_tagged(&mut handoff).await?;
        for _ in 0..8 {
            let user_code = inner.user_code();
            let mut device = DeviceGrant {
                id: UserCodeId::for_user_code(&inner.record_keys, &user_code),
                version: 0,
                service: service.to_owned(),
                handoff: handoff.id,
                label: label.clone(),
                created_at: now,
                expires_at,
                tag: [0; 32],
            };
            match inner.create_tagged(&mut device).await {
                Ok(()) => {
                    let verification_uri = format!("{}/device", inner.config.public_url.trim_end_matches('/'));
                    return Ok(DeviceStart {
                        device_code: SecretString::from(device_code),
                        verification_uri_complete: format!("{verification_uri}?user_code={user_code}"),
                        verification_uri,
                        user_code,
                        expires_in: inner.config.device_ttl,
                        interval: inner.config.device_interval,
                    });
                }
                // A live code with the same letters: draw again.
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(EngineError::StoreUnavailable { retry_after: Duration::from_secs(1) })
    }

    /// What the `/device` page shows for a typed user code before the user
    /// continues: the service and the program's label. Creates nothing.
    pub async fn device_confirmation(&self, user_code: &str) -> Result<DeviceConfirmation, EngineError> {
        let device = self.inner.waiting_device(user_code).await?;
        let normal = UserCodeId::normalize(user_code);
        let user_code = if normal.len() == 8 { format!("{}-{}", &normal[..4], &normal[4..]) } else { normal };
        Ok(DeviceConfirmation { user_code, service: device.service, label: device.label })
    }

    /// The user confirmed a typed code on the `/device` page: start the login
    /// for it, bound to the browser's `proof` as for [`Broker::begin_login`].
    pub async fn begin_device_login(&self, user_code: &str, proof: &str) -> Result<LoginStart, EngineError> {
        let inner = &self.inner;
        inner.check_proof(proof)?;
        let device = inner.waiting_device(user_code).await?;
        inner.begin_login(&device.service, Some(device.handoff), &device.label, proof).await
    }

    /// The device polls with its device code.
    pub async fn poll_device(&self, device_code: &str) -> Result<DevicePoll, EngineError> {
        check_token(device_code)?;
        let inner = &self.inner;
        let id = HandoffId::for_token(&inner.record_keys, device_code);
        let now = inner.now();
        {
            let mut polls = lock(&inner.device_polls);
            let horizon = inner.config.device_ttl;
            polls.retain(|_, last| now.duration_since(*last) < horizon);
            if let Some(last) = polls.insert(id, now) {
                if now.duration_since(last) < inner.config.device_interval {
                    return Ok(DevicePoll::SlowDown);
                }
            }
        }
        match self.fetch_handoff(device_code).await? {
            HandoffFetch::Ready(authid) => Ok(DevicePoll::Ready(authid)),
            HandoffFetch::Pending => Ok(DevicePoll::Pending),
            HandoffFetch::Denied => Ok(DevicePoll::Denied),
            // Device codes are never made for services that hand out tokens.
            HandoffFetch::Token(_) => Ok(DevicePoll::Invalid),
            HandoffFetch::Gone => Ok(match inner.store.load::<Handoff>(id.as_bytes()).await? {
                Some(_) => DevicePoll::Expired,
                None => DevicePoll::Invalid,
            }),
        }
    }
}

impl Inner {
    /// Loads a tagged record and refuses it if its tag does not verify: a
    /// changed routing field means someone without the master key wrote it.
    async fn load_tagged<R: Tagged>(&self, key: &[u8]) -> Result<Option<R>, EngineError> {
        match self.store.load::<R>(key).await? {
            Some(record) if !record.verify(&self.record_keys) => Err(EngineError::Corrupt {
                detail: format!("a stored {} record failed its integrity check", R::KIND.name()),
            }),
            other => Ok(other),
        }
    }

    async fn create_tagged<R: Tagged>(&self, record: &mut R) -> Result<(), StoreError> {
        record.sign(&self.record_keys);
        self.store.create(record).await
    }

    async fn update_tagged<R: Tagged>(&self, record: &mut R) -> Result<(), StoreError> {
        record.sign(&self.record_keys);
        self.store.update(record).await
    }

    /// Checks a browser proof's MAC and age; answers when it was issued.
    fn check_proof(&self, proof: &str) -> Result<Timestamp, EngineError> {
        let refused = || {
            EngineError::Forbidden(
                "this page has expired or did not come from this broker; go back, reload it and continue".into(),
            )
        };
        if proof.len() != BROWSER_PROOF_LEN {
            return Err(refused());
        }
        let bytes = URL_SAFE_NO_PAD.decode(proof).map_err(|_| refused())?;
        if bytes.len() != PROOF_NONCE + 8 + PROOF_MAC {
            return Err(refused());
        }
        let (body, mac) = bytes.split_at(PROOF_NONCE + 8);
        let expected = self.record_keys.lookup(b"latchkey/v1/browser-proof", body);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..PROOF_MAC], mac)) {
            return Err(refused());
        }
        let mut issued = [0u8; 8];
        issued.copy_from_slice(&body[PROOF_NONCE..]);
        let issued = Timestamp::from_unix_millis(u64::from_be_bytes(issued));
        let now = self.now();
        if issued > now || now.duration_since(issued) >= self.config.login_ttl {
            return Err(refused());
        }
        Ok(issued)
    }

    /// What a login stores of the browser proof that began it: a keyed hash.
    fn browser_binding(&self, proof: &str) -> [u8; 32] {
        self.record_keys.lookup(b"latchkey/v1/browser", proof.as_bytes())
    }

    /// The `state` of the login a proof begins: derived, so the same proof
    /// always names the same login record and can begin only one.
    fn state_for(&self, proof: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.record_keys.lookup(b"latchkey/v1/state-from-proof", proof.as_bytes()))
    }

    /// A device code still waiting for its user.
    async fn waiting_device(&self, user_code: &str) -> Result<DeviceGrant, EngineError> {
        let unknown = || EngineError::bad_request("this code is unknown; check it and try again");
        let id = UserCodeId::for_user_code(&self.record_keys, user_code);
        let device: DeviceGrant = self.load_tagged(id.as_bytes()).await?.ok_or_else(unknown)?;
        if self.now() >= device.expires_at {
            return Err(EngineError::bad_request("this code has expired; start again on the device"));
        }
        let handoff: Handoff = self.load_tagged(device.handoff.as_bytes()).await?.ok_or_else(unknown)?;
        if handoff.delivered_at.is_some() || handoff.authid.is_some() || handoff.denied_at.is_some() {
            return Err(EngineError::bad_request("this code was already used; start again on the device"));
        }
        Ok(device)
    }

    /// A new grant and its first AuthID from a provider's first token
    /// response; the AuthID is also sealed into the hand-off, if one waits.
    async fn create_grant(
        &self,
        service: &str,
        response: crate::provider::TokenResponse,
        handoff: Option<HandoffId>,
        label: &str,
    ) -> Result<LoginComplete, EngineError> {
        if response.refresh_token.is_none() && response.expires_in.is_some() {
            return Err(EngineError::ProviderMisconfigured {
                detail: "the provider issued an expiring access token but no refresh token".into(),
            });
        }
        let scopes = self.catalogue.service(service).map(|s| s.scopes.clone()).unwrap_or_default();
        let now = self.now();
        let payload = initial_payload(now, response, &scopes);
        let rng = self.rng.as_ref();
        let data_key = SymmetricKey::generate(rng);
        let mut grant = Grant::new(GrantId::generate(rng), service, &payload, &data_key, now, rng);
        self.store.create(&mut grant).await?;
        let authid = AuthId::generate(rng);
        let mut handle = Handle::new(&authid, grant.id, &data_key, label, &self.keyring, now, rng);
        self.store.create(&mut handle).await?;
        let delivery = match handoff {
            Some(handoff) => self.deliver_text(&handoff, &authid.expose_text()).await?,
            None => Delivery::NoHandoff,
        };
        Ok(LoginComplete {
            authid,
            grant_id: grant.id,
            service: service.to_owned(),
            handed_off: delivery == Delivery::Sealed,
            handoff_refused: delivery == Delivery::Refused,
        })
    }

    /// Hands the provider's access token to the user (and to a waiting
    /// hand-off); stores no grant and no handle.
    async fn hand_out(
        &self,
        service: &str,
        response: crate::provider::TokenResponse,
        handoff: Option<HandoffId>,
    ) -> Result<TokenHandout, EngineError> {
        let api_host = response.extra.iter().find(|(k, _)| k == "api_host").map(|(_, v)| v.clone());
        let access_token = response.access_token;
        let delivery = match handoff {
            Some(handoff) => {
                let sealed = zeroize::Zeroizing::new(format!("{TOKEN_IN_HANDOFF}{}", access_token.expose_secret()));
                self.deliver_text(&handoff, &sealed).await?
            }
            None => Delivery::NoHandoff,
        };
        Ok(TokenHandout {
            access_token,
            api_host,
            service: service.to_owned(),
            handed_off: delivery == Delivery::Sealed,
            handoff_refused: delivery == Delivery::Refused,
        })
    }

    fn service_entry(&self, service: &str) -> Result<&crate::catalogue::ProviderEntry, EngineError> {
        self.catalogue
            .provider_for(service)
            .ok_or_else(|| EngineError::bad_request(format!("unknown service '{}'", sanitize_error(service))))
    }

    fn user_code(&self) -> String {
        let mut code = String::with_capacity(9);
        while code.len() < 9 {
            if code.len() == 4 {
                code.push('-');
                continue;
            }
            // Rejection sampling keeps every letter equally likely.
            let byte = array::<1>(self.rng.as_ref())[0];
            if usize::from(byte) < 240 {
                code.push(char::from(USER_CODE_ALPHABET[usize::from(byte) % USER_CODE_ALPHABET.len()]));
            }
        }
        code
    }

    async fn begin_login(
        &self,
        service: &str,
        handoff: Option<HandoffId>,
        label: &str,
        proof: &str,
    ) -> Result<LoginStart, EngineError> {
        let entry = self.service_entry(service)?;
        let spec = self.catalogue.service(service).ok_or_else(|| EngineError::bad_request("unknown service"))?;
        let rng = self.rng.as_ref();
        let now = self.now();
        let state = SecretString::from(self.state_for(proof));
        let pkce = entry.spec.pkce.then(|| Pkce::generate(rng));
        let mut tx = LoginTransaction {
            id: LoginId::for_state(&self.record_keys, state.expose_secret()),
            version: 0,
            service: service.to_owned(),
            pkce_verifier: None,
            handoff,
            browser: Some(self.browser_binding(proof)),
            label: label.to_owned(),
            created_at: now,
            expires_at: now.saturating_add(self.config.login_ttl),
            completed_at: None,
            tag: [0; 32],
        };
        if let Some(pkce) = &pkce {
            tx.seal_verifier(&pkce.verifier, &self.keyring, rng);
        }
        let redirect_uri = self.redirect_uri();
        let request = AuthorizationRequest {
            redirect_uri: &redirect_uri,
            state: &state,
            scopes: &spec.scopes,
            pkce_challenge: pkce.as_ref().map(|p| p.challenge.as_str()),
            extra_params: &spec.auth_params,
        };
        let authorization_url = entry
            .client
            .authorization_url(&request)
            .map_err(|e| from_provider(&e, self.config.provider_retry_after))?;
        match self.create_tagged(&mut tx).await {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                return Err(EngineError::Forbidden(
                    "this login form was already used; go back, reload the page and continue".into(),
                ));
            }
            Err(e) => return Err(e.into()),
        }
        Ok(LoginStart { authorization_url, state, expires_at: tx.expires_at })
    }

    /// The hand-off for `token`, created if new; refused if used or expired.
    async fn ensure_handoff(&self, token: &str, ttl: Duration) -> Result<HandoffId, EngineError> {
        check_token(token)?;
        let id = HandoffId::for_token(&self.record_keys, token);
        loop {
            let now = self.now();
            match self.load_tagged::<Handoff>(id.as_bytes()).await? {
                Some(h) if h.delivered_at.is_some() || now >= h.expires_at => {
                    return Err(EngineError::bad_request("this hand-off token was already used or has expired"));
                }
                Some(_) => return Ok(id),
                None => {
                    let mut handoff = Handoff::new(&self.record_keys, token, now, now.saturating_add(ttl));
                    match self.create_tagged(&mut handoff).await {
                        Ok(()) => return Ok(id),
                        Err(StoreError::Conflict) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }

    /// Seals a fresh credential (an AuthID, or a handed-out access token) into
    /// a waiting hand-off, unless it already holds (or delivered) one: a
    /// hand-off carries exactly one, so a second login cannot swap its own in
    /// before the client fetches.
    async fn deliver_text(&self, id: &HandoffId, text: &str) -> Result<Delivery, EngineError> {
        loop {
            let Some(mut handoff) = self.load_tagged::<Handoff>(id.as_bytes()).await? else {
                return Ok(Delivery::Gone);
            };
            if handoff.authid.is_some() || handoff.delivered_at.is_some() {
                return Ok(Delivery::Refused);
            }
            if handoff.denied_at.is_some() || self.now() >= handoff.expires_at {
                return Ok(Delivery::Gone);
            }
            handoff.seal_text(text, self.rng.as_ref());
            match self.update_tagged(&mut handoff).await {
                Ok(()) => return Ok(Delivery::Sealed),
                Err(StoreError::Conflict | StoreError::NotFound) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn deny_handoff(&self, id: &HandoffId) {
        for _ in 0..4 {
            let Ok(Some(mut handoff)) = self.load_tagged::<Handoff>(id.as_bytes()).await else { return };
            if handoff.authid.is_some() || handoff.delivered_at.is_some() {
                return;
            }
            handoff.denied_at = Some(self.now());
            if !matches!(self.update_tagged(&mut handoff).await, Err(StoreError::Conflict)) {
                return;
            }
        }
    }
}

/// What became of a login's hand-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// No hand-off was named.
    NoHandoff,
    /// The AuthID is sealed for the waiting client.
    Sealed,
    /// The hand-off already carried another AuthID: refused.
    Refused,
    /// Expired, denied or unknown.
    Gone,
}
