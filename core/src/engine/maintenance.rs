//! Maintenance: garbage collection, the sweep of expired short-lived
//! records, statistics, master key re-seal, and the operator's view of
//! grants (list, show, revoke without the AuthID).
//! None of it needs an AuthID, and none of it sees a secret.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::authid::KeyId;
use crate::envelope::SealedBlob;
use crate::records::{
    DeviceGrant, Grant, GrantId, GrantState, Handle, Handoff, Lease, LoginTransaction, Record, Tagged,
};
use crate::store::{Store, StoreError, StoreExt};
use crate::time::Timestamp;

use super::{Broker, EngineError};

const PAGE: usize = 500;

/// A grant unused for longer than the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcCandidate {
    /// The grant.
    pub grant_id: GrantId,
    /// Its service.
    pub service: String,
    /// Its state.
    pub state: GrantState,
    /// The latest use of the grant or any of its handles.
    pub last_used_at: Timestamp,
    /// How many handles it has.
    pub handles: usize,
}

/// What a garbage collection found (and, unless a dry run, removed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Nothing was deleted.
    pub dry_run: bool,
    /// Grants unused for longer than the limit.
    pub grants: Vec<GcCandidate>,
    /// Expired login transactions.
    pub expired_logins: usize,
    /// Expired or delivered hand-offs past their expiry.
    pub expired_handoffs: usize,
    /// Expired device codes.
    pub expired_devices: usize,
    /// Leases lapsed long ago.
    pub stale_leases: usize,
}

/// Counts, never secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Grants by service and state.
    pub grants: BTreeMap<(String, &'static str), u64>,
    /// Live handles.
    pub handles_active: u64,
    /// Revoked handles.
    pub handles_revoked: u64,
    /// Logins begun and not yet completed or expired.
    pub logins_in_flight: u64,
    /// Hand-offs waiting for a login or a fetch.
    pub handoffs_waiting: u64,
}

/// What a master key re-seal did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResealReport {
    /// Handles moved to the current master key.
    pub handles_resealed: u64,
    /// Handles already under it.
    pub handles_current: u64,
    /// Login transactions whose PKCE verifier was moved.
    pub logins_resealed: u64,
    /// Records that could not be opened with any configured key.
    pub failed: u64,
}

/// A grant as the operator sees it: bookkeeping only. Its tokens and its
/// handles' labels are sealed under its data key, which only an AuthID opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantSummary {
    /// The grant.
    pub grant_id: GrantId,
    /// Its service.
    pub service: String,
    /// Its state.
    pub state: GrantState,
    /// When its login completed.
    pub created_at: Timestamp,
    /// The last change of the grant record.
    pub updated_at: Timestamp,
    /// The latest use of the grant or any of its handles.
    pub last_used_at: Timestamp,
    /// Handles not revoked.
    pub handles_active: usize,
    /// Handles revoked.
    pub handles_revoked: usize,
}

impl GrantSummary {
    fn of(grant: &Grant, handles: &[Handle]) -> Self {
        let active = handles.iter().filter(|h| h.revoked_at.is_none()).count();
        GrantSummary {
            grant_id: grant.id,
            service: grant.service.clone(),
            state: grant.state,
            created_at: grant.created_at,
            updated_at: grant.updated_at,
            last_used_at: handles.iter().map(|h| h.last_used_at).fold(grant.last_used_at, Timestamp::max),
            handles_active: active,
            handles_revoked: handles.len() - active,
        }
    }
}

/// One handle (AuthID) of a grant, as the operator sees it: never its key
/// wrap, and not its label, which is sealed under the grant's data key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandleSummary {
    /// The AuthID's public half.
    pub keyid: KeyId,
    /// When minted.
    pub created_at: Timestamp,
    /// Last token request made with it.
    pub last_used_at: Timestamp,
    /// When revoked, if it is.
    pub revoked_at: Option<Timestamp>,
}

impl HandleSummary {
    fn of(handle: &Handle) -> Self {
        HandleSummary {
            keyid: handle.keyid,
            created_at: handle.created_at,
            last_used_at: handle.last_used_at,
            revoked_at: handle.revoked_at,
        }
    }
}

/// A grant and its handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantDetails {
    /// The grant.
    pub grant: GrantSummary,
    /// Its handles, in keyid order.
    pub handles: Vec<HandleSummary>,
}

/// Which grants [`Broker::list_grants`] answers; every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantFilter {
    /// Of this service.
    pub service: Option<String>,
    /// In this state.
    pub state: Option<GrantState>,
    /// Neither the grant nor any of its handles used for this long.
    pub unused_for: Option<Duration>,
}

