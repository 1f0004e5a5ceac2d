// docs/providers.md's catalogue entry, as written there, for a provider the
// built-in catalogue does not have: given in the configuration, it works end
// to end against the fake provider (login through the broker's pages →
// AuthID → /refresh answers access tokens the provider issued).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use latchkey_testkit::{ClientAuth, FakeConfig};
use serde_json::Value;

use crate::support::{authid_from_page, harness, refresh};

const GUIDE: &str = include_str!("../../docs/providers.md");
const SECRET: &str = "acme-client-secret-0c81d3";

/// The TOML block after the guide's `<!-- providers-doc: … -->` marker.
fn guide_entry() -> String {
    let after = &GUIDE[GUIDE.find("<!-- providers-doc:").expect("the marked entry in docs/providers.md")..];
    let block = &after[after.find("```toml\n").expect("a toml block after the marker") + "```toml\n".len()..];
    block[..block.find("```").expect("the block's end")].to_owned()
}

/// `text` with `from` replaced by `to`; `from` must be there (the test breaks
/// when the guide changes its entry, instead of testing something else).
fn swap(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "docs/providers.md's entry no longer has {from}:\n{text}");
    text.replace(from, to)
}

#[tokio::test]
async fn the_guides_new_provider_entry_logs_in_and_refreshes_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("acme-client-secrets");
    std::fs::write(&secrets, format!("# the current secret\n{SECRET}\n")).unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    let entry = guide_entry();
    assert!(!entry.contains("[providers.fake]"), "a provider of its own");
    let entry = swap(&entry, "https://id.acme.example/oauth2/authorize", "{fake_base}/authorize");
    let entry = swap(&entry, "https://id.acme.example/oauth2/token", "{fake_base}/token");
    let entry = swap(&entry, "https://id.acme.example/oauth2/revoke", "{fake_base}/revoke");
    let entry = swap(&entry, "\"https://id.acme.example\"", "\"{fake_base}\"");
    let entry = swap(&entry, "/etc/latchkey/acme-client-secrets", secrets.to_str().unwrap());

    // The fake refuses whatever the entry does not declare: another client id
    // or secret, the secret anywhere but the form body, no PKCE, a
    // rotated-out refresh token presented again.
    let fake = FakeConfig {
        client_id: "latchkey-at-acme".into(),
        client_secrets: vec![SECRET.into()],
        client_auth: ClientAuth::Post,
        require_pkce: true,
        rotate: true,
        strict_reuse: true,
        // Every access token is expired when issued: each /refresh refreshes at the provider.
        access_lifetime: Some(Duration::ZERO),
        ..FakeConfig::default()
    };
    let h = harness(fake, &entry).await;
    // It names itself on its redirects, as the entry's `issuer` says.
    let base = h.fake.base_url();
    h.fake.configure(|c| c.issuer = Some(base));

    let services: Value = h.get("/v1/services").await.json().await.unwrap();
    let offered = services["services"].as_array().unwrap().iter().find(|s| s["id"] == "acmedrive");
    assert_eq!(offered.expect("acmedrive is offered")["display_name"], "Acme Drive", "{services}");

    let authid = authid_from_page(&h.browser_login("acmedrive", None).await);
    let mut generations = Vec::new();
    for _ in 0..2 {
        let answer = refresh(&h.http, &h.url, &authid).await;
        assert_eq!(answer.status(), 200);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["type"], "acmedrive");
        let access = body["access_token"].as_str().unwrap();
        assert!(h.fake.is_active(access));
        generations.push(h.fake.lineage(access).unwrap());
    }
    let grant = generations[0].0;
    assert_eq!(generations, [(grant, 2), (grant, 3)], "two refreshes, each with the rotated refresh token");
    assert_eq!(h.fake.reuse_attempts(), 0);

    // The requests were what the entry declares.
    let requests = h.fake.requests();
    let authorize = requests.iter().find(|r| r.path == "/authorize").unwrap();
    assert_eq!(authorize.query("client_id"), Some("latchkey-at-acme"));
    assert_eq!(authorize.query("scope"), Some("drive.readwrite offline_access"));
    assert_eq!(authorize.query("prompt"), Some("consent"));
    assert_eq!(authorize.query("code_challenge_method"), Some("S256"));
    assert_eq!(authorize.query("redirect_uri"), Some(format!("{}/logged-in", h.url).as_str()));
    let tokens = h.fake.token_requests();
    assert_eq!(tokens.len(), 3, "the code exchange and two refreshes");
    for request in &tokens {
        assert_eq!(request.form("client_secret"), Some(SECRET));
        assert_eq!(request.authorization, None, "client_auth = \"post\": no Basic credentials");
    }
}
