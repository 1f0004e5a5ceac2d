// The built-in catalogue and configuration validation.

use latchkey_core::LoginMethod;
use latchkey_providers::{BuildOptions, CatalogueConfig, CatalogueError, build};
use std::time::Duration;

fn options() -> BuildOptions {
    BuildOptions { redirect_uri: "https://broker.example/logged-in".into(), default_timeout: Duration::from_secs(10) }
}

fn with_credentials(mut config: CatalogueConfig) -> CatalogueConfig {
    for p in config.providers.values_mut() {
        p.client_id.get_or_insert_with(|| "client".into());
        p.client_secrets.get_or_insert_with(|| vec!["secret".into()]);
    }
    config
}

#[test]
fn every_built_in_entry_parses_and_validates() {
    let config = CatalogueConfig::built_in().unwrap();
    let providers: Vec<&str> = config.providers.keys().map(String::as_str).collect();
    assert_eq!(providers, ["box", "dropbox", "google", "jottacloud", "microsoft", "pcloud"]);
    let built = build(&with_credentials(config.clone()), &options()).unwrap();
    assert!(built.withheld.is_empty(), "{:?}", built.withheld);
    for id in [
        "onedrivev2",
        "sharepoint",
        "msgroup",
        "googledrive",
        "googledocs",
        "gcs",
        "dropbox",
        "box.com",
        "box",
        "pcloud",
        "jottacloud",
    ] {
        assert!(built.catalogue.service(id).is_some(), "{id} offered");
    }
    let listed: Vec<&str> = built.catalogue.listed_services().map(|s| s.id.as_str()).collect();
    assert!(!listed.contains(&"googledocs") && !listed.contains(&"box"), "hidden services are not listed");
    let onedrive = built.catalogue.service("onedrivev2").unwrap();
    assert_eq!(onedrive.scopes, ["offline_access", "Files.ReadWrite"]);
    let google = built.catalogue.provider_for("googledrive").unwrap();
    assert_eq!(google.spec.issuer.as_deref(), Some("https://accounts.google.com"));
    let ms = built.catalogue.provider_for("onedrivev2").unwrap();
    assert_eq!(ms.spec.refresh_idle_lifetime, Some(Duration::from_secs(90 * 86_400)));
    // The front end reads how users log in and where their browser goes from the spec.
    let jotta = built.catalogue.provider_for("jottacloud").unwrap();
    assert_eq!(jotta.spec.login, LoginMethod::LoginToken);
    assert_eq!(jotta.spec.authorize_origin, None, "no browser is sent anywhere");
    assert_eq!(ms.spec.login, LoginMethod::Redirect);
    assert_eq!(ms.spec.authorize_origin.as_deref(), Some("https://login.microsoftonline.com"));
    assert_eq!(ms.spec.rotates_refresh_tokens, Some(true));
    assert_eq!(google.spec.rotates_refresh_tokens, Some(false));
    assert_eq!(
        built.catalogue.authorize_origins(),
        [
            "https://account.box.com",
            "https://accounts.google.com",
            "https://login.microsoftonline.com",
            "https://my.pcloud.com",
            "https://www.dropbox.com",
        ]
    );
    assert_eq!(built.catalogue.login_method("jottacloud"), Some(LoginMethod::LoginToken));
    assert_eq!(built.catalogue.login_method("onedrivev2"), Some(LoginMethod::Redirect));
    assert_eq!(built.catalogue.login_method("nope"), None);
    let drive = built.catalogue.service("googledrive").unwrap();
    assert!(drive.auth_params.contains(&("access_type".into(), "offline".into())));
    assert!(drive.auth_params.contains(&("prompt".into(), "consent".into())));
}

#[test]
fn a_service_whose_provider_has_no_credentials_is_not_offered() {
    let built = build(&CatalogueConfig::built_in().unwrap(), &options()).unwrap();
    let offered: Vec<&str> = built.catalogue.listed_services().map(|s| s.id.as_str()).collect();
    assert_eq!(offered, ["jottacloud"], "only the public-client provider needs no credentials");
    let withheld = built.withheld.iter().find(|w| w.service == "onedrivev2").unwrap();
    assert!(withheld.reason.contains("client_id"), "{}", withheld.reason);
}

