//! Interop with a real, certified authorization server: panva's oidc-provider
//! on loopback, with plain reqwest as the OAuth client.

use std::collections::BTreeSet;

use base64::Engine as _;
use latchkey_testkit::oidc::{ClientAuthMethod, OidcOptions, OidcProvider, pkce_challenge, query_param};
use serde_json::Value;

const REDIRECT: &str = "http://127.0.0.1:1/callback";
const VERIFIER: &str = "interop-verifier-0123456789-abcdefghijklmnopqrstuvwxyz";
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

fn options() -> OidcOptions {
    OidcOptions {
        client_id: "latchkey-interop".into(),
        client_secret: "interop-secret".into(),
        redirect_uris: vec![REDIRECT.into(), "http://localhost:1/other".into()],
        access_ttl_secs: 5,
        rotate_refresh_tokens: true,
        client_auth: ClientAuthMethod::Basic,
    }
}

async fn start(options: OidcOptions) -> OidcProvider {
    OidcProvider::start(options).await.expect("oidc-provider starts (run `npm ci --prefix interop/oidc`)")
}

/// How the OAuth client authenticates, done by hand here rather than by the testkit.
#[derive(Clone, Copy)]
enum Auth {
    /// RFC 6749 §2.3.1: form-urlencode id and secret, then Basic.
    Basic,
    /// The id and secret as they are, in Basic: wrong for secrets that need encoding.
    UnencodedBasic,
    /// In the form body.
    Post,
}

async fn post(url: &str, id: &str, secret: &str, auth: Auth, form: &[(&str, &str)]) -> (u16, Value) {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let basic = |pair: String| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair));
    let mut fields = form.to_vec();
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let mut request = client.post(url);
    match auth {
        Auth::Basic => request = request.header("authorization", basic(format!("{}:{}", encode(id), encode(secret)))),
        Auth::UnencodedBasic => request = request.header("authorization", basic(format!("{id}:{secret}"))),
        Auth::Post => fields.extend([("client_id", id), ("client_secret", secret)]),
    }
    let response = request.form(&fields).send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

/// A POST authenticated the way the provider's client is registered.
async fn client_post(p: &OidcProvider, url: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let o = p.options();
    let auth = match o.client_auth {
        ClientAuthMethod::Basic => Auth::Basic,
        ClientAuthMethod::Post => Auth::Post,
    };
    post(url, &o.client_id, &o.client_secret, auth, form).await
}

fn text(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_else(|| panic!("{k} missing in {v}")).to_owned()
}

fn scopes(v: &Value) -> BTreeSet<String> {
    text(v, "scope").split(' ').map(str::to_owned).collect()
}

fn set(words: &str) -> BTreeSet<String> {
    words.split(' ').map(str::to_owned).collect()
}

/// Logs `user` in for `scope`: the checked callback's code.
async fn authorize(p: &OidcProvider, scope: &str, user: &str) -> String {
    let url = p.authorization_url(scope, "state-1", &pkce_challenge(VERIFIER));
    let callback = p.login(&url, user).await.unwrap();
    assert!(callback.starts_with(&format!("{REDIRECT}?")), "{callback}");
    assert_eq!(query_param(&callback, "error"), None, "{callback}");
    assert_eq!(query_param(&callback, "state").as_deref(), Some("state-1"));
    assert_eq!(query_param(&callback, "iss").as_deref(), Some(p.issuer()), "RFC 9207 iss");
    query_param(&callback, "code").expect("a code")
}

async fn exchange(p: &OidcProvider, code: &str, verifier: &str) -> (u16, Value) {
    let form =
        [("grant_type", "authorization_code"), ("code", code), ("redirect_uri", REDIRECT), ("code_verifier", verifier)];
    client_post(p, p.token_endpoint(), &form).await
}

