// Configuration: file, environment overrides, validation messages, key files.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use latchkey_server::config::{Cidr, Config, LogFormat, StoreKind, parse_duration};
use latchkey_server::http::client_address;
use latchkey_server::setup;

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
    assert_eq!(config.store.kind, StoreKind::Sled);
    assert_eq!(config.log.format, LogFormat::Text);
    assert_eq!(config.store.path, std::path::PathBuf::from("./latchkey-data"));
    assert_eq!(config.limits.token_requests_per_minute_per_keyid, 120);
    assert_eq!(config.limits.token_requests_per_minute_per_address, 600);
    assert_eq!(config.allowed_opener_origins, ["http://localhost:8200", "http://127.0.0.1:8200"]);
}

#[test]
fn bad_configuration_is_refused_naming_the_key() {
    // (configuration, what the message must name: the key, and for a choice the values it allows)
    let cases: [(&str, &[&str]); 14] = [
        ("lisen = \"127.0.0.1:1\"", &["lisen"]),
        ("public_url = \"not a url\"", &["public_url"]),
        ("public_url = \"ftp://x.example\"", &["public_url"]),
        ("trusted_proxies = [\"10.0.0.0/99\"]", &["trusted_proxies"]),
        ("allowed_opener_origins = [\"*\"]", &["allowed_opener_origins"]),
        ("allowed_opener_origins = [\"http://x.example/path\"]", &["allowed_opener_origins"]),
        ("[store]\nkind = \"postgres\"", &["store.url"]),
        ("[store]\nkind = \"redis\"", &["store.kind", "redis", "sled", "postgres"]),
        ("[limits]\ntoken_requests_per_minute_per_keyid = 0", &["token_requests_per_minute_per_keyid"]),
        ("[limits]\ntoken_requests_per_minute_per_keyid = \"many\"", &["limits.token_requests_per_minute_per_keyid"]),
        ("[providers.microsoft]\ntokn_url = \"x\"", &["tokn_url"]),
        ("[providers.microsoft]\nclient_auth = \"jwt\"", &["providers.microsoft.client_auth", "basic", "post", "none"]),
        ("[providers.microsoft]\nrevocation = \"yes\"", &["providers.microsoft.revocation", "rfc7009", "bearer"]),
        ("[log]\nformat = \"xml\"", &["log.format", "xml", "text", "json"]),
    ];
    for (text, names) in cases {
        let message = err(text);
        for name in names {
            assert!(message.contains(name), "{text:?}: {message} should name {name}");
        }
    }
    let from_env = Config::load(None, [("LATCHKEY_STORE__KIND".to_owned(), "mysql".to_owned())]).unwrap_err();
    assert!(from_env.to_string().contains("store.kind"), "{from_env}");
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

/// A sled configuration with its data at `<dir>/data`.
fn sled_in(dir: &Path) -> Config {
    Config::parse(&format!("[store]\npath = {:?}", dir.join("data").display().to_string())).unwrap()
}

/// Every file name under `dir`, recursively.
fn names_under(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        names.push(entry.file_name().to_string_lossy().into_owned());
        if entry.file_type().unwrap().is_dir() {
            names.extend(names_under(&entry.path()));
        }
    }
    names
}

fn write_0600(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

const OLD_KEY: &str = "k1:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
const OTHER_KEY: &str = "k2:AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

#[test]
fn the_embedded_default_generates_a_private_master_key_once_beside_the_data() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = sled_in(dir.path());
    let file = dir.path().join("latchkey-master.key");
    assert_eq!(setup::master_key_path(&config), file, "beside the data directory, not in it");
    let first = setup::load_keyring(&config).unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let names = names_under(&dir.path().join("data"));
    assert!(!names.iter().any(|n| n.contains("master")), "no key in the data directory: {names:?}");
    let again = setup::load_keyring(&config).unwrap();
    assert_eq!(first.current().id(), again.current().id(), "the same key comes back");
    assert_eq!(first.current().expose_config_text(), again.current().expose_config_text());
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = setup::load_keyring(&config).err().unwrap().to_string();
    assert!(refused.contains("readable by other users"), "{refused}");
    let shared = Config::parse("[store]\nkind = \"postgres\"\nurl = \"postgres://x@127.0.0.1/x\"").unwrap();
    assert!(setup::load_keyring(&shared).err().unwrap().to_string().contains("keys.master_keys"));
}

