//! From configuration to a running engine: store, master keys, catalogue.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use latchkey_core::keys::{MasterKey, MasterKeyId, MasterKeyring, PassphraseParams};
use latchkey_core::{Broker, BrokerParts, EngineConfig, OsRandom, Store};
use latchkey_providers::{BuildOptions, BuiltCatalogue, TokioRuntime, build};
use latchkey_storage_postgres::{PostgresStore, TlsOptions};
use latchkey_storage_sled::SledStore;

use crate::config::{Config, StoreKind};

/// The name of the master key the embedded default (sled, no `[keys]`)
/// generates. It sits beside the data directory, never inside it, so a copy
/// of the data is not a copy of the key: see [`master_key_path`].
pub const GENERATED_MASTER_KEY_FILE: &str = "latchkey-master.key";
/// Where older versions generated the key: inside the data directory. A key
/// found there is moved to [`master_key_path`] on start.
pub const LEGACY_MASTER_KEY_FILE: &str = "master.key";
/// Recorded Argon2id parameters for a passphrase, in a sled data directory.
///
/// Unlike the generated key, these stay inside the data directory: they are
/// not secret (a salt and cost parameters; the passphrase is the secret), and
/// the data cannot be opened without them, so they belong in every copy of
/// the data rather than in one more file to back up separately.
pub const PASSPHRASE_PARAMS_FILE: &str = "master-key.params";

/// Everything `serve` and the maintenance commands need.
pub struct Setup {
    /// The engine.
    pub broker: Broker,
    /// The store (also for `/readyz`).
    pub store: Arc<dyn Store>,
    /// The catalogue as built, with withheld services.
    pub withheld: Vec<latchkey_providers::Withheld>,
    /// The keyring in use.
    pub keyring: MasterKeyring,
}

/// Opens the configured store.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    match config.store.kind {
        StoreKind::Postgres => {
            let url = config.store.url.as_deref().ok_or_else(|| anyhow!("store.url is not set"))?;
            let tls = TlsOptions { ca_file: config.store.ca_file.clone() };
            // The context leads; `{:#}` (as `main` prints) adds the store's reasons after it.
            let store = PostgresStore::connect_with(url, &config.store.schema, &tls).await.map_err(|e| {
                anyhow::Error::new(e).context("store: cannot use PostgreSQL (check store.url and that the server runs)")
            })?;
            Ok(Arc::new(store))
        }
        StoreKind::Sled => {
            let store = SledStore::open(&config.store.path).await.map_err(|e| {
                let locked = std::error::Error::source(&e).is_some_and(|s| s.is::<latchkey_storage_sled::Locked>());
                let what = format!("store: cannot open the sled store at {}", config.store.path.display());
                if locked {
                    // The usual cause: the broker itself runs on it.
                    anyhow::Error::new(e).context(format!(
                        "{what}: another process has it open, most likely a running broker; \
                         stop the broker first (sled admits one process at a time), then run this again"
                    ))
                } else {
                    anyhow::Error::new(e).context(what)
                }
            })?;
            Ok(Arc::new(store))
        }
    }
}

/// Refuses a secret file other users may read.
pub fn check_secret_file(key: &str, path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("{key}: cannot read {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!("{key}: {} is readable by other users; run chmod 600 on it", path.display());
    }
    Ok(())
}

/// Writes a file with mode 0600 and syncs it; with `new_only`, never
/// replaces an existing file.
fn write_private_file(path: &Path, text: &str, new_only: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if new_only {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }
    let mut file = options.open(path).with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// Where the embedded default keeps its generated master key:
/// [`GENERATED_MASTER_KEY_FILE`] in the directory that holds `store.path`
/// (`./latchkey-data` → `./latchkey-master.key`). Used by start-up and by
/// `latchkey master-key rotate`.
pub fn master_key_path(config: &Config) -> PathBuf {
    let data = config.store.path.as_path();
    // `.`, `..` and the like name no directory of their own: resolve them so
    // that the key still lands beside the data, not in it.
    let resolved;
    let data = if data.file_name().is_some() {
        data
    } else {
        resolved = std::fs::canonicalize(data).unwrap_or_else(|_| data.to_path_buf());
        resolved.as_path()
    };
    match data.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join(GENERATED_MASTER_KEY_FILE),
        Some(_) => Path::new(".").join(GENERATED_MASTER_KEY_FILE),
        None => data.join(GENERATED_MASTER_KEY_FILE), // `/`: refused by `load_keyring`
    }
}