/// Logs in and exchanges the code: the token response.
async fn tokens(p: &OidcProvider, scope: &str, user: &str) -> Value {
    let code = authorize(p, scope, user).await;
    let (status, body) = exchange(p, &code, VERIFIER).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn refresh(p: &OidcProvider, token: &str) -> (u16, Value) {
    client_post(p, p.token_endpoint(), &[("grant_type", "refresh_token"), ("refresh_token", token)]).await
}

#[tokio::test]
async fn code_flow_with_pkce_yields_iss_and_a_refresh_token_for_offline_access_alone() {
    let p = start(options()).await;
    assert_eq!(p.metadata()["authorization_response_iss_parameter_supported"], true);
    assert_eq!(p.metadata()["code_challenge_methods_supported"], serde_json::json!(["S256"]));
    assert!(p.issuer().starts_with("http://127.0.0.1:"));

    let code = authorize(&p, "offline_access files", "alice").await;
    let (status, body) = exchange(&p, &code, VERIFIER).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 5, "the configured access token lifetime");
    assert_eq!(scopes(&body), set("offline_access files"));
    assert!(body.get("id_token").is_none(), "no openid, no id_token: {body}");
    let (access, refresh_token) = (text(&body, "access_token"), text(&body, "refresh_token"));
    let introspection = p.introspection(&access).await.unwrap();
    assert_eq!((introspection["active"].as_bool(), introspection["sub"].as_str()), (Some(true), Some("alice")));
    assert_eq!(introspection["client_id"], "latchkey-interop");
    assert!(p.introspect(&refresh_token).await.unwrap());

    let (status, body) = exchange(&p, &code, VERIFIER).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")), "a code is used once");

    let code = authorize(&p, "offline_access files", "alice").await;
    let (status, body) = exchange(&p, &code, "a-different-verifier-0123456789-abcdefghijklmnop").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")), "PKCE is checked");

    let with_openid = tokens(&p, "openid files", "bob").await;
    assert_eq!(text(&with_openid, "id_token").split('.').count(), 3);
    assert!(with_openid.get("refresh_token").is_none(), "no offline_access, no refresh token: {with_openid}");
}

#[tokio::test]
async fn pkce_is_required_and_consent_can_be_denied() {
    let p = start(options()).await;
    let no_pkce = format!(
        "{}?response_type=code&client_id=latchkey-interop&redirect_uri={}&scope=files&state=s2",
        p.authorization_endpoint(),
        form_urlencoded::byte_serialize(REDIRECT.as_bytes()).collect::<String>(),
    );
    let callback = p.login(&no_pkce, "alice").await.unwrap();
    assert_eq!(query_param(&callback, "error").as_deref(), Some("invalid_request"), "{callback}");
    assert_eq!(query_param(&callback, "state").as_deref(), Some("s2"));
    assert_eq!(query_param(&callback, "iss").as_deref(), Some(p.issuer()));

    let url = p.authorization_url("openid offline_access", "s3", &pkce_challenge(VERIFIER));
    let callback = p.login_and_deny(&url, "alice").await.unwrap();
    assert!(callback.starts_with(REDIRECT), "{callback}");
    assert_eq!(query_param(&callback, "error").as_deref(), Some("access_denied"), "{callback}");
    assert_eq!(query_param(&callback, "iss").as_deref(), Some(p.issuer()));
}

#[tokio::test]
async fn a_second_authorization_in_the_same_session_shows_no_pages_and_keeps_offline_access() {
    let p = start(options()).await;
    let browser = p.browser();
    let url = p.authorization_url("offline_access files", "s4", &pkce_challenge(VERIFIER));
    assert!(
        p.browser().authorize_without_interaction(&url).await.is_err(),
        "a browser without a session is asked to log in"
    );
    assert!(query_param(&browser.authorize(&url, "carol").await.unwrap(), "code").is_some());

    // The same session again: straight back with a code, and offline_access
    // still yields a refresh token without prompt=consent.
    let callback = browser.authorize_without_interaction(&url).await.unwrap();
    let (status, body) = exchange(&p, &query_param(&callback, "code").expect("a code"), VERIFIER).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(scopes(&body), set("offline_access files"));
    assert!(body.get("refresh_token").is_some(), "{body}");
    assert_eq!(p.introspection(&text(&body, "access_token")).await.unwrap()["sub"], "carol");

    // prompt=login asks for the login page again, and still keeps offline_access.
    let again = format!("{url}&prompt=login");
    assert!(browser.authorize_without_interaction(&again).await.is_err());
    let callback = browser.authorize(&again, "carol").await.unwrap();
    let (status, body) = exchange(&p, &query_param(&callback, "code").expect("a code"), VERIFIER).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("refresh_token").is_some(), "{body}");

    // A scope not yet granted in this session brings the consent page back.
    let more = p.authorization_url("openid offline_access files", "s5", &pkce_challenge(VERIFIER));
    let error = browser.authorize_without_interaction(&more).await.unwrap_err();
    assert!(error.to_string().contains("interaction"), "{error}");
}

