//! `cargo run -p latchkey-examples --bin hyper-app [ADDR]`: the hyper
//! application of `latchkey_examples::hyper_app`, against a fake cloud on
//! loopback, serving on ADDR (default 127.0.0.1:8081).

use std::sync::Arc;

use latchkey_examples::hyper_app::{self, App};
use latchkey_examples::{BTreeStore, standin};

#[tokio::main]
#[allow(clippy::print_stdout)] // the instructions are the point of running it
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8081".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let cloud = standin::cloud().await?;
    let broker =
        hyper_app::engine(Arc::new(BTreeStore::default()), &standin::catalogue(&cloud), standin::keyring(), &url)
            .await?;
    tokio::spawn(hyper_app::sweep(broker.clone()));
    let app = Arc::new(App { broker, service: standin::SERVICE.into() });
    println!("Open {url}/ and click Connect; the page after the fake cloud's login shows an AuthID.");
    println!("Then: curl -H \"Authorization: Bearer <AuthID>\" {url}/api/token");
    hyper_app::serve(listener, app).await?;
    Ok(())
}
