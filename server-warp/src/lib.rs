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
    let routes = hyper_util::service::TowerToHyperService::new(warp::service(http::routes(state)));
    let mut headers = vec![NOSNIFF];
    if config.served_over_https() {
        headers.push(HSTS);
    }
    let headers: Arc<[(HeaderName, HeaderValue)]> = headers.into();
    let limits = Limits::new(&config.connections);
    let (stop, stopped) = watch::channel(false);
    let main = connections::serve(
        listener,
        handler(routes.clone(), move |path| metrics_addr.is_none() || path != METRICS_PATH),
        limits,
        Arc::clone(&headers),
        stopped.clone(),
    );
    let metrics = metrics_listener.map(|listener| {
        connections::serve(listener, handler(routes, |path| path == METRICS_PATH), limits, headers, stopped)
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
    Arc::new(move |request| {
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