#[tokio::test]
async fn reusing_a_rotated_out_refresh_token_revokes_the_grant() {
    let p = start(options()).await;
    let first = tokens(&p, "openid offline_access files", "alice").await;
    let rt1 = text(&first, "refresh_token");

    let (status, second) = refresh(&p, &rt1).await;
    assert_eq!(status, 200, "{second}");
    let (rt2, at2) = (text(&second, "refresh_token"), text(&second, "access_token"));
    assert_ne!(rt1, rt2, "rotated");
    assert_eq!(scopes(&second), set("openid offline_access files"));
    assert!(second.get("id_token").is_some());
    assert!(!p.introspect(&rt1).await.unwrap(), "the rotated-out token is no longer active");
    assert!(p.introspect(&rt2).await.unwrap() && p.introspect(&at2).await.unwrap());

    let (status, body) = refresh(&p, &rt1).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")), "{body}");
    assert!(!p.introspect(&rt2).await.unwrap(), "reuse revoked the newest refresh token too");
    assert!(!p.introspect(&at2).await.unwrap(), "and its access token");
    assert!(!p.introspect(&text(&first, "access_token")).await.unwrap());
    let (status, body) = refresh(&p, &rt2).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")), "{body}");
}

#[tokio::test]
async fn without_rotation_the_refresh_token_stays_the_same() {
    let p = start(OidcOptions { rotate_refresh_tokens: false, ..options() }).await;
    let rt = text(&tokens(&p, "offline_access files", "alice").await, "refresh_token");
    for _ in 0..2 {
        let (status, body) = refresh(&p, &rt).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["refresh_token"].as_str(), Some(rt.as_str()), "the same token is returned");
        assert!(p.introspect(&text(&body, "access_token")).await.unwrap());
    }
    assert!(p.introspect(&rt).await.unwrap());
}

#[tokio::test]
async fn revocation_deactivates_tokens() {
    let p = start(options()).await;
    let revoke = |token: String, hint: &'static str| {
        let p = &p;
        async move { client_post(p, p.revocation_endpoint(), &[("token", token.as_str()), ("token_type_hint", hint)]).await }
    };

    let body = tokens(&p, "offline_access files", "alice").await;
    let (access, rt) = (text(&body, "access_token"), text(&body, "refresh_token"));
    let (status, refreshed) = refresh(&p, &rt).await;
    assert_eq!(status, 200, "{refreshed}");
    let (rt2, at2) = (text(&refreshed, "refresh_token"), text(&refreshed, "access_token"));
    assert!(p.introspect(&rt2).await.unwrap());
    let (status, body) = revoke(rt2.clone(), "refresh_token").await;
    assert_eq!(status, 200, "{body}");
    assert!(!p.introspect(&rt2).await.unwrap(), "the revoked refresh token");
    assert!(!p.introspect(&at2).await.unwrap(), "revoking a refresh token revokes its grant");
    assert!(!p.introspect(&access).await.unwrap(), "all of it");
    let (status, body) = refresh(&p, &rt2).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")), "{body}");

    // oidc-provider also revokes the grant's refresh tokens when an access
    // token is revoked (RFC 7009 §2.1 allows it).
    let body = tokens(&p, "offline_access files", "bob").await;
    let (access, rt) = (text(&body, "access_token"), text(&body, "refresh_token"));
    assert!(p.introspect(&access).await.unwrap());
    assert_eq!(revoke(access.clone(), "access_token").await.0, 200);
    assert!(!p.introspect(&access).await.unwrap(), "the revoked access token");
    assert!(!p.introspect(&rt).await.unwrap(), "and the refresh token of its grant");

    assert_eq!(revoke("no-such-token".into(), "refresh_token").await.0, 200, "RFC 7009 §2.2");
    let (status, body) =
        post(p.revocation_endpoint(), "latchkey-interop", "wrong", Auth::Basic, &[("token", "x")]).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")));
}