#[test]
fn the_default_data_directory_has_its_key_in_the_working_directory() {
    let config = Config::parse("").unwrap();
    assert_eq!(setup::master_key_path(&config), Path::new("./latchkey-master.key"));
    let bare = Config::parse("[store]\npath = \"latchkey-data\"").unwrap();
    assert_eq!(setup::master_key_path(&bare), Path::new("./latchkey-master.key"));
    let nested = Config::parse("[store]\npath = \"/var/lib/latchkey/data/\"").unwrap();
    assert_eq!(setup::master_key_path(&nested), Path::new("/var/lib/latchkey/latchkey-master.key"));
}

/// A sled store in `<tmp>/data` with no key yet: the paths of the key an
/// older version kept inside the data (`old`) and of the key beside it (`new`).
fn legacy_layout() -> (tempfile::TempDir, Config, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = sled_in(dir.path());
    let (old, new) = (dir.path().join("data").join("master.key"), dir.path().join("latchkey-master.key"));
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    (dir, config, old, new)
}

#[test]
fn a_key_left_in_the_data_directory_is_moved_beside_it_unchanged() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, config, old, new) = legacy_layout();
    // A world-readable one is refused where it is, not moved.
    std::fs::write(&old, format!("{OLD_KEY}\n")).unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = setup::load_keyring(&config).err().unwrap().to_string();
    assert!(refused.contains("readable by other users") && refused.contains("master.key"), "{refused}");
    assert!(old.exists() && !new.exists(), "left where it was");

    write_0600(&old, &format!("{OLD_KEY}\n{OTHER_KEY}\n"));
    let keyring = setup::load_keyring(&config).unwrap();
    assert_eq!(keyring.current().id().as_str(), "k1", "the same keyring, current key first");
    assert_eq!(keyring.current().expose_config_text().as_str(), OLD_KEY, "the same key bytes");
    assert!(!old.exists(), "no key left in the data directory");
    assert_eq!(std::fs::read_to_string(&new).unwrap(), format!("{OLD_KEY}\n{OTHER_KEY}\n"), "moved whole");
    assert_eq!(std::fs::metadata(&new).unwrap().permissions().mode() & 0o777, 0o600);
    // The next start reads it from its new place.
    let again = setup::load_keyring(&config).unwrap();
    assert_eq!(again.current().expose_config_text().as_str(), OLD_KEY);
}

#[test]
fn a_key_on_another_filesystem_is_copied_then_removed() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // The data directory is a link to tmpfs (/dev/shm, on every Linux this
    // runs on), so the key cannot be renamed beside it and is copied instead.
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir_in("/dev/shm").expect("this test needs /dev/shm");
    let device = |p: &Path| std::fs::metadata(p).unwrap().dev();
    assert_ne!(device(dir.path()), device(elsewhere.path()), "the temp dir and /dev/shm must be two filesystems");
    std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("data")).unwrap();
    let config = sled_in(dir.path());
    let (old, new) = (elsewhere.path().join("master.key"), dir.path().join("latchkey-master.key"));
    write_0600(&old, &format!("{OLD_KEY}\n"));
    let keyring = setup::load_keyring(&config).unwrap();
    assert_eq!(keyring.current().expose_config_text().as_str(), OLD_KEY);
    assert!(!old.exists(), "removed once the copy is in place");
    assert_eq!(std::fs::read_to_string(&new).unwrap(), format!("{OLD_KEY}\n"));
    assert_eq!(std::fs::metadata(&new).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn two_different_generated_keys_refuse_to_start_naming_both() {
    let (_dir, config, old, new) = legacy_layout();
    write_0600(&old, &format!("{OLD_KEY}\n"));
    write_0600(&new, &format!("{OTHER_KEY}\n"));
    let refused = setup::load_keyring(&config).err().unwrap().to_string();
    assert!(refused.contains(&old.display().to_string()), "{refused}");
    assert!(refused.contains(&new.display().to_string()), "{refused}");
    assert!(!refused.contains("AQEB") && !refused.contains("AgIC"), "no key in the message: {refused}");
    assert_eq!(std::fs::read_to_string(&old).unwrap(), format!("{OLD_KEY}\n"), "neither is touched");
    assert_eq!(std::fs::read_to_string(&new).unwrap(), format!("{OTHER_KEY}\n"), "neither is touched");
}

#[test]
fn a_copy_of_the_key_left_in_the_data_directory_is_removed() {
    let (_dir, config, old, new) = legacy_layout();
    write_0600(&old, &format!("{OLD_KEY}\n"));
    write_0600(&new, &format!("{OLD_KEY}\n"));
    let keyring = setup::load_keyring(&config).unwrap();
    assert_eq!(keyring.current().expose_config_text().as_str(), OLD_KEY);
    assert!(!old.exists(), "the copy inside the data is gone");
    assert_eq!(std::fs::read_to_string(&new).unwrap(), format!("{OLD_KEY}\n"), "the one beside it stays");
}

#[test]
fn master_key_rotate_replaces_the_generated_key_beside_the_data_and_audits_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (old, new) = (data.join("master.key"), dir.path().join("latchkey-master.key"));
    std::fs::create_dir_all(&data).unwrap();
    write_0600(&old, &format!("{OLD_KEY}\n")); // from an older version: moved first
    let config = dir.path().join("latchkey.toml");
    std::fs::write(&config, format!("[store]\npath = {:?}\n", data.display().to_string())).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LATCHKEY_") {
            command.env_remove(name);
        }
    }
    let output = command
        .args(["master-key", "rotate", "--config"])
        .arg(&config)
        .env("LATCHKEY_LOG", "info")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!old.exists(), "no key in the data directory");
    let text = std::fs::read_to_string(&new).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "only the new key is left: {} line(s)", lines.len());
    let (id, _) = lines[0].split_once(':').unwrap();
    assert_ne!(id, "k1", "a new current key");
    assert!(stderr.contains(&old.display().to_string()) && stderr.contains(&new.display().to_string()), "{stderr}");
    let audit: Vec<&str> = stderr.lines().filter(|l| l.contains("latchkey::audit")).collect();
    assert_eq!(audit.len(), 1, "{stderr}");
    assert!(audit[0].contains("master_key_rotated") && audit[0].contains(id), "{stderr}");
    for secret in [OLD_KEY.split_once(':').unwrap().1, lines[0].split_once(':').unwrap().1] {
        assert!(!stderr.contains(secret), "no key on stderr: {stderr}");
    }

    // With `log.format = "json"` the audit line is a JSON object on its own target.
    std::fs::write(&config, format!("[store]\npath = {:?}\n[log]\nformat = \"json\"\n", data.display().to_string()))
        .unwrap();
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let audit: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "latchkey::audit")
        .collect();
    assert_eq!(audit.len(), 1, "{stderr}");
    assert_eq!(audit[0]["fields"]["event"], "master_key_rotated", "{stderr}");
    let newest = std::fs::read_to_string(&new).unwrap();
    let newest_id = newest.lines().next().unwrap().split_once(':').unwrap().0.to_owned();
    assert_eq!(audit[0]["fields"]["key_id"], newest_id.as_str());
}

