// What real Duplicati clients send and expect: the classic web UI's JSONP
// hand-off polls, the new web UI's `/refresh?type=` popup, AuthIDs of other
// OAuth services, and `expires` as a 32-bit integer.

use std::time::Duration;

use reqwest::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use serde_json::Value;

use crate::support::{fake_config, harness, refresh};

/// The JSON inside a JSONP answer `<callback>(<json>);`.
fn jsonp_body(text: &str, callback: &str) -> Value {
    let inner = text.strip_prefix(&format!("{callback}(")).and_then(|t| t.strip_suffix(");"));
    serde_json::from_str(inner.unwrap_or_else(|| panic!("not a call of {callback}: {text}"))).unwrap()
}

#[tokio::test]
async fn the_handoff_answers_jsonp_for_every_outcome() {
    let h = harness(fake_config(), "").await;
    let token = "classic-ui-handoff-token-01";
    let callback = "angular.callbacks._0";
    let poll = |path: String| {
        let h = &h;
        async move {
            let response = h.get(&path).await;
            assert_eq!(response.status(), 200, "{path}: JSONP is always 200");
            assert_eq!(response.headers()[CONTENT_TYPE], "application/javascript; charset=utf-8");
            assert_eq!(response.headers()["x-content-type-options"], "nosniff");
            assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
            response.text().await.unwrap()
        }
    };
    assert_eq!(h.get(&format!("/?type=fake&token={token}")).await.status(), 200);
    let wait = poll(format!("/fetch?callback={callback}&token={token}")).await;
    assert_eq!(jsonp_body(&wait, callback), serde_json::json!({ "wait": "Not ready" }));
    let state = poll(format!("/token-state?jsonp={callback}&token={token}")).await;
    assert_eq!(jsonp_body(&state, callback)["wait"], "Not ready");
    let authid = crate::support::authid_from_page(&h.browser_login("fake", Some(token)).await);
    let state = poll(format!("/token-state?callback={callback}&token={token}")).await;
    assert_eq!(jsonp_body(&state, callback)["success"], true);
    let ready = poll(format!("/fetch?callback={callback}&token={token}")).await;
    assert_eq!(jsonp_body(&ready, callback)["authid"], authid.as_str());
    let gone = poll(format!("/fetch?callback={callback}&token={token}")).await;
    let gone = jsonp_body(&gone, callback);
    assert!(gone["error"].as_str().unwrap().contains("already fetched"), "{gone}");
    let short = poll("/fetch?callback=cb&token=short".to_owned()).await;
    assert!(jsonp_body(&short, "cb")["error"].as_str().unwrap().contains("too short"));
    // Plain JSON stays as it was.
    assert_eq!(h.get(&format!("/fetch?token={token}")).await.status(), 404);
}

#[tokio::test]
async fn a_callback_that_is_not_a_plain_name_is_refused_and_never_echoed() {
    let h = harness(fake_config(), "").await;
    let long = "a".repeat(200);
    for callback in ["alert(1)", "a]b", long.as_str(), "x;alert(1)//", "</script><script>", "a..b"] {
        for route in ["fetch", "token-state"] {
            let path = format!(
                "/{route}?callback={}&token=classic-ui-handoff-token-01",
                latchkey_server::http::pages::q(callback)
            );
            let response = h.get(&path).await;
            assert_eq!(response.status(), 400, "{path}");
            assert!(response.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("application/json"));
            let text = response.text().await.unwrap();
            assert!(!text.contains(callback), "{path}: the callback is not echoed: {text}");
        }
    }
}

#[tokio::test]
async fn the_new_web_ui_popup_at_refresh_with_a_type_goes_to_the_login() {
    let h = harness(fake_config(), "").await;
    let popup = h.get("/refresh?type=fake").await;
    assert_eq!(popup.status(), 302);
    assert_eq!(popup.headers()[LOCATION], "/?type=fake");
    let without = h.get("/refresh").await;
    assert_eq!(without.status(), 401, "no AuthID and no type: the JSON error stays");
    let body: Value = without.json().await.unwrap();
    assert_eq!(body["code"], "authid_invalid");
    let posted = h.http.post(format!("{}/refresh?type=fake", h.url)).send().await.unwrap();
    assert_eq!(posted.status(), 401, "a POST is a client, not a popup");
    let authid = h.login().await;
    let with = h.http.get(format!("{}/refresh?type=fake", h.url)).header("X-AuthID", &authid).send().await.unwrap();
    assert_eq!(with.status(), 200, "an AuthID wins over the type");
}

