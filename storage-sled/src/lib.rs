//! `SledStore`: latchkey's embedded default [`Store`], on sled 0.34.
//!
//! One process, one directory, no server to run. The adapter keeps every
//! record in a single sled tree and answers the [`Store`] contract that
//! `latchkey_core`'s conformance suite checks.
//!
//! # Key decision: durable before acknowledged
//!
//! Every write ends with a sled `flush` (write the log buffer and fsync)
//! before it answers: the broker answers an access token only after the
//! rotated refresh token behind it is stored, and a write sled merely
//! buffered would be lost on a crash while the provider has already
//! invalidated the old token. Refused writes flush too (they are rare).
//! Sled's own periodic flusher is switched off: it would add nothing.
//!
//! Reads (`get`, `list`) do not flush. A read may observe a write another
//! task has applied but not yet flushed, and that is safe:
//!
//! * the writer's own caller answers only after that flush, so nothing the
//!   writer promised depends on the read;
//! * whatever the reader then *writes* is flushed before it answers, and
//!   sled's log is sequential: that flush makes the observed write durable
//!   first, so no durable record ever depends on a lost one;
//! * whatever the reader *hands out* without writing (an access token, a
//!   refusal) is what the writer's caller is about to be handed too; a crash
//!   before the flush loses the write for every caller alike, read or not —
//!   flushing on the read would not have made it durable any sooner than
//!   the writer's own flush, which is already running.
//!
//! So a read's fsync bought nothing, and it cost the warm path a system
//! call whenever a write was in flight. The SIGKILL test of the broker's
//! process tests (`server-warp/tests/processes.rs`) kills the broker under
//! refresh load and checks that every grant still refreshes.
//!
//! # Layout
//!
//! One tree, `records`. Key = `[kind code] ‖ id`, so the records of a kind
//! are one contiguous key range in id order and `list` is a range scan.
//! Value (hand-written, versioned; integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 1 | value format (1) |
//! | 8 | record version (u64) |
//! | 1 | group tag: 0 = none, 1 = present |
//! | 4 + n | if present: group length (u32) and group bytes |
//! | rest | the record body, as `core` encoded it |
//!
//! Decoding is bounds-checked: any byte string yields a record or
//! [`StoreError::Corrupt`], never a panic.
//!
//! # Atomicity and threads
//!
//! Insert-if-absent, compare-and-swap and versioned delete are sled
//! compare-and-swaps on the whole value, so they are atomic across tasks;
//! leases use the trait's provided implementation on top of them. Sled calls
//! block, so each operation runs on Tokio's blocking pool
//! (`spawn_blocking`); called outside a Tokio runtime, it runs inline.
//! Notices are delivered in-process to every subscriber of this instance:
//! sled admits one process per directory, so there is nobody else to tell.
//!
//! # Using it
//!
//! Open a directory and give the store to the engine as an `Arc<dyn Store>`
//! (`BrokerParts::store`; the whole construction is in `latchkey_providers`'
//! crate documentation and `docs/embedding.md`). Keep the master key out of
//! the directory, so a copy of the data is not a copy of its key.
//!
//! ```
//! use std::sync::Arc;
//!
//! use latchkey_core::Store;
//! use latchkey_storage_sled::SledStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("latchkey-data");
//! let store: Arc<dyn Store> = Arc::new(SledStore::open(&path).await?);
//! store.ping().await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures_channel::mpsc;
use latchkey_core::records::RecordKind;
use latchkey_core::store::{ListQuery, Notice, NoticeStream, Page, Store, StoreError, StoredRecord};

/// The sled tree holding every record.
const TREE: &str = "records";
/// sled's page cache size.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// The value format this build writes and reads.
const VALUE_FORMAT: u8 = 1;

/// A [`Store`] in a sled database directory. Every acknowledged write is on
/// disk; see the crate documentation for the layout.
pub struct SledStore {
    inner: Arc<Inner>,
    path: PathBuf,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<Notice>>>,
}

struct Inner {
    db: sled::Db,
    records: sled::Tree,
}

