//! The broker's configuration: a TOML file (`--config` or `LATCHKEY_CONFIG`)
//! with `LATCHKEY_*` environment variables laid over it.
//!
//! An environment variable names a key by its path, levels separated by a
//! double underscore: `LATCHKEY_PUBLIC_URL`, `LATCHKEY_STORE__KIND`,
//! `LATCHKEY_PROVIDERS__MICROSOFT__CLIENT_ID`. Its value is read as a TOML
//! value when it is one (`120`, `true`, `["a", "b"]`) and as a string
//! otherwise. Unknown keys are errors, wherever they come from.
//!
//! In the settings that name a file (`keys.master_keys_file`,
//! `keys.master_passphrase_file`, `providers.<id>.client_secrets_file`,
//! `store.ca_file`), `${CREDENTIALS_DIRECTORY}` stands for the directory
//! systemd hands a unit its `LoadCredential=` files in (the variable of that
//! name); a file naming it while the variable is not set is refused.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use latchkey_providers::config::{ProviderConfig, ServiceConfig};
use latchkey_providers::{CatalogueConfig, from_toml};
use serde::Deserialize;

/// Environment variables that are not configuration keys.
const NOT_KEYS: [&str; 2] = ["LATCHKEY_CONFIG", "LATCHKEY_LOG"];

/// The variable systemd sets for a unit with `LoadCredential=`, and how file
/// settings refer to it.
const CREDENTIALS_VAR: &str = "CREDENTIALS_DIRECTORY";
const CREDENTIALS_REF: &str = "${CREDENTIALS_DIRECTORY}";

/// The whole configuration.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// A separate address for `/metrics`; when set, the main listener does
    /// not serve it.
    pub metrics_listen: Option<SocketAddr>,
    /// The broker's public base URL; see [`Config::redirect_uri`].
    pub public_url: Option<String>,
    /// Proxies whose `X-Forwarded-For` is believed (CIDRs).
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// This instance's name in refresh leases. Defaults to `<hostname>:<port>`,
    /// stable across restarts, so a restarted broker takes back its own
    /// leases at once instead of waiting for them to lapse.
    pub instance_id: Option<String>,
    /// Origins the AuthID page posts its message to when opened as a popup.
    #[serde(default = "default_openers")]
    pub allowed_opener_origins: Vec<String>,
    /// Where records live.
    #[serde(default)]
    pub store: StoreConfig,
    /// Master keys.
    #[serde(default)]
    pub keys: KeysConfig,
    /// Rate limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Connection deadlines and cap.
    #[serde(default)]
    pub connections: ConnectionsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The background sweep of expired short-lived records.
    #[serde(default)]
    pub sweep: SweepConfig,
    /// Provider credentials and overrides.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Extra or changed services.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_openers() -> Vec<String> {
    vec!["http://localhost:8200".into(), "http://127.0.0.1:8200".into()]
}