#[tokio::test]
async fn authids_of_other_oauth_services_are_told_to_log_in_here() {
    let h = harness(fake_config(), "").await;
    for authid in [
        "0f1e2d3c4b5a69788796a5b4c3d2e1f0:c2VjcmV0LXZhbHVlLWZyb20tdGhlLWhvc3RlZC1zZXJ2aWNl",
        "v2:eyJhbGciOiJIUzI1NiJ9.payload.signature",
    ] {
        let response = refresh(&h.http, &h.url, authid).await;
        assert_eq!(response.status(), 401, "{authid}");
        let reason = response.headers()["x-reason"].to_str().unwrap().to_owned();
        assert!(reason.contains("issued by another OAuth service"), "{reason}");
        assert!(reason.contains(&format!("log in again at {}/", h.url)), "names the login link: {reason}");
        assert!(!reason.contains("malformed"), "{reason}");
        let secret = authid.split(':').nth(1).unwrap();
        assert!(!reason.contains(secret), "never echoes the AuthID");
    }
    let ours_broken = refresh(&h.http, &h.url, "abc:def").await;
    assert!(ours_broken.headers()["x-reason"].to_str().unwrap().contains("malformed"));
}

#[tokio::test]
async fn expires_fits_duplicatis_32_bit_integer() {
    let fake =
        latchkey_testkit::FakeConfig { access_lifetime: Some(Duration::from_secs(1_000_000_000_000)), ..fake_config() };
    let h = harness(fake, "").await;
    let authid = h.login().await;
    let body: Value = refresh(&h.http, &h.url, &authid).await.json().await.unwrap();
    assert_eq!(body["expires"].as_u64(), Some(i32::MAX as u64), "{body}");
}

#[tokio::test]
async fn a_pcloud_shaped_service_hands_out_the_access_token_and_keeps_nothing() {
    use latchkey_core::RecordKind;
    let fake = latchkey_testkit::FakeConfig {
        issue_refresh_tokens: false,
        access_lifetime: None,
        extra_callback_params: vec![("hostname".into(), "localhost".into())],
        ..fake_config()
    };
    let extra = r#"
        [providers.cloudish]
        authorize_url = "{fake_authorize}"
        token_url = "{fake_token}"
        client_auth = "basic"
        client_id = "latchkey-test"
        client_secrets = ["fake-client-secret-value"]
        pkce = false
        access_tokens_expire = false
        api_host_param = "hostname"
        api_hosts = ["localhost"]
        handout = "access_token"
        [services.cloudish]
        provider = "cloudish"
        display_name = "Cloudish"
    "#;
    let store = std::sync::Arc::new(latchkey_core::MemoryStore::new());
    let h = crate::support::harness_on(fake, extra, store.clone()).await;
    let kept = |kind| store.count(kind);
    let before = (kept(RecordKind::Grant), kept(RecordKind::Handle));
    let token = "pcloud-handoff-token-0123";
    let page = h.browser_login("cloudish", Some(token)).await;
    assert!(page.contains("Your access token for Cloudish") && page.contains("the token itself"), "{page}");
    assert!(page.contains("keeps nothing"), "{page}");
    assert!(page.contains("<code id=api-host>localhost</code>"), "the API host the callback named: {page}");
    let access = crate::support::authid_from_page(&page);
    assert!(h.fake.is_active(&access), "the provider's own access token");
    assert!(!access.contains(':'), "not an AuthID");
    let request = h.fake.token_requests().pop().unwrap();
    assert_eq!(request.form("grant_type"), Some("authorization_code"));
    assert_eq!((kept(RecordKind::Grant), kept(RecordKind::Handle)), before, "no grant, no handle");
    // The waiting program receives the token where it expects an AuthID.
    let fetched: Value = h.get(&format!("/fetch?token={token}")).await.json().await.unwrap();
    assert_eq!(fetched["authid"], access.as_str());
    assert!(crate::support::logs().contains("event=\"access_token_handed_out\""));
    let device = crate::support::device_code(&h.http, &h.url, "cloudish").await;
    assert!(device["error_description"].as_str().unwrap().contains("login page"), "{device}");
}