#[cfg(feature = "postgres-tls")] // without it, a CA file is refused as needing TLS support
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

/// Writes `text` to `dir/name` with `mode`, as systemd's `LoadCredential=`
/// leaves a credential (0400) or an operator a secret file (0600).
fn write_mode(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn with_credentials(dir: &str) -> [(String, String); 1] {
    [("CREDENTIALS_DIRECTORY".to_owned(), dir.to_owned())]
}

#[test]
fn file_settings_take_the_credentials_directory_and_master_keys_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    write_mode(&credentials, "latchkey_master-keys", &format!("# newest first\n{OTHER_KEY}\n\n{OLD_KEY}\n"), 0o400);
    write_mode(&credentials, "latchkey_ms-secret", "first-secret\nsecond-secret\n", 0o400);
    let file = write_mode(
        dir.path(),
        "latchkey.toml",
        &format!(
            "[store]\npath = {:?}\n\
             [keys]\nmaster_keys_file = \"${{CREDENTIALS_DIRECTORY}}/latchkey_master-keys\"\n\
             [providers.microsoft]\nclient_id = \"app\"\n\
             client_secrets_file = \"${{CREDENTIALS_DIRECTORY}}/latchkey_ms-secret\"\n",
            dir.path().join("data").display().to_string()
        ),
        0o644,
    );
    // A trailing slash on the directory does not double the separator.
    let config = Config::load(Some(&file), with_credentials(&format!("{}/", credentials.display()))).unwrap();
    assert_eq!(config.keys.master_keys_file.as_deref(), Some(credentials.join("latchkey_master-keys").as_path()));
    assert_eq!(
        config.providers["microsoft"].client_secrets_file.as_deref(),
        Some(credentials.join("latchkey_ms-secret").as_path())
    );
    let debug = format!("{config:?}");
    assert!(!debug.contains(&OTHER_KEY[3..]) && !debug.contains(&OLD_KEY[3..]), "keys stay out of Debug: {debug}");
    // The file's keys are configured keys: the first current, comments and
    // blank lines skipped; nothing is generated beside the data.
    let ring = setup::load_keyring(&config).unwrap();
    assert_eq!(ring.current().id().as_str(), "k2");
    assert_eq!(ring.ids().len(), 2);
    assert!(!dir.path().join("latchkey-master.key").exists());
    // The secrets file is found where the variable points, and 0400 passes.
    let built = setup::catalogue(&config).unwrap();
    assert!(!built.withheld.iter().any(|w| w.service == "onedrivev2"), "microsoft is offered");

    // Without the variable, each setting naming it is refused, naming the key.
    let unset = Config::load(Some(&file), []).unwrap_err().to_string();
    assert!(unset.contains("keys.master_keys_file") && unset.contains("CREDENTIALS_DIRECTORY"), "{unset}");
    let empty = Config::load(Some(&file), with_credentials("")).unwrap_err().to_string();
    assert!(empty.contains("CREDENTIALS_DIRECTORY"), "{empty}");
    for (text, key) in [
        ("[keys]\nmaster_passphrase_file = \"${CREDENTIALS_DIRECTORY}/p\"", "keys.master_passphrase_file"),
        ("[store]\nca_file = \"${CREDENTIALS_DIRECTORY}/ca.pem\"", "store.ca_file"),
        ("[providers.box]\nclient_secrets_file = \"${CREDENTIALS_DIRECTORY}/s\"", "providers.box.client_secrets_file"),
    ] {
        let message = err(text);
        assert!(message.contains(key) && message.contains("CREDENTIALS_DIRECTORY"), "{text}: {message}");
    }
    // Other `${…}` are not expanded, and a path without it is left alone.
    let literal = Config::parse("[store]\nca_file = \"/etc/${HOME}/ca.pem\"").unwrap();
    assert_eq!(literal.store.ca_file.as_deref(), Some(Path::new("/etc/${HOME}/ca.pem")));
}

