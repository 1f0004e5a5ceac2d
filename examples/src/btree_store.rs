//! (c) A custom [`Store`]: every record in one ordered map behind a mutex.
//!
//! The whole contract is seven methods over `(kind, id) → (version, group,
//! body)`; the engine encodes and decodes the records itself, so a store never
//! knows what a grant is. Put your own database behind the same seven methods
//! (insert-if-absent, a version-checked update and delete, a paged listing in
//! id order, notices) and run the conformance suite against it, as
//! `tests/custom_store.rs` does for this one:
//!
//! ```ignore
//! latchkey_core::store_conformance_tests!(async { latchkey_examples::BTreeStore::default() });
//! ```
//!
//! This one keeps nothing across restarts, which suits tests and demos only:
//! a real store must make every acknowledged write durable.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use futures_channel::mpsc::{UnboundedSender, unbounded};
use latchkey_core::{ListQuery, Notice, NoticeStream, Page, RecordKind, Store, StoreError, StoredRecord};

/// Records keyed `(kind code, id)`, so one kind is one contiguous range in id
/// order; notices go to this process's subscribers.
#[derive(Default)]
pub struct BTreeStore {
    records: Mutex<BTreeMap<(u8, Vec<u8>), StoredRecord>>,
    subscribers: Mutex<Vec<UnboundedSender<Notice>>>,
}

fn key(kind: RecordKind, id: &[u8]) -> (u8, Vec<u8>) {
    (kind as u8, id.to_vec())
}

fn record(version: u64, group: Option<&[u8]>, body: &[u8]) -> StoredRecord {
    StoredRecord { version, group: group.map(<[u8]>::to_vec), body: body.to_vec() }
}

impl BTreeStore {
    fn records(&self) -> MutexGuard<'_, BTreeMap<(u8, Vec<u8>), StoredRecord>> {
        // Every change is one map operation: a panic elsewhere leaves no half-written record.
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Store for BTreeStore {
    async fn get(&self, kind: RecordKind, id: &[u8]) -> Result<Option<StoredRecord>, StoreError> {
        Ok(self.records().get(&key(kind, id)).cloned())
    }

    async fn insert(&self, kind: RecordKind, id: &[u8], group: Option<&[u8]>, body: &[u8]) -> Result<(), StoreError> {
        match self.records().entry(key(kind, id)) {
            Entry::Occupied(_) => Err(StoreError::Conflict),
            Entry::Vacant(slot) => {
                slot.insert(record(1, group, body));
                Ok(())
            }
        }
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
        let stored = records.get_mut(&key(kind, id)).ok_or(StoreError::NotFound)?;
        if stored.version != expected {
            return Err(StoreError::Conflict);
        }
        *stored = record(expected + 1, group, body);
        Ok(expected + 1)
    }

    async fn delete(&self, kind: RecordKind, id: &[u8], expected: Option<u64>) -> Result<(), StoreError> {
        let mut records = self.records();
        let version = records.get(&key(kind, id)).ok_or(StoreError::NotFound)?.version;
        if expected.is_some_and(|expected| expected != version) {
            return Err(StoreError::Conflict);
        }
        records.remove(&key(kind, id));
        Ok(())
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        let limit = query.limit.max(1);
        let start = match &query.after {
            Some(after) => Bound::Excluded(key(query.kind, after)),
            None => Bound::Included(key(query.kind, &[])),
        };
        let mut items: Vec<(Vec<u8>, StoredRecord)> = self
            .records()
            .range((start, Bound::Unbounded))
            .take_while(|((kind, _), _)| *kind == query.kind as u8)
            .filter(|(_, stored)| query.group.is_none() || stored.group == query.group)
            .take(limit + 1)
            .map(|((_, id), stored)| (id.clone(), stored.clone()))
            .collect();
        // One item more than asked for says there is a next page; it starts after the last one kept.
        let next = (items.len() > limit).then(|| items[limit - 1].0.clone());
        items.truncate(limit);
        Ok(Page { items, next })
    }

    async fn publish(&self, notice: Notice) -> Result<(), StoreError> {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(PoisonError::into_inner);
        subscribers.retain(|subscriber| subscriber.unbounded_send(notice).is_ok());
        Ok(())
    }

    async fn subscribe(&self) -> Result<NoticeStream, StoreError> {
        let (sender, receiver) = unbounded();
        self.subscribers.lock().unwrap_or_else(PoisonError::into_inner).push(sender);
        Ok(Box::pin(receiver))
    }
}
