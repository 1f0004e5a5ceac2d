//! latchkey's store for multi-instance deployments: PostgreSQL through
//! tokio-postgres and a deadpool pool, with cross-instance leases and
//! "grant changed" notices over LISTEN/NOTIFY.
//!
//! Several brokers share one database; this adapter makes them agree on
//! record versions, on who refreshes a grant, and on when caches go stale.
//! It mirrors [`MemoryStore`](latchkey_core::MemoryStore) exactly and runs the
//! core's conformance suite.
//!
//! # Key design decisions
//!
//! * **One table, one statement per operation.** Every record lives in
//!   `records (kind, id) → (grp, version, body)`, the bytes [`Store`]
//!   defines. Insert is `INSERT … ON CONFLICT DO NOTHING`, compare-and-swap an
//!   `UPDATE … WHERE version = $n`; the row count decides, so no operation
//!   needs an explicit transaction or a lock held across round trips. A
//!   follow-up existence check tells `NotFound` from `Conflict` only when a
//!   conditional write matched nothing.
//! * **Leases are lease records, taken by one upsert.** A lease stays a
//!   `Lease` record beside its grant, so the engine's revoke and garbage
//!   collection (which delete and list lease records) keep working. Two extra
//!   columns copy its owner and deadline, so taking it is a single
//!   `INSERT … ON CONFLICT DO UPDATE … WHERE deadline <= now OR owner = me`:
//!   PostgreSQL's row lock makes exactly one of many racing instances win.
//! * **Schema isolation.** Everything lives in one schema named by the caller
//!   (default [`DEFAULT_SCHEMA`]), validated strictly and quoted in all SQL, so
//!   tests and deployments sharing a server never collide. The NOTIFY channel
//!   is derived from it.
//! * **Migrations are embedded and versioned**, applied at start in one
//!   transaction under `pg_advisory_xact_lock`: instances starting together
//!   serialise, a failed migration rolls back and releases the lock with its
//!   transaction, and a database migrated by a newer build is refused with
//!   [`SetupError::SchemaTooNew`] instead of being misread.
//! * **Recovery without restarts.** Connection-level failures answer
//!   [`StoreError::Unavailable`] with `retryable: true`; deadpool discards
//!   closed connections when recycling, so once the server is back the next
//!   operation simply opens a new one. Connect, pool-wait and TCP timeouts
//!   bound every operation while the server is unreachable.
//! * **Reads of one record share two connections.** `get` and
//!   `get_with_group` (the broker's warm path) go to two connections taken
//!   out of the pool, where tokio-postgres pipelines the statements many
//!   requests send at once; a pooled connection would serve one at a time
//!   and wake its backend for each. Writes, leases and lists stay on the
//!   pool (at most 16 connections, plus these two and the listener). A
//!   shared connection found closed, or failing under a read, is replaced,
//!   and that read is made once more on a pooled connection, so a restart
//!   or a terminated backend costs no read. While one read opens a shared
//!   connection, the others read on the pool.
//! * **A dedicated listening connection**, outside the pool, is polled
//!   directly for notifications and fans them out to subscribers; when it
//!   drops it reconnects with backoff and LISTENs again. Notices published
//!   while it is down are lost, so after each reconnect the subscribers get
//!   [`Notice::Resync`] and the engine drops its whole token cache (a lost
//!   "grant changed" may have been a revocation); lost wake-ups are covered
//!   by the engine's polling.
//! * **TLS by `sslmode`, behind the `tls` feature.** Plain on loopback;
//!   rustls with a verified certificate where the URL (or a CA file) asks for
//!   it; a build without the feature refuses `sslmode=require` at start
//!   instead of silently connecting in the clear. The rules are in [`tls`].
//!
//! # Using it
//!
//! Connect (migrating the schema if needed) and give the store to the
//! engine as an `Arc<dyn Store>` (`BrokerParts::store`; the whole
//! construction is in `latchkey_providers`' crate documentation and
//! `docs/embedding.md`). Every instance sharing the schema must be given the
//! same master keys, and an instance id of its own
//! (`EngineConfig::instance_id`): leases name their owner by it.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use latchkey_core::Store;
//! use latchkey_storage_postgres::{DEFAULT_SCHEMA, PostgresStore};
//!
//! # async fn connect() -> Result<(), Box<dyn std::error::Error>> {
//! let url = "postgres://latchkey@127.0.0.1/latchkey";
//! let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(url, DEFAULT_SCHEMA).await?);
//! store.ping().await?;
//! # Ok(())
//! # }
//! ```