/// The lines of a key file that hold keys, as the keyring reads them.
fn key_lines(text: &str) -> Vec<&str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

/// Makes a rename, creation or removal in `dir` durable.
fn sync_dir(path: &Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync the directory {}", dir.display()))
}

/// Moves a key that an older version generated inside the data directory
/// (`old`) to `new`, beside it, without ever losing one: if both exist and
/// differ, start is refused (which one the data needs is the operator's
/// call); if they hold the same keys, the copy inside the data goes.
fn move_legacy_key(old: &Path, new: &Path) -> anyhow::Result<()> {
    if !old.try_exists().with_context(|| format!("cannot look for {}", old.display()))? {
        return Ok(());
    }
    let text = std::fs::read_to_string(old).with_context(|| format!("cannot read {}", old.display()))?;
    if new.try_exists().with_context(|| format!("cannot look for {}", new.display()))? {
        let current = std::fs::read_to_string(new).with_context(|| format!("cannot read {}", new.display()))?;
        if key_lines(&text) != key_lines(&current) {
            bail!(
                "two different generated master keys: {} (inside the data directory, where older versions \
                 kept it) and {}; latchkey will not guess which one this data needs: leave that one at {} \
                 and move the other out of the data directory (keep it until the broker serves again)",
                old.display(),
                new.display(),
                new.display()
            );
        }
        std::fs::remove_file(old).with_context(|| format!("cannot remove {}", old.display()))?;
        sync_dir(old)?;
        tracing::info!(
            removed = %old.display(),
            kept = %new.display(),
            "removed a duplicate of the generated master key from the data directory"
        );
        return Ok(());
    }
    check_secret_file(LEGACY_MASTER_KEY_FILE, old)?;
    match std::fs::rename(old, new) {
        Ok(()) => {
            sync_dir(new)?;
            sync_dir(old)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            // Another filesystem: copy, make the copy durable, and only then
            // remove the original.
            if let Err(e) = write_private_file(new, &text, true) {
                let _ = std::fs::remove_file(new);
                return Err(e.context(format!("cannot copy {} to {}", old.display(), new.display())));
            }
            sync_dir(new)?;
            std::fs::remove_file(old).with_context(|| format!("cannot remove {}", old.display()))?;
            sync_dir(old)?;
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("cannot move {} to {}", old.display(), new.display())));
        }
    }
    tracing::warn!(
        from = %old.display(),
        to = %new.display(),
        "moved the generated master key out of the data directory; back it up separately from the data"
    );
    Ok(())
}