/// What an operator's revocation did. The provider is never told: its
/// refresh token is sealed under the data key, which only an AuthID opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorRevocation {
    /// The grant concerned.
    pub grant_id: GrantId,
    /// Its service.
    pub service: String,
    /// Whether this call revoked the grant (and erased its payload); false
    /// when it was revoked already or keeps other live handles.
    pub grant_revoked: bool,
    /// Handles this call revoked (their key wraps erased).
    pub handles_revoked: usize,
    /// Handles of the grant still live afterwards.
    pub handles_left: usize,
}

/// Calls `visit` with every record of a kind, a page at a time.
async fn scan<R: Record>(store: &dyn Store, mut visit: impl FnMut(R)) -> Result<(), EngineError> {
    let mut after = None;
    loop {
        let (page, next) = store.load_page::<R>(after, PAGE).await?;
        page.into_iter().for_each(&mut visit);
        match next {
            Some(next) => after = Some(next),
            None => return Ok(()),
        }
    }
}

/// A short-lived record, useless once its expiry has passed.
trait Expiring: Record {
    fn expires_at(&self) -> Timestamp;
}

impl Expiring for LoginTransaction {
    fn expires_at(&self) -> Timestamp {
        self.expires_at
    }
}

impl Expiring for Handoff {
    fn expires_at(&self) -> Timestamp {
        self.expires_at
    }
}

impl Expiring for DeviceGrant {
    fn expires_at(&self) -> Timestamp {
        self.expires_at
    }
}

/// Whether a short-lived record has expired at `now`.
fn expired<R: Expiring>(now: Timestamp) -> impl Fn(&R) -> bool {
    move |r| now >= r.expires_at()
}

/// What one page of [`remove_expired_page`] did.
struct PageSwept {
    /// Records read.
    examined: usize,
    /// Records deleted (or, in a dry run, that would be).
    removed: usize,
    /// Where the next page starts; `None` after the last.
    next: Option<Vec<u8>>,
}

/// Reads one page (at most `limit` records) of a kind after `after` and
/// deletes, unless `dry_run`, those `expired` selects, each at the version
/// read: a record changed or deleted meanwhile (another instance's sweep,
/// a login completing) is left alone, so concurrent passes are harmless.
/// The one piece `gc` and the sweep share.
async fn remove_expired_page<R: Record>(
    store: &dyn Store,
    after: Option<Vec<u8>>,
    limit: usize,
    dry_run: bool,
    expired: &impl Fn(&R) -> bool,
) -> Result<PageSwept, EngineError> {
    let (page, next) = store.load_page::<R>(after, limit.max(1)).await?;
    let mut swept = PageSwept { examined: page.len(), removed: 0, next };
    for record in page.iter().filter(|r| expired(r)) {
        if dry_run {
            swept.removed += 1;
            continue;
        }
        match store.remove(record).await {
            Ok(()) => swept.removed += 1,
            // Changed or gone meanwhile: leave it to its new owner.
            Err(StoreError::Conflict | StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(swept)
}

/// Deletes (unless `dry_run`) every record of a kind that `expired` selects,
/// at the version read; answers how many went (or would go).
async fn remove_expired<R: Record>(
    store: &dyn Store,
    dry_run: bool,
    expired: impl Fn(&R) -> bool,
) -> Result<usize, EngineError> {
    let (mut removed, mut after) = (0, None);
    loop {
        let page = remove_expired_page::<R>(store, after, PAGE, dry_run, &expired).await?;
        removed += page.removed;
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(removed),
        }
    }
}

/// What one sweep pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Expired login transactions deleted.
    pub expired_logins: usize,
    /// Expired hand-offs deleted.
    pub expired_handoffs: usize,
    /// Expired device codes deleted.
    pub expired_devices: usize,
    /// Records read, at most the pass's limit per kind.
    pub examined: usize,
    /// Whether some kind has records this pass did not reach; the next pass
    /// goes on from there.
    pub more: bool,
}

impl SweepReport {
    /// Records deleted, of every kind.
    pub fn removed(&self) -> usize {
        self.expired_logins + self.expired_handoffs + self.expired_devices
    }
}

/// Where the next sweep pass goes on, per kind: each pass reads one page of
/// each kind, so a store with more short-lived records than a page holds is
/// swept over several passes, and then from the start again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepCursor {
    logins: Option<Vec<u8>>,
    handoffs: Option<Vec<u8>>,
    devices: Option<Vec<u8>>,
}

