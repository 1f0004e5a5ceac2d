// The custom Provider: a login with a pasted application key, then session
// tokens refreshed with the stored key, against a stand-in of the service's
// `b2_authorize_account` on loopback. Time is a manual clock: nothing waits.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use latchkey_core::testing::{ManualClock, ManualRuntime};
use latchkey_core::{
    Broker, BrokerParts, EngineConfig, ListQuery, MemoryStore, OsRandom, RecordKind, Store, Timestamp,
};
use latchkey_examples::api_key_provider::{self, SESSION_LIFETIME};
use latchkey_examples::standin;
use secrecy::ExposeSecret;

const KEY: &str = "0012ab34cd56:K001applicationkeyvalue";

/// The service's `b2_authorize_account`: a new session token for the right
/// key in Basic credentials, 401 for any other. Answers the URL and the
/// Authorization headers it saw.
async fn service() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/b2api/v3/b2_authorize_account", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let issued = Arc::new(AtomicU64::new(0));
    let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(KEY));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (log, issued, expected) = (Arc::clone(&log), Arc::clone(&issued), expected.clone());
            let answer = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let auth = request.headers().get("authorization").map(|v| v.to_str().unwrap().to_owned());
                log.lock().unwrap().push(auth.clone().unwrap_or_default());
                let response =
                    if request.uri().path() == "/b2api/v3/b2_authorize_account" && auth == Some(expected.clone()) {
                        let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                        let body = serde_json::json!({
                            "accountId": "0012ab34cd56",
                            "authorizationToken": format!("session-{n}"),
                            "apiInfo": { "storageApi": { "apiUrl": "https://api001.example.invalid" } },
                        });
                        Response::new(Full::new(Bytes::from(body.to_string())))
                    } else {
                        let mut refused = Response::new(Full::new(Bytes::from_static(b"{\"code\":\"unauthorized\"}")));
                        *refused.status_mut() = StatusCode::UNAUTHORIZED;
                        refused
                    };
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), answer));
        }
    });
    (url, seen)
}

#[tokio::test]
async fn a_pasted_key_becomes_an_authid_whose_session_tokens_the_engine_refreshes() {
    let (url, seen) = service().await;
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_767_225_600));
    let runtime = ManualRuntime::new(clock.clone(), Arc::new(|task| drop(tokio::spawn(task))));
    let store = Arc::new(MemoryStore::new());
    let broker = Broker::new(BrokerParts {
        store: store.clone(),
        catalogue: api_key_provider::catalogue(&url).unwrap(),
        keyring: standin::keyring(),
        runtime: Arc::new(runtime),
        rng: Arc::new(OsRandom),
        config: EngineConfig::default(),
    });
    broker.start().await.unwrap();

    // A wrong key is refused at login and leaves nothing behind.
    let proof = broker.new_browser_proof();
    let wrong = broker.login_with_token("b2", "0012ab34cd56:wrong", None, proof.expose_secret()).await;
    assert!(wrong.is_err(), "{wrong:?}");
    assert_eq!(store.count(RecordKind::Grant), 0);

    let proof = broker.new_browser_proof();
    let done = broker.login_with_token("b2", KEY, None, proof.expose_secret()).await.unwrap();
    assert_eq!(done.service, "b2");
    let first = broker.token(&done.authid, None).await.unwrap();
    assert_eq!(first.access_token.expose_secret(), "session-1", "the login's session token, no second call");
    assert_eq!(broker.expires_in(&first), Some(SESSION_LIFETIME));
    assert_eq!(seen.lock().unwrap().len(), 2, "the wrong key and the login");

    // Near the end of its day the token is renewed with the stored key.
    clock.advance(SESSION_LIFETIME - Duration::from_secs(60));
    let second = broker.token(&done.authid, None).await.unwrap();
    assert_eq!(second.access_token.expose_secret(), "session-2");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1], seen[2], "the refresh presents the key the user pasted");

    // The key is stored only sealed: no stored grant or handle holds its bytes.
    for kind in [RecordKind::Grant, RecordKind::Handle] {
        let page = store.list(&ListQuery::all(kind, 10)).await.unwrap();
        assert_eq!(page.items.len(), 1);
        for (_, record) in page.items {
            let secret = &KEY.as_bytes()[13..];
            assert!(!record.body.windows(secret.len()).any(|w| w == secret), "{kind:?} holds the key in the clear");
        }
    }
}
