//! The latchkey broker: turns HTTP into engine calls.
//!
//! Duplicati clients use the helper protocol at the root (`/refresh`,
//! `/login`, `/fetch`, …), standard OAuth2 clients the RFC 6749 facade at
//! `/oauth2/token`, and scripts the `/v1` JSON API. Pages are rendered here;
//! every decision about tokens is the engine's (`latchkey-core`).
//!
//! This crate is the one place that knows about configuration files, the
//! network, signals and logs. The API surfaces' errors cross into HTTP in
//! [`http::reply`], the pages' in their handlers; `docs/protocol.md` lists
//! every route, error status and configuration key.
//!
//! # Embedding
//!
//! The whole broker can live inside another warp application, under a path
//! of its own: [`Mounted`] builds the engine from the same [`Config`] as
//! `latchkey serve` (store, master keys, providers, services, limits) and
//! runs its background sweep; [`Mounted::routes`] is every route under the
//! path of `public_url` and nothing else ([`http::mount`]); [`serve_filter`]
//! serves the application's combined filter on the broker's own accept loop
//! (client addresses for the rate limits, deadlines, the connection cap).
//! `docs/embedding.md` has the details, `examples/src/warp_app.rs` a whole
//! application; embedding only the engine needs no warp at all (see
//! `latchkey_providers`).
//!
//! ```
//! use std::sync::Arc;
//!
//! use latchkey_core::MemoryStore;
//! use latchkey_server::config::Config;
//! use latchkey_server::{Mounted, serve_filter};
//! use warp::Filter;
//! use warp::reply::Reply;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! let config = Config::parse(
//!     r#"
//!     public_url = "https://app.example.org/oauth"
//!     [keys]
//!     master_keys = ["k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]
//!     "#,
//! )?;
//! let broker = Mounted::new(&config, Arc::new(MemoryStore::new())).await?;
//! let app = warp::path!("hello")
//!     .map(|| "hello from the app".into_response())
//!     .or(broker.routes()) // the broker, under /oauth/
//!     .unify();
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let (stop, stopped) = tokio::sync::watch::channel(false);
//! let served = tokio::spawn(serve_filter(listener, app, &config, stopped));
//! stop.send(true)?; // on shutdown
//! served.await?;
//! latchkey_server::drain(&broker.broker).await;
//! # Ok(())
//! # }
//! ```

pub mod audit;
pub mod config;
pub mod connections;
#[cfg(feature = "demo")]
pub mod demo;
pub mod http;
pub mod limits;
pub mod logging;
pub mod operator;
pub mod runtime;
pub mod setup;
pub mod upkeep;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use latchkey_core::{Broker, EngineConfig, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warp::http::header::{HeaderName, HeaderValue};

use crate::config::Config;
use crate::connections::{Handler, Limits};
use crate::http::AppState;
use crate::http::reply::{Failure, Refusal, Surface};
use crate::limits::Limiter;

/// How long a graceful shutdown waits for refreshes in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Every answer says its content type is the one to believe.
pub const NOSNIFF: (HeaderName, HeaderValue) =
    (HeaderName::from_static("x-content-type-options"), HeaderValue::from_static("nosniff"));

/// With an https `public_url`: browsers go on using HTTPS for a year.
pub const HSTS: (HeaderName, HeaderValue) =
    (HeaderName::from_static("strict-transport-security"), HeaderValue::from_static("max-age=31536000"));

/// The path of the metrics, which `metrics_listen` moves off the main listener.
const METRICS_PATH: &str = "/metrics";

/// A broker serving HTTP.
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    /// Where `/metrics` is served when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// The engine (tests read its metrics).
    pub broker: Broker,
    /// Services not offered, and why.
    pub withheld: Vec<latchkey_providers::Withheld>,
    stop: Option<watch::Sender<bool>>,
    task: JoinHandle<()>,
    /// The sweep and the notice watch; they stop with this value.
    _upkeep: upkeep::Upkeep,
}

impl Running {
    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting requests, lets those in flight finish, then waits for
    /// refreshes in flight to store what they obtained.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        let _ = (&mut self.task).await;
        drain(&self.broker).await;
    }

    /// Runs until `signal` completes, then stops gracefully.
    pub async fn until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down: finishing requests and refreshes in flight");
        self.stop().await;
    }
}

/// Waits (bounded) for refreshes in flight, then tries to store pending writes.
pub async fn drain(broker: &Broker) {
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while broker.refreshes_in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = broker.flush_pending().await;
    if left > 0 {
        tracing::error!(pending = left, "refreshed grants could not be stored before shutdown");
    }
}

/// Builds the engine on `store` and serves on `config.listen`.
pub async fn start(
    config: &Config,
    store: Arc<dyn Store>,
    tune: impl FnOnce(&mut EngineConfig),
) -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen: cannot bind {}", config.listen))?;
    serve(config, store, listener, tune).await
}

