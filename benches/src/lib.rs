//! Shared fixtures for latchkey's benchmarks.
//!
//! The criterion micro benchmarks (`benches/micro.rs`) and the HTTP load
//! harness (`src/bin/loadtest.rs`) both need grants that the broker can open:
//! an AuthID, a [`Grant`] whose payload is sealed under a random data key, and
//! a [`Handle`] that wraps that data key under the AuthID and the master key.
//! This crate mints them and writes them straight through the [`Store`] API,
//! so a store can be filled with a million grants without a million logins.
//!
//! Nothing here runs as part of the test suite: the library has no tests and
//! the benchmark and binary are only run on request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use latchkey_core::records::Record;
use latchkey_core::{
    AuthId, DataKey, Grant, GrantId, GrantPayload, Handle, MasterKeyring, OsRandom, Store, StoreError, Timestamp,
};
use secrecy::SecretString;

/// The master key every benchmark broker uses (a fixed, public test key).
pub const MASTER_KEY: &str = "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
/// The service id of the benchmark grants.
pub const SERVICE: &str = "fake";
/// The fake provider's client id (`FakeConfig::default()`).
pub const CLIENT_ID: &str = "latchkey-test";
/// The fake provider's client secret (`FakeConfig::default()`).
pub const CLIENT_SECRET: &str = "test-secret";

/// The keyring matching [`MASTER_KEY`].
pub fn keyring() -> MasterKeyring {
    #[allow(clippy::expect_used)]
    MasterKeyring::parse(&[MASTER_KEY]).expect("the benchmark master key parses")
}

