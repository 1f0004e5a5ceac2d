// The /v1 API, the RFC 6749 facade driven by the oauth2 crate, the device
// flow and handle management over HTTP, and the operations endpoints.

use oauth2::basic::BasicClient;
use oauth2::{ClientId, RefreshToken, TokenResponse, TokenUrl};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{device_code, device_token, fake_config, harness, refresh, v1_token};

#[tokio::test]
async fn one_grant_through_v1_and_through_a_standard_oauth2_client() {
    let h = harness(fake_config(), "").await;
    let authid = h.login().await;
    let v1 = v1_token(&h.http, &h.url, &authid).await;
    assert_eq!(v1.status(), 200);
    assert_eq!(v1.headers()["cache-control"], "no-store");
    let v1: Value = v1.json().await.unwrap();
    assert_eq!(v1["token_type"], "Bearer");
    assert_eq!(v1["service"], "fake");
    assert_eq!(v1["scope"], "files offline_access");
    assert!(v1["expires_in"].as_u64().unwrap() > 3000);
    assert!(v1["expires_at"].as_u64().is_some());
    assert!(v1["refresh_deadline"].is_null(), "no idle lifetime configured for this provider");
    let access = v1["access_token"].as_str().unwrap().to_owned();

    // rclone, golang.org/x/oauth2, authlib: the AuthID is their refresh token.
    let client = BasicClient::new(ClientId::new("any-client".into()))
        .set_token_uri(TokenUrl::new(format!("{}/oauth2/token", h.url)).unwrap());
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let token = client
        .exchange_refresh_token(&RefreshToken::new(authid.clone()))
        .request_async(&http)
        .await
        .expect("the facade answers a standard token response");
    assert_eq!(token.access_token().secret(), &access, "the same grant, from the cache");
    assert_eq!(token.refresh_token().map(|r| r.secret().as_str()), Some(authid.as_str()), "the refresh token stays");
    assert!(token.expires_in().is_some());

    let bad = client.exchange_refresh_token(&RefreshToken::new("no-colon".into())).request_async(&http).await;
    match bad {
        Err(oauth2::RequestTokenError::ServerResponse(e)) => {
            assert_eq!(e.error(), &oauth2::basic::BasicErrorResponseType::InvalidGrant)
        }
        other => panic!("expected invalid_grant, got {other:?}"),
    }
    let unsupported = h
        .http
        .post(format!("{}/oauth2/token", h.url))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(unsupported.status(), 400);
    assert_eq!(unsupported.json::<Value>().await.unwrap()["error"], "unsupported_grant_type");
}

