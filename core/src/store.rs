//! The `Store` trait every storage adapter implements, and its typed layer.
//!
//! Adapters see only `(kind, id) → (version, group, bytes)`: a handful of
//! required methods in the manner of object_store. Records are encoded and
//! decoded in `core` ([`StoreExt`]), so every adapter stores exactly the same
//! bytes and none of them knows what a grant is.

use std::error::Error as StdError;
use std::pin::Pin;

use async_trait::async_trait;
use futures_core::Stream;

use crate::records::{GrantId, Lease, Record, RecordKind};
use crate::time::Timestamp;

/// A boxed error from a storage backend, kept as the `source`.
pub type BackendError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong in the store, in terms every adapter shares.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record does not exist.
    #[error("record not found")]
    NotFound,
    /// The record exists already, or its version is not the expected one.
    #[error("record changed concurrently (version conflict or already exists)")]
    Conflict,
    /// The backend cannot be reached or failed.
    #[error("store unavailable{}", if *retryable { " (retryable)" } else { "" })]
    Unavailable {
        /// Whether trying again later may succeed.
        retryable: bool,
        /// The backend's own error.
        #[source]
        source: Option<BackendError>,
    },
    /// Stored bytes do not decode as the record they should be.
    #[error("stored record is corrupt: {detail}")]
    Corrupt {
        /// What is wrong, without any record content.
        detail: String,
        /// The underlying error.
        #[source]
        source: Option<BackendError>,
    },
}

impl StoreError {
    /// A retryable outage caused by `source`.
    pub fn unavailable(source: impl Into<BackendError>) -> Self {
        StoreError::Unavailable { retryable: true, source: Some(source.into()) }
    }

    /// Corruption described by `detail`.
    pub fn corrupt(detail: impl Into<String>) -> Self {
        StoreError::Corrupt { detail: detail.into(), source: None }
    }
}

/// A record as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Starts at 1 on insert; each compare-and-swap adds 1.
    pub version: u64,
    /// The secondary key listed by (a handle's grant id).
    pub group: Option<Vec<u8>>,
    /// The encoded record.
    pub body: Vec<u8>,
}

/// A page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// `(id, record)` in ascending id order.
    pub items: Vec<(Vec<u8>, StoredRecord)>,
    /// Where the next page starts (pass as `after`); `None` on the last page.
    pub next: Option<Vec<u8>>,
}

/// What to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// The record kind.
    pub kind: RecordKind,
    /// Only records of this group (e.g. one grant's handles).
    pub group: Option<Vec<u8>>,
    /// Only ids strictly greater than this.
    pub after: Option<Vec<u8>>,
    /// At most this many items (at least 1 is used).
    pub limit: usize,
}

impl ListQuery {
    /// The first page of every record of `kind`.
    pub fn all(kind: RecordKind, limit: usize) -> Self {
        ListQuery { kind, group: None, after: None, limit }
    }
}

/// A notice published through the store so every instance can react.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Notice {
    /// A grant or one of its handles changed (revoked, rotated): purge caches.
    GrantChanged(GrantId),
    /// A grant's tokens were refreshed and stored: instances waiting on the
    /// refreshing instance's lease may re-read.
    TokenRefreshed(GrantId),
    /// Notices may have been lost (a store's listening connection came back
    /// after a break): drop every cached token and re-read. Local only: a
    /// store emits it to its own subscribers and never sends it to another
    /// process; publishing it reaches this store's subscribers alone.
    Resync,
}

/// The notices a subscriber receives.
pub type NoticeStream = Pin<Box<dyn Stream<Item = Notice> + Send>>;

/// Whether a lease was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The caller holds the lease until `deadline`.
    Acquired {
        /// When it lapses.
        deadline: Timestamp,
    },
    /// Someone else holds it.
    Held {
        /// The holder.
        owner: String,
        /// When their lease lapses.
        deadline: Timestamp,
    },
}