impl SledStore {
    /// Opens (creating if needed) the store in directory `path`.
    ///
    /// Async because sled replays its log on open. Fails with
    /// [`StoreError::Unavailable`] when the directory cannot be used, which
    /// includes another process (or another `SledStore`) having it open, and
    /// with [`StoreError::Corrupt`] when sled finds its files damaged.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let dir = path.clone();
        let inner = blocking(move || {
            // sled's page cache defaults to 1 GiB; the broker's working set is
            // small (hot grants are in the token cache), so a modest cache keeps
            // memory flat however many grants are stored.
            let db = sled::Config::new()
                .path(&dir)
                .flush_every_ms(None)
                .cache_capacity(CACHE_BYTES)
                .open()
                .map_err(|e| opening(e, &dir))?;
            let records = db.open_tree(TREE).map_err(backend)?;
            db.flush().map_err(backend)?;
            Ok(Inner { db, records })
        })
        .await?;
        Ok(SledStore { inner: Arc::new(inner), path, subscribers: Mutex::new(Vec::new()) })
    }

    /// Writes and fsyncs anything sled still buffers. Every operation
    /// already does this before answering; this is for operators (e.g.
    /// before taking a file-level backup).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.run(|_| Ok(())).await
    }

    /// Runs a read on the blocking pool, without a flush (see "durable
    /// before acknowledged" in the crate docs).
    async fn read<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&sled::Tree) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        blocking(move || op(&inner.records)).await
    }

    /// Runs `op` on the blocking pool, then flushes unless sled failed, so
    /// whatever the operation wrote is durable when it answers.
    async fn run<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&sled::Tree) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let result = op(&inner.records);
            if let Err(StoreError::Unavailable { .. } | StoreError::Corrupt { .. }) = result {
                return result;
            }
            inner.db.flush().map_err(backend)?;
            result
        })
        .await
    }

    fn subscribers(&self) -> std::sync::MutexGuard<'_, Vec<mpsc::UnboundedSender<Notice>>> {
        // Each mutation of the list is a single call: a poisoned lock holds a whole list.
        self.subscribers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl fmt::Debug for SledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Runs a blocking closure off the async worker threads.
async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => match runtime.spawn_blocking(f).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down and never ran the closure.
            Err(e) => Err(StoreError::Unavailable { retryable: false, source: Some(Box::new(e)) }),
        },
        Err(_) => f(),
    }
}

/// Another process (or another [`SledStore`] in this one) has the directory
/// open: sled admits one at a time. The source of the
/// [`StoreError::Unavailable`] that [`SledStore::open`] answers then, so a
/// caller can tell the operator what to do.
#[derive(Debug)]
pub struct Locked {
    /// The store's directory.
    pub path: PathBuf,
    /// What sled and the operating system said.
    pub reason: String,
}

impl fmt::Display for Locked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is in use by another process (sled admits one at a time): {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for Locked {}

/// Maps an error from opening the database: the directory's lock taken by
/// another process is [`Locked`], the rest as [`backend`].
fn opening(e: sled::Error, path: &Path) -> StoreError {
    match &e {
        // sled words its lock failure this way (0.34, `Config::try_lock`).
        sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock") => StoreError::Unavailable {
            retryable: true,
            source: Some(Box::new(Locked { path: path.to_path_buf(), reason: io.to_string() })),
        },
        _ => backend(e),
    }
}

/// Maps a sled error to the shared vocabulary.
fn backend(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(_) => StoreError::Unavailable { retryable: true, source: Some(Box::new(e)) },
        sled::Error::Corruption { .. } => {
            StoreError::Corrupt { detail: "sled found its files damaged".into(), source: Some(Box::new(e)) }
        }
        // Unsupported use, a missing tree, or a sled bug: trying again will not help.
        _ => StoreError::Unavailable { retryable: false, source: Some(Box::new(e)) },
    }
}

fn key(kind: RecordKind, id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + id.len());
    key.push(kind as u8);
    key.extend_from_slice(id);
    key
}

fn encode(version: u64, group: Option<&[u8]>, body: &[u8]) -> Result<Vec<u8>, StoreError> {
    let group_len = group.map_or(0, <[u8]>::len);
    let mut out = Vec::with_capacity(1 + 8 + 1 + 4 + group_len + body.len());
    out.push(VALUE_FORMAT);
    out.extend_from_slice(&version.to_be_bytes());
    match group {
        None => out.push(0),
        Some(group) => {
            let len = u32::try_from(group.len()).map_err(|_| StoreError::Unavailable {
                retryable: false,
                source: Some("group longer than 4 GiB".into()),
            })?;
            out.push(1);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(group);
        }
    }
    out.extend_from_slice(body);
    Ok(out)
}