/// The master keyring: from configuration, from a passphrase, or (sled only)
/// generated on first start beside the data directory, at
/// [`master_key_path`], with mode 0600.
pub fn load_keyring(config: &Config) -> anyhow::Result<MasterKeyring> {
    if let Some(keys) = &config.keys.master_keys {
        return MasterKeyring::parse(keys).map_err(|e| anyhow!("keys.master_keys: {e}"));
    }
    let sled_dir = (config.store.kind == StoreKind::Sled).then_some(config.store.path.as_path());
    if let Some(file) = &config.keys.master_passphrase_file {
        check_secret_file("keys.master_passphrase_file", file)?;
        let passphrase = std::fs::read_to_string(file)?;
        let passphrase = passphrase.trim_end_matches(['\n', '\r']);
        if passphrase.len() < 12 {
            bail!("keys.master_passphrase_file: the passphrase is shorter than 12 characters");
        }
        let params = match (&config.keys.master_passphrase_params, sled_dir) {
            (Some(text), _) => {
                PassphraseParams::parse(text).map_err(|e| anyhow!("keys.master_passphrase_params: {e}"))?
            }
            (None, Some(dir)) => {
                std::fs::create_dir_all(dir)?;
                let path = dir.join(PASSPHRASE_PARAMS_FILE);
                match std::fs::read_to_string(&path) {
                    Ok(text) => PassphraseParams::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?,
                    Err(_) => {
                        let params = PassphraseParams::generate(&OsRandom);
                        write_private_file(&path, &params.to_text(), false)?;
                        params
                    }
                }
            }
            (None, None) => bail!(
                "keys.master_passphrase_params: a shared store needs the passphrase parameters in the configuration; use: {}",
                PassphraseParams::generate(&OsRandom).to_text()
            ),
        };
        let key = MasterKey::derive_from_passphrase(MasterKeyId::new("passphrase")?, passphrase.as_bytes(), &params)?;
        return Ok(MasterKeyring::single(key));
    }
    let Some(dir) = sled_dir else {
        bail!("keys: a shared store needs keys.master_keys (or keys.master_passphrase_file) in the configuration");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = master_key_path(config);
    let key_dir = path.parent().unwrap_or(Path::new("."));
    let inside = |d: &Path| d.canonicalize().with_context(|| format!("cannot resolve {}", d.display()));
    if inside(key_dir)?.starts_with(inside(dir)?) {
        bail!(
            "store.path: {} has no parent directory outside it to hold the generated master key; \
             name a directory of its own, or configure [keys]",
            dir.display()
        );
    }
    move_legacy_key(&dir.join(LEGACY_MASTER_KEY_FILE), &path)?;
    if path.try_exists().with_context(|| format!("cannot look for {}", path.display()))? {
        check_secret_file(GENERATED_MASTER_KEY_FILE, &path)?;
        let text = std::fs::read_to_string(&path)?;
        return MasterKeyring::parse(&key_lines(&text)).map_err(|e| anyhow!("{}: {e}", path.display()));
    }
    let key = MasterKey::generate(MasterKeyId::new(&format!("k{}", unix_now()))?, &OsRandom);
    write_private_file(&path, &format!("{}\n", key.expose_config_text().as_str()), true)?;
    sync_dir(&path)?;
    Ok(MasterKeyring::single(key))
}

/// Seconds since the epoch, for naming generated keys.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The catalogue from configuration.
pub fn catalogue(config: &Config) -> anyhow::Result<BuiltCatalogue> {
    for (id, p) in &config.providers {
        if let Some(file) = &p.client_secrets_file {
            check_secret_file(&format!("providers.{id}.client_secrets_file"), file)?;
        }
    }
    let options = BuildOptions { redirect_uri: config.redirect_uri(), default_timeout: Duration::from_secs(15) };
    Ok(build(&config.catalogue(), &options)?)
}

/// Builds the engine on an opened store.
pub async fn engine(
    config: &Config,
    store: Arc<dyn Store>,
    tune: impl FnOnce(&mut EngineConfig),
) -> anyhow::Result<Setup> {
    let keyring = load_keyring(config)?;
    let built = catalogue(config)?;
    let mut engine =
        EngineConfig { public_url: config.public_url(), instance_id: config.instance_id(), ..EngineConfig::default() };
    tune(&mut engine);
    let broker = Broker::new(BrokerParts {
        store: Arc::clone(&store),
        catalogue: built.catalogue,
        keyring: keyring.clone(),
        runtime: Arc::new(TokioRuntime),
        rng: Arc::new(OsRandom),
        config: engine,
    });
    broker.start().await.map_err(|e| anyhow!("store: cannot subscribe to notices ({e})"))?;
    Ok(Setup { broker, store, withheld: built.withheld, keyring })
}
