//! latchkey-storage-postgres's integration tests: one binary, one module per
//! concern. They need the PostgreSQL server named by `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); without it they fail. Each test
//! works in its own random schema and drops it at the end.
//!
//! Some tests restart or stop that server. Under cargo-nextest every test is
//! a process and the PostgreSQL tests run one at a time (a test group in
//! `.config/nextest.toml`); under `cargo test` they are threads of this one
//! process, so each holds the server through [`SERVER`]: shared by any test
//! with a schema, alone by a test that restarts it ([`Schema::alone`]).

use std::time::Duration;

use futures_util::StreamExt;
use latchkey_core::{GrantId, Notice, NoticeStream, OsRandom, Random};
use latchkey_storage_postgres::PostgresStore;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio_postgres::NoTls;

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    OsRandom.fill(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn grant() -> GrantId {
    GrantId::generate(&OsRandom)
}

/// The PostgreSQL server as this binary's tests share it: a test that talks
/// to it holds it shared, a test that restarts or stops it holds it alone
/// (and waits for the others to finish first). A failed test leaves no
/// poisoned lock behind.
static SERVER: RwLock<()> = RwLock::const_new(());

/// How a test holds [`SERVER`].
#[allow(dead_code)] // the guards are held, never read
enum Hold {
    Shared(RwLockReadGuard<'static, ()>),
    Alone(RwLockWriteGuard<'static, ()>),
    /// Through another schema of the same test ([`Schema::beside`]).
    Beside,
}

/// A fresh schema, dropped (with everything in it) when this guard is
/// dropped; it holds the server (see [`SERVER`]) until then.
struct Schema(String, #[allow(dead_code)] Hold);

impl Schema {
    /// A fresh schema in the shared server.
    async fn fresh() -> Self {
        Schema::named(format!("lk_test_{}", random_hex(8))).await
    }

    /// A schema named `name` in the shared server.
    async fn named(name: String) -> Self {
        Schema(name, Hold::Shared(SERVER.read().await))
    }

    /// A second fresh schema under this one's hold, for a test that needs
    /// two: a second shared hold could wait behind a test queued to restart
    /// the server, which waits for the first. Drop it before this one.
    fn beside(&self) -> Self {
        Schema(format!("lk_test_{}", random_hex(8)), Hold::Beside)
    }

    /// A fresh schema for a test that restarts or stops the server: no other
    /// test of this binary uses the server until it is dropped.
    async fn alone() -> Self {
        Schema(format!("lk_test_{}", random_hex(8)), Hold::Alone(SERVER.write().await))
    }

    async fn open(&self) -> PostgresStore {
        PostgresStore::connect(&database_url(), &self.0).await.expect("connect to the test database")
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime: clean up from a thread of our own.
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.0);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    let (client, connection) = tokio_postgres::connect(&database_url(), NoTls).await?;
                    tokio::spawn(connection);
                    client.batch_execute(&sql).await
                })
                .await;
            });
        })
        .join();
    }
}

/// A raw connection for what the store does not offer (bad payloads, version rows).
async fn raw_client() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&database_url(), NoTls).await.expect("raw connection");
    tokio::spawn(connection);
    client
}

/// A store in a fresh schema that drops the schema after the store closes
/// (fields drop in order: the connections close before the schema goes).
type TestStore = latchkey_core::testing::Guarded<PostgresStore, Schema>;

async fn fresh_store() -> TestStore {
    let schema = Schema::fresh().await;
    TestStore::new(schema.open().await, schema)
}

/// The next notice on `stream`, or a failure if none arrives within a second.
async fn next_within_a_second(stream: &mut NoticeStream) -> Notice {
    tokio::time::timeout(Duration::from_secs(1), stream.next())
        .await
        .expect("a notice within a second")
        .expect("the stream is open")
}

// (1) The core's conformance suite, each case in a fresh schema.
mod conformance {
    latchkey_core::store_conformance_tests!(async { super::fresh_store().await });
}

