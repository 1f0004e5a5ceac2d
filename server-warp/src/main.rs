//! The `latchkey` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use latchkey_core::engine::{GrantFilter, OperatorRevocation};
use latchkey_core::keys::{MasterKey, MasterKeyId, MasterKeyring};
use latchkey_core::{Broker, GrantId, GrantState, KeyId, OsRandom};
use latchkey_server::config::{Config, LogFormat, StoreKind, parse_duration};
use latchkey_server::{operator, setup};

/// The help text; `$demo` is what the `demo` line says, which depends on
/// whether this build has the `demo` feature.
macro_rules! usage {
    ($demo:literal) => {
        concat!(
            "latchkey — an OAuth token broker for unattended software

usage:
  latchkey serve      [--config FILE]   run the broker (default: 127.0.0.1:8080, sled store in ./latchkey-data)
  latchkey demo       [--listen ADDR]   ",
            $demo,
            "
  latchkey check      [--config FILE]   validate the configuration and reach the store
  latchkey services   [--config FILE]   list the services offered (and those withheld, with the reason)
  latchkey stats      [--config FILE]   count grants by service and state
  latchkey gc --unused-for DURATION [--dry-run] [--config FILE]
                                        delete grants unused for DURATION (e.g. 365d) and expired records
  latchkey master-key rotate [--config FILE]
                                        re-seal every handle under the current master key
  latchkey grants list [--service S] [--state S] [--unused-for DURATION] [--json] [--config FILE]
                                        list grants (state: active, reauth_required, revoked)
  latchkey grants show GRANT_ID [--json] [--config FILE]
                                        a grant and its AuthIDs (key ids, created, last used) — never a secret
  latchkey grants revoke GRANT_ID [--json] [--config FILE]
                                        revoke a grant and all its AuthIDs without an AuthID; the provider
                                        cannot be told (its token is sealed under the AuthIDs)
  latchkey handles revoke KEYID [--json] [--config FILE]
                                        revoke one AuthID by its key id (its grant too if it was the last)

On the embedded (sled) store, stop the broker before running stats, gc, grants,
handles or master-key rotate: sled admits one process at a time.

The configuration file may also be named by LATCHKEY_CONFIG; LATCHKEY_* variables
override its keys (LATCHKEY_STORE__KIND=postgres); LATCHKEY_LOG sets the log filter."
        )
    };
}

#[cfg(feature = "demo")]
const USAGE: &str = usage!(
    "run the broker with a fake provider on loopback, for a first look
                                        (default 127.0.0.1:8080; port 0 takes any free port)"
);
#[cfg(not(feature = "demo"))]
const USAGE: &str = usage!("not in this build (rebuild with the `demo` feature)");

struct Args {
    command: Vec<String>,
    config: Option<PathBuf>,
    // Only `demo` reads it; a build without the demo still accepts the flag.
    #[cfg_attr(not(feature = "demo"), allow(dead_code))]
    listen: Option<SocketAddr>,
    unused_for: Option<String>,
    dry_run: bool,
    service: Option<String>,
    state: Option<String>,
    json: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        command: Vec::new(),
        config: None,
        listen: None,
        unused_for: None,
        dry_run: false,
        service: None,
        state: None,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" | "-c" => args.config = Some(it.next().context("--config needs a file")?.into()),
            "--listen" => args.listen = Some(it.next().context("--listen needs an address")?.parse()?),
            "--unused-for" => args.unused_for = Some(it.next().context("--unused-for needs a duration")?),
            "--dry-run" => args.dry_run = true,
            "--service" => args.service = Some(it.next().context("--service needs a service id")?),
            "--state" => args.state = Some(it.next().context("--state needs a state")?),
            "--json" => args.json = true,
            "-h" | "--help" => args.command = vec!["help".into()],
            "-V" | "--version" => args.command = vec!["version".into()],
            // Grant ids and key ids are base64url: one may begin with '-'.
            flag if flag.starts_with('-') && !expects_id(&args.command) => {
                bail!("unknown option {flag}; see latchkey --help")
            }
            word => args.command.push(word.to_owned()),
        }
    }
    if args.config.is_none() {
        args.config = std::env::var_os("LATCHKEY_CONFIG").map(PathBuf::from);
    }
    Ok(args)
}

