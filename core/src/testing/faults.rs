//! `FaultStore`: a store wrapper that fails on command and logs writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;

use super::EventLog;
use crate::records::RecordKind;
use crate::store::{ListQuery, Notice, NoticeStream, Page, Store, StoreError, StoredRecord};

/// Wraps a store; fails reads, writes or publishes while told to, and appends
/// `store.cas <kind>` to an event log after each successful compare-and-swap.
pub struct FaultStore {
    inner: Arc<dyn Store>,
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
    fail_publishes: AtomicBool,
    fail_next_grant_writes: AtomicUsize,
    failed_writes: AtomicUsize,
    log: Option<EventLog>,
}

impl FaultStore {
    /// Wraps `inner`; nothing fails until told to.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        FaultStore {
            inner,
            fail_reads: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            fail_publishes: AtomicBool::new(false),
            fail_next_grant_writes: AtomicUsize::new(0),
            failed_writes: AtomicUsize::new(0),
            log: None,
        }
    }

    /// Logs successful compare-and-swaps to `log`.
    pub fn with_log(mut self, log: EventLog) -> Self {
        self.log = Some(log);
        self
    }

    /// Every read fails (`Unavailable`) while set.
    pub fn fail_reads(&self, fail: bool) {
        self.fail_reads.store(fail, Ordering::SeqCst);
    }

    /// Every write fails (`Unavailable`) while set.
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// Every notice publish fails (`Unavailable`) while set; subscribing
    /// still works.
    pub fn fail_publishes(&self, fail: bool) {
        self.fail_publishes.store(fail, Ordering::SeqCst);
    }

    /// The next `n` compare-and-swaps of grant records fail.
    pub fn fail_next_grant_writes(&self, n: usize) {
        self.fail_next_grant_writes.store(n, Ordering::SeqCst);
    }

    /// Writes refused so far.
    pub fn failed_writes(&self) -> usize {
        self.failed_writes.load(Ordering::SeqCst)
    }

    fn read_gate(&self) -> Result<(), StoreError> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable { retryable: true, source: None });
        }
        Ok(())
    }

    fn write_gate(&self, kind: RecordKind) -> Result<(), StoreError> {
        let grant_fault = kind == RecordKind::Grant
            && self
                .fail_next_grant_writes
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if grant_fault || self.fail_writes.load(Ordering::SeqCst) {
            self.failed_writes.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable { retryable: true, source: None });
        }
        Ok(())
    }
}

#[async_trait]
impl Store for FaultStore {
    async fn get(&self, kind: RecordKind, id: &[u8]) -> Result<Option<StoredRecord>, StoreError> {
        self.read_gate()?;
        self.inner.get(kind, id).await
    }

    async fn insert(&self, kind: RecordKind, id: &[u8], group: Option<&[u8]>, body: &[u8]) -> Result<(), StoreError> {
        self.write_gate(kind)?;
        self.inner.insert(kind, id, group, body).await
    }

    async fn compare_and_swap(
        &self,
        kind: RecordKind,
        id: &[u8],
        expected: u64,
        group: Option<&[u8]>,
        body: &[u8],
    ) -> Result<u64, StoreError> {
        self.write_gate(kind)?;
        let version = self.inner.compare_and_swap(kind, id, expected, group, body).await?;
        if let Some(log) = &self.log {
            log.lock().unwrap_or_else(|p| p.into_inner()).push(format!("store.cas {}", kind.name()));
        }
        Ok(version)
    }

    async fn delete(&self, kind: RecordKind, id: &[u8], expected: Option<u64>) -> Result<(), StoreError> {
        self.write_gate(kind)?;
        self.inner.delete(kind, id, expected).await
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        self.read_gate()?;
        self.inner.list(query).await
    }

    async fn publish(&self, notice: Notice) -> Result<(), StoreError> {
        if self.fail_publishes.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable { retryable: true, source: None });
        }
        self.inner.publish(notice).await
    }

    async fn subscribe(&self) -> Result<NoticeStream, StoreError> {
        self.inner.subscribe().await
    }
}
