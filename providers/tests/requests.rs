// The requests each provider sends, checked against the fake provider's records.

use std::sync::Arc;
use std::time::Duration;

use latchkey_core::provider::{AuthorizationRequest, CodeExchange, Pkce, RefreshRequest, TokenKind};
use latchkey_core::{OsRandom, Provider, ProviderError};
use latchkey_providers::{BuildOptions, CatalogueConfig, build};
use latchkey_testkit::{ClientAuth, FakeConfig, FakeProvider, Fault};
use secrecy::{ExposeSecret, SecretString};

const REDIRECT: &str = "https://broker.example/logged-in";

/// The built-in entry for `provider`, pointed at the fake and given credentials.
fn client_for(fake: &FakeProvider, provider: &str, extra: &str) -> Arc<dyn Provider> {
    let over = CatalogueConfig::parse(&format!(
        r#"[providers.{provider}]
        authorize_url = "{}"
        token_url = "{}"
        client_id = "latchkey-test"
        client_secrets = ["test-secret"]
        {extra}"#,
        fake.authorize_url(),
        fake.token_url(),
    ))
    .unwrap();
    let config = CatalogueConfig::built_in().unwrap().with_overrides(&over);
    let options = BuildOptions { redirect_uri: REDIRECT.into(), default_timeout: Duration::from_secs(5) };
    let built = build(&config, &options).unwrap();
    built.catalogue.provider(provider).unwrap().client.clone()
}

fn secret(s: &str) -> SecretString {
    SecretString::from(s.to_owned())
}

/// Follows an authorization URL at the fake; answers the callback's query.
async fn authorize(url: &str) -> Vec<(String, String)> {
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let response = client.get(url).send().await.unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    form_urlencoded::parse(location.split_once('?').unwrap().1.as_bytes()).into_owned().collect()
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A whole login through `client`; answers the refresh token.
async fn login(
    client: &dyn Provider,
    scopes: &[String],
    extra: &[(String, String)],
) -> (String, Vec<(String, String)>) {
    let pkce = Pkce::generate(&OsRandom);
    let state = secret("state-123");
    let url = client
        .authorization_url(&AuthorizationRequest {
            redirect_uri: REDIRECT,
            state: &state,
            scopes,
            pkce_challenge: Some(&pkce.challenge),
            extra_params: extra,
        })
        .unwrap();
    let callback = authorize(&url).await;
    let code = secret(param(&callback, "code").unwrap());
    let tokens = client
        .exchange_code(&CodeExchange {
            code: &code,
            redirect_uri: REDIRECT,
            pkce_verifier: Some(&pkce.verifier),
            callback_params: &[],
        })
        .await
        .unwrap();
    (tokens.refresh_token.unwrap().expose_secret().to_owned(), tokens.extra)
}

/// Refreshes reuse the provider's connections: 20 in a row and three bursts
/// of 16 open a handful, where a client without a pool would open one per
/// refresh (68). Not exactly one: a request sent the moment the previous
/// answer ends can race that connection's return to the pool and open
/// another (seen in CI: one extra in 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_reuse_provider_connections() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let client = client_for(&fake, "google", "");
    let (refresh, _) = login(client.as_ref(), &["files".into()], &[]).await;
    let after_login = fake.connections();
    let refresh = secret(&refresh);
    let request = RefreshRequest { refresh_token: &refresh, scopes: &[], extra: &[] };
    for _ in 0..20 {
        client.refresh(&request).await.unwrap();
    }
    let in_a_row = fake.connections() - after_login;
    assert!(in_a_row <= 3, "20 refreshes in a row opened {in_a_row} connections: they are kept alive");
    let before_bursts = fake.connections();
    for _ in 0..3 {
        let mut burst = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (client, refresh) = (Arc::clone(&client), refresh.clone());
            burst.spawn(async move {
                client.refresh(&RefreshRequest { refresh_token: &refresh, scopes: &[], extra: &[] }).await.unwrap();
            });
        }
        burst.join_all().await;
    }
    let opened = fake.connections() - before_bursts;
    assert!(opened <= 24, "three bursts of 16 refreshes opened {opened} connections: the pool keeps them");
}

