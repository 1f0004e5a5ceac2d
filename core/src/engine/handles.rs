//! Handles: more AuthIDs for one grant, listing, revocation, rotation.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::authid::{AuthId, KeyId};
use crate::envelope::{Field, SealContext, SealedBlob};
use crate::keys::{DataKey, KEY_LEN, SymmetricKey};
use crate::provider::{ProviderError, TokenKind};
use crate::records::RecordKind;
use crate::records::{Grant, GrantId, GrantState, Handle, Lease, Record};
use crate::store::{StoreError, StoreExt};
use crate::time::Timestamp;

use super::{Broker, EngineError, Inner};

/// One AuthID of a grant, as its holders may see it (never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandleInfo {
    /// The keyid.
    pub keyid: KeyId,
    /// Its label.
    pub label: String,
    /// When minted.
    pub created_at: Timestamp,
    /// Last use recorded (at most hourly).
    pub last_used_at: Timestamp,
    /// When revoked, if it is.
    pub revoked_at: Option<Timestamp>,
    /// Whether this is the AuthID that asked.
    pub is_caller: bool,
}

impl HandleInfo {
    fn of(handle: Handle, data_key: &DataKey, caller: &KeyId) -> Self {
        HandleInfo {
            label: handle.open_label(data_key).unwrap_or_default(),
            keyid: handle.keyid,
            created_at: handle.created_at,
            last_used_at: handle.last_used_at,
            revoked_at: handle.revoked_at,
            is_caller: handle.keyid == *caller,
        }
    }
}

/// A newly minted AuthID.
#[derive(Debug)]
pub struct MintedHandle {
    /// The AuthID, to hand over once.
    pub authid: AuthId,
    /// Its label.
    pub label: String,
    /// When minted.
    pub created_at: Timestamp,
}

/// What happened at the provider when a grant was revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderRevocation {
    /// The provider revoked the refresh token.
    Revoked,
    /// The provider offers no revocation; the token dies by expiry.
    Unsupported,
    /// There was no refresh token to revoke.
    NoToken,
    /// The provider could not be told (the local revocation stands).
    Failed(String),
}

/// The outcome of revoking a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRevocation {
    /// Handles revoked by this call.
    pub handles_revoked: usize,
    /// What the provider said.
    pub provider: ProviderRevocation,
}

/// What the revoke page did with an AuthID, and what it can offer next.
#[derive(Debug)]
pub struct PageRevocation {
    /// The grant's service.
    pub service: String,
    /// Set when that was the grant's last AuthID and the grant went too.
    pub grant: Option<GrantRevocation>,
    /// The grant's other AuthIDs that still work (never secrets): a stolen
    /// AuthID's owner finds here what the thief may have minted with it.
    pub siblings: Vec<HandleInfo>,
    /// While siblings remain: a ticket that lets this page revoke the whole
    /// login for [`REVOKE_TICKET_TTL`] (the revoked AuthID no longer can).
    pub ticket: Option<SecretString>,
}

/// How long a revoke page's "revoke the whole login" stays possible.
pub const REVOKE_TICKET_TTL: Duration = Duration::from_secs(600);

const MAX_LABEL_CHARS: usize = 100;

fn check_label(label: &str) -> Result<(), EngineError> {
    if label.chars().count() > MAX_LABEL_CHARS || label.chars().any(char::is_control) {
        return Err(EngineError::bad_request("a label is at most 100 characters, without control characters"));
    }
    Ok(())
}

impl Broker {
    /// The grant's handles, for any of its live AuthIDs.
    pub async fn list_handles(&self, authid: &AuthId) -> Result<Vec<HandleInfo>, EngineError> {
        let inner = &self.inner;
        let (caller, data_key) = inner.authenticate(authid).await?;
        inner.live_grant(&caller.grant_id).await?;
        let handles: Vec<Handle> = inner.store.load_group(caller.grant_id.as_bytes()).await?;
        Ok(handles.into_iter().map(|h| HandleInfo::of(h, &data_key, &caller.keyid)).collect())
    }

    /// Mints another AuthID for the caller's grant (one per machine).
    pub async fn mint_handle(&self, authid: &AuthId, label: &str) -> Result<MintedHandle, EngineError> {
        check_label(label)?;
        let inner = &self.inner;
        let (caller, data_key) = inner.authenticate(authid).await?;
        inner.live_grant(&caller.grant_id).await?;
        inner.mint(caller.grant_id, &data_key, label).await
    }

    /// Revokes one of the grant's handles (the caller's own included). When no
    /// live handle is left, the grant is revoked too, at the provider as well.
    pub async fn revoke_handle(&self, authid: &AuthId, target: KeyId) -> Result<Option<GrantRevocation>, EngineError> {
        let (caller, data_key) = self.inner.authenticate(authid).await?;
        self.inner.revoke_handle_of(&caller, &data_key, target).await
    }

