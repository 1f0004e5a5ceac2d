// Two brokers in this process on one PostgreSQL schema. The second one's
// store reaches PostgreSQL through a relay that can refuse new connections,
// so its notice listener, once killed, stays away for as long as the test
// says: a revocation on the first broker meanwhile sends a notice nobody
// hears, and the second must still refuse the AuthID soon after it listens
// again (the store says Resync, the engine drops its whole cache).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use latchkey_storage_postgres::PostgresStore;
use tokio::net::{TcpListener, TcpStream};

use crate::support::{fake_config, harness_on, refresh};

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A TCP relay that passes new connections on while open and drops them at
/// once while closed; connections already relayed carry on either way.
struct Gate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    async fn to(target: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn({
            let open = Arc::clone(&open);
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees the connection close
                    }
                    tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            }
        });
        Gate { addr, open, task }
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection of our own, for pg_stat_activity and clean-up.
async fn admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// How many connections with this application name are listening.
async fn listening(admin: &tokio_postgres::Client, application: &str) -> i64 {
    let row = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
            &[&application],
        )
        .await
        .unwrap();
    row.get(0)
}

async fn until(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) -> Instant {
    let give_up = Instant::now() + within;
    loop {
        if done().await {
            return Instant::now();
        }
        assert!(Instant::now() < give_up, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_missed_while_the_listener_was_down_is_enforced_soon_after_it_reconnects_on_postgres() {
    let _postgres = crate::support::postgres_shared().await;
    let mut bytes = [0u8; 6];
    latchkey_core::Random::fill(&latchkey_core::OsRandom, &mut bytes);
    let schema = format!("latchkey_it_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let application = format!("latchkey-second-{}", &schema[12..]);

    let mut url = url::Url::parse(&database_url()).unwrap();
    let target = SocketAddr::new(
        url.host_str().unwrap().parse().expect("DATABASE_URL names an IP address"),
        url.port().unwrap_or(5432),
    );
    let gate = Gate::to(target).await;
    url.set_port(Some(gate.addr.port())).unwrap();
    url.query_pairs_mut().append_pair("application_name", &application);

    let first_store = PostgresStore::connect(&database_url(), &schema).await.unwrap();
    let second_store = PostgresStore::connect(url.as_str(), &schema).await.unwrap();
    let first = harness_on(fake_config(), "", Arc::new(first_store)).await;
    let second = harness_on(fake_config(), "", Arc::new(second_store)).await;
    let admin = admin().await;
    assert_eq!(listening(&admin, &application).await, 1, "the second broker listens through the gate");

    let authid = first.login().await;
    for _ in 0..2 {
        assert_eq!(refresh(&second.http, &second.url, &authid).await.status(), 200);
    }
    assert!(second.server.broker.metrics().cache_hits >= 1, "the second broker has the token cached");

    // The second broker's listener goes, and cannot come back.
    gate.set_open(false);
    let killed = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
            &[&application],
        )
        .await
        .unwrap();
    assert_eq!(killed.len(), 1);
    until("the listening connection is gone", Duration::from_secs(5), async || {
        listening(&admin, &application).await == 0
    })
    .await;

    // Revoked on the first broker: the notice reaches no one on the second.
    let revoked = first.http.post(format!("{}/v1/grant/revoke", first.url)).bearer_auth(&authid).send().await.unwrap();
    assert_eq!(revoked.status(), 200);
    assert_eq!(refresh(&first.http, &first.url, &authid).await.status(), 401);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        refresh(&second.http, &second.url, &authid).await.status(),
        200,
        "the notice was lost: the second broker still answers from its cache"
    );

    gate.set_open(true);
    let reconnected = until("the second broker listens again", Duration::from_secs(10), async || {
        listening(&admin, &application).await == 1
    })
    .await;
    let refused = until("the second broker refuses the revoked AuthID", Duration::from_secs(5), async || {
        refresh(&second.http, &second.url, &authid).await.status() == 401
    })
    .await;
    let took = refused.saturating_duration_since(reconnected);
    assert!(took < Duration::from_secs(2), "refused {took:?} after reconnecting");

    first.server.stop().await;
    second.server.stop().await;
    let _ = admin.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).await;
}