#[tokio::test]
async fn google_asks_for_offline_access_with_pkce_and_posts_credentials() {
    let fake =
        FakeProvider::start(FakeConfig { require_pkce: true, client_auth: ClientAuth::Post, ..FakeConfig::default() })
            .await
            .unwrap();
    let client = client_for(&fake, "google", "");
    let extra = vec![("access_type".to_owned(), "offline".to_owned()), ("prompt".to_owned(), "consent".to_owned())];
    let (refresh, _) = login(client.as_ref(), &["https://www.googleapis.com/auth/drive.file".into()], &extra).await;
    let authorize = &fake.requests()[0];
    for (k, v) in [
        ("response_type", "code"),
        ("client_id", "latchkey-test"),
        ("redirect_uri", REDIRECT),
        ("state", "state-123"),
        ("scope", "https://www.googleapis.com/auth/drive.file"),
        ("code_challenge_method", "S256"),
        ("access_type", "offline"),
        ("prompt", "consent"),
    ] {
        assert_eq!(authorize.query(k), Some(v), "{k}");
    }
    let exchange = &fake.token_requests()[0];
    assert_eq!(exchange.form("client_secret"), Some("test-secret"));
    assert!(exchange.authorization.is_none());
    assert!(exchange.form("code_verifier").is_some());
    assert!(exchange.form("state").is_none(), "state never goes to the token endpoint");
    let response =
        client.refresh(&RefreshRequest { refresh_token: &secret(&refresh), scopes: &[], extra: &[] }).await.unwrap();
    assert!(response.refresh_token.is_none(), "no rotation: the engine keeps the old refresh token");
}