/// The storage every adapter implements.
///
/// Versions: insert creates version 1; a compare-and-swap succeeds only
/// against the current version and adds one. Every acknowledged write must be
/// durable. Operations that cannot reach the backend answer
/// [`StoreError::Unavailable`].
#[async_trait]
pub trait Store: Send + Sync {
    /// Reads one record.
    async fn get(&self, kind: RecordKind, id: &[u8]) -> Result<Option<StoredRecord>, StoreError>;

    /// Creates a record at version 1, or answers [`StoreError::Conflict`] if
    /// the id is taken.
    async fn insert(&self, kind: RecordKind, id: &[u8], group: Option<&[u8]>, body: &[u8]) -> Result<(), StoreError>;

    /// Replaces a record whose version is `expected`; answers the new version.
    /// [`StoreError::NotFound`] if absent, [`StoreError::Conflict`] if the
    /// version differs.
    async fn compare_and_swap(
        &self,
        kind: RecordKind,
        id: &[u8],
        expected: u64,
        group: Option<&[u8]>,
        body: &[u8],
    ) -> Result<u64, StoreError>;

    /// Deletes a record, if `expected` is given only at that version.
    /// [`StoreError::NotFound`] if absent, [`StoreError::Conflict`] on a
    /// version mismatch.
    async fn delete(&self, kind: RecordKind, id: &[u8], expected: Option<u64>) -> Result<(), StoreError>;

    /// One page of records in ascending id order.
    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError>;

    /// Publishes a notice to every subscriber, this instance's included.
    async fn publish(&self, notice: Notice) -> Result<(), StoreError>;

    /// Subscribes to notices. Notices published after this returns are delivered.
    async fn subscribe(&self) -> Result<NoticeStream, StoreError>;

    /// Reads one record and, when it has a group, the record of `group_kind`
    /// whose id is that group (a handle and its grant). Where the backend
    /// can, in one round trip: the engine's warm path reads nothing else.
    /// The default reads one, then the other.
    async fn get_with_group(
        &self,
        kind: RecordKind,
        id: &[u8],
        group_kind: RecordKind,
    ) -> Result<Option<(StoredRecord, Option<StoredRecord>)>, StoreError> {
        let Some(record) = self.get(kind, id).await? else { return Ok(None) };
        let grouped = match &record.group {
            Some(group) => self.get(group_kind, group).await?,
            None => None,
        };
        Ok(Some((record, grouped)))
    }

    /// Checks that the backend answers.
    async fn ping(&self) -> Result<(), StoreError> {
        self.get(RecordKind::Lease, b"").await.map(|_| ())
    }

