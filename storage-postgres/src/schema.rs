//! The database schema: name validation and embedded, versioned migrations.

use std::fmt;

use deadpool_postgres::Pool;
use latchkey_core::StoreError;

use crate::{pg_error, pool_error};

/// The newest schema version this build knows.
pub(crate) const LATEST: i32 = MIGRATIONS.len() as i32;

/// Migration `n + 1` is `MIGRATIONS[n]`; `{s}` stands for the quoted schema.
/// Never edit a released migration: append a new one.
const MIGRATIONS: [&str; 1] = [
    // 1: every record in one table; the lease columns copy a lease record's
    // owner and deadline so leases are taken with one conditional statement.
    r#"
    CREATE TABLE {s}.records (
        kind smallint NOT NULL,
        id bytea NOT NULL,
        grp bytea,
        version bigint NOT NULL,
        body bytea NOT NULL,
        lease_owner text,
        lease_deadline bigint,
        PRIMARY KEY (kind, id)
    );
    CREATE INDEX records_by_group ON {s}.records (kind, grp, id);
    "#,
];

/// Why [`PostgresStore::connect`](crate::PostgresStore::connect) refused to
/// start; the `source` of the [`StoreError::Unavailable`] it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SetupError {
    /// The schema name is not `[a-z_][a-z0-9_]{0,40}`, or starts with `pg_`.
    InvalidSchemaName,
    /// The database was migrated by a newer latchkey than this one.
    SchemaTooNew {
        /// The version recorded in the database.
        found: i32,
        /// The newest version this build knows.
        supported: i32,
    },
    /// The URL's `sslmode` or a CA file asks for TLS, and this build has none.
    TlsNotBuilt,
    /// The CA file cannot be used.
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// TLS cannot be set up.
    Tls(String),
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetupError::InvalidSchemaName => {
                f.write_str("invalid schema name: use [a-z_][a-z0-9_]{0,40}, not starting with pg_")
            }
            SetupError::SchemaTooNew { found, supported } => write!(
                f,
                "database schema version {found} is newer than this latchkey supports ({supported}): \
                 upgrade latchkey or point it at another schema"
            ),
            SetupError::TlsNotBuilt => f.write_str(
                "TLS to PostgreSQL was asked for (sslmode=require, or a ca_file), but this latchkey was built \
                 without it: build with the `postgres-tls` feature, or use sslmode=disable on a trusted network",
            ),
            SetupError::CaFile { path, reason } => write!(f, "cannot use the CA file {}: {reason}", path.display()),
            SetupError::Tls(reason) => write!(f, "cannot set up TLS to PostgreSQL: {reason}"),
        }
    }
}

impl std::error::Error for SetupError {}

impl From<SetupError> for StoreError {
    fn from(e: SetupError) -> Self {
        StoreError::Unavailable { retryable: false, source: Some(Box::new(e)) }
    }
}

/// Whether `name` may be used as a schema name: `[a-z_][a-z0-9_]{0,40}`,
/// and not `pg_…`, which PostgreSQL reserves.
pub(crate) fn valid_schema_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    matches!(bytes.first(), Some(b'a'..=b'z' | b'_'))
        && bytes.len() <= 41
        && bytes.iter().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
        && !name.starts_with("pg_")
}

/// The advisory lock key that serialises migrations of one schema: FNV-1a of
/// a fixed prefix and the name, so every build computes the same key.
fn lock_key(schema: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "latchkey-migrate:".bytes().chain(schema.bytes()) {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// Creates the schema if needed and applies every migration it lacks, in one
/// transaction under a transaction-scoped advisory lock.
pub(crate) async fn migrate(pool: &Pool, schema: &str) -> Result<(), StoreError> {
    let s = format!("\"{schema}\"");
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(pg_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(schema)]).await.map_err(pg_error)?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.schema_version (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await
    .map_err(pg_error)?;
    let row = tx
        .query_one(&format!("SELECT coalesce(max(version), 0) FROM {s}.schema_version"), &[])
        .await
        .map_err(pg_error)?;
    let found: i32 = row.try_get(0).map_err(|e| StoreError::Corrupt {
        detail: "schema_version is not an integer".into(),
        source: Some(Box::new(e)),
    })?;
    if found > LATEST {
        return Err(SetupError::SchemaTooNew { found, supported: LATEST }.into());
    }
    let record = format!("INSERT INTO {s}.schema_version (version) VALUES ($1)");
    for (version, sql) in (1..).zip(MIGRATIONS).skip(usize::try_from(found).unwrap_or(0)) {
        tx.batch_execute(&sql.replace("{s}", &s)).await.map_err(pg_error)?;
        tx.execute(&record, &[&version]).await.map_err(pg_error)?;
    }
    tx.commit().await.map_err(pg_error)
}