#[tokio::test]
async fn dropbox_uses_basic_auth_and_sends_no_redirect_uri_on_refresh() {
    let fake = FakeProvider::start(FakeConfig {
        client_auth: ClientAuth::Basic,
        access_lifetime: None,
        extra_token_fields: vec![("account_id".into(), "dbid:abc".into())],
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let client = client_for(&fake, "dropbox", &format!("revocation_url = \"{}\"", fake.bearer_revocation_url()));
    let (refresh, _) = login(client.as_ref(), &[], &[("token_access_type".into(), "offline".into())]).await;
    assert_eq!(fake.requests()[0].query("token_access_type"), Some("offline"));
    let refreshed =
        client.refresh(&RefreshRequest { refresh_token: &secret(&refresh), scopes: &[], extra: &[] }).await.unwrap();
    assert_eq!(refreshed.expires_in, Some(Duration::from_secs(14_400)), "Dropbox's 4 h default from the catalogue");
    assert_eq!(refreshed.account_id.as_deref(), Some("dbid:abc"));
    let request = fake.token_requests().pop().unwrap();
    assert_eq!(request.form("grant_type"), Some("refresh_token"));
    assert!(request.form("redirect_uri").is_none() && request.form("state").is_none());
    assert!(request.form("client_secret").is_none(), "credentials go in the Basic header");
    assert!(request.authorization.as_deref().unwrap().starts_with("Basic "));
    // Revocation: refresh for an access token, then POST it as bearer.
    client.revoke(&secret(&refresh), TokenKind::Refresh).await.unwrap();
    let revoke = fake.requests().pop().unwrap();
    assert_eq!(revoke.path, "/2/auth/token/revoke");
    assert!(revoke.authorization.unwrap().starts_with("Bearer at."));
    assert!(!fake.is_active(&refresh));
}

#[tokio::test]
async fn microsoft_posts_credentials_rotates_and_has_no_revocation() {
    let fake = FakeProvider::start(FakeConfig { rotate: true, client_auth: ClientAuth::Post, ..FakeConfig::default() })
        .await
        .unwrap();
    let client = client_for(&fake, "microsoft", "");
    let (refresh, _) = login(client.as_ref(), &["offline_access".into(), "Files.ReadWrite".into()], &[]).await;
    let scope = fake.requests()[0].query("scope").map(str::to_owned);
    assert_eq!(scope.as_deref(), Some("offline_access Files.ReadWrite"), "space-separated scopes");
    let rotated =
        client.refresh(&RefreshRequest { refresh_token: &secret(&refresh), scopes: &[], extra: &[] }).await.unwrap();
    assert_ne!(rotated.refresh_token.unwrap().expose_secret(), refresh);
    assert!(matches!(client.revoke(&secret(&refresh), TokenKind::Refresh).await, Err(ProviderError::Unsupported(_))));
}

#[tokio::test]
async fn rfc7009_revocation_sends_the_hint_and_client_credentials() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let client = client_for(&fake, "box", &format!("revocation_url = \"{}\"", fake.revocation_url()));
    let (refresh, _) = login(client.as_ref(), &["root_readwrite".into()], &[]).await;
    client.revoke(&secret(&refresh), TokenKind::Refresh).await.unwrap();
    let revoke = fake.requests().pop().unwrap();
    assert_eq!(
        (revoke.path.as_str(), revoke.form("token"), revoke.form("token_type_hint")),
        ("/revoke", Some(refresh.as_str()), Some("refresh_token"))
    );
    assert_eq!(revoke.form("client_secret"), Some("test-secret"));
    assert!(!fake.is_active(&refresh));
}

#[tokio::test]
async fn pcloud_takes_its_api_host_from_the_callback_and_only_a_listed_one() {
    let fake =
        FakeProvider::start(FakeConfig { access_lifetime: None, issue_refresh_tokens: false, ..FakeConfig::default() })
            .await
            .unwrap();
    let client = client_for(&fake, "pcloud", r#"api_hosts = ["localhost"]"#);
    let url = client
        .authorization_url(&AuthorizationRequest {
            redirect_uri: REDIRECT,
            state: &secret("s"),
            scopes: &[],
            pkce_challenge: None,
            extra_params: &[],
        })
        .unwrap();
    let code = param(&authorize(&url).await, "code").unwrap().to_owned();
    let callback = vec![("hostname".to_owned(), "localhost".to_owned())];
    let tokens = client
        .exchange_code(&CodeExchange {
            code: &secret(&code),
            redirect_uri: REDIRECT,
            pkce_verifier: None,
            callback_params: &callback,
        })
        .await
        .unwrap();
    assert_eq!(tokens.expires_in, None, "pCloud tokens never expire");
    assert!(tokens.refresh_token.is_none());
    assert_eq!(tokens.extra, vec![("api_host".to_owned(), "localhost".to_owned())]);
    assert_eq!(fake.token_requests().len(), 1, "the exchange reached the named host (the fake, as localhost)");
    let evil = vec![("hostname".to_owned(), "attacker.example".to_owned())];
    let err = client
        .exchange_code(&CodeExchange {
            code: &secret("c"),
            redirect_uri: REDIRECT,
            pkce_verifier: None,
            callback_params: &evil,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Protocol { .. }), "{err:?}");
    assert_eq!(fake.token_requests().len(), 1, "nothing was sent to an unlisted host");
}

/// The built-in Jottacloud provider, its token endpoint at the fake.
fn jottacloud_at(fake: &FakeProvider) -> std::sync::Arc<dyn latchkey_core::Provider> {
    let over =
        CatalogueConfig::parse(&format!("[providers.jottacloud]\ntoken_url = \"{}\"", fake.token_url())).unwrap();
    let config = CatalogueConfig::built_in().unwrap().with_overrides(&over);
    let built =
        build(&config, &BuildOptions { redirect_uri: REDIRECT.into(), default_timeout: Duration::from_secs(5) })
            .unwrap();
    built.catalogue.provider("jottacloud").unwrap().client.clone()
}

#[tokio::test]
async fn jottacloud_trades_a_personal_login_token_by_password_grant_without_a_secret() {
    let fake = FakeProvider::start(FakeConfig {
        client_id: "jottacli".into(),
        client_secrets: vec![],
        rotate: true,
        password_logins: vec![("user@example.com".into(), "auth-token-value".into())],
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let client = jottacloud_at(&fake);
    let login_token = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(
            r#"{"username":"user@example.com","realm":"jottacloud","well_known_link":"https://id.jottacloud.com/x","auth_token":"auth-token-value"}"#,
        )
    };
    let scopes = vec!["openid".to_owned(), "offline_access".to_owned()];
    let tokens = client.exchange_login_token(&secret(&login_token), &scopes).await.unwrap();
    assert!(tokens.refresh_token.is_some());
    let request = fake.token_requests().pop().unwrap();
    assert_eq!(request.form("grant_type"), Some("password"));
    assert_eq!(request.form("client_id"), Some("jottacli"));
    assert_eq!(request.form("username"), Some("user@example.com"));
    assert_eq!(request.form("scope"), Some("openid offline_access"));
    assert!(request.form("client_secret").is_none() && request.authorization.is_none());
    let err = client.exchange_login_token(&secret("not base64 json"), &scopes).await.unwrap_err();
    assert!(matches!(err, ProviderError::InvalidGrant { .. }));
}

#[tokio::test]
async fn jottacloud_login_tokens_are_accepted_in_both_alphabets_padded_or_not() {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    // A real-shaped token whose encoding needs padding and uses '/' (or '_'),
    // so the four encodings really differ.
    let auth = "auth-token-value~?>x";
    let json = format!(
        r#"{{"username":"user@example.com","realm":"jottacloud","well_known_link":"https://id.jottacloud.com/x","auth_token":"{auth}"}}"#
    );
    let standard = STANDARD.encode(&json);
    assert!(standard.contains('/') && standard.ends_with('='), "{standard}");
    let fake = FakeProvider::start(FakeConfig {
        client_id: "jottacli".into(),
        client_secrets: vec![],
        password_logins: vec![("user@example.com".into(), auth.into())],
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let client = jottacloud_at(&fake);
    let scopes = vec!["openid".to_owned(), "offline_access".to_owned()];
    let url_safe_unpadded = URL_SAFE_NO_PAD.encode(&json);
    let wrapped = format!("{}\n{}", &url_safe_unpadded[..40], &url_safe_unpadded[40..]);
    for (name, token) in [
        ("standard, padded", standard.clone()),
        ("standard, unpadded", STANDARD_NO_PAD.encode(&json)),
        ("url-safe, padded", URL_SAFE.encode(&json)),
        ("url-safe, unpadded (as Jottacloud issues them)", url_safe_unpadded.clone()),
        ("pasted with a line break", wrapped),
    ] {
        let tokens = client.exchange_login_token(&secret(&token), &scopes).await;
        assert!(tokens.is_ok(), "{name}: {tokens:?}");
        assert_eq!(fake.token_requests().pop().unwrap().form("password"), Some(auth), "{name}");
    }
    let truncated = &url_safe_unpadded[..url_safe_unpadded.len() - 5];
    let err = client.exchange_login_token(&secret(truncated), &scopes).await.unwrap_err();
    assert!(matches!(err, ProviderError::InvalidGrant { .. }), "a truncated paste: {err:?}");
}

#[tokio::test]
async fn client_secrets_are_tried_in_order_and_the_working_one_is_kept() {
    let fake = FakeProvider::start(FakeConfig { client_secrets: vec!["new-secret".into()], ..FakeConfig::default() })
        .await
        .unwrap();
    let over = format!(
        "[providers.myidp]\nauthorize_url = \"{}\"\ntoken_url = \"{}\"\nclient_id = \"latchkey-test\"\nclient_secrets = [\"old-secret\", \"new-secret\"]\nclient_auth = \"post\"",
        fake.authorize_url(),
        fake.token_url()
    );
    let config = CatalogueConfig::parse(&over).unwrap();
    let built =
        build(&config, &BuildOptions { redirect_uri: REDIRECT.into(), default_timeout: Duration::from_secs(5) })
            .unwrap();
    let client = built.catalogue.provider("myidp").unwrap().client.clone();
    let refresh = fake_grant(&fake).await;
    client.refresh(&RefreshRequest { refresh_token: &secret(&refresh), scopes: &[], extra: &[] }).await.unwrap();
    let sent: Vec<Option<String>> =
        fake.token_requests().iter().skip(1).map(|r| r.form("client_secret").map(str::to_owned)).collect();
    assert_eq!(sent, [Some("old-secret".to_owned()), Some("new-secret".to_owned())]);
    client.refresh(&RefreshRequest { refresh_token: &secret(&refresh), scopes: &[], extra: &[] }).await.unwrap();
    assert_eq!(
        fake.token_requests().last().unwrap().form("client_secret"),
        Some("new-secret"),
        "starts with the one that worked"
    );
    assert_eq!(fake.token_requests().len(), 4);
}

/// A grant created directly at the fake (login with its own client).
async fn fake_grant(fake: &FakeProvider) -> String {
    let url =
        format!("{}?response_type=code&client_id=latchkey-test&redirect_uri={REDIRECT}&state=s", fake.authorize_url());
    let code = param(&authorize(&url).await, "code").unwrap().to_owned();
    let body: serde_json::Value = reqwest::Client::new()
        .post(fake.token_url())
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", "latchkey-test"),
            ("client_secret", "new-secret"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["refresh_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn transport_failures_are_transient_and_bodies_are_capped() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let client = client_for(&fake, "box", "timeout_secs = 1");
    let (refresh, _) = login(client.as_ref(), &[], &[]).await;
    let request = |r: &str| {
        let r = secret(r);
        let client = client.clone();
        async move { client.refresh(&RefreshRequest { refresh_token: &r, scopes: &[], extra: &[] }).await }
    };
    fake.inject(Fault::Hang);
    assert!(matches!(request(&refresh).await, Err(ProviderError::Transient { .. })), "timeout");
    fake.inject(Fault::ServerError);
    assert!(matches!(request(&refresh).await, Err(ProviderError::Transient { .. })));
    fake.inject(Fault::RateLimited { retry_after_secs: 9 });
    assert!(
        matches!(request(&refresh).await, Err(ProviderError::RateLimited { retry_after: Some(d) }) if d.as_secs() == 9)
    );
    fake.inject(Fault::Malformed);
    assert!(matches!(request(&refresh).await, Err(ProviderError::Protocol { .. })));
    fake.inject(Fault::Oversized);
    let err = request(&refresh).await.unwrap_err();
    assert!(matches!(err, ProviderError::Protocol { ref detail, .. } if detail.contains("too large")), "{err:?}");
    fake.inject(Fault::DropAfterCommit);
    assert!(matches!(request(&refresh).await, Err(ProviderError::Transient { .. })));
    assert!(matches!(request("unknown").await, Err(ProviderError::InvalidGrant { .. })));
    let unreachable = latchkey_providers::OAuthProvider::new(latchkey_providers::ProviderSettings {
        token_url: "http://127.0.0.1:9/token".parse().unwrap(),
        ..built_settings(&fake)
    })
    .unwrap();
    let err = unreachable
        .refresh(&RefreshRequest { refresh_token: &secret(&refresh), scopes: &[], extra: &[] })
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Transient { .. }), "{err:?}");
    assert!(!format!("{err:?}").contains(&refresh) && !err.to_string().contains(&refresh));
}

#[tokio::test]
async fn provider_side_device_authorization_polls_until_approved() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let client =
        client_for(&fake, "google", &format!("device_authorization_url = \"{}\"", fake.device_authorization_url()));
    let device = client.device_authorization(&["drive".into()]).await.unwrap();
    assert!(!format!("{device:?}").contains(device.device_code.expose_secret()));
    let poll = client.device_token(&device.device_code).await.unwrap_err();
    assert!(
        matches!(poll, ProviderError::Transient { ref detail, .. } if detail == "authorization_pending"),
        "{poll:?}"
    );
    assert!(fake.approve_device(&device.user_code));
    let tokens = client.device_token(&device.device_code).await.unwrap();
    assert!(tokens.refresh_token.is_some());
}

#[tokio::test]
async fn debug_output_never_shows_a_secret() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let client = client_for(&fake, "google", "");
    let (refresh, _) = login(client.as_ref(), &[], &[]).await;
    let tokens =
        client.refresh(&RefreshRequest { refresh_token: &secret(&refresh), scopes: &[], extra: &[] }).await.unwrap();
    let over =
        CatalogueConfig::parse("[providers.google]\nclient_id = \"id\"\nclient_secrets = [\"test-secret\"]").unwrap();
    let config = CatalogueConfig::built_in().unwrap().with_overrides(&over);
    let built =
        build(&config, &BuildOptions { redirect_uri: REDIRECT.into(), default_timeout: Duration::from_secs(5) })
            .unwrap();
    let concrete = latchkey_providers::OAuthProvider::new(latchkey_providers::ProviderSettings {
        client_secrets: vec!["test-secret".into()],
        ..built_settings(&fake)
    })
    .unwrap();
    for shown in
        [format!("{tokens:?}"), format!("{config:?}"), format!("{:?}", built.catalogue), format!("{concrete:?}")]
    {
        for secret in ["test-secret", refresh.as_str(), tokens.access_token.expose_secret()] {
            assert!(!shown.contains(secret), "{shown} shows {secret}");
        }
    }
}

fn built_settings(fake: &FakeProvider) -> latchkey_providers::ProviderSettings {
    latchkey_providers::ProviderSettings {
        id: "x".into(),
        authorize_url: None,
        token_url: fake.token_url().parse().unwrap(),
        revocation: latchkey_providers::Revocation::None,
        device_url: None,
        client_id: "latchkey-test".into(),
        client_secrets: vec![],
        client_auth: latchkey_providers::ClientAuth::Post,
        redirect_uri: REDIRECT.into(),
        refresh_sends_redirect_uri: false,
        api_host_param: None,
        api_hosts: vec![],
        rules: latchkey_providers::classify::ResponseRules {
            default_expires_in: None,
            account_id: latchkey_providers::classify::AccountIdSource::None,
        },
        timeout: Duration::from_secs(5),
    }
}