mod listener;
mod schema;
pub mod tls;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{ClientWrapper, Object, Pool, PoolError, Runtime};
use latchkey_core::{
    GrantId, Lease, LeaseOutcome, ListQuery, Notice, NoticeStream, Page, Record, RecordKind, Store, StoreError,
    StoredRecord, Timestamp,
};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::listener::Listener;
pub use crate::schema::SetupError;
pub use crate::tls::TlsOptions;
use crate::tls::Transport;

/// The schema used when a deployment names none.
pub const DEFAULT_SCHEMA: &str = "latchkey";

/// The schema version this build creates and understands.
pub const SCHEMA_VERSION: i32 = schema::LATEST;

/// At most this many pooled connections per store.
const POOL_SIZE: usize = 16;
/// Connections taken out of the pool and shared by reads of one record
/// (the warm path's only query): tokio-postgres pipelines the statements
/// that requests send on one connection at once, where a pooled
/// connection serves one at a time and wakes its backend for each.
const READERS: usize = 2;
/// Bounds connecting, waiting for a pooled connection, and recycling one.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How often `acquire_lease` retries when the lease changes hands under it.
const LEASE_ROUNDS: usize = 16;

/// A [`Store`] in PostgreSQL, shared by every broker instance that uses the
/// same database and schema.
pub struct PostgresStore {
    pool: Pool,
    /// Connections taken out of the pool for single-statement reads, which
    /// many requests share at once (tokio-postgres pipelines them).
    readers: Vec<Reader>,
    next_reader: AtomicUsize,
    schema: String,
    channel: String,
    sql: Sql,
    listener: Listener,
    tls: bool,
}

/// One shared reading connection, when it is open.
#[derive(Default)]
struct Reader {
    client: Mutex<Option<Arc<ClientWrapper>>>,
    /// A read is taking a connection out of the pool for it.
    opening: AtomicBool,
}

/// The read that opens a [`Reader`]; others see it opening until this is
/// dropped (the connection in place, or the attempt failed or abandoned).
struct Opening<'a>(&'a Reader);

impl<'a> Opening<'a> {
    fn start(reader: &'a Reader) -> Option<Self> {
        reader.opening.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).ok().map(|_| Opening(reader))
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.opening.store(false, Ordering::Release);
    }
}

/// The fixed statements, schema-qualified once at start.
struct Sql {
    table: String,
    get: String,
    get_with_group: String,
    insert: String,
    cas: String,
    exists: String,
    delete: String,
    delete_at: String,
    acquire: String,
    lease_body: String,
    release: String,
}

