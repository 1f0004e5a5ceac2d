// The operator commands as processes (`latchkey stats`, `gc`, `check`,
// `services`, `master-key rotate`, `grants list/show/revoke`, `handles
// revoke`) on both stores, with exit codes, output, and JSON log lines; a
// revocation by the CLI refused by a broker on the same store; and a sled
// store held by another process refused before anything is written.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use latchkey_core::{AuthId, Store};
use latchkey_storage_postgres::PostgresStore;
use latchkey_storage_sled::SledStore;
use serde_json::Value;

use crate::processes::{database_url, drop_schema, random_schema};
use crate::support::{Harness, fake_config, harness_on, v1_token};

/// The master key the in-process harness uses (`support::harness_tuned`).
const HARNESS_KEY: &str = "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// What one `latchkey` run answered.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `latchkey ARGS --config CONFIG` and checks every log line it wrote
/// is a JSON object with a level and a message (the configs set
/// `log.format = "json"`); the error `main` prints on failure is the one
/// plain line allowed, and it is the last.
async fn latchkey(config: &Path, args: &[&str]) -> Run {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("LATCHKEY_CONFIG")
        .env_remove("LATCHKEY_LOG")
        .output()
        .await
        .expect("the latchkey binary runs");
    let run = Run {
        ok: output.status.success(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    };
    let lines: Vec<&str> = run.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    for (i, line) in lines.iter().enumerate() {
        if !run.ok && i + 1 == lines.len() && line.starts_with("latchkey: ") {
            continue;
        }
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {line}"));
        assert!(value["level"].is_string(), "{args:?}: no level: {line}");
        assert!(value["fields"]["message"].is_string(), "{args:?}: no message: {line}");
    }
    run
}

/// Like [`latchkey`], and it must succeed.
async fn ok(config: &Path, args: &[&str]) -> String {
    let run = latchkey(config, args).await;
    assert!(run.ok, "latchkey {args:?} failed: {}\n{}", run.stderr, run.stdout);
    run.stdout
}

fn write_config(dir: &Path, store: &str, keys: bool) -> std::path::PathBuf {
    let path = dir.join("latchkey.toml");
    let keys = if keys { format!("[keys]\nmaster_keys = [\"{HARNESS_KEY}\"]\n") } else { String::new() };
    let text =
        format!("public_url = \"http://127.0.0.1:8080\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n{keys}{store}\n");
    std::fs::write(&path, text).unwrap();
    path
}

fn keyid(authid: &str) -> String {
    AuthId::parse(authid).unwrap().keyid().to_string()
}

/// Two logins (the first with a second AuthID) through the fake provider.
async fn two_grants(h: &Harness) -> (String, String, String) {
    let first = h.login().await;
    let minted = crate::support::mint_handle(&h.http, &h.url, &first).await;
    let second_of_first = minted["authid"].as_str().expect("a minted AuthID").to_owned();
    let other = h.login().await;
    (first, second_of_first, other)
}

/// The grant id of the grant an AuthID opens, as `grants list --json` and `grants show` name it.
async fn grant_of(config: &Path, authid: &str) -> String {
    let list: Value = serde_json::from_str(&ok(config, &["grants", "list", "--json"]).await).unwrap();
    for grant in list.as_array().unwrap() {
        let id = grant["grant_id"].as_str().unwrap();
        let shown: Value = serde_json::from_str(&ok(config, &["grants", "show", id, "--json"]).await).unwrap();
        if shown["handles"].as_array().unwrap().iter().any(|h| h["keyid"] == keyid(authid).as_str()) {
            return id.to_owned();
        }
    }
    panic!("no grant holds {}", keyid(authid));
}

/// Every command on one store: the checks both stores share. The store
/// holds the grants of [`two_grants`]; answers the revoked AuthIDs.
async fn exercise(config: &Path, first: &str, second_of_first: &str, other: &str) {
    let help = ok(config, &["--help"]).await;
    for command in ["grants list", "grants show", "grants revoke", "handles revoke", "stop the broker"] {
        assert!(help.contains(command), "the help does not mention {command}: {help}");
    }
    assert!(ok(config, &["check"]).await.starts_with("configuration ok"));
    // No provider has credentials in this configuration: every service says why it is not offered.
    let services = ok(config, &["services"]).await;
    assert!(services.contains("onedrivev2") && services.contains("not offered"), "{services}");
    let stats = ok(config, &["stats"]).await;
    assert!(stats.contains("grants{service=fake,state=active} 2"), "{stats}");
    assert!(stats.contains("handles_active 3"), "{stats}");

    let list: Value = serde_json::from_str(&ok(config, &["grants", "list", "--json"]).await).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let table = ok(config, &["grants", "list", "--service", "fake", "--state", "active"]).await;
    assert!(table.starts_with("GRANT") && table.contains("2 grant(s)"), "{table}");
    assert!(ok(config, &["grants", "list", "--state", "revoked"]).await.contains("0 grant(s)"));
    assert!(ok(config, &["grants", "list", "--unused-for", "1d"]).await.contains("0 grant(s)"));
    assert!(ok(config, &["grants", "list", "--service", "nope"]).await.contains("0 grant(s)"));
    let bad = latchkey(config, &["grants", "list", "--state", "sleepy"]).await;
    assert!(!bad.ok && bad.stderr.contains("--state"), "{}", bad.stderr);

    let grant = grant_of(config, first).await;
    let shown: Value = serde_json::from_str(&ok(config, &["grants", "show", &grant, "--json"]).await).unwrap();
    assert_eq!(shown["state"], "active");
    assert_eq!(shown["service"], "fake");
    let keyids: Vec<&str> = shown["handles"].as_array().unwrap().iter().map(|h| h["keyid"].as_str().unwrap()).collect();
    assert_eq!(keyids.len(), 2);
    assert!(keyids.contains(&keyid(first).as_str()) && keyids.contains(&keyid(second_of_first).as_str()));
    let table = ok(config, &["grants", "show", &grant]).await;
    assert!(table.contains(&keyid(first)) && table.contains("active"), "{table}");
    // Never a secret: neither AuthID's secret half is printed anywhere.
    for authid in [first, second_of_first, other] {
        let secret = authid.rsplit(':').next().unwrap();
        assert!(!shown.to_string().contains(secret) && !table.contains(secret));
    }
    let missing = latchkey(config, &["grants", "show", "AAAAAAAAAAAAAAAAAAAAAA"]).await;
    assert!(!missing.ok && missing.stderr.contains("no grant"), "{}", missing.stderr);
    // Ids are base64url, so one may begin with '-': never taken for an option.
    let dash = latchkey(config, &["grants", "show", "-AAAAAAAAAAAAAAAAAAAAA"]).await;
    assert!(!dash.ok && dash.stderr.contains("no grant"), "{}", dash.stderr);
    let unknown = latchkey(config, &["grants", "list", "--colour"]).await;
    assert!(!unknown.ok && unknown.stderr.contains("unknown option --colour"), "{}", unknown.stderr);
    let malformed = latchkey(config, &["grants", "show", "not-an-id"]).await;
    assert!(!malformed.ok && malformed.stderr.contains("not a grant id"), "{}", malformed.stderr);

    // One AuthID of two: the grant stays.
    let one: Value =
        serde_json::from_str(&ok(config, &["handles", "revoke", &keyid(second_of_first), "--json"]).await).unwrap();
    assert_eq!((one["grant_revoked"].as_bool(), one["handles_revoked"].as_u64()), (Some(false), Some(1)), "{one}");
    assert_eq!(one["handles_left"], 1);
    assert_eq!(one["provider_revoked"], false);
    // The other grant's only AuthID: the grant goes with it.
    let last = ok(config, &["handles", "revoke", &keyid(other)]).await;
    assert!(last.contains("revoked and its payload erased") && last.contains("provider was not told"), "{last}");
    // The whole first grant, with its audit line (JSON, as the config says).
    let run = latchkey(config, &["grants", "revoke", &grant]).await;
    assert!(run.ok, "{}", run.stderr);
    let whole = run.stdout;
    assert!(whole.contains("revoked and its payload erased") && whole.contains("provider was not told"), "{whole}");
    let audit: Vec<Value> = run.stderr.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        audit.iter().any(|l| l["target"] == "latchkey::audit"
            && l["fields"]["event"] == "grant_revoked_by_operator"
            && l["fields"]["grant_id"] == grant.as_str()),
        "{}",
        run.stderr
    );
    let again: Value = serde_json::from_str(&ok(config, &["grants", "revoke", &grant, "--json"]).await).unwrap();
    assert_eq!((again["grant_revoked"].as_bool(), again["handles_revoked"].as_u64()), (Some(false), Some(0)));
    let shown: Value = serde_json::from_str(&ok(config, &["grants", "show", &grant, "--json"]).await).unwrap();
    assert_eq!(shown["state"], "revoked");
    assert!(
        shown["handles"].as_array().unwrap().iter().all(|h| h["state"] == "revoked" && h["revoked_at"].is_string())
    );
    let revoked: Value =
        serde_json::from_str(&ok(config, &["grants", "list", "--state", "revoked", "--json"]).await).unwrap();
    assert_eq!(revoked.as_array().unwrap().len(), 2);

    let stats = ok(config, &["stats"]).await;
    assert!(stats.contains("grants{service=fake,state=revoked} 2") && stats.contains("handles_revoked 3"), "{stats}");
    let gc = ok(config, &["gc", "--unused-for", "365d", "--dry-run"]).await;
    assert!(gc.contains("would delete 0 grant(s)"), "{gc}");
    let gc = latchkey(config, &["gc"]).await;
    assert!(!gc.ok && gc.stderr.contains("--unused-for"), "{}", gc.stderr);
    let rotate = ok(config, &["master-key", "rotate"]).await;
    assert!(rotate.contains("re-sealed") && rotate.contains("master key k1"), "{rotate}");
}

