// What every answer carries and what the listeners refuse before a route
// sees a request: nosniff everywhere, HSTS with an https public_url, 431 for
// a head over 16 KiB, 413 for a body over 16 KiB, /metrics on its own
// address, and the warning for plain http off loopback.

use std::time::Duration;

use latchkey_server::config::Config;
use reqwest::header::HeaderMap;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::{fake_config, harness, logs, open_page, read_until_closed};

fn nosniff(headers: &HeaderMap) -> bool {
    let values: Vec<_> = headers.get_all("x-content-type-options").iter().collect();
    values.len() == 1 && values[0] == "nosniff"
}

/// Sends raw bytes on a new connection and reads the answer until the
/// broker closes the connection (bounded).
async fn raw_exchange(addr: &str, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_until_closed(&mut stream, Duration::from_secs(10)).await.expect("the broker closes the connection")
}

#[tokio::test]
async fn every_kind_of_answer_says_nosniff_and_only_https_brokers_send_hsts() {
    let h = harness(fake_config(), "").await;
    let authid = h.login().await;
    let get = |path: &'static str| h.get(path);
    let mut answers = vec![
        ("JSON 200", get("/healthz").await),
        ("metrics", get("/metrics").await),
        ("unknown path 404", get("/nope").await),
        ("wrong method 405", h.http.delete(format!("{}/refresh", h.url)).send().await.unwrap()),
        ("Duplicati error 401", get("/refresh").await),
        ("static asset", get("/static/style.css").await),
        ("favicon", get("/favicon.ico").await),
        ("HTML page", get("/").await),
        ("404 page", get("/login?id=nope").await),
        ("JSONP", get("/fetch?callback=cb&token=0123456789abcdefghij").await),
        ("plain text", get("/privacy-policy").await),
        ("redirect", get("/refresh?type=fake").await),
        (
            "413",
            h.http
                .post(format!("{}/v1/token", h.url))
                .bearer_auth(&authid)
                .body(vec![b'x'; 20 * 1024])
                .send()
                .await
                .unwrap(),
        ),
        ("token 200", crate::support::refresh(&h.http, &h.url, &authid).await),
    ];
    answers.push(("v1 401", h.http.post(format!("{}/v1/token", h.url)).send().await.unwrap()));
    let mut statuses = Vec::new();
    for (name, response) in &answers {
        statuses.push(response.status().as_u16());
        assert!(nosniff(response.headers()), "{name} ({}): {:?}", response.status(), response.headers());
        assert!(!response.headers().contains_key("strict-transport-security"), "{name}: no HSTS over plain http");
    }
    for status in [200, 302, 401, 404, 405, 413] {
        assert!(statuses.contains(&status), "a {status} among {statuses:?}");
    }

    let https = harness(fake_config(), "public_url = \"https://broker.example\"").await;
    for path in ["/healthz", "/nope", "/static/style.css", "/"] {
        let response = https.get(path).await;
        assert_eq!(response.headers()["strict-transport-security"], "max-age=31536000", "{path}");
        assert!(nosniff(response.headers()), "{path}");
    }
}

#[tokio::test]
async fn a_head_over_16_kib_is_431_and_a_body_over_16_kib_is_413() {
    let h = harness(fake_config(), "").await;
    let addr = h.url.trim_start_matches("http://");
    let big = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(17 * 1024));
    let answer = raw_exchange(addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    // A head that does not parse at all: hyper's bare 400. Both are counted.
    let answer = raw_exchange(addr, b"NOT AN HTTP REQUEST\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert_eq!(h.metric("latchkey_connections_malformed_heads_total").await, 2);
    // Just under the limit is served.
    let fits =
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n", "a".repeat(15 * 1024));
    let answer = raw_exchange(addr, fits.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");

    let authid = h.login().await;
    let json = serde_json::json!({ "min_validity": 60, "padding": "x".repeat(20 * 1024) });
    let form = format!("grant_type=refresh_token&refresh_token={authid}&padding={}", "x".repeat(20 * 1024));
    // Each in its surface's vocabulary: the field that carries the code, the code.
    let cases = [
        (
            "JSON to /v1/token",
            ("error", "bad_request"),
            h.http.post(format!("{}/v1/token", h.url)).bearer_auth(&authid).json(&json),
        ),
        (
            "form to /oauth2/token",
            ("error", "invalid_request"),
            h.http
                .post(format!("{}/oauth2/token", h.url))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form.clone()),
        ),
        (
            "form to /refresh",
            ("code", "bad_request"),
            h.http
                .post(format!("{}/refresh", h.url))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form),
        ),
    ];
    for (name, (field, code), request) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 413, "{name}");
        assert!(nosniff(response.headers()), "{name}");
        // Duplicati's route says why in X-Reason, as for its other errors.
        assert_eq!(response.headers().contains_key("x-reason"), field == "code", "{name}");
        assert_eq!(response.json::<Value>().await.unwrap()[field], code, "{name}");
    }
    // Chunked, without a length: counted as it arrives.
    let chunk = format!("2800\r\n{}\r\n", "x".repeat(10 * 1024));
    let chunked = format!(
        "POST /v1/token HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {authid}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {chunk}{chunk}0\r\n\r\n"
    );
    let answer = raw_exchange(addr, chunked.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("x-content-type-options: nosniff"), "{answer}");
}