#[test]
fn a_master_keys_file_is_refused_when_others_may_read_it_empty_missing_or_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let load = |setting: &str| Config::parse(&format!("[keys]\n{setting}")).map(|_| ()).unwrap_err().to_string();
    let open = write_mode(dir.path(), "open", &format!("{OLD_KEY}\n"), 0o644);
    let blank = write_mode(dir.path(), "blank", "# nothing yet\n\n", 0o600);
    let good = write_mode(dir.path(), "good", &format!("{OLD_KEY}\n"), 0o600);
    let file = |p: &Path| format!("master_keys_file = {:?}\n", p.display().to_string());
    for (setting, says) in [
        (file(&open), "readable by other users"),
        (file(&blank), "holds no key"),
        (file(&dir.path().join("missing")), "cannot read"),
        (format!("{}master_keys = [\"{OTHER_KEY}\"]", file(&good)), "master_keys_file"),
        (format!("{}master_passphrase_file = \"/p\"", file(&good)), "master_passphrase_file"),
    ] {
        let message = load(&setting);
        assert!(message.contains("keys.master_keys_file") && message.contains(says), "{setting}: {message}");
        assert!(!message.contains(&OLD_KEY[3..]), "no key in the message: {message}");
    }
}

#[test]
fn the_packaged_configuration_loads_with_the_credentials_the_unit_hands_it() {
    // packaging/latchkey.toml as the Debian package installs it, with the
    // files the unit's LoadCredential=latchkey:/etc/latchkey/credentials
    // turns into $CREDENTIALS_DIRECTORY/latchkey_<name> (mode 0400).
    let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/latchkey.toml");
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/latchkey.service")).unwrap();
    assert!(unit.lines().any(|l| l == "LoadCredential=latchkey:/etc/latchkey/credentials"), "{unit}");
    assert!(unit.lines().any(|l| l == "ExecStart=/usr/bin/latchkey serve --config /etc/latchkey/latchkey.toml"));
    let dir = tempfile::tempdir().unwrap();
    write_mode(dir.path(), "latchkey_master-keys", &format!("{OLD_KEY}\n"), 0o400);
    write_mode(dir.path(), "latchkey_microsoft-client-secrets", "a-secret\n", 0o400);
    let config = Config::load(Some(&packaged), with_credentials(dir.path().to_str().unwrap())).unwrap();
    assert_eq!(config.store.kind, StoreKind::Sled);
    assert_eq!(config.store.path, Path::new("/var/lib/latchkey/data"), "inside the unit's StateDirectory");
    assert!(unit.contains("StateDirectory=latchkey\n"));
    assert_eq!(setup::load_keyring(&config).unwrap().current().id().as_str(), "k1");
    let built = setup::catalogue(&config).unwrap();
    assert!(!built.withheld.iter().any(|w| w.service == "onedrivev2"), "microsoft is offered");
}
