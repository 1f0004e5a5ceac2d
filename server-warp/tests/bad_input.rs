// Bad input of every kind gets the right status, JSON, X-Reason and Retry-After.

use std::sync::Arc;

use latchkey_testkit::{FakeConfig, Fault};
use reqwest::Method;
use serde_json::Value;

use crate::support::{click_to_provider, fake_config, harness, harness_on, mint_handle, refresh, v1_token};

struct Case {
    name: &'static str,
    method: Method,
    path: String,
    authid_header: Option<String>,
    body: Option<String>,
    status: u16,
    code: &'static str,
    reason_contains: &'static str,
}

#[tokio::test]
async fn bad_requests_get_exact_statuses_and_reasons() {
    let h = harness(fake_config(), "").await;
    let authid = h.login().await;
    let (keyid, secret) = authid.split_once(':').unwrap();
    let mut wrong = secret.to_owned();
    wrong.replace_range(0..1, if secret.starts_with('A') { "B" } else { "A" });
    let revoked = {
        let extra = mint_handle(&h.http, &h.url, &authid).await;
        let id = extra["authid"].as_str().unwrap().to_owned();
        h.http
            .delete(format!("{}/v1/handles/{}", h.url, id.split(':').next().unwrap()))
            .bearer_auth(&authid)
            .send()
            .await
            .unwrap();
        id
    };
    let refresh = |name, header: Option<String>, status, code, reason| Case {
        name,
        method: Method::GET,
        path: "/refresh".into(),
        authid_header: header,
        body: None,
        status,
        code,
        reason_contains: reason,
    };
    let cases = vec![
        refresh("no AuthID", None, 401, "authid_invalid", "no AuthID was given"),
        refresh("no separator", Some("ya29.raw-access-token".into()), 401, "authid_invalid", "no ':' separator"),
        refresh("malformed keyid", Some(format!("{keyid}x:{secret}")), 401, "authid_invalid", "key id"),
        refresh("v2 token", Some("v2:abc".into()), 401, "authid_invalid", "issued by another OAuth service"),
        refresh("wrong secret", Some(format!("{keyid}:{wrong}")), 401, "authid_invalid", "not known to this broker"),
        refresh("revoked", Some(revoked.clone()), 401, "authid_revoked", "revoked"),
        Case {
            name: "oversized body",
            method: Method::POST,
            path: "/refresh".into(),
            authid_header: None,
            body: Some(format!("authid={}", "x".repeat(20_000))),
            status: 413,
            code: "bad_request",
            reason_contains: "larger than 16 KiB",
        },
        Case {
            name: "oversized body on /v1/token",
            method: Method::POST,
            path: "/v1/token".into(),
            authid_header: None,
            body: Some(format!("authid={}", "x".repeat(20_000))),
            status: 413,
            code: "bad_request",
            reason_contains: "",
        },
        Case {
            name: "oversized body on /oauth2/token",
            method: Method::POST,
            path: "/oauth2/token".into(),
            authid_header: None,
            body: Some(format!("grant_type=refresh_token&refresh_token={}", "x".repeat(20_000))),
            status: 413,
            code: "invalid_request",
            reason_contains: "",
        },
        Case {
            name: "unknown route",
            method: Method::GET,
            path: "/nope".into(),
            authid_header: None,
            body: None,
            status: 404,
            code: "bad_request",
            reason_contains: "",
        },
    ];
    for case in cases {
        let mut request = h.http.request(case.method.clone(), format!("{}{}", h.url, case.path));
        if let Some(header) = &case.authid_header {
            request = request.header("X-AuthID", header);
        }
        if let Some(body) = &case.body {
            request = request.header("content-type", "application/x-www-form-urlencoded").body(body.clone());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), case.status, "{}", case.name);
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/json"), "{}", case.name);
        let reason = response.headers().get("x-reason").map(|v| v.to_str().unwrap().to_owned());
        let body: Value = response.json().await.unwrap_or_else(|_| panic!("{}: JSON body", case.name));
        let code = body.get("code").or_else(|| body.get("error")).and_then(Value::as_str).unwrap_or_default();
        assert_eq!(code, case.code, "{}: {body}", case.name);
        if !case.reason_contains.is_empty() {
            let reason = reason.unwrap_or_else(|| panic!("{}: X-Reason", case.name));
            assert!(reason.contains(case.reason_contains), "{}: {reason}", case.name);
        }
    }
    // %3A for ':' is accepted.
    let encoded = h.get(&format!("/refresh?authid={keyid}%3A{secret}")).await;
    assert_eq!(encoded.status(), 200);
    // The same failures on the other surfaces.
    let v1 = h.http.post(format!("{}/v1/token", h.url)).bearer_auth(format!("{keyid}:{wrong}")).send().await.unwrap();
    assert_eq!(v1.status(), 401);
    assert_eq!(v1.json::<Value>().await.unwrap()["error"], "authid_invalid");
    let missing = h.http.post(format!("{}/v1/token", h.url)).send().await.unwrap();
    assert!(missing.json::<Value>().await.unwrap()["error_description"].as_str().unwrap().contains("Bearer"));
    let oauth = h
        .http
        .post(format!("{}/oauth2/token", h.url))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", revoked.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(oauth.status(), 400);
    assert_eq!(oauth.json::<Value>().await.unwrap()["error"], "invalid_grant");
    // A device poll without its field is told that, not about a hand-off
    // token it never sent; an unknown code is still invalid_grant.
    let (status, misnamed) = crate::support::device_token(&h.http, &h.url, "").await;
    assert_eq!((status.as_u16(), misnamed["error"].as_str()), (400, Some("bad_request")));
    assert_eq!(misnamed["error_description"], "device_code is missing");
    let posted = h.http.post(format!("{}/v1/device/token", h.url)).form(&[("code", "ABCD")]).send().await.unwrap();
    assert_eq!(posted.json::<Value>().await.unwrap()["error_description"], "device_code is missing");
    let (status, unknown) = crate::support::device_token(&h.http, &h.url, "an-unknown-device-code-0123456789").await;
    assert_eq!((status.as_u16(), unknown["error"].as_str()), (400, Some("invalid_grant")));
}