impl Sql {
    fn new(schema: &str) -> Self {
        let t = format!("\"{schema}\".records");
        let lease = RecordKind::Lease as i16;
        Sql {
            get: format!("SELECT grp, version, body FROM {t} WHERE kind = $1 AND id = $2"),
            get_with_group: format!(
                "SELECT r.grp, r.version, r.body, g.grp, g.version, g.body FROM {t} r \
                 LEFT JOIN {t} g ON g.kind = $3 AND g.id = r.grp WHERE r.kind = $1 AND r.id = $2"
            ),
            insert: format!(
                "INSERT INTO {t} (kind, id, grp, version, body, lease_owner, lease_deadline) \
                 VALUES ($1, $2, $3, 1, $4, $5, $6) ON CONFLICT DO NOTHING"
            ),
            cas: format!(
                "UPDATE {t} SET version = version + 1, grp = $4, body = $5, lease_owner = $6, lease_deadline = $7 \
                 WHERE kind = $1 AND id = $2 AND version = $3 RETURNING version"
            ),
            exists: format!("SELECT 1 FROM {t} WHERE kind = $1 AND id = $2"),
            delete: format!("DELETE FROM {t} WHERE kind = $1 AND id = $2"),
            delete_at: format!("DELETE FROM {t} WHERE kind = $1 AND id = $2 AND version = $3"),
            acquire: format!(
                "INSERT INTO {t} AS r (kind, id, grp, version, body, lease_owner, lease_deadline) \
                 VALUES ({lease}, $1, NULL, 1, $2, $3, $4) \
                 ON CONFLICT (kind, id) DO UPDATE SET version = r.version + 1, grp = NULL, body = EXCLUDED.body, \
                 lease_owner = EXCLUDED.lease_owner, lease_deadline = EXCLUDED.lease_deadline \
                 WHERE r.lease_deadline <= $5 OR r.lease_owner = $3"
            ),
            lease_body: format!("SELECT body FROM {t} WHERE kind = {lease} AND id = $1"),
            release: format!("DELETE FROM {t} WHERE kind = {lease} AND id = $1 AND lease_owner = $2"),
            table: t,
        }
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (a `postgres://` URL or a
    /// `key=value` string), creates `schema` if needed and migrates it.
    ///
    /// Fails with [`StoreError::Unavailable`]: retryable when the server
    /// cannot be reached, not retryable with a [`SetupError`] source when the
    /// schema name is invalid or the schema is newer than this build.
    pub async fn connect(url: &str, schema: &str) -> Result<PostgresStore, StoreError> {
        Self::connect_with(url, schema, &TlsOptions::default()).await
    }

    /// [`PostgresStore::connect`] with TLS options; how they combine with
    /// the URL's `sslmode` is in [`tls`]. A TLS setup the build or the CA
    /// file cannot meet is refused (not retryable, [`SetupError`] source).
    pub async fn connect_with(url: &str, schema: &str, tls: &TlsOptions) -> Result<PostgresStore, StoreError> {
        if !schema::valid_schema_name(schema) {
            return Err(SetupError::InvalidSchemaName.into());
        }
        let mut config: tokio_postgres::Config = url.parse().map_err(fatal)?;
        if config.get_application_name().is_none() {
            config.application_name("latchkey");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(TIMEOUT);
        }
        // Notice a vanished server (no FIN, no RST) within about half a minute.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(15))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(30));
        let transport = Transport::new(&config, tls)?;
        let pool = Pool::builder(transport.manager(config.clone()))
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(TIMEOUT))
            .create_timeout(Some(TIMEOUT))
            .recycle_timeout(Some(TIMEOUT))
            .build()
            .map_err(fatal)?;
        schema::migrate(&pool, schema).await?;
        let channel = format!("{schema}_notices");
        Ok(PostgresStore {
            pool,
            readers: (0..READERS).map(|_| Reader::default()).collect(),
            next_reader: AtomicUsize::new(0),
            sql: Sql::new(schema),
            tls: transport.is_tls(),
            listener: Listener::new(config, transport, &channel),
            schema: schema.to_owned(),
            channel,
        })
    }

    /// The schema this store lives in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Whether its connections use TLS (under `sslmode=prefer`: whenever the
    /// server offers it).
    pub fn uses_tls(&self) -> bool {
        self.tls
    }

    /// The LISTEN/NOTIFY channel its notices travel on: `<schema>_notices`.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    async fn query_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query_opt(&statement, params).await.map_err(pg_error)
    }

