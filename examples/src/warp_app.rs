//! (a) A warp application that mounts the whole broker under `/oauth/`,
//! beside its own routes.
//!
//! | route | whose |
//! |---|---|
//! | `GET /` | the application's home page, linking to `/oauth/` |
//! | `GET /api/services` | the application's own API, reading the broker's catalogue |
//! | `/oauth/…` | the broker: its pages, Duplicati's protocol, `/v1`, `/oauth2/token`, `/healthz` |
//! | anything else | the application's own 404 |
//!
//! The broker takes its path from `public_url`
//! (`public_url = "https://app.example.org/oauth"`): it matches requests
//! under it, and every link, redirect, redirect URI and login link it makes
//! carries it. [`Mounted`] builds the engine from the same configuration as
//! `latchkey serve` ([`Config`]: store, keys, providers, services, limits)
//! and runs the background sweep; [`latchkey_server::serve_filter`] serves
//! the combined filter with what the broker's own listener has: the client's
//! address for the rate limits, request deadlines, the connection cap and
//! `nosniff`.

use std::convert::Infallible;
use std::sync::Arc;

use latchkey_core::Store;
use latchkey_server::Mounted;
use latchkey_server::config::Config;
use tokio::net::TcpListener;
use tokio::sync::watch;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

/// The application's routes with the broker's mounted among them.
pub fn routes(mounted: &Mounted) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + use<> {
    let home = warp::get().and(warp::path::end()).map(|| {
        warp::reply::html("<!doctype html><title>My app</title><h1>My app</h1><a href=\"/oauth/\">Connect storage</a>")
            .into_response()
    });
    let broker = mounted.broker.clone();
    let services = warp::get().and(warp::path!("api" / "services")).map(move || {
        let ids: Vec<&str> = broker.catalogue().listed_services().map(|s| s.id.as_str()).collect();
        warp::reply::json(&serde_json::json!({ "services": ids })).into_response()
    });
    home.or(services)
        .unify()
        .or(mounted.routes())
        .unify()
        // The application's own answer for everything else; the broker answers for itself under /oauth/.
        .or(warp::any().map(|| warp::reply::with_status("not found here", StatusCode::NOT_FOUND).into_response()))
        .unify()
}

/// The application, serving on `listener` until `stop` is sent `true`.
pub struct WarpApp {
    /// The broker as mounted (its engine is `mounted.broker`).
    pub mounted: Mounted,
    /// Send `true` to stop.
    pub stop: watch::Sender<bool>,
    /// Ends when every connection has.
    pub served: tokio::task::JoinHandle<()>,
}

/// Builds the broker from `config` on `store`, mounts it and serves.
pub async fn start(config: &Config, store: Arc<dyn Store>, listener: TcpListener) -> anyhow::Result<WarpApp> {
    let mounted = Mounted::new(config, store).await?;
    let (stop, stopped) = watch::channel(false);
    let served = tokio::spawn(latchkey_server::serve_filter(listener, routes(&mounted), config, stopped));
    Ok(WarpApp { mounted, stop, served })
}
