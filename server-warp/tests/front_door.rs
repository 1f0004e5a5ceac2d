// The browser side of the front door over HTTP: no provider redirect on a
// GET, same-origin POSTs with the proof cookie, logins bound to their
// browser, one AuthID per hand-off, `iss` required, audit lines.

use std::sync::Arc;

use latchkey_core::{MemoryStore, RecordKind};
use reqwest::header::{LOCATION, SET_COOKIE};
use serde_json::Value;

use crate::support::{
    CLIENT_SECRET, authid_from_page, click_to_provider, fake_config, form_fields, harness, harness_on, logs,
    mint_handle, open_page, post_form, refresh,
};

#[tokio::test]
async fn a_login_link_opened_by_any_page_only_shows_a_confirmation() {
    let store = Arc::new(MemoryStore::new());
    let h = harness_on(fake_config(), "", store.clone()).await;
    let token = "victims-handoff-token-0123";
    for path in [format!("/login?id=fake&token={token}"), format!("/?redirect=fake&token={token}")] {
        let page = h.get(&path).await;
        assert_eq!(page.status(), 200, "{path}: a page, not a redirect");
        assert!(page.headers().get(LOCATION).is_none());
        let cookie = page.headers()[SET_COOKIE].to_str().unwrap().to_owned();
        assert!(cookie.starts_with("latchkey-login="), "{cookie}");
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax") && cookie.contains("Path=/"),
            "{cookie}"
        );
        let html = page.text().await.unwrap();
        assert!(html.contains("Log in to Fake storage") && html.contains("A program is waiting for this login"));
        assert!(html.contains("Continue only if you started this yourself"), "{html}");
    }
    assert!(h.fake.requests().is_empty(), "the provider saw nothing");
    assert_eq!(store.count(RecordKind::LoginTransaction), 0, "a GET begins no login");
    let fetched: Value = h.get(&format!("/fetch?token={token}")).await.json().await.unwrap();
    assert!(fetched.get("authid").is_none(), "{fetched}");
}

#[tokio::test]
async fn cross_site_forms_missing_cookies_and_replayed_proofs_get_403_and_create_nothing() {
    let store = Arc::new(MemoryStore::new());
    let h = harness_on(fake_config(), "", store.clone()).await;
    let page = open_page(&h.http, &format!("{}/login?id=fake", h.url)).await;
    let fields = form_fields(&page.html, "/login");
    let post = |cookie: Option<&str>, headers: &[(&str, &str)], fields: Vec<(String, String)>| {
        let mut request = h.http.post(format!("{}/login", h.url)).form(&fields);
        if let Some(cookie) = cookie {
            request = request.header("Cookie", cookie);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        async move { request.send().await.unwrap() }
    };
    let forged = "x".repeat(54);
    let mut forged_fields = fields.clone();
    forged_fields.retain(|(k, _)| k != "csrf");
    forged_fields.push(("csrf".into(), forged.clone()));
    let cases: Vec<(&str, reqwest::Response)> = vec![
        ("cross-site fetch", post(Some(&page.cookie), &[("Sec-Fetch-Site", "cross-site")], fields.clone()).await),
        ("same-site sibling", post(Some(&page.cookie), &[("Sec-Fetch-Site", "same-site")], fields.clone()).await),
        ("foreign origin", post(Some(&page.cookie), &[("Origin", "http://evil.example")], fields.clone()).await),
        ("null origin", post(Some(&page.cookie), &[("Origin", "null")], fields.clone()).await),
        ("no cookie", post(None, &[("Sec-Fetch-Site", "same-origin")], fields.clone()).await),
        ("form without the cookie's value", {
            let mut other = fields.clone();
            other.retain(|(k, _)| k != "csrf");
            post(Some(&page.cookie), &[], other).await
        }),
        ("a proof the broker never issued", post(Some(&format!("latchkey-login={forged}")), &[], forged_fields).await),
    ];
    for (name, response) in cases {
        assert_eq!(response.status(), 403, "{name}");
        assert!(response.headers().get(LOCATION).is_none(), "{name}");
        let html = response.text().await.unwrap();
        assert!(html.contains("Refused"), "{name}: {html}");
    }
    assert_eq!(store.count(RecordKind::LoginTransaction), 0, "refusals create nothing");
    assert!(h.fake.requests().is_empty());
    // Our own page's form goes on, once.
    let go = post_form(&h.http, &h.url, "/login", &fields, &page.cookie).await;
    assert_eq!(go.status(), 303);
    assert!(go.headers()[LOCATION].to_str().unwrap().starts_with(&h.fake.authorize_url()));
    let replay = post_form(&h.http, &h.url, "/login", &fields, &page.cookie).await;
    assert_eq!(replay.status(), 403, "a replayed proof");
    assert!(replay.text().await.unwrap().contains("already used"));
    assert_eq!(store.count(RecordKind::LoginTransaction), 1);
    // A reload after the proof was used gets a fresh one.
    let reloaded = h.http.get(format!("{}/login?id=fake", h.url)).header("Cookie", &page.cookie).send().await.unwrap();
    let fresh = crate::support::login_cookie(&reloaded).unwrap();
    assert_ne!(fresh, page.cookie);
    assert!(logs().contains("event=\"browser_refused\""), "refusals are audited");
}

#[tokio::test]
async fn a_broker_on_https_uses_a_host_prefixed_secure_cookie_and_checks_its_own_origin() {
    let h = harness(fake_config(), "public_url = \"https://broker.example\"").await;
    let page = h.get("/login?id=fake").await;
    let cookie = page.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("__Host-latchkey-login=") && cookie.ends_with("; Secure"), "{cookie}");
    let value = cookie.split(';').next().unwrap().to_owned();
    let fields = form_fields(&page.text().await.unwrap(), "/login");
    let from = |origin: &'static str| {
        let request = h.http.post(format!("{}/login", h.url)).header("Cookie", &value).header("Origin", origin);
        let fields = fields.clone();
        async move { request.form(&fields).send().await.unwrap().status() }
    };
    assert_eq!(from("http://broker.example").await, 403, "the same host over http is another origin");
    assert_eq!(from("https://broker.example").await, 303);
}