    /// [`PostgresStore::query_opt`] for a read of one record, on one of the
    /// shared reading connections (taken from the pool the first time, or
    /// after the last one failed). A read that fails there is read once more
    /// on a pooled connection, and the shared one is replaced: a restart or a
    /// terminated backend costs no read.
    async fn read_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, StoreError> {
        let slot = &self.readers[self.next_reader.fetch_add(1, Ordering::Relaxed) % READERS];
        let lock = || slot.client.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let shared = lock().clone().filter(|reader| !reader.is_closed());
        let reader = match shared {
            Some(reader) => reader,
            // One read opens it; the others meanwhile read on the pool.
            None => match Opening::start(slot) {
                Some(_opening) => {
                    let reader = Arc::new(Object::take(self.client().await?));
                    *lock() = Some(Arc::clone(&reader));
                    reader
                }
                None => return self.query_opt(sql, params).await,
            },
        };
        let read = async {
            let statement = reader.prepare_cached(sql).await?;
            reader.query_opt(&statement, params).await
        };
        match read.await {
            Ok(row) => Ok(row),
            Err(_) => {
                {
                    let mut held = lock();
                    if held.as_ref().is_some_and(|held| Arc::ptr_eq(held, &reader)) {
                        held.take();
                    }
                }
                self.query_opt(sql, params).await
            }
        }
    }

    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.execute(&statement, params).await.map_err(pg_error)
    }

    /// After a conditional write matched nothing: `Conflict` if the record
    /// exists, else `NotFound`.
    async fn missed(&self, kind: i16, id: &[u8]) -> StoreError {
        match self.query_opt(&self.sql.exists, &[&kind, &id]).await {
            Ok(Some(_)) => StoreError::Conflict,
            Ok(None) => StoreError::NotFound,
            Err(e) => e,
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore").field("schema", &self.schema).field("tls", &self.tls).finish_non_exhaustive()
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, kind: RecordKind, id: &[u8]) -> Result<Option<StoredRecord>, StoreError> {
        match self.read_opt(&self.sql.get, &[&code(kind), &id]).await? {
            None => Ok(None),
            Some(row) => Ok(Some(stored(&row, 0)?)),
        }
    }

    /// One statement (prepared once per pooled connection): the record,
    /// and its group's record joined to it.
    async fn get_with_group(
        &self,
        kind: RecordKind,
        id: &[u8],
        group_kind: RecordKind,
    ) -> Result<Option<(StoredRecord, Option<StoredRecord>)>, StoreError> {
        let Some(row) = self.read_opt(&self.sql.get_with_group, &[&code(kind), &id, &code(group_kind)]).await? else {
            return Ok(None);
        };
        let record = stored(&row, 0)?;
        let grouped = match row.try_get::<_, Option<i64>>(4).map_err(corrupt)? {
            Some(_) => Some(stored(&row, 3)?),
            None => None,
        };
        Ok(Some((record, grouped)))
    }

    async fn insert(&self, kind: RecordKind, id: &[u8], group: Option<&[u8]>, body: &[u8]) -> Result<(), StoreError> {
        let (owner, deadline) = lease_columns(kind, body);
        let params: [&(dyn ToSql + Sync); 6] = [&code(kind), &id, &group, &body, &owner, &deadline];
        match self.execute(&self.sql.insert, &params).await? {
            0 => Err(StoreError::Conflict),
            _ => Ok(()),
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
        // A version beyond i64 is never stored: -1 matches nothing.
        let expected = i64::try_from(expected).unwrap_or(-1);
        let (owner, deadline) = lease_columns(kind, body);
        let params: [&(dyn ToSql + Sync); 7] = [&code(kind), &id, &expected, &group, &body, &owner, &deadline];
        match self.query_opt(&self.sql.cas, &params).await? {
            Some(row) => version(&row, 0),
            None => Err(self.missed(code(kind), id).await),
        }
    }

    async fn delete(&self, kind: RecordKind, id: &[u8], expected: Option<u64>) -> Result<(), StoreError> {
        let deleted = match expected {
            None => self.execute(&self.sql.delete, &[&code(kind), &id]).await?,
            Some(v) => {
                let v = i64::try_from(v).unwrap_or(-1);
                self.execute(&self.sql.delete_at, &[&code(kind), &id, &v]).await?
            }
        };
        match deleted {
            0 => Err(self.missed(code(kind), id).await),
            _ => Ok(()),
        }
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        let limit = query.limit.max(1);
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
        let kind = code(query.kind);
        let mut sql = format!("SELECT id, grp, version, body FROM {} WHERE kind = $1", self.sql.table);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&kind];
        if let Some(group) = &query.group {
            params.push(group);
            sql.push_str(&format!(" AND grp = ${}", params.len()));
        }
        if let Some(after) = &query.after {
            params.push(after);
            sql.push_str(&format!(" AND id > ${}", params.len()));
        }
        params.push(&fetch);
        sql.push_str(&format!(" ORDER BY id LIMIT ${}", params.len()));

        let client = self.client().await?;
        let statement = client.prepare_cached(&sql).await.map_err(pg_error)?;
        let rows = client.query(&statement, &params).await.map_err(pg_error)?;
        let mut items = rows
            .iter()
            .map(|row| Ok((row.try_get::<_, Vec<u8>>(0).map_err(corrupt)?, stored(row, 1)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|(id, _)| id.clone())
        } else {
            None
        };
        Ok(Page { items, next })
    }

    async fn publish(&self, notice: Notice) -> Result<(), StoreError> {
        let Some(payload) = listener::encode(notice) else {
            self.listener.deliver_locally(notice);
            return Ok(());
        };
        self.execute("SELECT pg_notify($1, $2)", &[&self.channel, &payload]).await.map(|_| ())
    }

    async fn subscribe(&self) -> Result<NoticeStream, StoreError> {
        self.listener.subscribe().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.client().await?.simple_query("SELECT 1").await.map(|_| ()).map_err(pg_error)
    }

    async fn acquire_lease(
        &self,
        grant: &GrantId,
        owner: &str,
        deadline: Timestamp,
        now: Timestamp,
    ) -> Result<LeaseOutcome, StoreError> {
        let id: &[u8] = grant.as_bytes();
        let body = Lease { grant_id: *grant, version: 0, owner: owner.to_owned(), deadline }.encode();
        let (until, at) = (millis(deadline), millis(now));
        // Each round is one conditional upsert; another round is needed only
        // when the lease changed hands between the upsert and the read.
        for _ in 0..LEASE_ROUNDS {
            if self.execute(&self.sql.acquire, &[&id, &body, &owner, &until, &at]).await? == 1 {
                return Ok(LeaseOutcome::Acquired { deadline });
            }
            // Someone else holds it; report them. If it changed hands in
            // between (released, lapsed), take it again.
            let Some(row) = self.query_opt(&self.sql.lease_body, &[&id]).await? else { continue };
            let bytes: Vec<u8> = row.try_get(0).map_err(corrupt)?;
            let held = Lease::decode(&bytes, 0).map_err(|e| StoreError::corrupt(format!("lease: {e}")))?;
            if held.owner != owner && held.deadline > now {
                return Ok(LeaseOutcome::Held { owner: held.owner, deadline: held.deadline });
            }
        }
        Err(StoreError::unavailable("lease kept changing hands; try again"))
    }

    async fn release_lease(&self, grant: &GrantId, owner: &str) -> Result<bool, StoreError> {
        let id: &[u8] = grant.as_bytes();
        Ok(self.execute(&self.sql.release, &[&id, &owner]).await? == 1)
    }
}

fn code(kind: RecordKind) -> i16 {
    i16::from(kind as u8)
}

/// A timestamp as the bigint the lease columns hold (saturating).
fn millis(t: Timestamp) -> i64 {
    i64::try_from(t.unix_millis()).unwrap_or(i64::MAX)
}

/// The lease columns for a record: set for a lease record that decodes, else null.
fn lease_columns(kind: RecordKind, body: &[u8]) -> (Option<String>, Option<i64>) {
    match kind {
        RecordKind::Lease => Lease::decode(body, 0).map_or((None, None), |l| (Some(l.owner), Some(millis(l.deadline)))),
        _ => (None, None),
    }
}

/// `(grp, version, body)` starting at column `at`.
fn stored(row: &Row, at: usize) -> Result<StoredRecord, StoreError> {
    Ok(StoredRecord {
        group: row.try_get(at).map_err(corrupt)?,
        version: version(row, at + 1)?,
        body: row.try_get(at + 2).map_err(corrupt)?,
    })
}

fn version(row: &Row, at: usize) -> Result<u64, StoreError> {
    let v: i64 = row.try_get(at).map_err(corrupt)?;
    u64::try_from(v).map_err(|_| StoreError::corrupt("negative record version"))
}

fn corrupt(e: tokio_postgres::Error) -> StoreError {
    StoreError::Corrupt { detail: "unexpected column type".into(), source: Some(Box::new(e)) }
}

fn fatal(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable { retryable: false, source: Some(Box::new(e)) }
}

/// Errors without an SQLSTATE are the connection's (I/O, closed, timeout):
/// retryable. Of the server's, the classes an outage or contention produces
/// are retryable; the rest (syntax, permissions, missing tables) are not.
pub(crate) fn pg_error(e: tokio_postgres::Error) -> StoreError {
    let retryable = match e.code() {
        None => true,
        Some(state) => {
            let code = state.code();
            ["08", "53", "55", "57", "58"].iter().any(|class| code.starts_with(class))
                || code == "40001"
                || code == "40P01"
        }
    };
    StoreError::Unavailable { retryable, source: Some(Box::new(e)) }
}

pub(crate) fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_error(e),
        PoolError::Timeout(_) => StoreError::unavailable(e),
        e => fatal(e),
    }
}
