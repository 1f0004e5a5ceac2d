// Configuration: file, environment overrides, validation messages, key files.

use std::net::{IpAddr, SocketAddr};

use latchkey_server::config::{Cidr, Config, parse_duration};
use latchkey_server::http::client_address;

fn err(text: &str) -> String {
    match Config::parse(text) {
        Ok(_) => panic!("{text:?} should be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_match_the_design() {
    let config = Config::parse("").unwrap();
    assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
    assert_eq!(config.public_url(), "http://127.0.0.1:8080");
    assert_eq!(config.store.kind, "sled");
    assert_eq!(config.store.path, std::path::PathBuf::from("./latchkey-data"));
    assert_eq!(config.limits.token_requests_per_minute_per_keyid, 120);
    assert_eq!(config.limits.token_requests_per_minute_per_address, 600);
    assert_eq!(config.allowed_opener_origins, ["http://localhost:8200", "http://127.0.0.1:8200"]);
}

#[test]
fn bad_configuration_is_refused_naming_the_key() {
    let cases = [
        ("lisen = \"127.0.0.1:1\"", "lisen"),
        ("public_url = \"not a url\"", "public_url"),
        ("public_url = \"ftp://x.example\"", "public_url"),
        ("trusted_proxies = [\"10.0.0.0/99\"]", "trusted_proxies"),
        ("allowed_opener_origins = [\"*\"]", "allowed_opener_origins"),
        ("allowed_opener_origins = [\"http://x.example/path\"]", "allowed_opener_origins"),
        ("[store]\nkind = \"postgres\"", "store.url"),
        ("[store]\nkind = \"redis\"", "store.kind"),
        ("[limits]\ntoken_requests_per_minute_per_keyid = 0", "token_requests_per_minute_per_keyid"),
        ("[providers.microsoft]\ntokn_url = \"x\"", "tokn_url"),
        ("[log]\nformat = \"xml\"", "log.format"),
    ];
    for (text, key) in cases {
        let message = err(text);
        assert!(message.contains(key), "{text:?}: {message}");
    }
}

#[test]
fn environment_variables_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("latchkey.toml");
    std::fs::write(&file, "public_url = \"https://file.example\"\n[limits]\ntoken_requests_per_minute_per_keyid = 5\n")
        .unwrap();
    let env = [
        ("LATCHKEY_PUBLIC_URL", "https://env.example/"),
        ("LATCHKEY_LIMITS__TOKEN_REQUESTS_PER_MINUTE_PER_KEYID", "7"),
        ("LATCHKEY_PROVIDERS__MICROSOFT__CLIENT_ID", "app-id"),
        ("LATCHKEY_PROVIDERS__MICROSOFT__CLIENT_SECRETS", "[\"s1\", \"s2\"]"),
        ("LATCHKEY_CONFIG", "ignored"),
        ("OTHER", "ignored"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let config = Config::load(Some(&file), env).unwrap();
    assert_eq!(config.public_url(), "https://env.example");
    assert_eq!(config.limits.token_requests_per_minute_per_keyid, 7);
    let ms = &config.providers["microsoft"];
    assert_eq!(ms.client_id.as_deref(), Some("app-id"));
    assert_eq!(ms.client_secrets.as_deref(), Some(&["s1".to_owned(), "s2".to_owned()][..]));
    assert!(!format!("{config:?}").contains("s2"), "secrets stay out of Debug");
    let unknown = Config::load(None, [("LATCHKEY_NOPE".to_owned(), "1".to_owned())]).unwrap_err();
    assert!(unknown.to_string().contains("nope"), "{unknown}");
    let missing = Config::load(Some(&dir.path().join("missing.toml")), []).unwrap_err();
    assert!(missing.to_string().contains("missing.toml"));
}

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let proxies = vec![Cidr::parse("127.0.0.1/32").unwrap(), Cidr::parse("10.0.0.0/8").unwrap()];
    let peer = |ip: &str| Some(SocketAddr::new(ip.parse().unwrap(), 1234));
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        client_address(peer("203.0.113.9"), Some("198.51.100.1"), &proxies),
        ip("203.0.113.9"),
        "untrusted peer"
    );
    assert_eq!(client_address(peer("127.0.0.1"), Some("198.51.100.1"), &proxies), ip("198.51.100.1"));
    assert_eq!(
        client_address(peer("127.0.0.1"), Some("6.6.6.6, 198.51.100.1, 10.1.2.3"), &proxies),
        ip("198.51.100.1"),
        "rightmost untrusted hop"
    );
    assert_eq!(client_address(peer("127.0.0.1"), None, &proxies), ip("127.0.0.1"));
    assert_eq!(client_address(peer("127.0.0.1"), Some("garbage"), &proxies), ip("127.0.0.1"));
    assert!(Cidr::parse("::1").unwrap().contains(ip("::1")));
    assert!(Cidr::parse("127.0.0.0/8").unwrap().contains(ip("::ffff:127.0.0.5")));
    assert!(Cidr::parse("1.2.3.4/33").is_none());
}

#[test]
fn durations_read_like_people_write_them() {
    for (text, secs) in
        [("365d", 365 * 86_400), ("12h", 43_200), ("30m", 1800), ("45s", 45), ("90", 90), ("2w", 1_209_600)]
    {
        assert_eq!(parse_duration(text).unwrap().as_secs(), secs, "{text}");
    }
    for bad in ["", "d", "5y", "-1d", "1.5h"] {
        assert!(parse_duration(bad).is_none(), "{bad}");
    }
}

#[test]
fn the_embedded_default_generates_a_private_master_key_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config =
        Config::parse(&format!("[store]\npath = {:?}", dir.path().join("data").display().to_string())).unwrap();
    let first = latchkey_server::setup::load_keyring(&config).unwrap();
    let file = dir.path().join("data").join("master.key");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let again = latchkey_server::setup::load_keyring(&config).unwrap();
    assert_eq!(first.current().id(), again.current().id(), "the same key comes back");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = latchkey_server::setup::load_keyring(&config).err().unwrap().to_string();
    assert!(refused.contains("readable by other users"), "{refused}");
    let shared = Config::parse("[store]\nkind = \"postgres\"\nurl = \"postgres://x@127.0.0.1/x\"").unwrap();
    assert!(latchkey_server::setup::load_keyring(&shared).err().unwrap().to_string().contains("keys.master_keys"));
}

#[tokio::test]
async fn the_postgres_ca_file_setting_reaches_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("db-ca.pem");
    let env = [
        ("LATCHKEY_STORE__KIND", "postgres"),
        ("LATCHKEY_STORE__URL", "postgres://latchkey@127.0.0.1/latchkey"),
        ("LATCHKEY_STORE__CA_FILE", ca_file.to_str().unwrap()),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let config = Config::load(None, env).unwrap();
    assert_eq!(config.store.ca_file.as_deref(), Some(ca_file.as_path()));
    // The file is read before any connection is tried: a missing one is named.
    let error = latchkey_server::setup::open_store(&config).await.err().expect("refused");
    let message = format!("{error:#}"); // as `latchkey` prints it
    assert!(message.contains("CA file") && message.contains("db-ca.pem"), "{message}");
}