/// `store.kind`: where records live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The embedded sled store in `store.path` (the default).
    #[default]
    Sled,
    /// PostgreSQL at `store.url`, shared by every instance.
    Postgres,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sled` (default) or `postgres`.
    #[serde(default)]
    pub kind: StoreKind,
    /// The sled data directory.
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// The PostgreSQL URL.
    pub url: Option<String>,
    /// The PostgreSQL schema.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// A PEM file of CA certificates the PostgreSQL server's certificate may
    /// chain to, besides Mozilla's roots; setting it asks for TLS (builds
    /// with the `postgres-tls` feature). The URL's `sslmode` decides the rest.
    pub ca_file: Option<PathBuf>,
}

fn default_path() -> PathBuf {
    PathBuf::from("./latchkey-data")
}
fn default_schema() -> String {
    "latchkey".into()
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::default(),
            path: default_path(),
            url: None,
            schema: default_schema(),
            ca_file: None,
        }
    }
}

/// `[keys]`. `Debug` never shows a key.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// `<id>:<base64 32 bytes>`, the first current. Also what
    /// `master_keys_file` holds once the configuration is loaded.
    pub master_keys: Option<Vec<String>>,
    /// A file holding the master keys, one `<id>:<base64>` a line, the first
    /// current (mode 0600 or stricter). Read when the configuration is
    /// loaded, into `master_keys`.
    pub master_keys_file: Option<PathBuf>,
    /// A file holding an operator passphrase (Argon2id derives the key).
    pub master_passphrase_file: Option<PathBuf>,
    /// The recorded Argon2id parameters for the passphrase (`argon2id$v=19$…`).
    pub master_passphrase_params: Option<String>,
}

impl fmt::Debug for KeysConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeysConfig")
            .field("master_keys", &self.master_keys.as_ref().map(|k| format!("<{} redacted>", k.len())))
            .field("master_keys_file", &self.master_keys_file)
            .field("master_passphrase_file", &self.master_passphrase_file)
            .finish_non_exhaustive()
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Token requests per minute for one AuthID (counted once the secret proved right).
    #[serde(default = "default_per_keyid")]
    pub token_requests_per_minute_per_keyid: u32,
    /// Token requests per minute from one client address.
    #[serde(default = "default_per_address")]
    pub token_requests_per_minute_per_address: u32,
    /// Hand-off polls (`/fetch`, `/token-state`, device polls) per minute per address.
    #[serde(default = "default_fetch")]
    pub fetch_requests_per_minute_per_address: u32,
    /// Requests that store a record before anyone is authenticated (a login
    /// begun, a hand-off, a device code) per minute per address.
    #[serde(default = "default_creations")]
    pub record_creations_per_minute_per_address: u32,
    /// Device user codes entered per minute per address (right or wrong).
    #[serde(default = "default_user_codes")]
    pub user_code_attempts_per_minute_per_address: u32,
}

fn default_per_keyid() -> u32 {
    120
}
fn default_per_address() -> u32 {
    600
}
fn default_fetch() -> u32 {
    120
}
fn default_creations() -> u32 {
    30
}
fn default_user_codes() -> u32 {
    10
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            token_requests_per_minute_per_keyid: default_per_keyid(),
            token_requests_per_minute_per_address: default_per_address(),
            fetch_requests_per_minute_per_address: default_fetch(),
            record_creations_per_minute_per_address: default_creations(),
            user_code_attempts_per_minute_per_address: default_user_codes(),
        }
    }
}

/// `[connections]`: how long a client may take to send a request, and how
/// many connections may be open (see [`crate::connections`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// Open connections at most, on each listener; at the cap the longest
    /// idle keep-alive connection is closed, or the new one waits.
    #[serde(default = "default_max_open")]
    pub max_open: usize,
    /// Seconds a request head may take to arrive (also how long a keep-alive
    /// connection stays open idle).
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: u64,
    /// Seconds a request body may take to arrive, from its head.
    #[serde(default = "default_body_timeout")]
    pub body_timeout_secs: u64,
}

fn default_max_open() -> usize {
    10_000
}
fn default_header_timeout() -> u64 {
    10
}
fn default_body_timeout() -> u64 {
    30
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            max_open: default_max_open(),
            header_timeout_secs: default_header_timeout(),
            body_timeout_secs: default_body_timeout(),
        }
    }
}

/// `log.format`: how log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter (`info`, `latchkey=debug`, …); `LATCHKEY_LOG` overrides it.
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::default(), level: default_level() }
    }
}

/// `[sweep]`: how often expired login transactions, hand-offs and device
/// codes are deleted, and how many of each a pass reads at most.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// Seconds between passes.
    #[serde(default = "default_sweep_interval")]
    pub interval_secs: u64,
    /// Records of each kind a pass reads at most (and so deletes at most);
    /// the next pass goes on where it stopped.
    #[serde(default = "default_records_per_pass")]
    pub records_per_pass: usize,
}

fn default_sweep_interval() -> u64 {
    60
}
fn default_records_per_pass() -> usize {
    1000
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig { interval_secs: default_sweep_interval(), records_per_pass: default_records_per_pass() }
    }
}

/// Why the configuration was refused. Each message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the configuration file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// TOML syntax, or an unknown key at the top level.
    #[error("configuration: {0}")]
    Syntax(String),
    /// A key holds a value that cannot be used: of the wrong type, not one
    /// of the key's choices (the message lists them), or refused on checking.
    #[error("configuration key `{key}`: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_owned(), reason: reason.into() }
}

/// A network range for `trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `x::y/n`, or a bare address.
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let a = text.trim().parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut current = table;
    for part in parents {
        let entry = current.entry(part.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| format!("`{part}` is not a table"))?;
    }
    current.insert(last.clone(), value);
    Ok(())
}