/// Builds the engine on `store` and serves on an already bound listener
/// (tests bind port 0 first, to know the public URL).
pub async fn serve(
    config: &Config,
    store: Arc<dyn Store>,
    listener: tokio::net::TcpListener,
    tune: impl FnOnce(&mut EngineConfig),
) -> anyhow::Result<Running> {
    let setup = setup::engine(config, Arc::clone(&store), tune).await?;
    let upkeep = upkeep::spawn(&setup.broker, &config.sweep);
    let addr = listener.local_addr()?;
    let metrics_listener = match config.metrics_listen {
        Some(at) => {
            Some(tokio::net::TcpListener::bind(at).await.with_context(|| format!("metrics_listen: cannot bind {at}"))?)
        }
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    if config.plain_http_exposed() {
        tracing::warn!(
            public_url = %config.public_url(),
            "public_url is plain http on a host other than loopback: AuthIDs, access tokens and login cookies \
             cross the network in the clear; serve the broker behind TLS and give its https URL"
        );
    }
    let state = Arc::new(AppState::new(setup.broker.clone(), store, config, Limiter::new(&config.limits)));
    let routes = hyper_util::service::TowerToHyperService::new(warp::service(http::routes(Arc::clone(&state))));
    let mut headers = vec![NOSNIFF];
    if config.served_over_https() {
        headers.push(HSTS);
    }
    let headers: Arc<[(HeaderName, HeaderValue)]> = headers.into();
    let limits = Limits::new(&config.connections);
    let (stop, stopped) = watch::channel(false);
    let counted = Arc::clone(&state.connections);
    let main = connections::serve(
        listener,
        http::with_shortcut(state, handler(routes.clone(), move |path| metrics_addr.is_none() || path != METRICS_PATH)),
        limits,
        Arc::clone(&headers),
        counted,
        stopped.clone(),
    );
    // The scrapers' own connections are not counted with the clients'.
    let metrics = metrics_listener.map(|listener| {
        let handler = handler(routes, |path| path == METRICS_PATH);
        connections::serve(listener, handler, limits, headers, Arc::default(), stopped)
    });
    let task = tokio::spawn(async move {
        match metrics {
            Some(metrics) => {
                tokio::join!(main, metrics);
            }
            None => main.await,
        }
    });
    if let Some(metrics) = metrics_addr {
        tracing::info!(addr = %metrics, "serving /metrics on its own address, not on the main one");
    }
    Ok(Running {
        addr,
        metrics_addr,
        broker: setup.broker,
        withheld: setup.withheld,
        stop: Some(stop),
        task,
        _upkeep: upkeep,
    })
}

/// The routes as a [`Handler`] serving the paths `serves` allows, and 404
/// (no route, in the `/v1` shape) for the rest.
fn handler<S>(service: S, serves: impl Fn(&str) -> bool + Send + Sync + 'static) -> Handler
where
    S: hyper::service::Service<
            warp::http::Request<connections::RequestBody>,
            Response = warp::reply::Response,
            Error = std::convert::Infallible,
        > + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    Arc::new(move |mut request: warp::http::Request<connections::RequestBody>, peer| {
        request.extensions_mut().insert(connections::Peer(peer));
        if !serves(request.uri().path()) {
            let failure = Failure::refused(Refusal::NoRoute, "no such endpoint");
            return Box::pin(std::future::ready(http::reply::error(Surface::V1, &failure)));
        }
        let answer = hyper::service::Service::call(&service, request);
        Box::pin(async move {
            match answer.await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        })
    })
}

/// The broker to mount in a warp application of its own: the engine built
/// from a [`Config`] on a store, with the background sweep of expired
/// records, which stops when this value is dropped. Put [`Mounted::routes`]
/// beside the application's own routes and serve them with
/// [`serve_filter`]; on shutdown, [`drain`] the broker.
pub struct Mounted {
    /// The engine; the application's own handlers may call it too.
    pub broker: Broker,
    /// Services configured but not offered, and why.
    pub withheld: Vec<latchkey_providers::Withheld>,
    state: http::State,
    _upkeep: upkeep::Upkeep,
}

impl Mounted {
    /// Builds the engine on `store` as `latchkey serve` does: master keys,
    /// catalogue, limits and sweep from `config`, `public_url` for every
    /// link, redirect and redirect URI.
    pub async fn new(config: &Config, store: Arc<dyn Store>) -> anyhow::Result<Mounted> {
        let setup = setup::engine(config, Arc::clone(&store), |_| {}).await?;
        let upkeep = upkeep::spawn(&setup.broker, &config.sweep);
        let state = Arc::new(AppState::new(setup.broker.clone(), store, config, Limiter::new(&config.limits)));
        Ok(Mounted { broker: setup.broker, withheld: setup.withheld, state, _upkeep: upkeep })
    }

    /// Every route of the broker under the path of `public_url`, and
    /// nothing outside it: see [`http::mount`].
    pub fn routes(&self) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
        http::mount(Arc::clone(&self.state))
    }
}

/// Serves `filter` — an application's own warp routes with
/// [`Mounted::routes`] among them — the way `latchkey serve` serves the
/// broker: each client's address reaches the broker's rate limits (under
/// `warp::serve` the broker sees none, and every client shares one budget),
/// the `[connections]` deadlines and cap hold, and every answer carries
/// `nosniff` (and HSTS with an https `public_url`). A request `filter`
/// rejects gets warp's answer for the rejection. Stops accepting when
/// `shutdown` turns true; the future resolves when every connection has
/// ended, and borrows nothing (spawn it).
pub fn serve_filter<F, R>(
    listener: tokio::net::TcpListener,
    filter: F,
    config: &Config,
    shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + use<F, R>
where
    F: warp::Filter<Extract = (R,)> + Clone + Send + Sync + 'static,
    F::Error: Into<warp::Rejection>,
    R: warp::Reply + Send + 'static,
{
    use warp::Filter as _;
    let filter = filter.map(warp::Reply::into_response).boxed();
    let service = hyper_util::service::TowerToHyperService::new(warp::service(filter));
    let mut headers = vec![NOSNIFF];
    if config.served_over_https() {
        headers.push(HSTS);
    }
    let limits = Limits::new(&config.connections);
    connections::serve(listener, handler(service, |_| true), limits, headers.into(), Arc::default(), shutdown)
}

/// Resolves when the process gets SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
