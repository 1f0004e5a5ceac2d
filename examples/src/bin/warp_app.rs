//! `cargo run -p latchkey-examples --bin warp-app [ADDR]`: the warp
//! application of `latchkey_examples::warp_app`, with the broker under
//! `/oauth/`, against a fake cloud on loopback, serving on ADDR (default
//! 127.0.0.1:8082).

use std::sync::Arc;

use latchkey_core::MemoryStore;
use latchkey_examples::{standin, warp_app};
use latchkey_server::config::Config;

#[tokio::main]
#[allow(clippy::print_stdout)] // the instructions are the point of running it
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8082".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let cloud = standin::cloud().await?;
    // The broker's configuration, as `latchkey serve` reads it; a fresh key held only in memory.
    let key = standin::keyring().current().expose_config_text().as_str().to_owned();
    let config = Config::parse(&format!(
        "public_url = \"{url}/oauth\"\n[keys]\nmaster_keys = [\"{key}\"]\n{}",
        standin::catalogue(&cloud)
    ))?;
    let app = warp_app::start(&config, Arc::new(MemoryStore::new()), listener).await?;
    println!("The app is at {url}/; the broker under it at {url}/oauth/ (log in at {url}/oauth/?type=examplecloud).");
    println!("Then: curl -H \"X-AuthID: <AuthID>\" {url}/oauth/refresh");
    latchkey_server::shutdown_signal().await;
    let _ = app.stop.send(true);
    let _ = app.served.await;
    latchkey_server::drain(&app.mounted.broker).await;
    Ok(())
}
