//! `latchkey demo`: the broker and the testkit's fake provider on loopback,
//! so a newcomer sees a whole login and refresh without any cloud account.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use latchkey_testkit::{ClientAuth, FakeConfig, FakeProvider};

use crate::config::Config;

/// The demo's configuration for a broker on `listen`, with its data in
/// `data_dir` and the fake provider at `fake`.
pub fn config(listen: SocketAddr, data_dir: &std::path::Path, fake: &FakeProvider) -> anyhow::Result<Config> {
    let text = format!(
        r#"
        listen = "{listen}"
        [store]
        path = {data:?}
        [providers.demo]
        authorize_url = "{authorize}"
        token_url = "{token}"
        revocation_url = "{revoke}"
        device_authorization_url = "{device}"
        client_auth = "basic"
        client_id = "latchkey-demo"
        client_secrets = ["demo-secret"]
        rotates_refresh_tokens = true
        refresh_idle_lifetime_days = 90
        [services.demo]
        provider = "demo"
        display_name = "Demo storage (fake provider on this machine)"
        scopes = ["files", "offline_access"]
        [services.jottacloud]
        enabled = false
        "#,
        data = data_dir.display().to_string(),
        authorize = fake.authorize_url(),
        token = fake.token_url(),
        revoke = fake.revocation_url(),
        device = fake.device_authorization_url(),
    );
    Config::parse(&text).context("demo configuration")
}

/// The fake provider the demo uses: shows a login form, rotates refresh
/// tokens with strict reuse detection, issues 5-minute access tokens.
pub async fn fake_provider() -> anyhow::Result<FakeProvider> {
    FakeProvider::start(FakeConfig {
        client_id: "latchkey-demo".into(),
        client_secrets: vec!["demo-secret".into()],
        client_auth: ClientAuth::Basic,
        rotate: true,
        strict_reuse: true,
        access_lifetime: Some(Duration::from_secs(300)),
        auto_approve: false,
        ..FakeConfig::default()
    })
    .await
    .context("cannot start the demo provider")
}

/// What the demo prints for a broker at `url`.
pub fn instructions(url: &str) -> String {
    const TEXT: &str = r#"
latchkey demo is running at URL (a fake provider on loopback; no cloud account needed).

1. Open URL/?type=demo in a browser, click the service, then "Allow" at the fake provider.
2. Copy the AuthID the broker shows, then get an access token the way each kind of client does:
     Duplicati:  curl -H "X-AuthID: <AuthID>" URL/refresh
     JSON API:   curl -X POST -H "Authorization: Bearer <AuthID>" URL/v1/token
     OAuth2:     curl -d grant_type=refresh_token -d refresh_token=<AuthID> URL/oauth2/token
3. No browser on this machine? Use the device flow:
     curl -d service=demo URL/v1/device/code          (open the verification_uri_complete it prints)
     curl -d device_code=<device_code> URL/v1/device/token
4. Revoke the AuthID at URL/revoke, and watch URL/metrics.

Press Ctrl-C to stop; the demo's data is deleted.
"#;
    TEXT.replace("URL", url)
}