#[test]
fn operator_configuration_overrides_fields_and_adds_entries() {
    let over = CatalogueConfig::parse(
        r#"
        [providers.microsoft]
        client_id = "my-app"
        client_secrets = ["s1"]
        token_url = "http://127.0.0.1:9/token"

        [providers.myidp]
        authorize_url = "https://idp.example.org/auth"
        token_url = "https://idp.example.org/token"
        client_id = "x"
        client_secrets = ["y"]
        rotates_refresh_tokens = true

        [services.myservice]
        provider = "myidp"
        display_name = "My storage"
        scopes = ["files.readwrite", "offline_access"]

        [services.sharepoint]
        enabled = false
        "#,
    )
    .unwrap();
    let merged = CatalogueConfig::built_in().unwrap().with_overrides(&over);
    let ms = &merged.providers["microsoft"];
    assert_eq!(ms.token_url.as_deref(), Some("http://127.0.0.1:9/token"), "URLs can be overridden");
    assert_eq!(ms.authorize_url.as_deref(), Some("https://login.microsoftonline.com/common/oauth2/v2.0/authorize"));
    let built = build(&merged, &options()).unwrap();
    assert!(built.catalogue.service("onedrivev2").is_some());
    assert!(built.catalogue.service("myservice").is_some());
    assert!(built.catalogue.service("sharepoint").is_none());
    assert!(built.withheld.iter().any(|w| w.service == "sharepoint" && w.reason.contains("disabled")));
}

