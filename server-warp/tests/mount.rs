// The broker mounted in another warp application (`Mounted`, `serve_filter`):
// every route of the table answers under the prefix, nothing outside it does,
// and with no prefix there is no catch-all.

use std::sync::Arc;

use latchkey_core::MemoryStore;
use latchkey_server::config::Config;
use latchkey_server::{Mounted, serve_filter};
use latchkey_testkit::FakeProvider;
use reqwest::Method;
use warp::Filter;
use warp::reply::Reply;

use crate::support::{CLIENT_SECRET, fake_config};

const APP_404: &str = "the application's own 404";

/// A warp application with its own `/mine` and 404, and the broker mounted
/// at `public_url`'s path (`prefix`); answers its base URL.
async fn app(prefix: &str) -> (String, FakeProvider, tokio::sync::watch::Sender<bool>) {
    let fake = FakeProvider::start(fake_config()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = Config::parse(&format!(
        r#"
        public_url = "{url}{prefix}"
        [keys]
        master_keys = ["k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]
        [providers.fake]
        authorize_url = "{authorize}"
        token_url = "{token}"
        client_id = "latchkey-test"
        client_secrets = ["{CLIENT_SECRET}"]
        [services.fake]
        provider = "fake"
        "#,
        authorize = fake.authorize_url(),
        token = fake.token_url(),
    ))
    .unwrap();
    let mounted = Mounted::new(&config, Arc::new(MemoryStore::new())).await.unwrap();
    let mine = warp::path!("mine").map(|| "mine".into_response());
    let routes = mine
        .or(mounted.routes())
        .unify()
        .or(warp::any().map(|| warp::reply::with_status(APP_404, warp::http::StatusCode::NOT_FOUND).into_response()))
        .unify();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        serve_filter(listener, routes, &config, stopped).await;
        drop(mounted);
    });
    (url, fake, stop)
}

async fn answer(http: &reqwest::Client, method: Method, url: &str) -> (u16, String) {
    let response = http.request(method, url).send().await.unwrap();
    let status = response.status().as_u16();
    assert_eq!(response.headers()["x-content-type-options"], "nosniff", "{url}: served like the broker's own listener");
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn every_route_answers_under_the_prefix_and_the_application_keeps_the_rest() {
    let (url, _fake, stop) = app("/oauth").await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    assert_eq!(answer(&http, Method::GET, &format!("{url}/mine")).await, (200, "mine".into()));
    for (path, _) in latchkey_server::http::served_paths() {
        let path = path.replace("{keyid}", "AAAAAAAAAAAAAAAAAAAAAA");
        // Some method reaches the route's handler, not the "no such route / method" answer.
        let mut handled = Vec::new();
        for method in [Method::GET, Method::POST, Method::DELETE] {
            let (status, body) = answer(&http, method.clone(), &format!("{url}/oauth{path}")).await;
            assert_ne!(body, APP_404, "{method} /oauth{path} is the broker's");
            if status != 404 && status != 405 {
                handled.push(method);
            }
        }
        assert!(!handled.is_empty(), "/oauth{path}: no method reaches a handler");
        // At the root the path is the application's.
        let (status, body) = answer(&http, Method::GET, &format!("{url}{path}")).await;
        assert_eq!((status, body.as_str()), (404, APP_404), "{path} outside the prefix");
    }
    let (status, body) = answer(&http, Method::GET, &format!("{url}/oauth/no-such-page")).await;
    assert_eq!(status, 404);
    assert_ne!(body, APP_404, "under the prefix the broker answers for itself");
    // Counted by their path under the prefix, as at the root: one GET, one POST and one DELETE of /healthz.
    let (_, metrics) = answer(&http, Method::GET, &format!("{url}/oauth/metrics")).await;
    assert!(metrics.contains("latchkey_http_requests_total{route=\"/healthz\",status=\"200\"} 1"), "{metrics}");
    assert!(!metrics.contains("route=\"/oauth/"), "{metrics}");
    let _ = stop.send(true);
}

#[tokio::test]
async fn mounted_at_the_root_the_broker_has_no_catch_all() {
    let (url, _fake, stop) = app("").await;
    let http = reqwest::Client::new();
    assert_eq!(answer(&http, Method::GET, &format!("{url}/healthz")).await.0, 200);
    let (_, metrics) = answer(&http, Method::GET, &format!("{url}/metrics")).await;
    assert!(metrics.contains("latchkey_http_requests_total{route=\"/healthz\",status=\"200\"} 1"), "{metrics}");
    assert_eq!(answer(&http, Method::GET, &format!("{url}/mine")).await, (200, "mine".into()));
    assert_eq!(answer(&http, Method::GET, &format!("{url}/no-such-page")).await, (404, APP_404.into()));
    let _ = stop.send(true);
}