#[tokio::test]
async fn metrics_listen_moves_metrics_off_the_main_listener() {
    let h = harness(fake_config(), "metrics_listen = \"127.0.0.1:0\"").await;
    let metrics = format!("http://{}", h.server.metrics_addr.expect("a metrics address"));
    assert_ne!(metrics, h.url);
    assert_eq!(h.get("/healthz").await.status(), 200);

    let hidden = h.get("/metrics").await;
    assert_eq!(hidden.status(), 404, "not on the main listener");
    assert!(nosniff(hidden.headers()));
    assert_eq!(hidden.json::<Value>().await.unwrap()["error"], "bad_request");

    let scraped = h.http.get(format!("{metrics}/metrics")).send().await.unwrap();
    assert_eq!(scraped.status(), 200);
    assert!(nosniff(scraped.headers()));
    let text = scraped.text().await.unwrap();
    assert!(text.contains("latchkey_http_requests_total{route=\"/healthz\",status=\"200\"} 1"), "{text}");
    for path in ["/healthz", "/", "/refresh"] {
        let other = h.http.get(format!("{metrics}{path}")).send().await.unwrap();
        assert_eq!(other.status(), 404, "{path} is not served on the metrics address");
    }

    // Without the key, the main listener serves them.
    let plain = harness(fake_config(), "").await;
    assert!(plain.server.metrics_addr.is_none());
    assert_eq!(plain.get("/metrics").await.status(), 200);
}

#[tokio::test]
async fn plain_http_off_loopback_is_warned_about_at_start() {
    for (public_url, exposed) in [
        ("http://broker.warn-me.example", true),
        ("http://192.0.2.7:8080", true),
        ("http://[2001:db8::1]", true),
        ("https://broker.example", false),
        ("http://127.0.0.1:8080", false),
        ("http://127.8.9.1", false),
        ("http://localhost:8080", false),
        ("http://[::1]:8080", false),
    ] {
        let config = Config::parse(&format!("public_url = \"{public_url}\"")).unwrap();
        assert_eq!(config.plain_http_exposed(), exposed, "{public_url}");
        assert_eq!(config.served_over_https(), public_url.starts_with("https"), "{public_url}");
    }
    let listen_anywhere = Config::parse("listen = \"0.0.0.0:8080\"").unwrap();
    assert!(listen_anywhere.plain_http_exposed(), "the default public_url of a broker listening everywhere");

    let h = harness(fake_config(), "public_url = \"http://broker.warn-me.example\"").await;
    assert_eq!(h.get("/healthz").await.status(), 200);
    let logs = logs();
    let warning = logs.lines().find(|l| l.contains("broker.warn-me.example") && l.contains("plain http"));
    assert!(warning.is_some_and(|l| l.contains("WARN")), "a warning naming the public_url: {logs}");
    // A page served by such a broker still works (the cookie is not Secure).
    open_page(&h.http, &format!("{}/login?id=fake", h.url)).await;
}

#[test]
fn connection_settings_default_to_the_documented_values_and_refuse_zero() {
    let config = Config::parse("").unwrap();
    assert_eq!(config.connections.max_open, 10_000);
    assert_eq!(config.connections.header_timeout_secs, 10);
    assert_eq!(config.connections.body_timeout_secs, 30);
    assert_eq!(config.metrics_listen, None);
    let limits = latchkey_server::connections::Limits::new(&config.connections);
    assert_eq!(limits.header_timeout, Duration::from_secs(10));
    assert_eq!(limits.body_timeout, Duration::from_secs(30));
    for (text, key) in [
        ("[connections]\nmax_open = 0", "connections.max_open"),
        ("[connections]\nheader_timeout_secs = 0", "connections.header_timeout_secs"),
        ("[connections]\nbody_timeout_secs = 0", "connections.body_timeout_secs"),
        ("[connections]\nbody_timeout = 5", "body_timeout"),
        ("listen = \"127.0.0.1:9000\"\nmetrics_listen = \"127.0.0.1:9000\"", "metrics_listen"),
        ("metrics_listen = \"nowhere\"", "metrics_listen"),
    ] {
        let message = Config::parse(text).err().unwrap_or_else(|| panic!("{text:?} should be refused")).to_string();
        assert!(message.contains(key), "{text:?}: {message}");
    }
    let env = [("LATCHKEY_CONNECTIONS__MAX_OPEN".to_owned(), "50".to_owned())];
    assert_eq!(Config::load(None, env).unwrap().connections.max_open, 50);
}
