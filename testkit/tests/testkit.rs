//! The fake provider behaves like a real authorization server, and misbehaves on command.

mod oidc;

use std::time::Duration;

use latchkey_testkit::{ClientAuth, FakeConfig, FakeProvider, Fault};
use serde_json::Value;

fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

async fn post(url: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let response = client().post(url).form(form).send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

/// Authorizes and exchanges the code: the tokens of a new grant.
async fn login(fake: &FakeProvider, scope: &str) -> Value {
    let verifier = "a-verifier-of-sufficient-length-0123456789abcdef";
    let challenge = {
        use base64::Engine;
        use sha2::Digest;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier))
    };
    let url = format!(
        "{}?response_type=code&client_id=latchkey-test&redirect_uri=http%3A%2F%2Flocalhost%2Fcb&state=xyz&scope={}&code_challenge={challenge}&code_challenge_method=S256",
        fake.authorize_url(),
        scope.replace(' ', "+"),
    );
    let response = client().get(&url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 302);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("http://localhost/cb?"), "{location}");
    let query: Vec<(String, String)> =
        form_urlencoded::parse(location.split_once('?').unwrap().1.as_bytes()).into_owned().collect();
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("state").as_deref(), Some("xyz"));
    let code = get("code").expect("a code");
    let (status, body) = post(
        &fake.token_url(),
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "http://localhost/cb"),
            ("code_verifier", verifier),
            ("client_id", "latchkey-test"),
            ("client_secret", "test-secret"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn refresh(fake: &FakeProvider, token: &str) -> (u16, Value) {
    post(
        &fake.token_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", token),
            ("client_id", "latchkey-test"),
            ("client_secret", "test-secret"),
        ],
    )
    .await
}

fn text(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_else(|| panic!("{k} missing in {v}")).to_owned()
}

#[tokio::test]
async fn a_login_yields_tokens_and_an_id_token_for_openid() {
    let fake = FakeProvider::start(FakeConfig { issuer: Some("https://fake.test".into()), ..FakeConfig::default() })
        .await
        .unwrap();
    let tokens = login(&fake, "openid offline_access").await;
    assert_eq!(tokens["expires_in"], 3600);
    assert!(fake.is_active(&text(&tokens, "refresh_token")));
    let id_token = text(&tokens, "id_token");
    assert_eq!(id_token.split('.').count(), 3);
    let authorize = &fake.requests()[0];
    assert_eq!(authorize.query("state"), Some("xyz"));
}

#[tokio::test]
async fn rotation_and_strict_reuse_detection_revoke_the_whole_grant() {
    let fake =
        FakeProvider::start(FakeConfig { rotate: true, strict_reuse: true, ..FakeConfig::default() }).await.unwrap();
    let first = text(&login(&fake, "files").await, "refresh_token");
    let (status, body) = refresh(&fake, &first).await;
    assert_eq!(status, 200);
    let second = text(&body, "refresh_token");
    assert_ne!(first, second);
    assert!(!fake.is_active(&first) && fake.is_active(&second));
    let (status, body) = refresh(&fake, &first).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")));
    assert_eq!(fake.reuse_attempts(), 1);
    assert!(!fake.is_active(&second), "reuse revoked the grant");
    assert_eq!(fake.refreshes(), 1);
}

#[tokio::test]
async fn without_rotation_no_refresh_token_is_returned() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let token = text(&login(&fake, "files").await, "refresh_token");
    let (status, body) = refresh(&fake, &token).await;
    assert_eq!(status, 200);
    assert!(body.get("refresh_token").is_none());
    assert!(fake.is_active(&token));
}

