// Interop with a real, certified authorization server: panva's oidc-provider
// on loopback, standing in for Microsoft's identity platform.

use std::sync::Arc;

use latchkey_core::MemoryStore;
use latchkey_server::Running;
use latchkey_server::config::Config;
use latchkey_testkit::oidc::{ClientAuthMethod, OidcOptions, OidcProvider};
use serde_json::Value;

use crate::support::{bearer_post, device_code, device_token, form_fields, open_page, post_form, refresh, v1_token};

pub(crate) const CLIENT_ID: &str = "latchkey-interop";
/// Needs form-urlencoding in HTTP Basic, which oidc-provider checks.
pub(crate) const CLIENT_SECRET: &str = "s:e/c+r%t interop";
pub(crate) const MASTER_KEY: &str = "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// The broker's provider and service entries for an oidc-provider.
pub(crate) fn provider_toml(oidc: &OidcProvider) -> String {
    format!(
        r#"
        [providers.oidc]
        authorize_url = "{}"
        token_url = "{}"
        revocation_url = "{}"
        issuer = "{}"
        client_auth = "basic"
        client_id = "{CLIENT_ID}"
        client_secrets = ["{CLIENT_SECRET}"]
        pkce = true
        rotates_refresh_tokens = true
        account_id = "id_token"
        [services.oidc]
        provider = "oidc"
        display_name = "OIDC storage"
        scopes = ["openid", "offline_access", "files"]
        auth_params = {{ prompt = "consent" }}
        [services.jottacloud]
        enabled = false
        "#,
        oidc.authorization_endpoint(),
        oidc.token_endpoint(),
        oidc.revocation_endpoint(),
        oidc.issuer(),
    )
}

pub(crate) fn oidc_options(redirect_uris: Vec<String>, access_ttl_secs: u64) -> OidcOptions {
    OidcOptions {
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        redirect_uris,
        access_ttl_secs,
        rotate_refresh_tokens: true,
        client_auth: ClientAuthMethod::Basic,
    }
}

pub(crate) fn http() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Logs in through the broker at `url` as `user` at the provider; answers the AuthID.
pub(crate) async fn login(http: &reqwest::Client, url: &str, oidc: &OidcProvider, user: &str, path: &str) -> String {
    let (to_provider, cookie) = crate::support::click_to_provider(http, url, path).await;
    assert!(to_provider.contains("prompt=consent"), "the provider is asked to show its screen: {to_provider}");
    let back = oidc.login(&to_provider, user).await.expect("login and consent at the provider");
    assert!(back.starts_with(&format!("{url}/logged-in?")), "{back}");
    assert!(back.contains("iss="), "RFC 9207 iss comes back: {back}");
    let page = http.get(&back).header("Cookie", cookie).send().await.unwrap();
    assert_eq!(page.status(), 200);
    crate::support::authid_from_page(&page.text().await.unwrap())
}

struct Interop {
    oidc: OidcProvider,
    server: Running,
    url: String,
    http: reqwest::Client,
}

async fn interop(access_ttl_secs: u64) -> Interop {
    crate::support::capture_logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let oidc = OidcProvider::start(oidc_options(vec![format!("{url}/logged-in")], access_ttl_secs)).await.unwrap();
    let text = format!("public_url = \"{url}\"\n[keys]\nmaster_keys = [\"{MASTER_KEY}\"]\n{}", provider_toml(&oidc));
    let config = Config::parse(&text).unwrap();
    let server = latchkey_server::serve(&config, Arc::new(MemoryStore::new()), listener, |c| {
        c.device_interval = std::time::Duration::ZERO;
    })
    .await
    .unwrap();
    Interop { oidc, server, url, http: http() }
}

#[tokio::test]
async fn a_login_at_oidc_provider_then_tokens_through_every_surface() {
    let t = interop(3600).await;
    let authid = login(&t.http, &t.url, &t.oidc, "alice", "/login?id=oidc").await;
    let refresh = refresh(&t.http, &t.url, &authid).await;
    assert_eq!(refresh.status(), 200);
    let refresh: Value = refresh.json().await.unwrap();
    let access = refresh["access_token"].as_str().unwrap().to_owned();
    let introspection = t.oidc.introspection(&access).await.unwrap();
    assert_eq!(introspection["active"], true);
    assert_eq!(introspection["sub"], "alice");
    let v1: Value = v1_token(&t.http, &t.url, &authid).await.json().await.unwrap();
    assert_eq!(v1["access_token"], access.as_str());
    assert!(v1["scope"].as_str().unwrap().contains("offline_access"));
    let oauth2: Value = t
        .http
        .post(format!("{}/oauth2/token", t.url))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", authid.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(oauth2["access_token"], access.as_str());
    assert_eq!(oauth2["refresh_token"], authid.as_str());
    t.server.stop().await;
}