/// The value of an environment variable as TOML, or as a string.
fn env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

impl Config {
    /// Reads the file (if any), applies `LATCHKEY_*` variables from `env`,
    /// and validates.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut credentials = None;
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read { path: path.to_owned(), reason: e.to_string() })?;
                toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::Syntax(e.to_string()))?
            }
            None => toml::Table::new(),
        };
        for (name, raw) in env {
            if name == CREDENTIALS_VAR {
                credentials = Some(raw);
                continue;
            }
            let Some(key) = name.strip_prefix("LATCHKEY_") else { continue };
            if NOT_KEYS.contains(&name.as_str()) || key.is_empty() {
                continue;
            }
            let path: Vec<String> = key.split("__").map(str::to_lowercase).collect();
            set_path(&mut table, &path, env_value(&raw)).map_err(|reason| invalid(&name, reason))?;
        }
        Self::from_table(table, credentials.as_deref())
    }

    /// Parses configuration text (no environment, so no
    /// `${CREDENTIALS_DIRECTORY}` either).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Self::from_table(toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?, None)
    }

    fn from_table(table: toml::Table, credentials: Option<&str>) -> Result<Config, ConfigError> {
        let mut config: Config = from_toml(toml::Value::Table(table)).map_err(|e| {
            if e.key.is_empty() { ConfigError::Syntax(e.reason) } else { invalid(&e.dotted(), e.reason) }
        })?;
        config.resolve_files(credentials)?;
        config.validate()?;
        Ok(config)
    }

    /// Puts the credentials directory into the file settings, and reads
    /// `keys.master_keys_file` into `keys.master_keys`.
    fn resolve_files(&mut self, credentials: Option<&str>) -> Result<(), ConfigError> {
        let expand = |key: &str, path: &mut Option<PathBuf>| -> Result<(), ConfigError> {
            let Some(text) = path.as_ref().and_then(|p| p.to_str()).filter(|t| t.contains(CREDENTIALS_REF)) else {
                return Ok(());
            };
            let dir = credentials.filter(|d| !d.is_empty()).ok_or_else(|| {
                invalid(
                    key,
                    format!(
                        "names {CREDENTIALS_REF}, but {CREDENTIALS_VAR} is not set (systemd sets it for a unit \
                         with LoadCredential=; elsewhere set it to the directory holding the files)"
                    ),
                )
            })?;
            *path = Some(PathBuf::from(text.replace(CREDENTIALS_REF, dir.trim_end_matches('/'))));
            Ok(())
        };
        expand("keys.master_keys_file", &mut self.keys.master_keys_file)?;
        expand("keys.master_passphrase_file", &mut self.keys.master_passphrase_file)?;
        expand("store.ca_file", &mut self.store.ca_file)?;
        for (id, provider) in &mut self.providers {
            expand(&format!("providers.{id}.client_secrets_file"), &mut provider.client_secrets_file)?;
        }
        let Some(file) = &self.keys.master_keys_file else { return Ok(()) };
        let key = "keys.master_keys_file";
        if self.keys.master_keys.is_some() || self.keys.master_passphrase_file.is_some() {
            return Err(invalid(key, "give one of master_keys, master_keys_file and master_passphrase_file"));
        }
        let unreadable = |e: std::io::Error| invalid(key, format!("cannot read {}: {e}", file.display()));
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(file).map_err(unreadable)?.permissions());
        if mode & 0o077 != 0 {
            return Err(invalid(key, format!("{} is readable by other users; run chmod 600 on it", file.display())));
        }
        let text = std::fs::read_to_string(file).map_err(unreadable)?;
        let keys: Vec<String> =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect();
        if keys.is_empty() {
            return Err(invalid(key, format!("{} holds no key", file.display())));
        }
        self.keys.master_keys = Some(keys);
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let public = url::Url::parse(&self.public_url()).map_err(|e| invalid("public_url", e.to_string()))?;
        if !matches!(public.scheme(), "http" | "https") || public.host().is_none() {
            return Err(invalid("public_url", "must be an http(s) URL with a host"));
        }
        if public.query().is_some() || public.fragment().is_some() {
            return Err(invalid("public_url", "must not carry a query or fragment"));
        }
        for proxy in &self.trusted_proxies {
            Cidr::parse(proxy)
                .ok_or_else(|| invalid("trusted_proxies", format!("'{proxy}' is not an address or CIDR")))?;
        }
        for origin in &self.allowed_opener_origins {
            let url =
                url::Url::parse(origin).map_err(|e| invalid("allowed_opener_origins", format!("'{origin}': {e}")))?;
            if origin == "*" || url.path() != "/" || origin.ends_with('/') || url.query().is_some() {
                return Err(invalid(
                    "allowed_opener_origins",
                    format!("'{origin}' is not an origin like https://host:port"),
                ));
            }
        }
        if self.store.kind == StoreKind::Postgres && self.store.url.is_none() {
            return Err(invalid("store.url", "the postgres store needs a url"));
        }
        for (key, value) in [
            ("sweep.interval_secs", self.sweep.interval_secs),
            ("sweep.records_per_pass", self.sweep.records_per_pass as u64),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        let limits = &self.limits;
        for (key, value) in [
            ("limits.token_requests_per_minute_per_keyid", limits.token_requests_per_minute_per_keyid),
            ("limits.token_requests_per_minute_per_address", limits.token_requests_per_minute_per_address),
            ("limits.fetch_requests_per_minute_per_address", limits.fetch_requests_per_minute_per_address),
            ("limits.record_creations_per_minute_per_address", limits.record_creations_per_minute_per_address),
            ("limits.user_code_attempts_per_minute_per_address", limits.user_code_attempts_per_minute_per_address),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        let connections = &self.connections;
        for (key, value) in [
            ("connections.max_open", connections.max_open as u64),
            ("connections.header_timeout_secs", connections.header_timeout_secs),
            ("connections.body_timeout_secs", connections.body_timeout_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.metrics_listen.is_some_and(|metrics| metrics == self.listen && metrics.port() != 0) {
            return Err(invalid("metrics_listen", "must differ from listen"));
        }
        if self.keys.master_keys.is_some() && self.keys.master_passphrase_file.is_some() {
            return Err(invalid("keys", "give master_keys or master_passphrase_file, not both"));
        }
        Ok(())
    }

    /// Whether users reach the broker over HTTPS (`public_url`).
    pub fn served_over_https(&self) -> bool {
        self.public_url().starts_with("https://")
    }

    /// Plain HTTP at a `public_url` that is not a loopback host: browsers
    /// would send AuthIDs and login cookies in the clear.
    pub fn plain_http_exposed(&self) -> bool {
        let Ok(url) = url::Url::parse(&self.public_url()) else { return false };
        let loopback = match url.host() {
            Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => true,
        };
        url.scheme() == "http" && !loopback
    }

    /// The public base URL without a trailing slash.
    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}", self.listen),
        }
    }

    /// The exact redirect URI registered with providers.
    pub fn redirect_uri(&self) -> String {
        latchkey_core::redirect_uri(&self.public_url())
    }

    /// The catalogue part: built-in entries with this configuration laid over them.
    pub fn catalogue(&self) -> CatalogueConfig {
        let over = CatalogueConfig { providers: self.providers.clone(), services: self.services.clone() };
        CatalogueConfig::built_in().map(|c| c.with_overrides(&over)).unwrap_or(over)
    }

    /// This instance's lease owner name.
    pub fn instance_id(&self) -> String {
        if let Some(id) = &self.instance_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        format!("{host}:{}", self.listen.port())
    }

    /// The parsed trusted proxy ranges.
    pub fn trusted_proxies(&self) -> Vec<Cidr> {
        self.trusted_proxies.iter().filter_map(|p| Cidr::parse(p)).collect()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("public_url", &self.public_url)
            .field("store", &self.store)
            .field("keys", &self.keys)
            .field("providers", &self.providers)
            .finish_non_exhaustive()
    }
}

/// Parses `365d`, `12h`, `30m`, `45s` (or a bare number of seconds).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        "w" => n.checked_mul(7 * 86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}