#[tokio::test]
async fn faults_are_injected_per_request() {
    let fake = FakeProvider::start(FakeConfig { rotate: true, ..FakeConfig::default() }).await.unwrap();
    let token = text(&login(&fake, "files").await, "refresh_token");
    fake.inject(Fault::ServerError);
    assert_eq!(refresh(&fake, &token).await.0, 500);
    fake.inject(Fault::RateLimited { retry_after_secs: 7 });
    let response = client()
        .post(fake.token_url())
        .form(&[("grant_type", "refresh_token"), ("refresh_token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    fake.inject(Fault::Malformed);
    let (status, body) = refresh(&fake, &token).await;
    assert_eq!(status, 200);
    assert!(body.is_string(), "not JSON: {body}");
    fake.inject(Fault::InvalidGrant);
    assert_eq!(refresh(&fake, &token).await.0, 400);
    assert!(fake.is_active(&token), "none of these touched the grant");

    fake.inject(Fault::DropAfterCommit);
    let dropped = client()
        .post(fake.token_url())
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", token.as_str()),
            ("client_id", "latchkey-test"),
            ("client_secret", "test-secret"),
        ])
        .send()
        .await;
    assert!(dropped.is_err(), "the connection was dropped");
    assert!(!fake.is_active(&token), "but the rotation was committed");

    fake.inject(Fault::Hang);
    let hung = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap()
        .post(fake.token_url())
        .form(&[("grant_type", "refresh_token")])
        .send()
        .await;
    assert!(hung.unwrap_err().is_timeout());
    fake.inject_at(fake.token_requests().len() as u64 + 2, Fault::ServerError);
    assert_eq!(refresh(&fake, "unknown").await.0, 400);
    assert_eq!(refresh(&fake, "unknown").await.0, 500, "the n-th request");
}

#[tokio::test]
async fn client_authentication_is_checked_as_configured() {
    let fake = FakeProvider::start(FakeConfig {
        client_id: "id with space".into(),
        client_secrets: vec!["s:e/c+r%t".into()],
        client_auth: ClientAuth::Basic,
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let basic = |id: &str, secret: &str| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", encode(id), encode(secret)))
        )
    };
    let attempt = |auth: Option<String>, form: Vec<(&'static str, &'static str)>| {
        let url = fake.token_url();
        async move {
            let mut req = client().post(url).form(&[vec![("grant_type", "password")], form].concat());
            if let Some(auth) = auth {
                req = req.header("authorization", auth);
            }
            let response = req.send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, body["error"].as_str().map(str::to_owned))
        }
    };
    // Right credentials: passes client auth, fails the (empty) password grant.
    assert_eq!(attempt(Some(basic("id with space", "s:e/c+r%t")), vec![]).await, (400, Some("invalid_grant".into())));
    let invalid = (401, Some("invalid_client".to_owned()));
    assert_eq!(attempt(Some(basic("id with space", "wrong")), vec![]).await, invalid);
    assert_eq!(
        attempt(None, vec![("client_id", "id with space"), ("client_secret", "s:e/c+r%t")]).await,
        invalid,
        "post is not allowed here"
    );
    assert_eq!(attempt(None, vec![]).await, invalid);
}

#[tokio::test]
async fn revocation_introspection_and_device_flow() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let tokens = login(&fake, "files").await;
    let (refresh_token, access) = (text(&tokens, "refresh_token"), text(&tokens, "access_token"));
    let (_, active) = post(&fake.introspection_url(), &[("token", &refresh_token)]).await;
    assert_eq!(active["active"], true);
    let (status, _) = post(
        &fake.revocation_url(),
        &[
            ("token", &refresh_token),
            ("token_type_hint", "refresh_token"),
            ("client_id", "latchkey-test"),
            ("client_secret", "test-secret"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert!(!fake.is_active(&refresh_token) && !fake.is_active(&access));
    let (_, active) = post(&fake.introspection_url(), &[("token", &refresh_token)]).await;
    assert_eq!(active["active"], false);

    let other = login(&fake, "files").await;
    let response = client()
        .post(fake.bearer_revocation_url())
        .header("authorization", format!("Bearer {}", text(&other, "access_token")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(!fake.is_active(&text(&other, "refresh_token")));

    let (_, device) =
        post(&fake.device_authorization_url(), &[("client_id", "latchkey-test"), ("scope", "files")]).await;
    let device_code = text(&device, "device_code");
    let poll = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
        ("device_code", device_code.as_str()),
        ("client_id", "latchkey-test"),
        ("client_secret", "test-secret"),
    ];
    let (status, body) = post(&fake.token_url(), &poll).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("authorization_pending")));
    assert!(fake.approve_device(&text(&device, "user_code")));
    let (status, body) = post(&fake.token_url(), &poll).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(post(&fake.token_url(), &poll).await.0, 400, "a device code is used once");
}

#[tokio::test]
async fn the_login_form_and_denial_redirect_back_with_the_decision() {
    let fake = FakeProvider::start(FakeConfig { auto_approve: false, ..FakeConfig::default() }).await.unwrap();
    let url = format!(
        "{}?response_type=code&client_id=latchkey-test&redirect_uri=http://x/cb&state=s1",
        fake.authorize_url()
    );
    let page = client().get(&url).send().await.unwrap().text().await.unwrap();
    let login = page.split("name=login value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let response = client()
        .post(format!("{}/authorize/decide", fake.base_url()))
        .form(&[("login", login.as_str()), ("decision", "deny")])
        .send()
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap();
    assert!(location.contains("error=access_denied") && location.contains("state=s1"), "{location}");
    fake.deny_logins(true);
    let response = client().get(&url).send().await.unwrap();
    assert!(response.headers()["location"].to_str().unwrap().contains("error=access_denied"));
}