/// One sweep pass over `store` at `now`: reads at most `limit` login
/// transactions, hand-offs and device codes each (from where `cursor` says)
/// and deletes those expired, each at the version read, so passes of several
/// instances at once are harmless. [`Broker::sweep_expired`] runs it with
/// the broker's clock and cursor; `latchkey gc` removes the same records in
/// one go.
pub async fn sweep_pass(
    store: &dyn Store,
    now: Timestamp,
    limit: usize,
    cursor: &mut SweepCursor,
) -> Result<SweepReport, EngineError> {
    let mut report = SweepReport::default();
    sweep_into(store, now, limit, cursor, &mut report).await?;
    Ok(report)
}

/// [`sweep_pass`], counting into `report` kind by kind, so a pass that fails
/// half-way still tells what the kinds before the failure removed.
async fn sweep_into(
    store: &dyn Store,
    now: Timestamp,
    limit: usize,
    cursor: &mut SweepCursor,
    report: &mut SweepReport,
) -> Result<(), EngineError> {
    async fn kind<R: Expiring>(
        store: &dyn Store,
        now: Timestamp,
        limit: usize,
        at: &mut Option<Vec<u8>>,
        report: &mut SweepReport,
    ) -> Result<usize, EngineError> {
        let page = remove_expired_page::<R>(store, at.take(), limit, false, &expired::<R>(now)).await?;
        report.examined += page.examined;
        report.more |= page.next.is_some();
        *at = page.next;
        Ok(page.removed)
    }
    report.expired_logins = kind::<LoginTransaction>(store, now, limit, &mut cursor.logins, report).await?;
    report.expired_handoffs = kind::<Handoff>(store, now, limit, &mut cursor.handoffs, report).await?;
    report.expired_devices = kind::<DeviceGrant>(store, now, limit, &mut cursor.devices, report).await?;
    Ok(())
}

impl Broker {
    /// Removes grants (with their handles and lease) whose grant and handles
    /// were all unused for `unused_for`, and expired short-lived records.
    /// With `dry_run`, only lists what would go.
    pub async fn gc(&self, unused_for: Duration, dry_run: bool) -> Result<GcReport, EngineError> {
        let inner = &self.inner;
        let store = inner.store.as_ref();
        let now = inner.now();
        let cutoff = now.saturating_sub(unused_for);
        let mut report = GcReport { dry_run, ..GcReport::default() };

        let mut after = None;
        loop {
            let (grants, next) = store.load_page::<Grant>(after, PAGE).await?;
            for grant in grants {
                if grant.last_used_at >= cutoff {
                    continue;
                }
                let handles: Vec<Handle> = store.load_group(grant.id.as_bytes()).await?;
                let last_used_at = handles.iter().map(|h| h.last_used_at).fold(grant.last_used_at, Timestamp::max);
                if last_used_at >= cutoff {
                    continue;
                }
                if !dry_run {
                    // The grant goes first, at the version read: if it was
                    // used meanwhile, the delete fails and nothing is lost.
                    match store.remove(&grant).await {
                        Ok(()) => {}
                        Err(StoreError::Conflict | StoreError::NotFound) => continue,
                        Err(e) => return Err(e.into()),
                    }
                    for handle in &handles {
                        let _ = store.delete(Handle::KIND, &handle.key(), None).await;
                    }
                    let _ = store.delete(Lease::KIND, grant.id.as_bytes(), None).await;
                    inner.grant_changed(&grant.id).await;
                }
                report.grants.push(GcCandidate {
                    grant_id: grant.id,
                    service: grant.service,
                    state: grant.state,
                    last_used_at,
                    handles: handles.len(),
                });
            }
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }

        report.expired_logins = remove_expired(store, dry_run, expired::<LoginTransaction>(now)).await?;
        report.expired_handoffs = remove_expired(store, dry_run, expired::<Handoff>(now)).await?;
        report.expired_devices = remove_expired(store, dry_run, expired::<DeviceGrant>(now)).await?;
        let long_ago = now.saturating_sub(Duration::from_secs(3600));
        report.stale_leases = remove_expired::<Lease>(store, dry_run, |l| l.deadline < long_ago).await?;
        Ok(report)
    }

