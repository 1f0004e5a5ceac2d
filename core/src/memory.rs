//! `MemoryStore`: the in-memory [`Store`], for tests and single-process demos.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use futures_channel::mpsc;

use crate::records::RecordKind;
use crate::store::{ListQuery, Notice, NoticeStream, Page, Store, StoreError, StoredRecord};

type Key = (RecordKind, Vec<u8>);

/// A [`Store`] in a map behind a mutex. Nothing survives the process.
#[derive(Default)]
pub struct MemoryStore {
    records: Mutex<BTreeMap<Key, StoredRecord>>,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<Notice>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn records(&self) -> MutexGuard<'_, BTreeMap<Key, StoredRecord>> {
        // A panic elsewhere while holding the lock cannot leave a half-written
        // record: every mutation is a single map operation.
        self.records.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many records of `kind` are stored.
    pub fn count(&self, kind: RecordKind) -> usize {
        self.records().keys().filter(|(k, _)| *k == kind).count()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").field("records", &self.records().len()).finish()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, kind: RecordKind, id: &[u8]) -> Result<Option<StoredRecord>, StoreError> {
        Ok(self.records().get(&(kind, id.to_vec())).cloned())
    }

    async fn insert(&self, kind: RecordKind, id: &[u8], group: Option<&[u8]>, body: &[u8]) -> Result<(), StoreError> {
        let mut records = self.records();
        let key = (kind, id.to_vec());
        if records.contains_key(&key) {
            return Err(StoreError::Conflict);
        }
        records.insert(key, StoredRecord { version: 1, group: group.map(<[u8]>::to_vec), body: body.to_vec() });
        Ok(())
    }

    async fn compare_and_swap(
        &self,
        kind: RecordKind,
        id: &[u8],
        expected: u64,
        group: Option<&[u8]>,
        body: &[u8],
    ) -> Result<u64, StoreError> {
        let mut records = self.records();
        let record = records.get_mut(&(kind, id.to_vec())).ok_or(StoreError::NotFound)?;
        if record.version != expected {
            return Err(StoreError::Conflict);
        }
        *record = StoredRecord { version: expected + 1, group: group.map(<[u8]>::to_vec), body: body.to_vec() };
        Ok(expected + 1)
    }

    async fn delete(&self, kind: RecordKind, id: &[u8], expected: Option<u64>) -> Result<(), StoreError> {
        let mut records = self.records();
        let key = (kind, id.to_vec());
        let record = records.get(&key).ok_or(StoreError::NotFound)?;
        if expected.is_some_and(|v| v != record.version) {
            return Err(StoreError::Conflict);
        }
        records.remove(&key);
        Ok(())
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        let limit = query.limit.max(1);
        let records = self.records();
        let start = match &query.after {
            Some(after) => Bound::Excluded((query.kind, after.clone())),
            None => Bound::Included((query.kind, Vec::new())),
        };
        let mut items: Vec<(Vec<u8>, StoredRecord)> = records
            .range((start, Bound::Unbounded))
            .take_while(|((kind, _), _)| *kind == query.kind)
            .filter(|(_, r)| query.group.is_none() || r.group == query.group)
            .take(limit + 1)
            .map(|((_, id), r)| (id.clone(), r.clone()))
            .collect();
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|(id, _)| id.clone())
        } else {
            None
        };
        Ok(Page { items, next })
    }

    async fn publish(&self, notice: Notice) -> Result<(), StoreError> {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers.retain(|tx| tx.unbounded_send(notice).is_ok());
        Ok(())
    }

    async fn subscribe(&self) -> Result<NoticeStream, StoreError> {
        let (tx, rx) = mpsc::unbounded();
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        Ok(Box::pin(rx))
    }
}