// (2) Two instances (two pools) on one schema race compare-and-swaps and leases.
mod two_instances {
    use futures_util::future::join_all;
    use latchkey_core::{Lease, LeaseOutcome, Record, RecordKind, Store, StoreError, Timestamp};

    use super::{Schema, grant};

    const RACERS: usize = 16;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compare_and_swap_has_one_winner_per_round_across_instances() {
        let schema = Schema::fresh().await;
        let (a, b) = (schema.open().await, schema.open().await);
        let id = b"shared";
        a.insert(RecordKind::Grant, id, None, b"start").await.expect("insert");
        for round in 0..10u64 {
            let version = round + 1;
            let bodies: Vec<Vec<u8>> = (0..RACERS).map(|i| format!("{round}-{i}").into_bytes()).collect();
            let results = join_all(bodies.iter().enumerate().map(|(i, body)| {
                let store = if i % 2 == 0 { &a } else { &b };
                store.compare_and_swap(RecordKind::Grant, id, version, None, body)
            }))
            .await;
            let winners: Vec<usize> = results.iter().enumerate().filter(|(_, r)| r.is_ok()).map(|(i, _)| i).collect();
            assert_eq!(winners.len(), 1, "round {round}: {results:?}");
            assert!(
                results
                    .iter()
                    .all(|r| matches!(r, Ok(v) if *v == version + 1) || matches!(r, Err(StoreError::Conflict)))
            );
            let seen = b.get(RecordKind::Grant, id).await.expect("get").expect("present");
            assert_eq!(seen.version, version + 1);
            assert_eq!(seen.body, bodies[winners[0]]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_have_one_holder_across_instances() {
        let schema = Schema::fresh().await;
        let (a, b) = (schema.open().await, schema.open().await);
        let t = Timestamp::from_unix_secs(1_767_225_600);
        let at = |s: u64| t.saturating_add(std::time::Duration::from_secs(s));
        let owners: Vec<String> = (0..RACERS).map(|i| format!("instance-{i}")).collect();
        for round in 0..5 {
            let g = grant();
            // A free lease, then the same lease once lapsed: one taker wins each time.
            for (deadline, now) in [(at(30), t), (at(90), at(30))] {
                let results = join_all(owners.iter().enumerate().map(|(i, owner)| {
                    let store = if i % 2 == 0 { &a } else { &b };
                    store.acquire_lease(&g, owner, deadline, now)
                }))
                .await;
                let winners: Vec<&String> = owners
                    .iter()
                    .zip(&results)
                    .filter(|(_, r)| matches!(r, Ok(LeaseOutcome::Acquired { .. })))
                    .map(|(o, _)| o)
                    .collect();
                assert_eq!(winners.len(), 1, "round {round}: {results:?}");
                let winner = winners[0].clone();
                for r in &results {
                    match r {
                        Ok(LeaseOutcome::Acquired { deadline: d }) => assert_eq!(*d, deadline),
                        Ok(LeaseOutcome::Held { owner, deadline: d }) => assert_eq!((owner, *d), (&winner, deadline)),
                        Err(e) => panic!("lease error: {e:?}"),
                    }
                }
                // The lease is an ordinary lease record, visible to both instances.
                let stored = a.get(RecordKind::Lease, g.as_bytes()).await.expect("get").expect("lease record");
                let lease = Lease::decode(&stored.body, stored.version).expect("lease decodes");
                assert_eq!((lease.owner, lease.deadline, lease.grant_id), (winner, deadline, g));
            }
            let holder = a.get(RecordKind::Lease, g.as_bytes()).await.expect("get").expect("present");
            let holder = Lease::decode(&holder.body, 0).expect("decodes").owner;
            let other = owners.iter().find(|o| **o != holder).expect("another owner");
            assert!(!b.release_lease(&g, other).await.expect("release by a non-holder"));
            assert!(matches!(b.acquire_lease(&g, other, at(100), at(40)).await, Ok(LeaseOutcome::Held { .. })));
            assert!(b.release_lease(&g, &holder).await.expect("release by the holder"));
            assert!(matches!(a.acquire_lease(&g, other, at(100), at(40)).await, Ok(LeaseOutcome::Acquired { .. })));
        }
    }

    /// The engine's sweep on two instances at once, each on its own task,
    /// a few records a pass: every expired record goes exactly once, the
    /// live ones stay, and neither pass fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sweeps_on_two_instances_at_once_delete_each_expired_record_once() {
        use std::sync::Arc;
        use std::time::Duration;

        use latchkey_core::engine::{SweepCursor, sweep_pass};
        use latchkey_core::testing::conformance::short_lived_records;

        let schema = Schema::fresh().await;
        let (a, b) = (Arc::new(schema.open().await), Arc::new(schema.open().await));
        let t = Timestamp::from_unix_secs(1_767_225_600);
        let (expired, live, now) =
            (t, t.saturating_add(Duration::from_secs(600)), t.saturating_add(Duration::from_secs(1)));
        const EXPIRED: usize = 60;
        for i in 0..EXPIRED + 4 {
            let expires = if i < EXPIRED { expired } else { live };
            // Half written through each instance.
            let store = if i % 2 == 0 { &a } else { &b };
            short_lived_records(store.as_ref(), &format!("{i}"), expires).await;
        }
        let sweeper = |store: Arc<latchkey_storage_postgres::PostgresStore>| {
            tokio::spawn(async move {
                let (mut cursor, mut removed, mut passes) = (SweepCursor::default(), [0; 3], 0);
                loop {
                    let report = sweep_pass(store.as_ref(), now, 7, &mut cursor).await.expect("a sweep pass");
                    passes += 1;
                    for (sum, n) in
                        removed.iter_mut().zip([report.expired_logins, report.expired_handoffs, report.expired_devices])
                    {
                        *sum += n;
                    }
                    if !report.more {
                        return (removed, passes);
                    }
                }
            })
        };
        let (first, second) = (sweeper(Arc::clone(&a)), sweeper(Arc::clone(&b)));
        let ((one, one_passes), (two, two_passes)) = (first.await.unwrap(), second.await.unwrap());
        for kind in 0..3 {
            assert_eq!(one[kind] + two[kind], EXPIRED, "each expired record once: {one:?} {two:?}");
        }
        assert!(
            one_passes <= 10 && two_passes <= 10,
            "at most 64 records of each kind, 7 a pass: {one_passes} and {two_passes} passes"
        );
        for kind in [RecordKind::LoginTransaction, RecordKind::Handoff, RecordKind::DeviceGrant] {
            let left = a.list(&latchkey_core::ListQuery::all(kind, 100)).await.expect("list");
            assert_eq!(left.items.len(), 4, "{kind:?}: the live records stay");
        }
    }
}

// (3) A notice published through one instance reaches the subscribers of every instance.
mod notices {
    use latchkey_core::{Notice, Store};

    use super::{Schema, grant, next_within_a_second, raw_client};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn notices_cross_instances_and_bad_payloads_are_ignored() {
        let schema = Schema::fresh().await;
        let (a, b) = (schema.open().await, schema.open().await);
        let mut on_a = a.subscribe().await.expect("subscribe a");
        let mut on_b = b.subscribe().await.expect("subscribe b");
        let (g, h) = (grant(), grant());
        a.publish(Notice::GrantChanged(g)).await.expect("publish");
        b.publish(Notice::TokenRefreshed(h)).await.expect("publish");
        for stream in [&mut on_a, &mut on_b] {
            assert_eq!(next_within_a_second(stream).await, Notice::GrantChanged(g));
            assert_eq!(next_within_a_second(stream).await, Notice::TokenRefreshed(h));
        }

        // Payloads the store did not write are skipped, not fatal.
        let raw = raw_client().await;
        for bad in ["", "c:", "x:00112233445566778899aabbccddeeff", "c:0011", "c:00112233445566778899AABBCCDDEEFF", "é"]
        {
            raw.execute("SELECT pg_notify($1, $2)", &[&a.channel(), &bad]).await.expect("notify");
        }
        a.publish(Notice::GrantChanged(h)).await.expect("publish");
        assert_eq!(next_within_a_second(&mut on_b).await, Notice::GrantChanged(h));
        assert_eq!(next_within_a_second(&mut on_a).await, Notice::GrantChanged(h));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn schemas_do_not_hear_each_other() {
        let one = Schema::fresh().await;
        let two = one.beside();
        let (x, y) = (one.open().await, two.open().await);
        assert_ne!(x.channel(), y.channel());
        let mut on_y = y.subscribe().await.expect("subscribe");
        let (g, h) = (grant(), grant());
        x.publish(Notice::GrantChanged(g)).await.expect("publish on x");
        y.publish(Notice::GrantChanged(h)).await.expect("publish on y");
        assert_eq!(next_within_a_second(&mut on_y).await, Notice::GrantChanged(h));
    }

    /// Notices sent while the listening connection is gone are lost; once it
    /// listens again its subscribers are told so with `Resync`. A `Resync`
    /// published by hand stays in its own store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_listening_connection_is_followed_by_resync() {
        let schema = Schema::fresh().await;
        let (a, b) = (schema.open().await, schema.open().await);
        let mut on_a = a.subscribe().await.expect("subscribe a");
        let mut on_b = b.subscribe().await.expect("subscribe b");
        b.publish(Notice::Resync).await.expect("publish resync");
        assert_eq!(next_within_a_second(&mut on_b).await, Notice::Resync, "b's own subscribers get it");
        let g = grant();
        a.publish(Notice::GrantChanged(g)).await.expect("publish");
        assert_eq!(next_within_a_second(&mut on_a).await, Notice::GrantChanged(g), "but nobody else");
        assert_eq!(next_within_a_second(&mut on_b).await, Notice::GrantChanged(g));

        // Both listening connections (one query text per schema) go.
        let raw = raw_client().await;
        let listen = format!("LISTEN \"{}\"", a.channel());
        let killed = raw
            .query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = $1", &[&listen])
            .await
            .expect("terminate the listening connections");
        assert_eq!(killed.len(), 2);
        for stream in [&mut on_a, &mut on_b] {
            let first = tokio::time::timeout(std::time::Duration::from_secs(5), futures_util::StreamExt::next(stream))
                .await
                .expect("a notice within 5 s of the break");
            assert_eq!(first, Some(Notice::Resync));
        }
        let h = grant();
        a.publish(Notice::GrantChanged(h)).await.expect("publish after the reconnect");
        assert_eq!(next_within_a_second(&mut on_b).await, Notice::GrantChanged(h));
        assert_eq!(next_within_a_second(&mut on_a).await, Notice::GrantChanged(h));
    }
}

// (4) Migrations: concurrent starts, re-opening, a newer schema, invalid names, no server.
mod migrations {
    use std::time::{Duration, Instant};

    use futures_util::future::join_all;
    use latchkey_core::{RecordKind, Store, StoreError};
    use latchkey_storage_postgres::{PostgresStore, SCHEMA_VERSION, SetupError};

    use super::{Schema, database_url, raw_client};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_starting_together_migrate_once() {
        let schema = Schema::fresh().await;
        let url = database_url();
        let stores = join_all((0..8).map(|_| PostgresStore::connect(&url, &schema.0))).await;
        let stores: Vec<PostgresStore> = stores.into_iter().map(|s| s.expect("every instance starts")).collect();
        let rows = raw_client()
            .await
            .query(&format!("SELECT version FROM \"{}\".schema_version ORDER BY version", schema.0), &[])
            .await
            .expect("versions");
        let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());

        // Re-opening a migrated schema keeps its data.
        stores[0].insert(RecordKind::Grant, b"kept", None, b"body").await.expect("insert");
        drop(stores);
        let again = schema.open().await;
        assert_eq!(again.get(RecordKind::Grant, b"kept").await.expect("get").expect("kept").body, b"body");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_newer_schema_is_refused_clearly() {
        let schema = Schema::fresh().await;
        drop(schema.open().await);
        let newer = SCHEMA_VERSION + 1;
        raw_client()
            .await
            .execute(&format!("INSERT INTO \"{}\".schema_version (version) VALUES ($1)", schema.0), &[&newer])
            .await
            .expect("record a newer version");
        let err = PostgresStore::connect(&database_url(), &schema.0).await.expect_err("newer schema refused");
        let StoreError::Unavailable { retryable: false, source: Some(source) } = &err else {
            panic!("expected a permanent error, got {err:?}")
        };
        let setup = source.downcast_ref::<SetupError>().expect("a SetupError");
        assert_eq!(*setup, SetupError::SchemaTooNew { found: newer, supported: SCHEMA_VERSION });
        assert!(setup.to_string().contains("newer than this latchkey supports"), "{setup}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn schema_names_are_validated_strictly() {
        let url = database_url();
        for bad in ["", "1abc", "Latchkey", "a-b", "a.b", "a\"b", "x; DROP TABLE y", "pg_catalog", "é", &"a".repeat(42)]
        {
            let err = PostgresStore::connect(&url, bad).await.expect_err(bad);
            let StoreError::Unavailable { retryable: false, source: Some(source) } = &err else {
                panic!("{bad}: {err:?}")
            };
            assert_eq!(source.downcast_ref::<SetupError>(), Some(&SetupError::InvalidSchemaName), "{bad}");
        }
        let longest = Schema::named(format!("lk_{}", "z".repeat(38))).await;
        assert_eq!(longest.0.len(), 41);
        assert_eq!(longest.open().await.schema(), longest.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_server_is_a_retryable_error_not_a_hang() {
        let started = Instant::now();
        let err = PostgresStore::connect("postgres://postgres@127.0.0.1:1/test", "latchkey")
            .await
            .expect_err("nothing listens on port 1");
        assert!(matches!(err, StoreError::Unavailable { retryable: true, .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}

// (5) The server restarts (and stops) under a running store, which recovers by itself.
mod restart {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use latchkey_core::{Notice, NoticeStream, RecordKind, Store, StoreError};
    use latchkey_storage_postgres::PostgresStore;

    use super::{Schema, grant, random_hex};

    /// No single operation may take longer than this, server up or down.
    const OP_BOUND: Duration = Duration::from_secs(15);
    /// How long the server may take to come back.
    const RECOVERY_BOUND: Duration = Duration::from_secs(30);

    fn cluster_version() -> String {
        let versions = std::fs::read_dir("/etc/postgresql").expect("a local PostgreSQL cluster in /etc/postgresql");
        versions
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .max_by_key(|v| v.split('.').map(|part| part.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>())
            .expect("a cluster version")
    }

    async fn pg_ctl(action: &str) {
        let status = tokio::process::Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &cluster_version(), "main", action])
            .status()
            .await
            .expect("run pg_ctlcluster");
        assert!(status.success(), "pg_ctlcluster {action}: {status}");
    }

    /// Starts the server again if a failed test left it stopped.
    struct ServerBack;

    impl Drop for ServerBack {
        fn drop(&mut self) {
            let up = std::process::Command::new("pg_isready").args(["-q", "-h", "127.0.0.1"]).status();
            if !up.is_ok_and(|s| s.success()) {
                let _ = std::process::Command::new("pg_ctlcluster")
                    .args(["--skip-systemctl-redirect", &cluster_version(), "main", "start"])
                    .status();
            }
        }
    }

    fn retryable(e: &StoreError) -> bool {
        matches!(e, StoreError::Unavailable { retryable: true, .. })
    }

    async fn bounded<T>(what: &str, op: impl Future<Output = T>) -> T {
        tokio::time::timeout(OP_BOUND, op).await.unwrap_or_else(|_| panic!("{what} hung for {OP_BOUND:?}"))
    }

    /// Polls until the store answers again; answers how long that took.
    async fn recovered(store: &PostgresStore) -> Duration {
        let started = Instant::now();
        loop {
            match bounded("ping", store.ping()).await {
                Ok(()) => return started.elapsed(),
                Err(e) => assert!(retryable(&e), "while recovering: {e:?}"),
            }
            assert!(started.elapsed() < RECOVERY_BOUND, "the store did not recover within {RECOVERY_BOUND:?}");
            // Waiting on the external server, not on time.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Publishes fresh notices through `from` until one reaches `to`; a
    /// notice sent while `to`'s listener is still reconnecting is lost.
    async fn notices_flow(from: &PostgresStore, to: &mut NoticeStream) -> Duration {
        let started = Instant::now();
        loop {
            let g = grant();
            if from.publish(Notice::GrantChanged(g)).await.is_ok() {
                let wait = tokio::time::timeout(Duration::from_millis(500), async {
                    while let Some(n) = futures_util::StreamExt::next(to).await {
                        if n == Notice::GrantChanged(g) {
                            return true;
                        }
                    }
                    false
                });
                match wait.await {
                    Ok(true) => return started.elapsed(),
                    Ok(false) => panic!("the notice stream ended"),
                    Err(_) => {}
                }
            }
            assert!(started.elapsed() < RECOVERY_BOUND, "notices did not flow again within {RECOVERY_BOUND:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::print_stderr)] // the measured outage is the point of this test
    async fn the_store_recovers_from_a_restart_without_being_rebuilt() {
        // Dropped in reverse: the server is started again (if a failure left
        // it stopped) before the schema goes and the other tests may go on.
        let schema = Schema::alone().await;
        let _server = ServerBack;
        let a = Arc::new(schema.open().await);
        let b = schema.open().await;
        let mut on_b = b.subscribe().await.expect("subscribe before the restart");

        // Phase 1: a restart in the middle of a stream of writes and reads.
        let stop = Arc::new(AtomicBool::new(false));
        let worker = tokio::spawn({
            let (a, stop) = (Arc::clone(&a), Arc::clone(&stop));
            async move {
                let (mut ok, mut failed, mut first_failure, mut last_failure) = (0, 0, None, None);
                // Paced so the worker loads the server without flooding it.
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let id = random_hex(8).into_bytes();
                    let result = match bounded("insert", a.insert(RecordKind::Grant, &id, None, b"x")).await {
                        Ok(()) => match bounded("get", a.get(RecordKind::Grant, &id)).await {
                            Ok(found) => {
                                assert_eq!(found.expect("an acknowledged insert is readable").body, b"x");
                                Ok(())
                            }
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            assert!(retryable(&e), "during the restart: {e:?}");
                            failed += 1;
                            first_failure.get_or_insert_with(Instant::now);
                            last_failure = Some(Instant::now());
                        }
                    }
                }
                let window = first_failure.zip(last_failure).map(|(f, l)| l - f);
                (ok, failed, window)
            }
        });
        let restart_started = Instant::now();
        pg_ctl("restart").await;
        let restart_took = restart_started.elapsed();
        let ping_after = recovered(&a).await;
        let b_notices_after = notices_flow(&a, &mut on_b).await;
        stop.store(true, Ordering::Relaxed);
        let (ok, failed, window) = worker.await.expect("the worker saw only successes and retryable errors");
        assert!(ok > 0);
        eprintln!(
            "restart: pg_ctlcluster took {restart_took:?}; worker {ok} ok, {failed} failed, failures spanned \
             {window:?}; ping ok {ping_after:?} after; notices again {b_notices_after:?} after"
        );

        // The same store objects work again, and new subscriptions too.
        a.insert(RecordKind::Grant, b"after-restart", None, b"y").await.expect("insert after restart");
        assert!(b.get(RecordKind::Grant, b"after-restart").await.expect("get").is_some());
        let mut on_a = a.subscribe().await.expect("subscribe after restart");
        b.publish(Notice::TokenRefreshed(grant())).await.expect("publish after restart");
        assert!(matches!(super::next_within_a_second(&mut on_a).await, Notice::TokenRefreshed(_)));

        // Phase 2: while the server is down, every operation fails retryably and promptly.
        pg_ctl("stop").await;
        let down = Instant::now();
        let e = bounded("get", a.get(RecordKind::Grant, b"after-restart")).await.expect_err("server down");
        assert!(retryable(&e), "{e:?}");
        let e = bounded("insert", a.insert(RecordKind::Grant, b"down", None, b"z")).await.expect_err("server down");
        assert!(retryable(&e), "{e:?}");
        let e = bounded("lease", a.acquire_lease(&grant(), "a", Default::default(), Default::default()))
            .await
            .expect_err("server down");
        assert!(retryable(&e), "{e:?}");
        let e = bounded("publish", b.publish(Notice::GrantChanged(grant()))).await.expect_err("server down");
        assert!(retryable(&e), "{e:?}");
        let failing_took = down.elapsed();
        let e = bounded("subscribe", b.subscribe()).await.err().expect("no subscription without a server");
        assert!(retryable(&e), "{e:?}");
        let subscribe_took = down.elapsed() - failing_took;
        pg_ctl("start").await;
        let ping_after = recovered(&a).await;
        let a_notices_after = notices_flow(&b, &mut on_a).await;
        let b_notices_after = notices_flow(&a, &mut on_b).await;
        eprintln!(
            "stop: four failing operations took {failing_took:?}, a failing subscribe {subscribe_took:?}; after start, ping ok {ping_after:?} after, \
             notices again {a_notices_after:?} / {b_notices_after:?} after"
        );
        assert_eq!(
            a.get(RecordKind::Grant, b"after-restart").await.expect("get after start").expect("kept").body,
            b"y"
        );
    }
}

// (6) TLS, through a verifying front before the real server.
#[cfg(feature = "tls")]
mod tls;

// (5) Reads of one record on the shared reading connections.
mod shared_reads {
    use std::time::{Duration, Instant};

    use futures_util::future::join_all;
    use latchkey_core::{RecordKind, Store};

    use super::{Schema, raw_client};

    /// Reads share a few connections taken from the pool. When every
    /// connection of the store is killed (an operator's
    /// `pg_terminate_backend`, a failover), no read fails: a shared
    /// connection found closed, or failing under a read, is replaced and
    /// the read made on a pooled one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_survive_their_shared_connections_being_killed() {
        let schema = Schema::fresh().await;
        let store = schema.open().await;
        store.insert(RecordKind::Grant, b"kept", None, b"body").await.expect("insert");
        let read = || async {
            let found = store.get(RecordKind::Grant, b"kept").await.expect("a read");
            assert_eq!(found.map(|r| r.body), Some(b"body".to_vec()));
        };
        // Many at once, so every shared connection carries some.
        join_all((0..32).map(|_| read())).await;

        let raw = raw_client().await;
        let ours = format!("%\"{}\".records%", schema.0);
        let killed: Vec<i32> = raw
            .query(
                "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND query LIKE $1 \
                 AND query NOT LIKE 'LISTEN%' AND pg_terminate_backend(pid)",
                &[&ours],
            )
            .await
            .expect("terminate the store's connections")
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert!(killed.len() >= 2, "the shared reading connections were among them: {killed:?}");
        // Termination is asynchronous: wait until those backends are gone.
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let left = raw
                .query("SELECT pid FROM pg_stat_activity WHERE pid = ANY($1)", &[&killed])
                .await
                .expect("list backends");
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < give_up, "backends {killed:?} still there after 10 s");
            tokio::task::yield_now().await;
        }
        join_all((0..32).map(|_| read())).await;
        for _ in 0..8 {
            read().await;
        }
    }
}