#[tokio::test]
async fn login_errors_have_clear_pages() {
    let h = harness(fake_config(), "").await;
    let unknown = h.get("/login?id=nope").await;
    assert_eq!(unknown.status(), 404);
    assert!(unknown.text().await.unwrap().contains("does not offer that service"));
    // Replayed state: complete a login, then present its callback again.
    let (to_provider, cookie) = click_to_provider(&h.http, &h.url, "/login?id=fake").await;
    let back = h.http.get(&to_provider).send().await.unwrap();
    let callback = back.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(h.http.get(&callback).header("Cookie", &cookie).send().await.unwrap().status(), 200);
    let replay = h.http.get(&callback).header("Cookie", &cookie).send().await.unwrap();
    assert_eq!(replay.status(), 400);
    assert!(replay.text().await.unwrap().contains("already completed"));
    // A provider error on the code exchange.
    let (to_provider, cookie) = click_to_provider(&h.http, &h.url, "/login?id=fake").await;
    let back = h.http.get(&to_provider).send().await.unwrap();
    h.fake.inject(Fault::ServerError);
    let callback = back.headers()["location"].to_str().unwrap();
    let failed = h.http.get(callback).header("Cookie", &cookie).send().await.unwrap();
    assert_eq!(failed.status(), 502);
    let html = failed.text().await.unwrap();
    assert!(
        html.contains("provider is unavailable") && !html.contains("500 oops"),
        "never the provider's body: {html}"
    );
}

#[tokio::test]
async fn a_provider_that_is_down_gets_provider_unavailable_with_retry_after() {
    // Tokens that expire at once, so every request needs the provider.
    let h = harness(FakeConfig { access_lifetime: Some(std::time::Duration::ZERO), ..fake_config() }, "").await;
    let authid = h.login().await;
    // The first try and both retries fail.
    let sent = h.fake.token_requests().len() as u64;
    for n in 1..=3 {
        h.fake.inject_at(sent + n, Fault::ServerError);
    }
    let response = refresh(&h.http, &h.url, &authid).await;
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["retry-after"], "30");
    assert!(response.headers()["x-reason"].to_str().unwrap().contains("provider is unavailable"));
    h.fake.inject(Fault::RateLimited { retry_after_secs: 120 });
    let v1 = v1_token(&h.http, &h.url, &authid).await;
    assert_eq!(v1.status(), 503);
    assert_eq!(v1.headers()["retry-after"], "120");
    assert_eq!(v1.json::<Value>().await.unwrap()["error"], "provider_unavailable");
    let ok = refresh(&h.http, &h.url, &authid).await;
    assert_eq!(ok.status(), 200, "the provider is back");
}

#[tokio::test]
async fn rate_limits_answer_503_to_duplicati_and_429_elsewhere() {
    let store = Arc::new(latchkey_core::MemoryStore::new());
    let h = harness_on(fake_config(), "[limits]\ntoken_requests_per_minute_per_keyid = 2", store).await;
    let authid = h.login().await;
    for _ in 0..2 {
        assert_eq!(refresh(&h.http, &h.url, &authid).await.status(), 200);
    }
    let limited = refresh(&h.http, &h.url, &authid).await;
    assert_eq!(limited.status(), 503);
    assert_eq!(limited.headers()["retry-after"], "30");
    assert!(limited.headers()["x-reason"].to_str().unwrap().contains("too many requests"));
    let v1 = v1_token(&h.http, &h.url, &authid).await;
    assert_eq!(v1.status(), 429);
    let oauth = h
        .http
        .post(format!("{}/oauth2/token", h.url))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", authid.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(oauth.status(), 429);
}