    /// Takes the lease on a grant for `owner` until `deadline`, if it is free,
    /// lapsed (its deadline is not after `now`), or already `owner`'s.
    ///
    /// Provided on top of insert and compare-and-swap; an adapter may
    /// override it with a single conditional update.
    async fn acquire_lease(
        &self,
        grant: &GrantId,
        owner: &str,
        deadline: Timestamp,
        now: Timestamp,
    ) -> Result<LeaseOutcome, StoreError> {
        let mut lease = Lease { grant_id: *grant, version: 0, owner: owner.to_owned(), deadline };
        loop {
            match self.get(RecordKind::Lease, grant.as_bytes()).await? {
                None => match self.insert(RecordKind::Lease, grant.as_bytes(), None, &lease.encode()).await {
                    Ok(()) => return Ok(LeaseOutcome::Acquired { deadline }),
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(e),
                },
                Some(stored) => {
                    let held = Lease::decode(&stored.body, stored.version)
                        .map_err(|e| StoreError::corrupt(format!("lease: {e}")))?;
                    if held.owner != owner && held.deadline > now {
                        return Ok(LeaseOutcome::Held { owner: held.owner, deadline: held.deadline });
                    }
                    lease.version = stored.version;
                    let body = lease.encode();
                    match self.compare_and_swap(RecordKind::Lease, grant.as_bytes(), stored.version, None, &body).await
                    {
                        Ok(_) => return Ok(LeaseOutcome::Acquired { deadline }),
                        Err(StoreError::Conflict | StoreError::NotFound) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// Releases `owner`'s lease on a grant. Answers whether `owner` held it.
    async fn release_lease(&self, grant: &GrantId, owner: &str) -> Result<bool, StoreError> {
        loop {
            let Some(stored) = self.get(RecordKind::Lease, grant.as_bytes()).await? else {
                return Ok(false);
            };
            let held =
                Lease::decode(&stored.body, stored.version).map_err(|e| StoreError::corrupt(format!("lease: {e}")))?;
            if held.owner != owner {
                return Ok(false);
            }
            match self.delete(RecordKind::Lease, grant.as_bytes(), Some(stored.version)).await {
                Ok(()) => return Ok(true),
                Err(StoreError::Conflict | StoreError::NotFound) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Typed access to records, encoding and decoding in `core`.
#[async_trait]
pub trait StoreExt: Store {
    /// Reads and decodes a record; checks that it is stored under its own key.
    async fn load<R: Record>(&self, key: &[u8]) -> Result<Option<R>, StoreError> {
        match self.get(R::KIND, key).await? {
            None => Ok(None),
            Some(stored) => decode_stored::<R>(key, &stored).map(Some),
        }
    }

    /// Reads and decodes a record and the record its group names (a
    /// handle and its grant), in one step where the store can.
    async fn load_with_group<R: Record, G: Record>(&self, key: &[u8]) -> Result<Option<(R, Option<G>)>, StoreError> {
        let Some((stored, grouped)) = self.get_with_group(R::KIND, key, G::KIND).await? else { return Ok(None) };
        let record = decode_stored::<R>(key, &stored)?;
        let grouped = match (&stored.group, grouped) {
            (Some(group), Some(grouped)) => Some(decode_stored::<G>(group, &grouped)?),
            _ => None,
        };
        Ok(Some((record, grouped)))
    }

    /// Inserts a new record; sets its version to 1.
    async fn create<R: Record>(&self, record: &mut R) -> Result<(), StoreError> {
        self.insert(R::KIND, &record.key(), record.group().as_deref(), &record.encode()).await?;
        record.set_version(1);
        Ok(())
    }

    /// Writes a record over the version it was read at; sets its new version.
    async fn update<R: Record>(&self, record: &mut R) -> Result<(), StoreError> {
        let version = self
            .compare_and_swap(R::KIND, &record.key(), record.version(), record.group().as_deref(), &record.encode())
            .await?;
        record.set_version(version);
        Ok(())
    }

    /// Deletes a record at the version it was read at.
    async fn remove<R: Record>(&self, record: &R) -> Result<(), StoreError> {
        self.delete(R::KIND, &record.key(), Some(record.version())).await
    }

    /// One page of records of a kind in id order, and where the next starts.
    async fn load_page<R: Record>(
        &self,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<(Vec<R>, Option<Vec<u8>>), StoreError> {
        let page = self.list(&ListQuery { kind: R::KIND, group: None, after, limit }).await?;
        let records = page.items.iter().map(|(id, stored)| decode_stored::<R>(id, stored)).collect::<Result<_, _>>()?;
        Ok((records, page.next))
    }

    /// Every record of a group (e.g. all handles of a grant), paging through.
    async fn load_group<R: Record>(&self, group: &[u8]) -> Result<Vec<R>, StoreError> {
        let mut out = Vec::new();
        let mut query = ListQuery { kind: R::KIND, group: Some(group.to_vec()), after: None, limit: 256 };
        loop {
            let page = self.list(&query).await?;
            for (id, stored) in &page.items {
                out.push(decode_stored::<R>(id, stored)?);
            }
            match page.next {
                Some(next) => query.after = Some(next),
                None => return Ok(out),
            }
        }
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

fn decode_stored<R: Record>(key: &[u8], stored: &StoredRecord) -> Result<R, StoreError> {
    let record = R::decode(&stored.body, stored.version)
        .map_err(|e| StoreError::corrupt(format!("{} record: {e}", R::KIND.name())))?;
    if record.key() != key {
        return Err(StoreError::corrupt(format!("{} record stored under another key", R::KIND.name())));
    }
    Ok(record)
}