#[tokio::test]
async fn a_callback_replayed_into_another_browser_creates_nothing() {
    let store = Arc::new(MemoryStore::new());
    let h = harness_on(fake_config(), "", store.clone()).await;
    let (to_provider, cookie) = click_to_provider(&h.http, &h.url, "/login?id=fake").await;
    let back = h.http.get(&to_provider).send().await.unwrap();
    let callback = back.headers()[LOCATION].to_str().unwrap().to_owned();
    let elsewhere = open_page(&h.http, &format!("{}/", h.url)).await.cookie;
    for other in [None, Some(elsewhere.as_str())] {
        let mut request = h.http.get(&callback);
        if let Some(other) = other {
            request = request.header("Cookie", other);
        }
        let refused = request.send().await.unwrap();
        assert_eq!(refused.status(), 403, "{other:?}");
        assert!(refused.text().await.unwrap().contains("started in another browser"));
    }
    assert_eq!(store.count(RecordKind::Grant), 0, "nothing created");
    assert!(h.fake.token_requests().is_empty(), "the code was not even exchanged");
    let done = h.http.get(&callback).header("Cookie", &cookie).send().await.unwrap();
    assert_eq!(done.status(), 200, "the real browser still completes it");
}

#[tokio::test]
async fn a_handoff_takes_one_authid_and_short_tokens_are_refused() {
    let h = harness(fake_config(), "").await;
    let token = "victims-handoff-token-0123";
    let first = h.browser_login("fake", Some(token)).await;
    assert!(first.contains("will pick it up by itself"));
    let second = h.browser_login("fake", Some(token)).await;
    assert!(second.contains("had already received an AuthID"), "{second}");
    let fetched: Value = h.get(&format!("/fetch?token={token}")).await.json().await.unwrap();
    assert_eq!(fetched["authid"], authid_from_page(&first).as_str(), "the first delivery stands");
    assert!(logs().contains("event=\"handoff_refused\""));

    let short = h.get("/?type=fake&token=short-token").await;
    assert_eq!(short.status(), 400);
    assert!(short.text().await.unwrap().contains("too short (at least 16 characters)"));
    let fetch = h.get("/fetch?token=short-token").await;
    assert_eq!(fetch.status(), 400);
    assert!(fetch.headers()["x-reason"].to_str().unwrap().contains("too short"));
}

#[tokio::test]
async fn a_callback_without_iss_is_refused_where_the_provider_has_an_issuer() {
    let fake = latchkey_testkit::FakeConfig { issuer: Some("https://issuer.test".into()), ..fake_config() };
    let h = harness(fake, "").await;
    let authid = h.login().await;
    assert_eq!(refresh(&h.http, &h.url, &authid).await.status(), 200, "with iss: accepted");
    let (to_provider, cookie) = click_to_provider(&h.http, &h.url, "/login?id=fake").await;
    let back = h.http.get(&to_provider).send().await.unwrap();
    let callback = back.headers()[LOCATION].to_str().unwrap().to_owned();
    assert!(callback.contains("iss="), "{callback}");
    let stripped: String = {
        let (base, query) = callback.split_once('?').unwrap();
        let kept: Vec<&str> = query.split('&').filter(|p| !p.starts_with("iss=")).collect();
        format!("{base}?{}", kept.join("&"))
    };
    let refused = h.http.get(&stripped).header("Cookie", &cookie).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    assert!(refused.text().await.unwrap().contains("does not say which server issued it"));
}