    /// The revoke page: revokes the caller's AuthID, and answers the
    /// grant's other live AuthIDs with a ticket to revoke them all.
    pub async fn revoke_for_page(&self, authid: &AuthId) -> Result<PageRevocation, EngineError> {
        let inner = &self.inner;
        let (caller, data_key) = inner.authenticate(authid).await?;
        let grant = inner.revoke_handle_of(&caller, &data_key, caller.keyid).await?;
        let service =
            inner.store.load::<Grant>(caller.grant_id.as_bytes()).await?.map(|g| g.service).unwrap_or_default();
        let handles: Vec<Handle> = inner.store.load_group(caller.grant_id.as_bytes()).await?;
        let siblings: Vec<HandleInfo> = handles
            .into_iter()
            .filter(|h| h.revoked_at.is_none() && h.keyid != caller.keyid)
            .map(|h| HandleInfo::of(h, &data_key, &caller.keyid))
            .collect();
        let ticket = (grant.is_none() && !siblings.is_empty()).then(|| inner.revoke_ticket(caller.grant_id, &data_key));
        Ok(PageRevocation { service, grant, siblings, ticket })
    }

    /// Revokes a whole grant with a revoke page's ticket.
    pub async fn revoke_grant_with_ticket(&self, ticket: &str) -> Result<GrantRevocation, EngineError> {
        let inner = &self.inner;
        let expired = || EngineError::bad_request("this revoke page has expired; revoke with one of the AuthIDs");
        let bytes = URL_SAFE_NO_PAD.decode(ticket.trim()).map_err(|_| expired())?;
        if bytes.len() < 16 {
            return Err(expired());
        }
        let grant_id = GrantId::from_bytes(bytes[..16].try_into().map_err(|_| expired())?);
        let ids: [&[u8]; 1] = [grant_id.as_bytes()];
        let plain = inner
            .keyring
            .open(&ticket_ctx(&ids), &SealedBlob::from_bytes(bytes[16..].to_vec()))
            .map_err(|_| expired())?;
        if plain.len() != 8 + KEY_LEN {
            return Err(expired());
        }
        let mut deadline = [0u8; 8];
        deadline.copy_from_slice(&plain[..8]);
        if inner.now().unix_millis() >= u64::from_be_bytes(deadline) {
            return Err(expired());
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(&plain[8..]);
        inner.revoke_grant(grant_id, &SymmetricKey::from_bytes(*key)).await
    }

    /// Replaces the caller's AuthID with a new one for the same grant; the old
    /// one is dead when this returns.
    pub async fn rotate_handle(&self, authid: &AuthId) -> Result<MintedHandle, EngineError> {
        let inner = &self.inner;
        let (caller, data_key) = inner.authenticate(authid).await?;
        inner.live_grant(&caller.grant_id).await?;
        let label = caller.open_label(&data_key).unwrap_or_default();
        let minted = inner.mint(caller.grant_id, &data_key, &label).await?;
        inner.revoke_one(caller.clone()).await?;
        inner.grant_changed(&caller.grant_id).await;
        Ok(minted)
    }

    /// Revokes every handle of the caller's grant and the grant itself,
    /// including at the provider where it supports revocation.
    pub async fn revoke_grant(&self, authid: &AuthId) -> Result<GrantRevocation, EngineError> {
        let (caller, data_key) = self.inner.authenticate(authid).await?;
        self.inner.revoke_grant(caller.grant_id, &data_key).await
    }
}

fn ticket_ctx<'a>(ids: &'a [&'a [u8]]) -> SealContext<'a> {
    SealContext { kind: RecordKind::Grant, field: Field::RevokeTicket, format: 1, ids }
}

impl Inner {
    /// A ticket: the grant id, then its deadline and data key sealed under the
    /// master key, so only this broker can use it, and only until the deadline.
    fn revoke_ticket(&self, grant_id: GrantId, data_key: &DataKey) -> SecretString {
        let deadline = self.now().saturating_add(REVOKE_TICKET_TTL).unix_millis();
        let mut plain = Zeroizing::new(Vec::with_capacity(8 + KEY_LEN));
        plain.extend_from_slice(&deadline.to_be_bytes());
        plain.extend_from_slice(data_key.expose_secret());
        let ids: [&[u8]; 1] = [grant_id.as_bytes()];
        let blob = self.keyring.seal(&ticket_ctx(&ids), &plain, self.rng.as_ref());
        let mut bytes = grant_id.as_bytes().to_vec();
        bytes.extend_from_slice(blob.as_bytes());
        SecretString::from(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Revokes `target`, one of the authenticated `caller`'s grant's handles;
    /// the last live one takes the grant with it.
    async fn revoke_handle_of(
        &self,
        caller: &Handle,
        data_key: &DataKey,
        target: KeyId,
    ) -> Result<Option<GrantRevocation>, EngineError> {
        let handle = if target == caller.keyid {
            caller.clone()
        } else {
            match self.store.load::<Handle>(target.as_bytes()).await? {
                Some(h) if h.grant_id == caller.grant_id => h,
                _ => return Err(EngineError::bad_request("this login has no AuthID with that key id")),
            }
        };
        // Revoking the last live handle revokes the grant, and the grant goes
        // first: if that fails, the caller's AuthID still works to retry.
        let live =
            |handles: &[Handle]| handles.iter().filter(|h| h.revoked_at.is_none()).map(|h| h.keyid).collect::<Vec<_>>();
        let before: Vec<Handle> = self.store.load_group(caller.grant_id.as_bytes()).await?;
        if live(&before) == [handle.keyid] {
            return self.revoke_grant(caller.grant_id, data_key).await.map(Some);
        }
        self.revoke_one(handle).await?;
        self.grant_changed(&caller.grant_id).await;
        // Two handles revoked at once may each have seen the other live.
        let after: Vec<Handle> = self.store.load_group(caller.grant_id.as_bytes()).await?;
        if !live(&after).is_empty() {
            return Ok(None);
        }
        self.revoke_grant(caller.grant_id, data_key).await.map(Some)
    }

    /// The grant, if it can still be used or managed.
    async fn live_grant(&self, id: &GrantId) -> Result<Grant, EngineError> {
        let grant = self.load_grant(id).await?;
        match grant.state {
            GrantState::Active => Ok(grant),
            GrantState::Revoked => Err(EngineError::AuthIdRevoked),
            GrantState::ReauthRequired => Err(EngineError::ReauthRequired { service: grant.service }),
        }
    }

    async fn mint(&self, grant_id: GrantId, data_key: &DataKey, label: &str) -> Result<MintedHandle, EngineError> {
        let rng = self.rng.as_ref();
        let now = self.now();
        let authid = AuthId::generate(rng);
        let mut handle = Handle::new(&authid, grant_id, data_key, label, &self.keyring, now, rng);
        self.store.create(&mut handle).await?;
        Ok(MintedHandle { authid, label: label.to_owned(), created_at: now })
    }

    /// Marks a handle revoked and erases its key wrap, so not even its AuthID
    /// and the master key together can open the grant through it any more.
    pub(super) async fn revoke_one(&self, mut handle: Handle) -> Result<bool, EngineError> {
        loop {
            if handle.revoked_at.is_some() {
                return Ok(false);
            }
            handle.revoked_at = Some(self.now());
            handle.wrapped_data_key = SealedBlob::from_bytes(Vec::new());
            match self.store.update(&mut handle).await {
                Ok(()) => return Ok(true),
                Err(StoreError::NotFound) => return Ok(false),
                Err(StoreError::Conflict) => match self.store.load::<Handle>(&handle.key()).await? {
                    Some(current) => handle = current,
                    None => return Ok(false),
                },
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Revokes a grant: state and payload first (so nothing refreshes it any
    /// more), then every handle, then the refresh token at the provider.
    pub(super) async fn revoke_grant(
        &self,
        grant_id: GrantId,
        data_key: &DataKey,
    ) -> Result<GrantRevocation, EngineError> {
        let mut refresh_token = None;
        let mut service = None;
        loop {
            let Some(mut grant) = self.store.load::<Grant>(grant_id.as_bytes()).await? else { break };
            service = Some(grant.service.clone());
            if grant.state == GrantState::Revoked {
                break;
            }
            if let Ok(payload) = grant.open_payload(data_key) {
                refresh_token = payload.refresh_token;
            }
            grant.state = GrantState::Revoked;
            grant.payload = SealedBlob::from_bytes(Vec::new());
            grant.updated_at = self.now();
            match self.store.update(&mut grant).await {
                Ok(()) => break,
                Err(StoreError::Conflict) => continue,
                Err(StoreError::NotFound) => break,
                Err(e) => return Err(e.into()),
            }
        }
        // A refreshed token this instance could not store yet is the live one.
        let pending = self.take_pending_token(&grant_id);
        let _ = self.store.delete(Lease::KIND, grant_id.as_bytes(), None).await;
        let mut handles_revoked = 0;
        for handle in self.store.load_group::<Handle>(grant_id.as_bytes()).await? {
            if self.revoke_one(handle).await? {
                handles_revoked += 1;
            }
        }
        self.grant_changed(&grant_id).await;
        let entry = service.as_deref().and_then(|s| self.catalogue.provider_for(s));
        let mut tokens: Vec<SecretString> = pending.into_iter().chain(refresh_token).collect();
        tokens.dedup_by(|a, b| a.expose_secret() == b.expose_secret());
        let provider = match (tokens.first(), entry) {
            (None, _) => ProviderRevocation::NoToken,
            (Some(_), None) => ProviderRevocation::Failed("the service is no longer configured".into()),
            (Some(live), Some(entry)) => {
                // The live token decides the report; a rotated-out one is revoked for good measure.
                let outcome = match entry.client.revoke(live, TokenKind::Refresh).await {
                    Ok(()) => ProviderRevocation::Revoked,
                    Err(ProviderError::Unsupported(_)) => ProviderRevocation::Unsupported,
                    Err(e) => ProviderRevocation::Failed(e.to_string()),
                };
                for older in &tokens[1..] {
                    let _ = entry.client.revoke(older, TokenKind::Refresh).await;
                }
                outcome
            }
        };
        Ok(GrantRevocation { handles_revoked, provider })
    }
}