#[tokio::test]
async fn revoking_the_grant_revokes_it_at_the_provider() {
    let t = interop(3600).await;
    let authid = login(&t.http, &t.url, &t.oidc, "bob", "/login?id=oidc").await;
    let v1: Value = v1_token(&t.http, &t.url, &authid).await.json().await.unwrap();
    let access = v1["access_token"].as_str().unwrap().to_owned();
    assert!(t.oidc.introspect(&access).await.unwrap());
    let report = bearer_post(&t.http, &t.url, "/v1/grant/revoke", &authid, None).await;
    assert_eq!(report["provider"], "revoked", "{report}");
    assert!(!t.oidc.introspect(&access).await.unwrap(), "RFC 7009 revocation of the refresh token ended the grant");
    let after = refresh(&t.http, &t.url, &authid).await;
    assert_eq!(after.status(), 401);
}

#[tokio::test]
async fn the_revoke_page_lists_the_other_authids_and_revokes_the_whole_login_at_the_provider() {
    let t = interop(3600).await;
    let stolen = login(&t.http, &t.url, &t.oidc, "dave", "/login?id=oidc").await;
    // The thief minted one more with the stolen AuthID.
    let label = serde_json::json!({ "label": "thief's laptop" });
    let minted = bearer_post(&t.http, &t.url, "/v1/handles", &stolen, Some(label)).await;
    let theirs = minted["authid"].as_str().unwrap().to_owned();
    let access = v1_token(&t.http, &t.url, &theirs).await.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(t.oidc.introspect(&access).await.unwrap());
    // The victim revokes their own AuthID and sees the sibling.
    let page = t.http.post(format!("{}/revoked", t.url)).form(&[("authid", stolen.as_str())]).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    let keyid = theirs.split(':').next().unwrap();
    assert!(html.contains(keyid) && html.contains("thief&#39;s laptop"), "the sibling is listed: {html}");
    assert!(!html.contains(theirs.split(':').nth(1).unwrap()), "never a sibling's secret");
    assert_eq!(v1_token(&t.http, &t.url, &theirs).await.status(), 200, "the sibling still works until the victim acts");
    let ticket = crate::support::form_fields(&html, "/revoked");
    let done = t.http.post(format!("{}/revoked", t.url)).form(&ticket).send().await.unwrap();
    assert_eq!(done.status(), 200);
    let done = done.text().await.unwrap();
    assert!(done.contains("Login revoked") && done.contains("at the provider as well"), "{done}");
    assert!(!t.oidc.introspect(&access).await.unwrap(), "RFC 7009 ended the grant at the provider");
    assert_eq!(v1_token(&t.http, &t.url, &theirs).await.status(), 401);
    let again = t.http.post(format!("{}/revoked", t.url)).form(&ticket).send().await.unwrap();
    assert_eq!(again.status(), 200, "a second use finds nothing left to revoke");
    let forged = t.http.post(format!("{}/revoked", t.url)).form(&[("ticket", "AAAA")]).send().await.unwrap();
    assert_eq!(forged.status(), 400);
}

#[tokio::test]
async fn the_device_flow_end_to_end_against_oidc_provider() {
    let t = interop(3600).await;
    let start = device_code(&t.http, &t.url, "oidc").await;
    let code = start["device_code"].as_str().unwrap().to_owned();
    let poll = || async { device_token(&t.http, &t.url, &code).await.1 };
    assert_eq!(poll().await["error"], "authorization_pending");
    // The user types the code on the broker's device page and logs in at the provider.
    let user_code = start["user_code"].as_str().unwrap();
    let form = open_page(&t.http, &format!("{}/device?user_code={user_code}", t.url)).await;
    let mut fields = form_fields(&form.html, "/device");
    fields.push(("user_code".into(), user_code.into()));
    let shown = post_form(&t.http, &t.url, "/device", &fields, &form.cookie).await;
    assert_eq!(shown.status(), 200);
    let shown = shown.text().await.unwrap();
    assert!(shown.contains("A program is waiting") && shown.contains("test program"), "{shown}");
    let go = post_form(&t.http, &t.url, "/login", &form_fields(&shown, "/login"), &form.cookie).await;
    assert_eq!(go.status(), 303);
    let back = t.oidc.login(go.headers()["location"].to_str().unwrap(), "carol").await.unwrap();
    let page = t.http.get(&back).header("Cookie", &form.cookie).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let polled = poll().await;
    let authid = polled["authid"].as_str().unwrap_or_else(|| panic!("{polled}")).to_owned();
    let token: Value = refresh(&t.http, &t.url, &authid).await.json().await.unwrap();
    let introspection = t.oidc.introspection(token["access_token"].as_str().unwrap()).await.unwrap();
    assert_eq!((introspection["active"].as_bool(), introspection["sub"].as_str()), (Some(true), Some("carol")));
}