/// Whether the words so far are a command whose next word is a grant id or
/// key id (base64url, which may begin with '-').
fn expects_id(command: &[String]) -> bool {
    matches!(
        command.iter().map(String::as_str).collect::<Vec<_>>().as_slice(),
        ["grants", "show" | "revoke"] | ["handles", "revoke"]
    )
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    Ok(Config::load(args.config.as_deref(), std::env::vars())?)
}

/// Installs the log subscriber (see `latchkey_server::logging`). Its guard
/// is not kept: `main` writes out every queued line before the process
/// ends, whichever command ran.
fn init_logging(config: Option<&Config>) {
    let level = std::env::var("LATCHKEY_LOG").ok().or_else(|| config.map(|c| c.log.level.clone()));
    let json = config.is_some_and(|c| c.log.format == LogFormat::Json);
    drop(latchkey_server::logging::init(level.as_deref().unwrap_or("info"), json));
}

#[allow(clippy::print_stdout)]
async fn run(args: Args) -> anyhow::Result<()> {
    let words: Vec<&str> = args.command.iter().map(String::as_str).collect();
    match words.as_slice() {
        [] | ["help"] => {
            println!("{USAGE}");
            Ok(())
        }
        ["version"] => {
            println!("latchkey {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        ["serve"] => {
            let config = load_config(&args)?;
            init_logging(Some(&config));
            let store = setup::open_store(&config).await?;
            let running = latchkey_server::start(&config, store, |_| {}).await?;
            for w in &running.withheld {
                tracing::info!(service = %w.service, reason = %w.reason, "service not offered");
            }
            tracing::info!(addr = %running.addr, public_url = %config.public_url(), "latchkey is serving");
            running.until(latchkey_server::shutdown_signal()).await;
            Ok(())
        }
        #[cfg(not(feature = "demo"))]
        ["demo"] => bail!("this build has no demo; rebuild with the `demo` feature (on by default)"),
        #[cfg(feature = "demo")]
        ["demo"] => {
            init_logging(None);
            let fake = latchkey_server::demo::fake_provider().await?;
            let listen = args.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
            // Bound before the configuration is made, so that port 0 (any
            // free port) works: the demo's URLs name the port it got.
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("--listen: cannot bind {listen}"))?;
            let dir = std::env::temp_dir().join(format!("latchkey-demo-{}", std::process::id()));
            // The data one level down: the generated master key goes beside
            // it, in `dir`, and is removed with it.
            let config = latchkey_server::demo::config(listener.local_addr()?, &dir.join("data"), &fake)?;
            let store = setup::open_store(&config).await?;
            let running = latchkey_server::serve(&config, store, listener, |_| {}).await?;
            println!("{}", latchkey_server::demo::instructions(&running.url()));
            running.until(latchkey_server::shutdown_signal()).await;
            drop(fake);
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        }
        ["check"] => {
            let config = load_config(&args)?;
            init_logging(Some(&config));
            let store = setup::open_store(&config).await?;
            store.ping().await.context("store: not reachable")?;
            let built = setup::catalogue(&config)?;
            setup::load_keyring(&config)?;
            println!(
                "configuration ok: {} service(s) offered, {} withheld, store reachable",
                built.catalogue.listed_services().count(),
                built.withheld.len()
            );
            Ok(())
        }
        ["services"] => {
            let config = load_config(&args)?;
            let built = setup::catalogue(&config)?;
            for s in built.catalogue.listed_services() {
                println!("{:<14} {}  (provider {})", s.id, s.display_name, s.provider);
            }
            for w in &built.withheld {
                println!("{:<14} not offered: {}", w.service, w.reason);
            }
            Ok(())
        }
        ["stats"] => {
            let config = load_config(&args)?;
            init_logging(Some(&config));
            let store = setup::open_store(&config).await?;
            let setup = setup::engine(&config, store, |_| {}).await?;
            let stats = setup.broker.stats().await?;
            for ((service, state), n) in &stats.grants {
                println!("grants{{service={service},state={state}}} {n}");
            }
            println!("handles_active {}\nhandles_revoked {}", stats.handles_active, stats.handles_revoked);
            println!("logins_in_flight {}\nhandoffs_waiting {}", stats.logins_in_flight, stats.handoffs_waiting);
            Ok(())
        }
        ["gc"] => {
            let text = args.unused_for.as_deref().context("gc needs --unused-for DURATION (e.g. 365d)")?;
            let unused_for =
                parse_duration(text).with_context(|| format!("--unused-for: '{text}' is not like 365d"))?;
            let config = load_config(&args)?;
            init_logging(Some(&config));
            let store = setup::open_store(&config).await?;
            let setup = setup::engine(&config, store, |_| {}).await?;
            let report = setup.broker.gc(unused_for, args.dry_run).await?;
            let verb = if args.dry_run { "would delete" } else { "deleted" };
            for g in &report.grants {
                println!("{verb} grant {} ({}, {}, {} handle(s))", g.grant_id, g.service, g.state.as_str(), g.handles);
            }
            println!(
                "{verb} {} grant(s), {} expired login(s), {} hand-off(s), {} device code(s), {} stale lease(s)",
                report.grants.len(),
                report.expired_logins,
                report.expired_handoffs,
                report.expired_devices,
                report.stale_leases
            );
            Ok(())
        }
        ["master-key", "rotate"] => master_key_rotate(&args).await,
        ["grants", "list"] => {
            let state = match args.state.as_deref() {
                None => None,
                Some("active") => Some(GrantState::Active),
                Some("reauth_required") => Some(GrantState::ReauthRequired),
                Some("revoked") => Some(GrantState::Revoked),
                Some(other) => bail!("--state: '{other}' is none of active, reauth_required, revoked"),
            };
            let unused_for = match args.unused_for.as_deref() {
                None => None,
                Some(text) => {
                    Some(parse_duration(text).with_context(|| format!("--unused-for: '{text}' is not like 365d"))?)
                }
            };
            let filter = GrantFilter { service: args.service.clone(), state, unused_for };
            let broker = operator_broker(&args).await?;
            println!("{}", operator::grant_list(&broker.list_grants(&filter).await?, args.json));
            Ok(())
        }
        ["grants", "show", id] => {
            let grant_id = parse_grant_id(id)?;
            let broker = operator_broker(&args).await?;
            let details = broker.show_grant(&grant_id).await?.with_context(|| format!("no grant {grant_id}"))?;
            println!("{}", operator::grant_details(&details, args.json));
            Ok(())
        }
        ["grants", "revoke", id] => {
            let grant_id = parse_grant_id(id)?;
            let broker = operator_broker(&args).await?;
            let done =
                broker.revoke_grant_as_operator(&grant_id).await?.with_context(|| format!("no grant {grant_id}"))?;
            audit_revocation(&broker, &done, None);
            println!("{}", operator::revocation(&done, args.json));
            Ok(())
        }
        ["handles", "revoke", keyid] => {
            let keyid = KeyId::parse(keyid).map_err(|_| anyhow::anyhow!("'{keyid}' is not a key id"))?;
            let broker = operator_broker(&args).await?;
            let done = broker
                .revoke_handle_as_operator(&keyid)
                .await?
                .with_context(|| format!("no AuthID with key id {keyid}"))?;
            audit_revocation(&broker, &done, Some(&keyid));
            println!("{}", operator::revocation(&done, args.json));
            Ok(())
        }
        _ => bail!("unknown command '{}'; see latchkey --help", words.join(" ")),
    }
}