#[tokio::test]
async fn min_validity_asks_for_a_fresher_token() {
    let h = harness(
        latchkey_testkit::FakeConfig { access_lifetime: Some(std::time::Duration::from_secs(600)), ..fake_config() },
        "",
    )
    .await;
    let authid = h.login().await;
    let first: Value = v1_token(&h.http, &h.url, &authid).await.json().await.unwrap();
    // 600 s tokens: 300 s wanted by default is within half the lifetime: cached.
    let again: Value = v1_token(&h.http, &h.url, &authid).await.json().await.unwrap();
    assert_eq!(first["access_token"], again["access_token"]);
    assert_eq!(h.fake.refreshes(), 0);
    let bad = h
        .http
        .post(format!("{}/v1/token", h.url))
        .bearer_auth(&authid)
        .json(&json!({ "min_validity": "soon" }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.json::<Value>().await.unwrap()["error"], "bad_request");
}

#[tokio::test]
async fn handles_are_minted_listed_rotated_and_revoked_over_http() {
    let h = harness(fake_config(), "").await;
    let authid = h.login().await;
    let url = |p: &str| format!("{}{p}", h.url);
    let minted =
        h.http.post(url("/v1/handles")).bearer_auth(&authid).json(&json!({ "label": "nas" })).send().await.unwrap();
    assert_eq!(minted.status(), StatusCode::CREATED);
    let minted: Value = minted.json().await.unwrap();
    let second = minted["authid"].as_str().unwrap().to_owned();
    assert_eq!(minted["label"], "nas");
    let listed: Value = h.http.get(url("/v1/handles")).bearer_auth(&second).send().await.unwrap().json().await.unwrap();
    let handles = listed["handles"].as_array().unwrap();
    assert_eq!(handles.len(), 2);
    assert!(handles.iter().any(|x| x["label"] == "nas" && x["current"] == true));
    assert!(!listed.to_string().contains(second.split(':').nth(1).unwrap()), "no secrets in the listing");

    let rotated: Value =
        h.http.post(url("/v1/handles/rotate")).bearer_auth(&second).send().await.unwrap().json().await.unwrap();
    let third = rotated["authid"].as_str().unwrap().to_owned();
    let dead = v1_token(&h.http, &h.url, &second).await;
    assert_eq!(dead.status(), 401);
    assert_eq!(dead.json::<Value>().await.unwrap()["error"], "authid_revoked");
    assert_eq!(v1_token(&h.http, &h.url, &third).await.status(), 200);

    let keyid = authid.split(':').next().unwrap();
    let deleted = h.http.delete(url(&format!("/v1/handles/{keyid}"))).bearer_auth(&third).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(deleted.json::<Value>().await.unwrap()["grant_revoked"], false);
    assert_eq!(v1_token(&h.http, &h.url, &authid).await.status(), 401);

    let report: Value =
        h.http.post(url("/v1/grant/revoke")).bearer_auth(&third).send().await.unwrap().json().await.unwrap();
    assert_eq!(report["provider"], "revoked", "RFC 7009 at the fake provider: {report}");
    assert_eq!(v1_token(&h.http, &h.url, &third).await.status(), 401);
}

#[tokio::test]
async fn the_device_flow_end_to_end_over_http() {
    // No polling interval, so the test need not wait one out (slow_down is the engine's test).
    let store = std::sync::Arc::new(latchkey_core::MemoryStore::new());
    let h = crate::support::harness_tuned(fake_config(), "", store, |c| c.device_interval = std::time::Duration::ZERO)
        .await;
    let start = device_code(&h.http, &h.url, "fake").await;
    let code = start["device_code"].as_str().unwrap().to_owned();
    let user_code = start["user_code"].as_str().unwrap().to_owned();
    assert_eq!(start["verification_uri"], format!("{}/device", h.url));
    assert_eq!(start["interval"], 0);
    let poll = || device_token(&h.http, &h.url, &code);
    let (status, body) = poll().await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("authorization_pending")));
    // The user types the code on the device page and logs in.
    let page = crate::support::open_page(&h.http, &format!("{}/device?user_code={user_code}", h.url)).await;
    assert!(page.html.contains(&user_code));
    let mut fields = crate::support::form_fields(&page.html, "/device");
    fields.push(("user_code".into(), user_code.to_lowercase()));
    let shown = crate::support::post_form(&h.http, &h.url, "/device", &fields, &page.cookie).await;
    assert_eq!(shown.status(), 200);
    let shown = shown.text().await.unwrap();
    assert!(shown.contains("test program") && shown.contains("Fake storage"), "what asks is shown first: {shown}");
    assert!(h.fake.requests().is_empty(), "nothing went to the provider before the user continued");
    let go = crate::support::post_form(
        &h.http,
        &h.url,
        "/login",
        &crate::support::form_fields(&shown, "/login"),
        &page.cookie,
    )
    .await;
    assert_eq!(go.status(), 303);
    let done = h.follow(go.headers()["location"].to_str().unwrap().to_owned(), &page.cookie).await;
    assert_eq!(done.status(), 200);
    let shown = crate::support::authid_from_page(&done.text().await.unwrap());
    let (status, body) = poll().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["authid"], shown.as_str());
    let refresh = refresh(&h.http, &h.url, &shown).await;
    assert_eq!(refresh.status(), 200);
}

#[tokio::test]
async fn services_health_readiness_and_metrics() {
    let h = harness(fake_config(), "").await;
    let services: Value = h.get("/v1/services").await.json().await.unwrap();
    assert_eq!(
        services["services"],
        json!([{ "id": "fake", "display_name": "Fake storage", "login_url": format!("{}/?type=fake", h.url) }])
    );
    assert_eq!(h.get("/healthz").await.status(), 200);
    assert_eq!(h.get("/readyz").await.json::<Value>().await.unwrap()["status"], "ready");
    let authid = h.login().await;
    for _ in 0..2 {
        refresh(&h.http, &h.url, &authid).await;
    }
    let metrics = h.get("/metrics").await.text().await.unwrap();
    for line in [
        "latchkey_http_requests_total{route=\"/refresh\",status=\"200\"} 2",
        "latchkey_cache_hits_total 1",
        "latchkey_cache_misses_total 1",
        "# TYPE latchkey_provider_latency_seconds histogram",
        "# TYPE latchkey_refreshes_total counter",
        "# TYPE latchkey_rotation_mismatches_total counter",
        "latchkey_single_flight_joins_total 0",
        "latchkey_lease_waits_total 0",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    assert!(!metrics.contains(authid.split(':').nth(1).unwrap()));
}