fn decode(value: &[u8]) -> Result<StoredRecord, StoreError> {
    let (&format, rest) = value.split_first().ok_or_else(|| StoreError::corrupt("empty sled value"))?;
    if format != VALUE_FORMAT {
        return Err(StoreError::corrupt(format!("unknown sled value format {format}")));
    }
    let (version, rest) = rest.split_first_chunk::<8>().ok_or_else(|| StoreError::corrupt("sled value: no version"))?;
    let (&tag, rest) = rest.split_first().ok_or_else(|| StoreError::corrupt("sled value: no group tag"))?;
    let (group, body) = match tag {
        0 => (None, rest),
        1 => {
            let (len, rest) =
                rest.split_first_chunk::<4>().ok_or_else(|| StoreError::corrupt("sled value: no group length"))?;
            let len = usize::try_from(u32::from_be_bytes(*len))
                .map_err(|_| StoreError::corrupt("sled value: group length"))?;
            if len > rest.len() {
                return Err(StoreError::corrupt("sled value: group runs past the end"));
            }
            let (group, body) = rest.split_at(len);
            (Some(group.to_vec()), body)
        }
        _ => return Err(StoreError::corrupt(format!("sled value: group tag {tag}"))),
    };
    Ok(StoredRecord { version: u64::from_be_bytes(*version), group, body: body.to_vec() })
}

#[async_trait]
impl Store for SledStore {
    async fn get(&self, kind: RecordKind, id: &[u8]) -> Result<Option<StoredRecord>, StoreError> {
        let key = key(kind, id);
        self.read(move |tree| tree.get(key).map_err(backend)?.map(|value| decode(&value)).transpose()).await
    }

    async fn insert(&self, kind: RecordKind, id: &[u8], group: Option<&[u8]>, body: &[u8]) -> Result<(), StoreError> {
        let (key, value) = (key(kind, id), encode(1, group, body)?);
        self.run(move |tree| match tree.compare_and_swap(key, None::<&[u8]>, Some(value)).map_err(backend)? {
            Ok(()) => Ok(()),
            Err(_) => Err(StoreError::Conflict),
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        kind: RecordKind,
        id: &[u8],
        expected: u64,
        group: Option<&[u8]>,
        body: &[u8],
    ) -> Result<u64, StoreError> {
        // No stored version can be u64::MAX and still take a successor: refuse it as stale.
        let next = expected.checked_add(1).ok_or(StoreError::Conflict)?;
        let (key, value) = (key(kind, id), sled::IVec::from(encode(next, group, body)?));
        self.run(move |tree| {
            loop {
                let current = tree.get(&key).map_err(backend)?.ok_or(StoreError::NotFound)?;
                if decode(&current)?.version != expected {
                    return Err(StoreError::Conflict);
                }
                // Swap against the exact bytes read; if they changed meanwhile, look again.
                if tree.compare_and_swap(&key, Some(&current), Some(value.clone())).map_err(backend)?.is_ok() {
                    return Ok(next);
                }
            }
        })
        .await
    }

    async fn delete(&self, kind: RecordKind, id: &[u8], expected: Option<u64>) -> Result<(), StoreError> {
        let key = key(kind, id);
        self.run(move |tree| {
            let Some(expected) = expected else {
                // Unconditional: needs no decoding, so it also clears a corrupt record.
                return tree.remove(&key).map_err(backend)?.map(|_| ()).ok_or(StoreError::NotFound);
            };
            loop {
                let current = tree.get(&key).map_err(backend)?.ok_or(StoreError::NotFound)?;
                if decode(&current)?.version != expected {
                    return Err(StoreError::Conflict);
                }
                if tree.compare_and_swap(&key, Some(&current), None::<sled::IVec>).map_err(backend)?.is_ok() {
                    return Ok(());
                }
            }
        })
        .await
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        use std::ops::Bound;
        let query = query.clone();
        self.read(move |tree| {
            let limit = query.limit.max(1);
            let code = query.kind as u8;
            let start = match &query.after {
                Some(after) => Bound::Excluded(key(query.kind, after)),
                None => Bound::Included(vec![code]),
            };
            let end = code.checked_add(1).map_or(Bound::Unbounded, |next| Bound::Excluded(vec![next]));
            let mut items = Vec::new();
            for entry in tree.range::<Vec<u8>, _>((start, end)) {
                let (k, value) = entry.map_err(backend)?;
                let record = decode(&value)?;
                if query.group.is_some() && record.group != query.group {
                    continue;
                }
                items.push((k.get(1..).unwrap_or_default().to_vec(), record));
                if items.len() > limit {
                    break;
                }
            }
            let next = if items.len() > limit {
                items.truncate(limit);
                items.last().map(|(id, _)| id.clone())
            } else {
                None
            };
            Ok(Page { items, next })
        })
        .await
    }

    async fn publish(&self, notice: Notice) -> Result<(), StoreError> {
        self.subscribers().retain(|tx| tx.unbounded_send(notice).is_ok());
        Ok(())
    }

    async fn subscribe(&self) -> Result<NoticeStream, StoreError> {
        let (tx, rx) = mpsc::unbounded();
        self.subscribers().push(tx);
        Ok(Box::pin(rx))
    }
}