/// Now, as the broker's clock reads it.
pub fn now() -> Timestamp {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    Timestamp::from_unix_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// Where the broker's provider lives.
#[derive(Debug, Clone)]
pub struct ProviderUrls {
    /// Authorization endpoint.
    pub authorize: String,
    /// Token endpoint.
    pub token: String,
}

impl ProviderUrls {
    /// URLs under a base such as `http://127.0.0.1:9` (nothing needs to listen
    /// there as long as no request reaches the provider).
    pub fn under(base: &str) -> Self {
        ProviderUrls { authorize: format!("{base}/authorize"), token: format!("{base}/token") }
    }
}

/// The TOML of a broker listening on `listen` with one non-rotating provider
/// and service `fake`, rate limits out of the way, and `store` (a `[store]`
/// table, or empty for an in-process store passed to `latchkey_server::serve`).
pub fn config_text(listen: SocketAddr, provider: &ProviderUrls, store: &str) -> String {
    let tables = "[limits]\ntoken_requests_per_minute_per_keyid = 4000000000\n\
                  token_requests_per_minute_per_address = 4000000000\n[log]\nlevel = \"warn\"";
    broker_toml(listen, provider, tables, store)
}

/// [`config_text`] as an operator would run it: defaults everywhere
/// (logging at `info`, in text) except every limit, which a benchmark from
/// one address would hit (logins included).
pub fn operator_config_text(listen: SocketAddr, provider: &ProviderUrls, store: &str) -> String {
    let limits: String = [
        "token_requests_per_minute_per_keyid",
        "token_requests_per_minute_per_address",
        "fetch_requests_per_minute_per_address",
        "record_creations_per_minute_per_address",
        "user_code_attempts_per_minute_per_address",
    ]
    .iter()
    .map(|key| format!("{key} = 4000000000\n"))
    .collect();
    broker_toml(listen, provider, &format!("[limits]\n{limits}"), store)
}

fn broker_toml(listen: SocketAddr, provider: &ProviderUrls, tables: &str, store: &str) -> String {
    format!(
        r#"
listen = "{listen}"
public_url = "http://{listen}"
[keys]
master_keys = ["{MASTER_KEY}"]
{tables}
{store}
[providers.fake]
authorize_url = "{authorize}"
token_url = "{token}"
client_auth = "post"
client_id = "{CLIENT_ID}"
client_secrets = ["{CLIENT_SECRET}"]
rotates_refresh_tokens = false
[services.fake]
provider = "fake"
display_name = "Benchmark storage"
scopes = ["files"]
[services.jottacloud]
enabled = false
"#,
        authorize = provider.authorize,
        token = provider.token,
    )
}

/// One minted grant: its AuthID (text), grant and handle records.
pub struct Minted {
    /// The AuthID as a client sends it.
    pub authid: String,
    /// The grant record.
    pub grant: Grant,
    /// The handle record.
    pub handle: Handle,
}

/// A payload with `refresh_token` and an access token expiring at
/// `access_expires_at` (already expired when that is not after `now`).
pub fn payload(refresh_token: &str, access_expires_at: Timestamp, now: Timestamp) -> GrantPayload {
    GrantPayload {
        refresh_token: Some(SecretString::from(refresh_token.to_owned())),
        access_token: Some(SecretString::from("bench-access-token-0000000000000000000000000000".to_owned())),
        access_expires_at: Some(access_expires_at),
        refreshed_at: now,
        scopes: vec!["files".into()],
        account_id: None,
        token_type: Some("Bearer".into()),
        extra: Vec::new(),
    }
}

/// Mints an AuthID, a grant sealed under a fresh data key, and its handle.
pub fn mint(ring: &MasterKeyring, payload: &GrantPayload, now: Timestamp) -> Minted {
    let rng = OsRandom;
    let authid = AuthId::generate(&rng);
    let data_key = DataKey::generate(&rng);
    let grant = Grant::new(GrantId::generate(&rng), SERVICE, payload, &data_key, now, &rng);
    let handle = Handle::new(&authid, grant.id, &data_key, "bench", ring, now, &rng);
    Minted { authid: authid.expose_text().to_string(), grant, handle }
}

/// Writes a minted grant and its handle with two plain `Store::insert`s.
pub async fn insert(store: &dyn Store, minted: &Minted) -> Result<(), StoreError> {
    let (grant, handle) = (&minted.grant, &minted.handle);
    store.insert(Grant::KIND, &grant.key(), grant.group().as_deref(), &grant.encode()).await?;
    store.insert(Handle::KIND, &handle.key(), handle.group().as_deref(), &handle.encode()).await
}

/// What [`populate`] did.
#[derive(Debug, Clone)]
pub struct Populated {
    /// Grants written (each with one handle).
    pub count: u64,
    /// Time spent sealing records (summed over the minting threads).
    pub mint_cpu: Duration,
    /// Wall-clock time of the whole fill.
    pub wall: Duration,
    /// AuthIDs of a sample spread evenly over the fill.
    pub sample: Vec<String>,
}

/// Fills `store` with `count` grants whose access tokens stay valid for 30
/// days (so a token request never reaches the provider), `concurrency`
/// inserts at a time, keeping about `sample` AuthIDs. Stops early, keeping
/// what is written, once `deadline` passes.
pub async fn populate(
    store: Arc<dyn Store>,
    count: u64,
    concurrency: usize,
    sample: usize,
    deadline: Option<Instant>,
    mut progress: impl FnMut(u64, Duration) + Send + 'static,
) -> anyhow::Result<Populated> {
    let started = Instant::now();
    let ring = Arc::new(keyring());
    let every = (count / sample.max(1) as u64).max(1);
    let concurrency = concurrency.max(1);
    let per_task = count.div_ceil(concurrency as u64);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..concurrency as u64 {
        let (store, ring, stop, done) = (Arc::clone(&store), Arc::clone(&ring), Arc::clone(&stop), Arc::clone(&done));
        let range = (t * per_task)..((t + 1) * per_task).min(count);
        tasks.push(tokio::spawn(async move {
            let mut sample = Vec::new();
            let mut mint_cpu = Duration::ZERO;
            let mut written = 0u64;
            for i in range {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let t0 = Instant::now();
                let now = now();
                let minted = mint(
                    &ring,
                    &payload("bench-refresh", now.saturating_add(Duration::from_secs(30 * 86_400)), now),
                    now,
                );
                mint_cpu += t0.elapsed();
                insert(store.as_ref(), &minted).await?;
                written += 1;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i % every == 0 {
                    sample.push(minted.authid);
                }
            }
            anyhow::Ok((sample, mint_cpu, written))
        }));
    }
    let watcher = {
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let n = done.load(std::sync::atomic::Ordering::Relaxed);
                progress(n, started.elapsed());
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if n >= count {
                    break;
                }
            }
        })
    };
    let mut result = Populated { count: 0, mint_cpu: Duration::ZERO, wall: Duration::ZERO, sample: Vec::new() };
    for task in tasks {
        let (sample, mint_cpu, written) = task.await??;
        result.sample.extend(sample);
        result.mint_cpu += mint_cpu;
        result.count += written;
    }
    watcher.abort();
    result.wall = started.elapsed();
    Ok(result)
}