#[tokio::test]
async fn security_events_are_audited_without_secrets() {
    let h = harness(fake_config(), "").await;
    let token = "audited-handoff-token-0123";
    let authid = authid_from_page(&h.browser_login("fake", Some(token)).await);
    let fetched: Value = h.get(&format!("/fetch?token={token}")).await.json().await.unwrap();
    assert_eq!(fetched["authid"], authid.as_str());
    let minted = mint_handle(&h.http, &h.url, &authid).await["authid"].as_str().unwrap().to_owned();
    let rotated = crate::support::bearer_post(&h.http, &h.url, "/v1/handles/rotate", &minted, None).await;
    let rotated = rotated["authid"].as_str().unwrap().to_owned();
    let keyid = authid.split(':').next().unwrap();
    // Failed secrets for a keyid nobody holds (failures charged to a real
    // owner's keyid would lock the owner out).
    let wrong = format!("{}Q:{}", "A".repeat(21), "A".repeat(43));
    for _ in 0..6 {
        assert_eq!(refresh(&h.http, &h.url, &wrong).await.status(), 401);
    }
    let revoked = h.http.post(format!("{}/revoked", h.url)).form(&[("authid", rotated.as_str())]).send().await.unwrap();
    assert_eq!(revoked.status(), 200);
    let report = h.http.post(format!("{}/v1/grant/revoke", h.url)).bearer_auth(&authid).send().await.unwrap();
    assert_eq!(report.status(), 200);

    let logs = logs();
    let audit: Vec<&str> = logs.lines().filter(|l| l.contains("latchkey::audit")).collect();
    for event in [
        "login_completed",
        "handoff_delivered",
        "authid_minted",
        "authid_rotated",
        "backoff_engaged",
        "authid_revoked",
        "grant_revoked",
    ] {
        // Under plain `cargo test` other tests' lines share the capture
        // (their clients are other addresses): this test's line is the one
        // from its own client.
        let found = audit.iter().any(|l| l.contains(&format!("event=\"{event}\"")) && l.contains("client=127.0.0.1"));
        assert!(found, "no {event} line with client=127.0.0.1 in {audit:#?}");
    }
    let login = audit.iter().find(|l| l.contains("login_completed") && l.contains(&format!("keyid={keyid}"))).unwrap();
    assert!(login.contains("grant_id=") && login.contains("service=\"fake\""), "{login}");
    for id in [&authid, &minted, &rotated] {
        let secret = id.split(':').nth(1).unwrap();
        assert!(!logs.contains(secret), "an AuthID secret reached the logs");
    }
    for secret in [token, CLIENT_SECRET] {
        assert!(!logs.contains(secret), "a secret reached the logs");
    }
    for request in h.fake.requests() {
        for (name, value) in request.query.iter().chain(&request.form) {
            if ["state", "code", "code_verifier", "refresh_token"].contains(&name.as_str()) {
                assert!(!logs.contains(value.as_str()), "{name} reached the logs");
            }
        }
    }
}

#[tokio::test]
async fn someone_who_knows_a_keyid_cannot_lock_its_owner_out() {
    // Requests arrive through a trusted proxy, so X-Forwarded-For names the client.
    let extra = "trusted_proxies = [\"127.0.0.1/32\"]\n[limits]\ntoken_requests_per_minute_per_keyid = 5";
    let h = harness(fake_config(), extra).await;
    let authid = h.login().await;
    let keyid = authid.split(':').next().unwrap();
    let wrong = format!("{keyid}:{}", "A".repeat(43));
    let from = |client: &'static str, authid: String| {
        let request =
            h.http.get(format!("{}/refresh", h.url)).header("X-AuthID", authid).header("X-Forwarded-For", client);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(from("203.0.113.7", wrong.clone()).await);
    }
    assert!(statuses[..6].iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&503), "the stranger backs off: {statuses:?}");
    // The owner, elsewhere, is not refused for the stranger's failures, and
    // their keyid's allowance was not spent by requests that were not theirs.
    for _ in 0..5 {
        assert_eq!(from("198.51.100.2", authid.clone()).await, 200);
    }
    assert_eq!(from("198.51.100.2", authid.clone()).await, 503, "the owner's own allowance still applies");
}
