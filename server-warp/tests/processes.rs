// The broker as real processes: two instances on one PostgreSQL under load
// against oidc-provider, SIGKILL in the middle of refresh storms (sled and
// PostgreSQL), and PostgreSQL stopped under load.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use latchkey_core::keys::MasterKeyring;
use latchkey_core::{AuthId, Grant, Handle, Store, StoreExt};
use latchkey_storage_postgres::PostgresStore;
use latchkey_storage_sled::SledStore;
use latchkey_testkit::oidc::OidcProvider;
use latchkey_testkit::{FakeConfig, FakeProvider};
use secrecy::ExposeSecret;
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::interop::{MASTER_KEY, http, login, oidc_options, provider_toml};
use crate::support::authid_from_page;

pub(crate) fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub(crate) fn random_schema() -> String {
    let mut bytes = [0u8; 6];
    latchkey_core::Random::fill(&latchkey_core::OsRandom, &mut bytes);
    format!("latchkey_it_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

pub(crate) async fn drop_schema(schema: &str) {
    if let Ok((client, connection)) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls).await {
        tokio::spawn(connection);
        let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).await;
    }
}

/// A `latchkey serve` process.
struct Broker {
    child: Child,
    url: String,
    config: PathBuf,
    log: PathBuf,
}

impl Broker {
    async fn start(config: &Path, port: u16) -> Broker {
        let log = config.with_extension("log");
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_latchkey"))
            .args(["serve", "--config"])
            .arg(config)
            .env("LATCHKEY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("the latchkey binary starts");
        let url = format!("http://127.0.0.1:{port}");
        let broker = Broker { child, url, config: config.to_owned(), log };
        broker.wait_ready().await;
        broker
    }

    async fn wait_ready(&self) {
        let client = http();
        let give_up = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client.get(format!("{}/healthz", self.url)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < give_up,
                "broker did not start: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL, and reap.
    async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }

    async fn restart(&mut self) {
        let port: u16 = self.url.rsplit(':').next().unwrap().parse().unwrap();
        *self = Broker::start(&self.config.clone(), port).await;
    }
}

fn write_config(dir: &Path, name: &str, port: u16, store: &str, rest: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "listen = \"127.0.0.1:{port}\"\npublic_url = \"http://127.0.0.1:{port}\"\n\
         [keys]\nmaster_keys = [\"{MASTER_KEY}\"]\n\
         [limits]\ntoken_requests_per_minute_per_keyid = 1000000\ntoken_requests_per_minute_per_address = 1000000\n\
         {store}\n{rest}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The configuration of the fake provider as service `fake` (Jottacloud
/// off): `provider` and `service` add lines to their tables.
fn fake_toml(fake: &FakeProvider, secret: &str, provider: &str, service: &str) -> String {
    format!(
        "[providers.fake]\nauthorize_url = \"{}\"\ntoken_url = \"{}\"\nclient_auth = \"basic\"\nclient_id = \"latchkey-test\"\n\
         client_secrets = [\"{secret}\"]\n{provider}[services.fake]\nprovider = \"fake\"\n{service}[services.jottacloud]\nenabled = false",
        fake.authorize_url(),
        fake.token_url()
    )
}

async fn refresh(client: &reqwest::Client, url: &str, authid: &str) -> (u16, Option<String>, Option<String>) {
    match client.get(format!("{url}/refresh")).header("X-AuthID", authid).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let reason = response.headers().get("x-reason").map(|v| v.to_str().unwrap_or_default().to_owned());
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body["access_token"].as_str().map(str::to_owned), reason)
        }
        Err(_) => (0, None, None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_broker_processes_on_postgres_share_rotating_grants_under_load() {
    let _postgres = crate::support::postgres_shared().await;
    let dir = tempfile::tempdir().unwrap();
    let (port_a, port_b) = (free_port(), free_port());
    let urls = [format!("http://127.0.0.1:{port_a}"), format!("http://127.0.0.1:{port_b}")];
    // Access tokens live 4 s: each grant is refreshed every ~2 s, by whichever instance gets there first.
    let oidc =
        OidcProvider::start(oidc_options(urls.iter().map(|u| format!("{u}/logged-in")).collect(), 4)).await.unwrap();
    let schema = random_schema();
    let store = format!("[store]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"", database_url());
    let a = Broker::start(&write_config(dir.path(), "a", port_a, &store, &provider_toml(&oidc)), port_a).await;
    let b = Broker::start(&write_config(dir.path(), "b", port_b, &store, &provider_toml(&oidc)), port_b).await;
    let client = http();
    let mut authids = Vec::new();
    for user in ["u0", "u1", "u2", "u3", "u4"] {
        authids.push(login(&client, &a.url, &oidc, user, "/login?id=oidc").await);
    }
    let failures = Arc::new(Mutex::new(Vec::new()));
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(30);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (client, url, authid) = (client.clone(), urls[i % 2].clone(), authids[i % authids.len()].clone());
        let (failures, served) = (failures.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while Instant::now() < end {
                tick.tick().await;
                let (status, _, reason) = refresh(&client, &url, &authid).await;
                if status == 200 {
                    served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    failures.lock().unwrap().push((status, reason));
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{} failed requests, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let served = served.load(std::sync::atomic::Ordering::Relaxed);
    assert!(served > 10_000, "only {served} requests served");
    // No reuse was detected: every grant is still alive at the provider.
    for authid in &authids {
        let (status, access, _) = refresh(&client, &urls[0], authid).await;
        assert_eq!(status, 200);
        assert!(oidc.introspect(&access.unwrap()).await.unwrap(), "the provider revoked a grant");
    }
    let mut refreshes = 0.0;
    for url in &urls {
        let metrics = client.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
        for line in
            metrics.lines().filter(|l| l.starts_with("latchkey_refreshes_total{provider=\"oidc\",outcome=\"success\"}"))
        {
            refreshes += line.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
        }
    }
    assert!(refreshes >= 25.0, "the grants were refreshed at the provider many times, not {refreshes}");
    drop((a, b));
    drop_schema(&schema).await;
}

/// What the storm saw: (grant index, access token) for each 200.
type Answered = Arc<Mutex<Vec<(usize, String)>>>;

async fn fake_login(client: &reqwest::Client, url: &str) -> String {
    let (mut location, cookie) = crate::support::click_to_provider(client, url, "/login?id=fake").await;
    loop {
        let response = client.get(&location).header("Cookie", &cookie).send().await.unwrap();
        match response.headers().get("location") {
            Some(next) => location = next.to_str().unwrap().to_owned(),
            None => return authid_from_page(&response.text().await.unwrap()),
        }
    }
}

/// The refresh token the store holds for `authid`, opened as only an AuthID holder can.
async fn stored_refresh_token(store: &dyn Store, authid: &str) -> String {
    let authid = AuthId::parse(authid).unwrap();
    let ring = MasterKeyring::parse(&[MASTER_KEY]).unwrap();
    let handle: Handle = store.load(authid.keyid().as_bytes()).await.unwrap().unwrap();
    let key = handle.unwrap_data_key(authid.secret(), &ring).unwrap();
    let grant: Grant = store.load(handle.grant_id.as_bytes()).await.unwrap().unwrap();
    grant.open_payload(&key).unwrap().refresh_token.unwrap().expose_secret().to_owned()
}

/// Kills the broker in the middle of a refresh storm, ten times. After each
/// kill, every access token the broker answered must come from a rotation the
/// store holds (persist before answer), and after the restart every grant
/// works — except one whose rotation the provider committed in the instant
/// between its answer and the store's commit, which no client saw; the
/// provider then sees that one reuse, and nothing else.
#[allow(clippy::print_stderr)] // the one line of evidence the storm prints
async fn sigkill_storm(store_toml: String, open: impl AsyncFn() -> Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start(FakeConfig {
        client_secrets: vec!["storm-secret".into()],
        rotate: true,
        strict_reuse: true,
        access_lifetime: Some(Duration::from_secs(1)),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let port = free_port();
    let rest = fake_toml(&fake, "storm-secret", "rotates_refresh_tokens = true\n", "scopes = [\"files\"]\n");
    let mut broker = Broker::start(&write_config(dir.path(), "storm", port, &store_toml, &rest), port).await;
    let client = http();
    let mut authids = Vec::new();
    for _ in 0..5 {
        authids.push(fake_login(&client, &broker.url).await);
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let (mut acknowledged, mut lost) = (0, 0);
    for round in 0..10 {
        let answered: Answered = Arc::new(Mutex::new(Vec::new()));
        let mut storm = Vec::new();
        for t in 0..20 {
            let (client, url, ids, answered) = (client.clone(), broker.url.clone(), authids.clone(), answered.clone());
            storm.push(tokio::spawn(async move {
                let mut n = t;
                loop {
                    let i = n % ids.len();
                    n += 7;
                    match refresh(&client, &url, &ids[i]).await {
                        (200, Some(token), _) => answered.lock().unwrap().push((i, token)),
                        (0, _, _) => return,
                        _ => {}
                    }
                }
            }));
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // The one use of real time here: when the fault strikes.
        tokio::time::sleep(Duration::from_millis(300 + seed % 700)).await;
        broker.kill().await;
        for task in storm {
            task.abort();
        }
        let store = open().await;
        let answered = answered.lock().unwrap().clone();
        acknowledged += answered.len();
        let mut dead = Vec::new();
        for (i, authid) in authids.iter().enumerate() {
            let stored = stored_refresh_token(store.as_ref(), authid).await;
            let (grant, stored_generation) = fake.lineage(&stored).expect("the stored token is the provider's");
            for (_, token) in answered.iter().filter(|(j, _)| *j == i) {
                let (g, generation) = fake.lineage(token).unwrap();
                assert_eq!(g, grant);
                assert!(
                    generation <= stored_generation,
                    "round {round}: an access token of rotation {generation} was answered, but the store holds rotation {stored_generation}"
                );
            }
            if fake.latest_generation(grant).unwrap() > stored_generation {
                dead.push(i);
            }
        }
        drop(store);
        broker.restart().await;
        for (i, authid) in authids.iter().enumerate() {
            let (status, _, reason) = refresh(&client, &broker.url, authid).await;
            if dead.contains(&i) {
                assert_eq!(status, 401, "round {round}: a grant whose unacknowledged rotation was lost");
            } else {
                assert_eq!(status, 200, "round {round}: grant {i} must work after the restart: {reason:?}");
            }
        }
        lost += dead.len();
        for i in dead {
            authids[i] = fake_login(&client, &broker.url).await;
        }
    }
    eprintln!(
        "{acknowledged} tokens answered over 10 kills; {lost} unacknowledged rotations lost in the commit window"
    );
    assert!(acknowledged > 100, "the storm ran: {acknowledged}");
    assert_eq!(
        fake.reuse_attempts(),
        lost as u64,
        "the provider saw reuse only where a rotation was lost unacknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_refresh_storm_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let store = format!("[store]\npath = {:?}", path.display().to_string());
    sigkill_storm(store, async || {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&path).await.unwrap());
        store
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_refresh_storm_on_postgres() {
    let _postgres = crate::support::postgres_shared().await;
    let schema = random_schema();
    let store = format!("[store]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"", database_url());
    let s = schema.clone();
    sigkill_storm(store, async move || {
        let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&database_url(), &s).await.unwrap());
        store
    })
    .await;
    drop_schema(&schema).await;
}

/// Starts PostgreSQL again even if the test fails half way.
struct PostgresBack;

fn pg_ctl(action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .max()
        .unwrap();
    let status = std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", action])
        .status()
        .unwrap();
    assert!(status.success() || action == "start", "pg_ctlcluster {action}");
}

impl Drop for PostgresBack {
    fn drop(&mut self) {
        pg_ctl("start");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_postgres_fails_fast_serves_the_cache_and_recovers_postgres() {
    // Alone until the end: the server is started again (`back`) before
    // another test may use it.
    let _postgres = crate::support::postgres_alone().await;
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start(FakeConfig { client_secrets: vec!["pg-secret".into()], ..FakeConfig::default() })
        .await
        .unwrap();
    let port = free_port();
    let schema = random_schema();
    let store = format!("[store]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"", database_url());
    let rest = fake_toml(&fake, "pg-secret", "", "");
    let broker = Broker::start(&write_config(dir.path(), "pg", port, &store, &rest), port).await;
    let client = http();
    let cached = fake_login(&client, &broker.url).await;
    assert_eq!(refresh(&client, &broker.url, &cached).await.0, 200);
    let minted = crate::support::mint_handle(&client, &broker.url, &cached).await;
    let uncached = minted["authid"].as_str().unwrap().to_owned();

    let back = PostgresBack;
    pg_ctl("stop");
    let started = Instant::now();
    assert_eq!(refresh(&client, &broker.url, &cached).await.0, 200, "cached tokens keep being served");
    let (status, _, reason) = refresh(&client, &broker.url, &uncached).await;
    assert_eq!(status, 500, "Duplicati retries a 500 (a 503 would make it give up)");
    assert!(reason.unwrap().contains("cannot reach its store"));
    let v1 = client.post(format!("{}/v1/token", broker.url)).bearer_auth(&uncached).send().await.unwrap();
    assert_eq!(v1.status(), 503);
    assert!(v1.headers().contains_key("retry-after"));
    assert_eq!(client.get(format!("{}/readyz", broker.url)).send().await.unwrap().status(), 503);
    assert!(started.elapsed() < Duration::from_secs(5), "failed fast, not hung: {:?}", started.elapsed());

    drop(back);
    let give_up = Instant::now() + Duration::from_secs(30);
    while client.get(format!("{}/readyz", broker.url)).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < give_up, "the broker did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(refresh(&client, &broker.url, &uncached).await.0, 200, "recovered without a restart");
    drop(broker);
    drop_schema(&schema).await;
}

/// SIGTERM in the middle of a refresh storm: the broker stops accepting,
/// finishes what is in flight, and exits cleanly with every rotation it
/// obtained stored — the provider's latest rotation of each grant is the one
/// in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_refreshes_in_flight_and_stores_every_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start(FakeConfig {
        client_secrets: vec!["term-secret".into()],
        rotate: true,
        strict_reuse: true,
        access_lifetime: Some(Duration::ZERO),
        latency: Duration::from_millis(20),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let port = free_port();
    let path = dir.path().join("data");
    let store = format!("[store]\npath = {:?}", path.display().to_string());
    let rest = fake_toml(&fake, "term-secret", "rotates_refresh_tokens = true\n", "");
    let mut broker = Broker::start(&write_config(dir.path(), "term", port, &store, &rest), port).await;
    let client = http();
    let mut authids = Vec::new();
    for _ in 0..3 {
        authids.push(fake_login(&client, &broker.url).await);
    }
    let mut storm = Vec::new();
    for t in 0..12 {
        let (client, url, id) = (client.clone(), broker.url.clone(), authids[t % 3].clone());
        storm.push(tokio::spawn(async move { while refresh(&client, &url, &id).await.0 != 0 {} }));
    }
    // Every token expires at once: refreshes are in flight all the time.
    let started = fake.refreshes();
    let give_up = Instant::now() + Duration::from_secs(20);
    while fake.refreshes() < started + 30 {
        assert!(Instant::now() < give_up, "the storm is refreshing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = broker.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(30), broker.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "a clean exit: {status:?}");
    for task in storm {
        task.abort();
    }
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&path).await.unwrap());
    for authid in &authids {
        let stored = stored_refresh_token(store.as_ref(), authid).await;
        let (grant, generation) = fake.lineage(&stored).unwrap();
        assert_eq!(fake.latest_generation(grant), Some(generation), "the last rotation obtained is the one stored");
    }
    drop(store);
    broker.restart().await;
    for authid in &authids {
        assert_eq!(refresh(&client, &broker.url, authid).await.0, 200);
    }
    assert_eq!(fake.reuse_attempts(), 0);
}

/// The lease across processes, with a provider slower than the lease: the
/// fake provider answers refreshes after 40 s (the lease is 30 s; the
/// provider timeout is raised to 60 s so the call is not cut short). While
/// instance A's refresh is open, instance B asks for the same grant: it waits
/// on the lease A keeps renewing, never calls the provider, and gives up
/// after one lease period. A stores the rotated token; B then adopts it. A
/// strict-rotation provider sees one refresh and no reuse. Bounded: about
/// 45 s of real time, two minutes at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stderr)] // the figures
async fn a_provider_slower_than_the_lease_is_asked_by_one_broker_process_only_on_postgres() {
    let _postgres = crate::support::postgres_shared().await;
    let run = async {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeProvider::start(FakeConfig {
            client_secrets: vec!["slow-secret".into()],
            rotate: true,
            strict_reuse: true,
            // The login's token is stale at once, so the first request refreshes.
            access_lifetime: Some(Duration::ZERO),
            ..FakeConfig::default()
        })
        .await
        .unwrap();
        let schema = random_schema();
        let store = format!("[store]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"", database_url());
        let rest = fake_toml(&fake, "slow-secret", "rotates_refresh_tokens = true\ntimeout_secs = 60\n", "");
        let (port_a, port_b) = (free_port(), free_port());
        let a = Broker::start(&write_config(dir.path(), "a", port_a, &store, &rest), port_a).await;
        let b = Broker::start(&write_config(dir.path(), "b", port_b, &store, &rest), port_b).await;
        let client = http();
        let authid = fake_login(&client, &a.url).await;
        fake.configure(|c| {
            c.latency = Duration::from_secs(40);
            c.access_lifetime = Some(Duration::from_secs(3600));
        });
        let asked = fake.token_requests().len();
        let started = Instant::now();
        let first = tokio::spawn({
            let (client, url, authid) = (client.clone(), a.url.clone(), authid.clone());
            async move { refresh(&client, &url, &authid).await }
        });
        while fake.token_requests().len() == asked {
            assert!(started.elapsed() < Duration::from_secs(10), "A never asked the provider");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (status, _, reason) = refresh(&client, &b.url, &authid).await;
        let waited = started.elapsed();
        // provider_unavailable, as Duplicati's surface answers it (502 with
        // X-Reason: its clients retry with back-off) — B's store answered.
        assert_eq!(status, 502, "B gives up waiting for A's refresh: {reason:?}");
        assert!(reason.as_deref().is_some_and(|r| r.contains("provider is unavailable")), "{reason:?}");
        assert!(waited >= Duration::from_secs(25), "B waited about one lease period, not {waited:?}");
        assert_eq!(fake.token_requests().len(), asked + 1, "B never called the provider while A's call was open");
        let (status, first_token, reason) = first.await.unwrap();
        assert_eq!(status, 200, "A's slow refresh is answered: {reason:?}");
        assert!(started.elapsed() >= Duration::from_secs(40), "it took the provider's 40 s");
        let (status, adopted, _) = refresh(&client, &b.url, &authid).await;
        assert_eq!((status, adopted), (200, first_token), "B adopts the token A stored");
        assert_eq!(fake.token_requests().len(), asked + 1, "one refresh in all");
        assert_eq!(fake.reuse_attempts(), 0, "the provider never saw a refresh token twice");
        let metrics = client.get(format!("{}/metrics", a.url)).send().await.unwrap().text().await.unwrap();
        let renewals = metrics
            .lines()
            .find(|l| l.starts_with("latchkey_lease_renewals_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        // Every 10 s of the 40 s call; a renewal the store fails under load is
        // not counted (the lease still holds until its deadline), so at least
        // one. Without any, B would have taken the lapsed lease at 30 s and
        // called the provider, which the request count above rules out.
        eprintln!(
            "B gave up after {waited:?}; A answered after {:?} with {renewals:?} lease renewals",
            started.elapsed()
        );
        assert!(renewals.is_some_and(|n| n >= 1.0), "A renewed its lease while it waited: {renewals:?}");
        drop((a, b));
        drop_schema(&schema).await;
    };
    tokio::time::timeout(Duration::from_secs(120), run).await.expect("the run is bounded");
}