    /// One bounded pass of the background sweep: deletes expired login
    /// transactions, hand-offs and device codes, reading at most `limit`
    /// records of each kind ([`sweep_pass`]). Successive passes go on where
    /// the last stopped, so every record is reached; what went is counted in
    /// [`MetricsSnapshot::swept_records`](super::MetricsSnapshot::swept_records).
    /// Safe to run on several instances at once.
    pub async fn sweep_expired(&self, limit: usize) -> Result<SweepReport, EngineError> {
        let inner = &self.inner;
        let mut cursor = std::mem::take(&mut *super::lock(&inner.sweep_cursor));
        let mut report = SweepReport::default();
        let swept = sweep_into(inner.store.as_ref(), inner.now(), limit, &mut cursor, &mut report).await;
        *super::lock(&inner.sweep_cursor) = cursor;
        inner.metrics.swept_records.fetch_add(report.removed() as u64, std::sync::atomic::Ordering::Relaxed);
        swept.map(|()| report)
    }

    /// Counts by service and state.
    pub async fn stats(&self) -> Result<Stats, EngineError> {
        let inner = &self.inner;
        let store = inner.store.as_ref();
        let now = inner.now();
        let mut stats = Stats::default();
        scan::<Grant>(store, |g| *stats.grants.entry((g.service, g.state.as_str())).or_default() += 1).await?;
        scan::<Handle>(store, |h| match h.revoked_at {
            None => stats.handles_active += 1,
            Some(_) => stats.handles_revoked += 1,
        })
        .await?;
        scan::<LoginTransaction>(store, |t| {
            stats.logins_in_flight += u64::from(now < t.expires_at && t.completed_at.is_none());
        })
        .await?;
        scan::<Handoff>(store, |h| stats.handoffs_waiting += u64::from(now < h.expires_at && h.delivered_at.is_none()))
            .await?;
        Ok(stats)
    }

    /// Moves every handle's outer seal (and every pending login's PKCE
    /// verifier) to the current master key. Needs no AuthID. Afterwards old
    /// keys can be removed from the configuration.
    pub async fn reseal(&self) -> Result<ResealReport, EngineError> {
        let inner = &self.inner;
        let store = inner.store.as_ref();
        let rng = inner.rng.as_ref();
        let mut report = ResealReport::default();
        let mut after = None;
        loop {
            let (handles, next) = store.load_page::<Handle>(after, PAGE).await?;
            for mut handle in handles {
                if handle.revoked_at.is_some() {
                    continue;
                }
                // A conflict means the handle changed (used, revoked): re-read and redo.
                for _ in 0..4 {
                    match handle.reseal(&inner.keyring, rng) {
                        Ok(false) => {
                            report.handles_current += 1;
                            break;
                        }
                        Err(_) => {
                            report.failed += 1;
                            break;
                        }
                        Ok(true) => match store.update(&mut handle).await {
                            Ok(()) => {
                                report.handles_resealed += 1;
                                break;
                            }
                            Err(StoreError::Conflict) => match store.load::<Handle>(&handle.key()).await? {
                                Some(current) if current.revoked_at.is_none() => handle = current,
                                _ => break,
                            },
                            Err(StoreError::NotFound) => break,
                            Err(e) => return Err(e.into()),
                        },
                    }
                }
            }
            let Some(next) = next else { break };
            after = Some(next);
        }
        let mut after = None;
        loop {
            let (logins, next) = store.load_page::<LoginTransaction>(after, PAGE).await?;
            for mut tx in logins {
                match tx.reseal(&inner.keyring, rng) {
                    Ok(true) => {
                        tx.sign(&inner.record_keys);
                        if store.update(&mut tx).await.is_ok() {
                            report.logins_resealed += 1;
                        }
                    }
                    Ok(false) => {}
                    Err(_) => report.failed += 1,
                }
            }
            let Some(next) = next else { break };
            after = Some(next);
        }
        Ok(report)
    }

    /// The grants `filter` selects, in id order, with the latest use of each
    /// (its own or any handle's).
    pub async fn list_grants(&self, filter: &GrantFilter) -> Result<Vec<GrantSummary>, EngineError> {
        let inner = &self.inner;
        let store = inner.store.as_ref();
        let cutoff = filter.unused_for.map(|d| inner.now().saturating_sub(d));
        let mut grants = Vec::new();
        scan::<Grant>(store, |g| {
            let keep = filter.service.as_ref().is_none_or(|s| *s == g.service)
                && filter.state.is_none_or(|s| s == g.state)
                && cutoff.is_none_or(|c| g.last_used_at < c);
            if keep {
                grants.push(g);
            }
        })
        .await?;
        let mut out = Vec::with_capacity(grants.len());
        for grant in grants {
            let handles: Vec<Handle> = store.load_group(grant.id.as_bytes()).await?;
            let summary = GrantSummary::of(&grant, &handles);
            if cutoff.is_none_or(|c| summary.last_used_at < c) {
                out.push(summary);
            }
        }
        Ok(out)
    }