/// The engine on the configured store, for the operator commands.
async fn operator_broker(args: &Args) -> anyhow::Result<Broker> {
    let config = load_config(args)?;
    init_logging(Some(&config));
    let store = setup::open_store(&config).await?;
    Ok(setup::engine(&config, store, |_| {}).await?.broker)
}

fn parse_grant_id(text: &str) -> anyhow::Result<GrantId> {
    GrantId::parse(text).with_context(|| format!("'{text}' is not a grant id (see latchkey grants list)"))
}

/// One audit line per operator revocation, as the HTTP surface writes for a
/// user's; and an error when its grant-changed notice could not be published
/// (the revocation stands; running brokers may serve their cached token for
/// up to ten minutes).
fn audit_revocation(broker: &Broker, done: &OperatorRevocation, keyid: Option<&KeyId>) {
    if broker.metrics().notice_publish_failures > 0 {
        tracing::error!(
            grant_id = %done.grant_id,
            "the revocation stands, but the store did not take its notice to running brokers: \
             they may serve the grant's cached access token for up to ten minutes"
        );
    }
    tracing::info!(
        target: "latchkey::audit",
        event = if keyid.is_some() { "authid_revoked_by_operator" } else { "grant_revoked_by_operator" },
        grant_id = %done.grant_id,
        keyid = keyid.map(tracing::field::display),
        service = %done.service,
        grant_revoked = done.grant_revoked,
        handles_revoked = done.handles_revoked,
        provider_told = false,
        "revoked by the operator"
    );
}

