//! TLS to PostgreSQL (feature `tls`). The local server's own certificate is
//! Debian's self-signed one, so the tests put a TLS front before it: a small
//! server that answers PostgreSQL's SSLRequest with `S`, completes the TLS
//! handshake with a certificate from a CA made for the test, and relays the
//! decrypted bytes to the real server. The store must verify that
//! certificate (chain and name), and every connection it makes — the pool's
//! and the LISTEN connection — must come through TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use latchkey_core::{Notice, RecordKind, Store, StoreError};
use latchkey_storage_postgres::{PostgresStore, SetupError, TlsOptions};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{Schema, database_url, grant, next_within_a_second};

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A test CA and what it signs.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ca { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA") }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    fn server(&self, names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        let cert = params.signed_by(&key, &self.issuer).expect("server certificate");
        (cert.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    /// The CA certificate as a PEM file in `dir`.
    fn pem_file(&self, dir: &tempfile::TempDir) -> PathBuf {
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, self.issuer.pem()).expect("write the CA file");
        path
    }
}

/// The TLS front and what it saw.
struct Front {
    addr: SocketAddr,
    /// Connections that completed a TLS handshake.
    tls: Arc<AtomicUsize>,
    /// Connections that did not open with an SSLRequest (refused).
    plain: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn upstream() -> SocketAddr {
    let config: tokio_postgres::Config = database_url().parse().expect("DATABASE_URL");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        other => panic!("the TLS tests need DATABASE_URL to name a TCP host, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .expect("resolve the database host")
        .next()
        .expect("an address for the database host")
}

async fn front(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Front {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the front");
    let addr = listener.local_addr().expect("front address");
    let (tls, plain) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (tls_seen, plain_seen, upstream) = (Arc::clone(&tls), Arc::clone(&plain), upstream());
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (acceptor, tls_seen, plain_seen) = (acceptor.clone(), Arc::clone(&tls_seen), Arc::clone(&plain_seen));
            tokio::spawn(async move {
                let mut opening = [0u8; 8];
                if socket.read_exact(&mut opening).await.is_err() || opening != SSL_REQUEST {
                    plain_seen.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                if socket.write_all(b"S").await.is_err() {
                    return;
                }
                let Ok(mut client) = acceptor.accept(socket).await else { return };
                tls_seen.fetch_add(1, Ordering::SeqCst);
                let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    Front { addr, tls, plain, task }
}

/// The test database's URL, pointed at the front.
fn url_through(front: &Front, sslmode: &str) -> String {
    let config: tokio_postgres::Config = database_url().parse().expect("DATABASE_URL");
    let mut url = format!(
        "host={} port={} user={} dbname={} sslmode={sslmode}",
        front.addr.ip(),
        front.addr.port(),
        config.get_user().unwrap_or("postgres"),
        config.get_dbname().unwrap_or("postgres"),
    );
    if let Some(password) = config.get_password() {
        url.push_str(&format!(" password='{}'", String::from_utf8_lossy(password).replace('\'', "\\'")));
    }
    url
}

/// An error and its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_tls_connection_carries_queries_and_notices() {
    let ca = Ca::new("latchkey test CA");
    let (cert, key) = ca.server(&["127.0.0.1"]);
    let front = front(cert, key).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let options = TlsOptions { ca_file: Some(ca.pem_file(&dir)) };
    let schema = Schema::fresh().await;

    let store =
        PostgresStore::connect_with(&url_through(&front, "require"), &schema.0, &options).await.expect("connect");
    assert!(store.uses_tls());
    store.insert(RecordKind::Grant, b"over-tls", None, b"body").await.expect("insert");
    let stored = store.get(RecordKind::Grant, b"over-tls").await.expect("get").expect("present");
    assert_eq!(stored.body, b"body");

    let mut notices = store.subscribe().await.expect("subscribe (the LISTEN connection)");
    let g = grant();
    store.publish(Notice::GrantChanged(g)).await.expect("publish");
    assert_eq!(next_within_a_second(&mut notices).await, Notice::GrantChanged(g));

    assert!(front.tls.load(Ordering::SeqCst) >= 2, "the pool's and the listener's connections went through TLS");
    assert_eq!(front.plain.load(Ordering::SeqCst), 0, "no connection skipped TLS");
    drop(notices);
    drop(store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_an_unknown_ca_is_refused() {
    let (trusted, signer) = (Ca::new("trusted CA"), Ca::new("some other CA"));
    let (cert, key) = signer.server(&["127.0.0.1"]);
    let front = front(cert, key).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let options = TlsOptions { ca_file: Some(trusted.pem_file(&dir)) };
    let schema = Schema::fresh().await;

    let error = PostgresStore::connect_with(&url_through(&front, "require"), &schema.0, &options)
        .await
        .expect_err("an unverifiable server must be refused");
    let text = chain(&error);
    assert!(text.contains("certificate") && text.contains("UnknownIssuer"), "{text}");
    assert_eq!(front.tls.load(Ordering::SeqCst), 0, "no handshake completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_host_is_refused() {
    let ca = Ca::new("latchkey test CA");
    let (cert, key) = ca.server(&["db.example.org"]);
    let front = front(cert, key).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let options = TlsOptions { ca_file: Some(ca.pem_file(&dir)) };
    let schema = Schema::fresh().await;

    let error = PostgresStore::connect_with(&url_through(&front, "require"), &schema.0, &options)
        .await
        .expect_err("a certificate naming another host must be refused");
    let text = chain(&error);
    assert!(text.contains("not valid for name \"127.0.0.1\""), "{text}");
    assert_eq!(front.tls.load(Ordering::SeqCst), 0, "no handshake completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_without_certificates_is_refused_before_connecting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, "not a certificate\n").expect("write");
    let options = TlsOptions { ca_file: Some(path.clone()) };
    let error = PostgresStore::connect_with(&database_url(), &Schema::fresh().await.0, &options)
        .await
        .expect_err("an unusable CA file");
    let StoreError::Unavailable { retryable: false, source: Some(source) } = &error else {
        panic!("not a setup error: {error:?}")
    };
    assert_eq!(
        source.downcast_ref::<SetupError>(),
        Some(&SetupError::CaFile { path, reason: "it holds no PEM certificate".into() })
    );
    let missing = TlsOptions { ca_file: Some(dir.path().join("missing.pem")) };
    let error = PostgresStore::connect_with(&database_url(), &Schema::fresh().await.0, &missing).await.unwrap_err();
    assert!(chain(&error).contains("missing.pem"), "{}", chain(&error));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_stays_plain_by_default() {
    // The local server offers TLS with a certificate nobody can verify; the
    // default `prefer` on loopback must not try it.
    let schema = Schema::fresh().await;
    let store = schema.open().await;
    assert!(!store.uses_tls());
    store.insert(RecordKind::Grant, b"plain", None, b"x").await.expect("insert over plain TCP");
}