#[tokio::test]
async fn the_device_flow_end_to_end() {
    let p = start(options()).await;
    let authorize_device = || async {
        let (status, device) =
            client_post(&p, p.device_authorization_endpoint(), &[("scope", "openid offline_access files")]).await;
        assert_eq!(status, 200, "{device}");
        assert_eq!(device["verification_uri"], p.device_verification_uri());
        assert!(text(&device, "verification_uri_complete").contains("user_code="));
        device
    };
    let poll = |device_code: String| {
        let p = &p;
        async move {
            let form = [("grant_type", DEVICE_GRANT), ("device_code", device_code.as_str())];
            client_post(p, p.token_endpoint(), &form).await
        }
    };

    let device = authorize_device().await;
    let device_code = text(&device, "device_code");
    let (status, body) = poll(device_code.clone()).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("authorization_pending")), "{body}");
    p.approve_device(&text(&device, "user_code"), "dana").await.unwrap();
    let (status, body) = poll(device_code.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(scopes(&body), set("openid offline_access files"));
    assert!(body.get("id_token").is_some());
    let introspection = p.introspection(&text(&body, "refresh_token")).await.unwrap();
    assert_eq!((introspection["active"].as_bool(), introspection["sub"].as_str()), (Some(true), Some("dana")));
    let (status, body) = poll(device_code).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")), "a device code is used once: {body}");

    let denied = authorize_device().await;
    p.deny_device(&text(&denied, "user_code")).await.unwrap();
    let (status, body) = poll(text(&denied, "device_code")).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("access_denied")), "{body}");
    assert!(p.approve_device("WRONG-CODE", "dana").await.is_err(), "an unknown user code is refused");
}

#[tokio::test]
async fn client_secret_basic_form_urlencodes_the_secret_and_the_method_is_enforced() {
    let secret = "s:e/c+r%t";
    let p = start(OidcOptions { client_secret: secret.into(), ..options() }).await;
    let id = "latchkey-interop";
    let code = authorize(&p, "offline_access files", "alice").await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", VERIFIER),
    ];
    let (status, body) = post(p.token_endpoint(), id, secret, Auth::UnencodedBasic, &form).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_request")), "an unencoded secret: {body}");
    let (status, body) = post(p.token_endpoint(), id, secret, Auth::Post, &form).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")), "post is not registered: {body}");
    let (status, body) = post(p.token_endpoint(), id, secret, Auth::Basic, &form).await;
    assert_eq!(status, 200, "{body}");
    assert!(p.introspect(&text(&body, "refresh_token")).await.unwrap());

    let p = start(OidcOptions { client_secret: secret.into(), client_auth: ClientAuthMethod::Post, ..options() }).await;
    assert_eq!(p.metadata()["issuer"], p.issuer());
    let code = authorize(&p, "offline_access", "alice").await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", VERIFIER),
    ];
    let (status, body) = post(p.token_endpoint(), id, secret, Auth::Basic, &form).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")), "basic is not registered: {body}");
    let (status, body) = post(p.token_endpoint(), id, secret, Auth::Post, &form).await;
    assert_eq!(status, 200, "{body}");
    assert!(p.introspect(&text(&body, "access_token")).await.unwrap(), "introspection authenticates by post");
}

#[tokio::test]
async fn bad_options_fail_clearly_and_the_server_dies_with_its_handle() {
    let error = OidcProvider::start(OidcOptions { redirect_uris: vec![], ..options() }).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    let p = start(options()).await;
    assert!(p.startup_duration() < latchkey_testkit::oidc::START_TIMEOUT);
    let pid = p.pid().expect("running");
    drop(p);
    // kill_on_drop: the process is gone (or a zombie being reaped) soon after.
    let status = std::path::PathBuf::from(format!("/proc/{pid}/status"));
    for _ in 0..100 {
        let state = std::fs::read_to_string(&status).unwrap_or_default();
        if state.is_empty() || state.contains("State:\tZ") {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("node {pid} still runs after the provider was dropped");
}
