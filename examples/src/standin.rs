//! The stand-in cloud the examples log in at: the testkit's fake OAuth
//! provider on loopback, and a catalogue entry for it.

use latchkey_core::{MasterKey, MasterKeyId, MasterKeyring, OsRandom};
use latchkey_testkit::{FakeConfig, FakeProvider};

/// The service id of the stand-in cloud.
pub const SERVICE: &str = "examplecloud";

/// Starts the fake provider on `127.0.0.1:0`, approving every login at once.
pub async fn cloud() -> std::io::Result<FakeProvider> {
    FakeProvider::start(FakeConfig { rotate: true, strict_reuse: true, require_pkce: true, ..FakeConfig::default() })
        .await
}

/// The catalogue TOML for `cloud`: a provider and a service given as data,
/// exactly as a broker's configuration would give them.
pub fn catalogue(cloud: &FakeProvider) -> String {
    let config = FakeConfig::default();
    format!(
        r#"
        [providers.examplecloud]
        authorize_url = "{authorize}"
        token_url = "{token}"
        revocation_url = "{revoke}"
        client_auth = "basic"
        pkce = true
        rotates_refresh_tokens = true
        client_id = "{client_id}"
        client_secrets = ["{secret}"]

        [services.{SERVICE}]
        provider = "examplecloud"
        display_name = "Example cloud"
        scopes = ["files", "offline_access"]
        "#,
        authorize = cloud.authorize_url(),
        token = cloud.token_url(),
        revoke = cloud.revocation_url(),
        client_id = config.client_id,
        secret = config.client_secrets[0],
    )
}

/// A fresh master keyring, held only in memory (a real deployment loads its
/// keys from configuration: `MasterKeyring::parse`).
pub fn keyring() -> MasterKeyring {
    MasterKeyring::single(MasterKey::generate(MasterKeyId::new("k1").expect("a valid key id"), &OsRandom))
}
