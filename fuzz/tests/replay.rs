//! Replays `corpus/<target>/` and `regressions/<target>/` through every
//! target's checks, without libFuzzer: `cargo test --manifest-path fuzz/Cargo.toml`.
//!
//! Also keeps the generated seeds (`latchkey_fuzz::seeds`) and the committed
//! files in step; `LATCHKEY_FUZZ_WRITE_SEEDS=1` (re)writes them.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use latchkey_fuzz::{TARGETS, seeds};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The regular files of `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    files.sort();
    files
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "non-string panic".to_owned())
}

/// Panics inside a replayed input are collected and reported together; print
/// each as one line instead of a backtrace per input.
fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
            eprintln!("panic at {at}: {}", panic_message(info.payload()));
        }));
    });
}

/// Runs every input of `kind` (`corpus` or `regressions`) through its target.
fn replay(kind: &str) -> (usize, Vec<String>) {
    quiet_panics();
    let mut count = 0;
    let mut failures = Vec::new();
    for (name, check) in TARGETS {
        for file in inputs(&root().join(kind).join(name)) {
            let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            count += 1;
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
                let shown = file.strip_prefix(root()).unwrap_or(&file).display().to_string();
                failures.push(format!("{shown}: {}", panic_message(payload.as_ref())));
            }
        }
    }
    (count, failures)
}

#[test]
fn corpus_replays_without_failure() {
    let (count, failures) = replay("corpus");
    for (name, _) in TARGETS {
        assert!(!inputs(&root().join("corpus").join(name)).is_empty(), "corpus/{name} is empty");
    }
    assert!(failures.is_empty(), "{} of {count} corpus inputs failed:\n{}", failures.len(), failures.join("\n"));
    eprintln!("replayed {count} corpus inputs");
}

#[test]
fn regressions_replay_without_failure() {
    let (count, failures) = replay("regressions");
    assert!(failures.is_empty(), "{} of {count} regression inputs failed:\n{}", failures.len(), failures.join("\n"));
    eprintln!("replayed {count} regression inputs");
}

#[test]
fn generated_seeds_are_committed() {
    let write = std::env::var_os("LATCHKEY_FUZZ_WRITE_SEEDS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for (target, name, bytes) in seeds::all() {
        assert!(TARGETS.iter().any(|(t, _)| *t == target), "seed for unknown target {target}");
        let path = root().join("corpus").join(target).join(&name);
        if std::fs::read(&path).ok().as_deref() == Some(&bytes[..]) {
            continue;
        }
        if write {
            std::fs::create_dir_all(path.parent().expect("seed path has a parent")).expect("create corpus dir");
            std::fs::write(&path, &bytes).expect("write seed");
        } else {
            stale.push(format!("corpus/{target}/{name}"));
        }
    }
    assert!(
        stale.is_empty(),
        "seed files missing or out of date (regenerate with LATCHKEY_FUZZ_WRITE_SEEDS=1 cargo test \
         --manifest-path fuzz/Cargo.toml):\n{}",
        stale.join("\n")
    );
}

/// The seeds are worth their place: each reaches the success path it was made for.
#[test]
fn seeds_reach_the_paths_they_are_for() {
    use latchkey_core::{AuthId, AuthIdSecret, Grant, Handle, Handoff, LoginTransaction, Record, SealedBlob, envelope};
    use latchkey_fuzz::{HANDOFF_TOKEN, SECRET, data_key, keyring, master_context, payload_context};

    let all = seeds::all();
    let seed = |target: &str, name: &str| {
        all.iter()
            .find(|(t, n, _)| *t == target && n == name)
            .map(|(_, _, b)| b.clone())
            .unwrap_or_else(|| panic!("no seed {target}/{name}"))
    };

    let blob = |name| SealedBlob::from_bytes(seed("envelope_open", name));
    assert!(envelope::open(&data_key(), &payload_context(), &blob("data_key_blob")).is_ok());
    assert!(keyring().open(&master_context(), &blob("master_blob_current_key")).is_ok());
    assert!(
        keyring()
            .reseal(&master_context(), &blob("master_blob_old_key"), &latchkey_core::testing::SeqRandom::new(0))
            .unwrap()
            .is_some()
    );

    let grant = Grant::decode(&seed("record_decode", "grant"), 1).unwrap();
    assert!(grant.open_payload(&data_key()).is_ok());
    let handle = Handle::decode(&seed("record_decode", "handle"), 1).unwrap();
    let dk = handle.unwrap_data_key(&AuthIdSecret::from_bytes(SECRET), &keyring()).unwrap();
    assert_eq!(handle.open_label(&dk).unwrap(), "laptop backup");
    let tx = LoginTransaction::decode(&seed("record_decode", "login_with_pkce"), 1).unwrap();
    assert!(tx.open_verifier(&keyring()).unwrap().is_some());
    let handoff = Handoff::decode(&seed("record_decode", "handoff_ready"), 1).unwrap();
    assert!(handoff.open_authid(HANDOFF_TOKEN).unwrap().is_some());

    for name in ["canonical", "percent_3A", "percent_3a", "whitespace", "generated"] {
        assert!(AuthId::parse(&String::from_utf8(seed("authid_parse", name)).unwrap()).is_ok(), "{name}");
    }

    let rules = latchkey_providers::classify::ResponseRules {
        default_expires_in: None,
        account_id: latchkey_providers::classify::AccountIdSource::IdToken,
    };
    let ok = latchkey_providers::classify::parse_token_response(&seed("token_response", "microsoft_ok")[3..], &rules);
    assert_eq!(ok.unwrap().account_id.as_deref(), Some("00000000-0000-0000-66f3-3332eca7ea81"));

    let text = |name| String::from_utf8(seed("config_parse", name)).unwrap();
    assert!(latchkey_server::config::Config::parse(&text("server_config")).is_ok());
    let over = latchkey_providers::CatalogueConfig::parse(&text("catalogue_override")).unwrap();
    let built = latchkey_providers::build(&over, &latchkey_fuzz::build_options()).unwrap();
    assert!(built.withheld.is_empty());
}