    /// One grant and its handles; `None` if there is no such grant.
    pub async fn show_grant(&self, grant_id: &GrantId) -> Result<Option<GrantDetails>, EngineError> {
        let store = self.inner.store.as_ref();
        let Some(grant) = store.load::<Grant>(grant_id.as_bytes()).await? else { return Ok(None) };
        let handles: Vec<Handle> = store.load_group(grant.id.as_bytes()).await?;
        Ok(Some(GrantDetails {
            grant: GrantSummary::of(&grant, &handles),
            handles: handles.iter().map(HandleSummary::of).collect(),
        }))
    }

    /// Revokes a grant without any of its AuthIDs: marks it revoked, erases
    /// its sealed payload and every handle's key wrap (so nothing can be
    /// decrypted any more, with any AuthID or master key), drops its lease
    /// and publishes "grant changed" so every instance drops its cached
    /// token. The provider cannot be told: the refresh token is sealed under
    /// the data key. `None` if there is no such grant.
    pub async fn revoke_grant_as_operator(
        &self,
        grant_id: &GrantId,
    ) -> Result<Option<OperatorRevocation>, EngineError> {
        let inner = &self.inner;
        let store = inner.store.as_ref();
        let Some(grant) = store.load::<Grant>(grant_id.as_bytes()).await? else { return Ok(None) };
        let service = grant.service.clone();
        let grant_revoked = self.erase_grant(grant).await?;
        // A token this instance refreshed and could not store yet dies with the grant.
        drop(inner.take_pending_token(grant_id));
        let _ = store.delete(Lease::KIND, grant_id.as_bytes(), None).await;
        let mut handles_revoked = 0;
        for handle in store.load_group::<Handle>(grant_id.as_bytes()).await? {
            if inner.revoke_one(handle).await? {
                handles_revoked += 1;
            }
        }
        inner.grant_changed(grant_id).await;
        Ok(Some(OperatorRevocation { grant_id: *grant_id, service, grant_revoked, handles_revoked, handles_left: 0 }))
    }

    /// Revokes one handle without its AuthID: marks it revoked and erases its
    /// key wrap, and publishes "grant changed". When it was the grant's last
    /// live handle, the grant is revoked as by
    /// [`revoke_grant_as_operator`](Self::revoke_grant_as_operator): no AuthID
    /// could open it any more. `None` if there is no such handle.
    pub async fn revoke_handle_as_operator(&self, keyid: &KeyId) -> Result<Option<OperatorRevocation>, EngineError> {
        let inner = &self.inner;
        let store = inner.store.as_ref();
        let Some(handle) = store.load::<Handle>(keyid.as_bytes()).await? else { return Ok(None) };
        let grant_id = handle.grant_id;
        let handles_revoked = usize::from(inner.revoke_one(handle).await?);
        inner.grant_changed(&grant_id).await;
        let left = store.load_group::<Handle>(grant_id.as_bytes()).await?;
        let handles_left = left.iter().filter(|h| h.revoked_at.is_none()).count();
        let grant = store.load::<Grant>(grant_id.as_bytes()).await?;
        let service = grant.as_ref().map(|g| g.service.clone()).unwrap_or_default();
        if handles_left == 0 {
            if let Some(mut whole) = self.revoke_grant_as_operator(&grant_id).await? {
                whole.handles_revoked += handles_revoked;
                return Ok(Some(whole));
            }
        }
        Ok(Some(OperatorRevocation { grant_id, service, grant_revoked: false, handles_revoked, handles_left }))
    }

    /// Marks a grant revoked and erases its payload, at the version read,
    /// re-reading on a conflict; answers whether this call changed it.
    async fn erase_grant(&self, mut grant: Grant) -> Result<bool, EngineError> {
        let inner = &self.inner;
        loop {
            if grant.state == GrantState::Revoked && grant.payload.as_bytes().is_empty() {
                return Ok(false);
            }
            grant.state = GrantState::Revoked;
            grant.payload = SealedBlob::from_bytes(Vec::new());
            grant.updated_at = inner.now();
            match inner.store.update(&mut grant).await {
                Ok(()) => return Ok(true),
                Err(StoreError::NotFound) => return Ok(false),
                Err(StoreError::Conflict) => match inner.store.load::<Grant>(grant.id.as_bytes()).await? {
                    Some(current) => grant = current,
                    None => return Ok(false),
                },
                Err(e) => return Err(e.into()),
            }
        }
    }
}