/// A revoked AuthID, as a broker on the store answers it.
async fn assert_refused(h: &Harness, authid: &str) {
    let response = v1_token(&h.http, &h.url, authid).await;
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "authid_revoked", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_command_on_sled_and_a_revoked_authid_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (first, second_of_first, other) = {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&data).await.unwrap());
        let h = harness_on(fake_config(), "", store).await;
        let logins = two_grants(&h).await;
        assert_eq!(v1_token(&h.http, &h.url, &logins.0).await.status(), 200);
        h.server.stop().await;
        logins
    };
    let config = write_config(dir.path(), &format!("[store]\nkind = \"sled\"\npath = \"{}\"", data.display()), true);
    // The broker above lets go of the directory once its last task ended.
    let give_up = Instant::now() + Duration::from_secs(10);
    while !latchkey(&config, &["check"]).await.ok {
        assert!(Instant::now() < give_up, "the in-process broker still holds the sled store");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    exercise(&config, &first, &second_of_first, &other).await;

    // A broker on the same store refuses every revoked AuthID.
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&data).await.unwrap());
    let h = harness_on(fake_config(), "", store).await;
    for authid in [&first, &second_of_first, &other] {
        assert_refused(&h, authid).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_store_in_use_is_refused_and_master_key_rotate_leaves_the_key_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The generated master key (no [keys]): `check` creates it beside the data.
    let config = write_config(dir.path(), &format!("[store]\nkind = \"sled\"\npath = \"{}\"", data.display()), false);
    ok(&config, &["check"]).await;
    let key_file = dir.path().join("latchkey-master.key");
    let before = std::fs::read(&key_file).unwrap();

    // Held as a running broker holds it.
    let held = SledStore::open(&data).await.unwrap();
    for args in [
        &["master-key", "rotate"][..],
        &["stats"],
        &["grants", "list"],
        &["grants", "revoke", "AAAAAAAAAAAAAAAAAAAAAA"],
    ] {
        let run = latchkey(&config, args).await;
        assert!(!run.ok, "{args:?} succeeded on a held store");
        assert!(run.stderr.contains("stop the broker first"), "{args:?}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
    }
    assert_eq!(std::fs::read(&key_file).unwrap(), before, "the key file changed");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 3, "{leftovers:?}"); // data, latchkey.toml, latchkey-master.key
    drop(held);

    // A configuration the engine cannot be built from is refused before the key file is written too.
    let broken = dir.path().join("broken.toml");
    let text = std::fs::read_to_string(&config).unwrap() + "[services.orphan]\nprovider = \"nowhere\"\n";
    std::fs::write(&broken, text).unwrap();
    let run = latchkey(&broken, &["master-key", "rotate"]).await;
    assert!(!run.ok && run.stderr.contains("nowhere"), "{}", run.stderr);
    assert_eq!(std::fs::read(&key_file).unwrap(), before, "the key file changed");
    std::fs::remove_file(&broken).unwrap();

    // Let go of, it rotates: a new key, the old one gone from the file.
    let rotate = ok(&config, &["master-key", "rotate"]).await;
    assert!(rotate.contains("old master keys removed"), "{rotate}");
    let after = std::fs::read_to_string(&key_file).unwrap();
    assert_ne!(after.as_bytes(), before.as_slice());
    assert_eq!(after.lines().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_command_on_postgres_and_a_running_broker_drops_the_revoked_grant() {
    let _postgres = crate::support::postgres_shared().await;
    let schema = random_schema();
    let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&database_url(), &schema).await.unwrap());
    let h = harness_on(fake_config(), "", store).await;
    let (first, second_of_first, other) = two_grants(&h).await;
    // Cached in the running broker: only the notice can make it let go.
    assert_eq!(v1_token(&h.http, &h.url, &first).await.status(), 200);
    assert_eq!(v1_token(&h.http, &h.url, &other).await.status(), 200);

    let dir = tempfile::tempdir().unwrap();
    let store_toml = format!("[store]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"", database_url());
    let config = write_config(dir.path(), &store_toml, true);
    exercise(&config, &first, &second_of_first, &other).await;

    for authid in [&first, &second_of_first, &other] {
        let give_up = Instant::now() + Duration::from_secs(5);
        while v1_token(&h.http, &h.url, authid).await.status() == 200 {
            assert!(Instant::now() < give_up, "the running broker still answers a revoked AuthID");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_refused(&h, authid).await;
    }
    h.server.stop().await;
    drop_schema(&schema).await;
}