/// Re-seals every handle under the current master key. With the generated
/// key file of a sled store (`setup::master_key_path`), first adds a new key
/// as current, and removes the old ones once nothing needs them.
#[allow(clippy::print_stdout)]
async fn master_key_rotate(args: &Args) -> anyhow::Result<()> {
    let config = load_config(args)?;
    init_logging(Some(&config));
    let generated = config.keys.master_keys.is_none()
        && config.keys.master_passphrase_file.is_none()
        && config.store.kind == StoreKind::Sled;
    let key_file = setup::master_key_path(&config);
    // Everything that can refuse comes before the key file is touched: the
    // store (a sled store a running broker holds is refused here) and the
    // catalogue the engine is built with. From the first write on, the file
    // always holds every key the data may need (new and old, then, once
    // every record is re-sealed, the new one alone), each write atomic.
    let store = setup::open_store(&config).await?;
    setup::catalogue(&config)?;
    if generated {
        // Creates the key file on a first run (or moves one an older version
        // left in the data directory), and checks an existing one parses.
        let ring = setup::load_keyring(&config)?;
        // Ids are `k<seconds>`; two rotations within a second must not share one.
        let taken: Vec<String> = ring.ids().iter().map(|id| id.as_str().to_owned()).collect();
        let id = (setup::unix_now() + 1..).map(|n| format!("k{n}")).find(|id| !taken.contains(id)).unwrap_or_default();
        let new = MasterKey::generate(MasterKeyId::new(&id)?, &OsRandom);
        let mut lines = vec![new.expose_config_text().as_str().to_owned()];
        let old_text = std::fs::read_to_string(&key_file)?;
        lines.extend(old_text.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned));
        write_key_file(&key_file, &lines)?;
    }
    let setup = setup::engine(&config, Arc::clone(&store), |_| {}).await?;
    let report = setup.broker.reseal().await?;
    println!(
        "re-sealed {} handle(s) and {} login(s); {} already current; {} could not be opened",
        report.handles_resealed, report.logins_resealed, report.handles_current, report.failed
    );
    let current = setup.keyring.current().id().to_string();
    if report.failed > 0 {
        bail!("some records could not be opened with the configured keys; keep the old keys configured");
    }
    if generated {
        let text = std::fs::read_to_string(&key_file)?;
        let first: Vec<String> = text.lines().take(1).map(str::to_owned).collect();
        write_key_file(&key_file, &first)?;
        println!("old master keys removed from {}; current key is {current}", key_file.display());
    } else {
        println!("every record is under master key {current}; older keys can now be removed from the configuration");
    }
    tracing::info!(
        target: "latchkey::audit",
        event = "master_key_rotated",
        key_id = %current,
        handles_resealed = report.handles_resealed,
        logins_resealed = report.logins_resealed,
        "master key rotated"
    );
    Ok(())
}

/// Replaces the key file atomically: checks the keys parse, writes a
/// temporary file beside it (mode 0600, synced), renames it over the file and
/// syncs the directory. A crash leaves the old file or the new one.
fn write_key_file(path: &std::path::Path, lines: &[String]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = MasterKeyring::parse(lines).context("the new key file would not parse; nothing was written")?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(format!("{}\n", lines.join("\n")).as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match parse_args() {
        Ok(args) => run(args).await,
        Err(e) => Err(e),
    };
    // Whatever a command logged is written out before the process ends.
    latchkey_server::logging::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("latchkey: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