#[test]
fn invalid_configuration_gets_a_clear_error() {
    type Check = Box<dyn Fn(&CatalogueError) -> bool>;
    fn invalid(field: &'static str, says: &'static [&'static str]) -> Check {
        Box::new(move |e| {
            matches!(e, CatalogueError::Invalid { field: f, reason, .. }
                if f == field && says.iter().all(|s| reason.contains(s)))
        })
    }
    const P: &str = "[providers.p]\nauthorize_url = \"https://a.example/a\"\ntoken_url = \"https://a.example/t\"\n";
    let cases: Vec<(String, Check)> = vec![
        (
            "[services.x]\nprovider = \"nope\"".into(),
            Box::new(|e| matches!(e, CatalogueError::UnknownProvider { provider, .. } if provider == "nope")),
        ),
        (
            "[providers.p]\ntoken_url = \"https://a.example/t\"\n[services.x]\nprovider = \"p\"".into(),
            Box::new(|e| matches!(e, CatalogueError::Missing { field: "authorize_url", .. })),
        ),
        (
            "[providers.p]\nauthorize_url = \"https://a.example/a\"".into(),
            Box::new(|e| matches!(e, CatalogueError::Missing { field: "token_url", .. })),
        ),
        (
            "[providers.p]\nauthorize_url = \"https://a.example/a\"\ntoken_url = \"http://idp.example.org/token\"".into(),
            invalid("token_url", &["loopback"]),
        ),
        (
            "[providers.p]\nauthorize_url = \"ftp://a.example/a\"\ntoken_url = \"https://a.example/t\"".into(),
            invalid("authorize_url", &[]),
        ),
        // Choices are typed: an unknown one is refused as the file is read,
        // naming the field and the values it allows.
        (format!("{P}client_auth = \"jwt\""), invalid("client_auth", &["jwt", "basic", "post", "none"])),
        (format!("{P}revocation = \"rfc9999\""), invalid("revocation", &["rfc9999", "rfc7009", "bearer", "none"])),
        (format!("{P}handout = \"cookie\""), invalid("handout", &["cookie", "authid", "access_token"])),
        (format!("{P}account_id = \"email\""), invalid("account_id", &["email", "id_token", "field:<name>"])),
        (format!("{P}account_id = \"field:\""), invalid("account_id", &["field:<name>"])),
        (format!("{P}pkce = \"yes\""), invalid("pkce", &["boolean"])),
        (
            "[providers.p]\nauthorize_url = \"https://a.example/a\"\ntoken_url = \"https://a.example/t\"\nrevocation = \"rfc7009\"".into(),
            Box::new(|e| matches!(e, CatalogueError::Missing { field: "revocation_url", .. })),
        ),
        ("[services.x]\ndisplay_name = \"x\"".into(), Box::new(|e| matches!(e, CatalogueError::NoProvider(_)))),
        (
            "[providers.p]\nauthorize_url = \"https://a.example/a\"\ntoken_url = \"https://a.example/t\"\nrefresh_idle_lifetime_days = 213503982334602".into(),
            invalid("refresh_idle_lifetime_days", &[]),
        ),
    ];
    for (text, check) in cases {
        let err = match CatalogueConfig::parse(&text).and_then(|config| build(&config, &options())) {
            Err(e) => e,
            Ok(_) => panic!("{text:?} should not build"),
        };
        assert!(check(&err), "{text:?} gave {err:?}");
        let message = err.to_string();
        assert!(message.contains("'p'") || !text.contains("[providers.p]"), "{message} names the provider");
    }
    let misspelt = CatalogueConfig::parse("[providers.p]\ntokn_url = \"x\"").unwrap_err();
    assert!(invalid("tokn_url", &["unknown field", "token_url"])(&misspelt), "{misspelt:?}");
    for (text, names) in [
        ("[providers.p]\n[providers.p]", ""),
        ("[weird]\nx = 1", "weird: unknown field `weird`"),
        ("[services.s]\nhidden = 1", "services.s.hidden: invalid type"),
    ] {
        let err = CatalogueConfig::parse(text).unwrap_err();
        assert!(matches!(&err, CatalogueError::Syntax(m) if m.contains(names)), "{text:?}: {err:?}");
    }
    let loopback = CatalogueConfig::parse(
        "[providers.p]\nauthorize_url = \"http://localhost:1/a\"\ntoken_url = \"http://[::1]:1/t\"\nclient_id = \"c\"\nclient_secrets = [\"s\"]",
    )
    .unwrap();
    assert!(build(&loopback, &options()).is_ok(), "plain http to loopback is fine for tests");
}

#[test]
fn secrets_come_from_a_file_and_never_show_in_debug() {
    let dir = std::env::temp_dir().join(format!("latchkey-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secrets");
    std::fs::write(&file, "# rotated 2026-11\nnew-secret-value\n\nold-secret-value\n").unwrap();
    let config = CatalogueConfig::parse(&format!(
        "[providers.p]\nauthorize_url = \"https://a.example/a\"\ntoken_url = \"https://a.example/t\"\nclient_id = \"c\"\nclient_secrets_file = {:?}\n[services.s]\nprovider = \"p\"",
        file.display().to_string()
    ))
    .unwrap();
    let built = build(&config, &options()).unwrap();
    assert!(built.catalogue.service("s").is_some());
    let inline = CatalogueConfig::parse(
        "[providers.p]\nclient_id = \"c\"\nclient_secrets = [\"inline-secret-value\"]\ntoken_url = \"https://a.example/t\"",
    )
    .unwrap();
    for shown in [format!("{inline:?}"), format!("{:?}", built.catalogue)] {
        assert!(!shown.contains("secret-value"), "{shown}");
    }
    let missing = CatalogueConfig::parse(
        "[providers.p]\nauthorize_url = \"https://a.example/a\"\ntoken_url = \"https://a.example/t\"\nclient_id = \"c\"\nclient_secrets_file = \"/nonexistent/latchkey\"",
    )
    .unwrap();
    assert!(matches!(build(&missing, &options()), Err(CatalogueError::SecretsFile { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_browser_login_asks_the_provider_to_show_its_screen() {
    // A hostile page can open a login in a browser that already approved the
    // app; the provider must then still show a screen of its own.
    let built = build(&with_credentials(CatalogueConfig::built_in().unwrap()), &options()).unwrap();
    let expected: &[(&str, &str, &str)] = &[
        ("onedrivev2", "prompt", "select_account"),
        ("sharepoint", "prompt", "select_account"),
        ("msgroup", "prompt", "select_account"),
        ("googledrive", "prompt", "consent"),
        ("googledocs", "prompt", "consent"),
        ("gcs", "prompt", "consent"),
        ("dropbox", "force_reapprove", "true"),
    ];
    for (service, name, value) in expected {
        let spec = built.catalogue.service(service).unwrap();
        assert!(spec.auth_params.contains(&((*name).into(), (*value).into())), "{service}: {:?}", spec.auth_params);
    }
    // Known to have no such parameter (Box, pCloud) or no browser login at all (Jottacloud).
    let without = ["box.com", "box", "pcloud", "jottacloud"];
    let all: Vec<&str> = ["onedrivev2", "sharepoint", "msgroup", "googledrive", "googledocs", "gcs", "dropbox"]
        .into_iter()
        .chain(without)
        .collect();
    for spec in built.catalogue.services() {
        assert!(all.contains(&spec.id.as_str()), "a new built-in service {} must say how it forces a screen", spec.id);
    }
}
