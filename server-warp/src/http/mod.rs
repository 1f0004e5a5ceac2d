//! The HTTP surface: Duplicati's helper protocol at the root, the `/v1` JSON
//! API, the RFC 6749 facade, pages, and operations endpoints.
//!
//! Every handler answers a response: errors are explicit, in the vocabulary
//! of the surface they happen on. Warp's own rejections (no route, wrong
//! method, body too large) are turned into JSON errors — by `recover_on` in
//! the vocabulary of the route group that matched — so no request ever gets
//! an HTML error page or a stack trace.

mod api;
mod duplicati;
pub mod front_door;
mod metrics;
mod mount;
pub mod pages;
pub mod reply;
mod routes;
mod token_path;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use latchkey_core::{Broker, LoginMethod, Store};
use warp::Filter;
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::Response;

pub use self::metrics::HttpMetrics;
pub use self::mount::{base_path, mount};
use self::reply::{Failure, Refusal, Surface};
use self::routes::Route;
use crate::config::Cidr;
use crate::limits::Limiter;

/// Request bodies larger than this are refused.
pub const MAX_BODY: u64 = 16 * 1024;

/// What every handler can reach.
pub struct AppState {
    /// The engine.
    pub broker: Broker,
    /// The store, for `/readyz`.
    pub store: Arc<dyn Store>,
    /// The public base URL, without a trailing slash.
    pub public_url: String,
    /// Origins the AuthID page posts its message to.
    pub openers: Vec<String>,
    /// Rate limits.
    pub limiter: Limiter,
    /// Proxies whose `X-Forwarded-For` counts.
    pub proxies: Vec<Cidr>,
    /// Request counters.
    pub metrics: HttpMetrics,
    /// The main listener's connection counts.
    pub connections: Arc<crate::connections::ConnectionStats>,
    /// The pages' Content-Security-Policy.
    pub csp: String,
    /// How long a login may take; the proof cookie lives as long.
    pub login_ttl: std::time::Duration,
}

impl AppState {
    /// State for a broker; the CSP allows forms to go to this broker and to
    /// the authorization endpoints of the broker's catalogue, and nothing else.
    pub fn new(broker: Broker, store: Arc<dyn Store>, config: &crate::config::Config, limiter: Limiter) -> Self {
        let form_action: String =
            broker.catalogue().authorize_origins().into_iter().map(|origin| format!(" {origin}")).collect();
        let csp = format!(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; connect-src 'none'; \
             base-uri 'none'; frame-ancestors 'none'; form-action 'self'{form_action}"
        );
        AppState {
            login_ttl: broker.login_ttl(),
            broker,
            store,
            public_url: config.public_url(),
            openers: config.allowed_opener_origins.clone(),
            limiter,
            proxies: config.trusted_proxies(),
            metrics: HttpMetrics::default(),
            connections: Arc::default(),
            csp,
        }
    }

    /// Whether users log into `service` by pasting a login token (`/cli-token`).
    pub fn logs_in_with_token(&self, service: &str) -> bool {
        self.broker.catalogue().login_method(service) == Some(LoginMethod::LoginToken)
    }

    /// The login link for a service (what Duplicati shows its user).
    pub fn login_link(&self, service: &str) -> String {
        format!("{}/?type={}", self.public_url, pages::q(service))
    }
}

/// Shared state as a filter.
pub type State = Arc<AppState>;

fn with_state(state: State) -> impl Filter<Extract = (State,), Error = Infallible> + Clone {
    warp::any().map(move || Arc::clone(&state))
}

pub use crate::limits::client_address;

/// The client's address: the peer, or what `X-Forwarded-For` says when the
/// peer is a trusted proxy (see [`client_address`]).
fn client_from(peer: Option<SocketAddr>, headers: &HeaderMap, proxies: &[Cidr]) -> IpAddr {
    if proxies.is_empty() {
        // No proxy is trusted: the peer is the client, and no header is read.
        return client_address(peer, std::iter::empty(), &[]);
    }
    // Named once: a name given as text is parsed at every lookup.
    const X_FORWARDED_FOR: warp::http::header::HeaderName =
        warp::http::header::HeaderName::from_static("x-forwarded-for");
    let lines = headers.get_all(X_FORWARDED_FOR).into_iter().filter_map(|v| v.to_str().ok());
    client_address(peer, lines, proxies)
}

fn client_ip(state: State) -> warp::filters::BoxedFilter<(IpAddr,)> {
    let peer = crate::connections::remote();
    if state.proxies.is_empty() {
        // No proxy is trusted: no header is read, nor cloned.
        return peer.map(|peer: Option<SocketAddr>| client_from(peer, &HeaderMap::new(), &[])).boxed();
    }
    peer.and(warp::header::headers_cloned())
        .map(move |peer: Option<SocketAddr>, headers: HeaderMap| client_from(peer, &headers, &state.proxies))
        .boxed()
}

/// Query parameters as a map (the first value of each name).
fn query() -> impl Filter<Extract = (HashMap<String, String>,), Error = Infallible> + Clone {
    warp::query::raw().or(warp::any().map(String::new)).unify().map(|raw: String| query_map(raw.as_bytes()))
}

/// A query string as a map: the first value of each name.
pub fn query_map(raw: &[u8]) -> HashMap<String, String> {
    let mut map = HashMap::new();
    for (k, v) in form_urlencoded::parse(raw) {
        map.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    map
}

/// Where a Duplicati request's AuthID comes from: the `X-AuthID` header,
/// else the body's `authid` field, else the query's (older clients).
pub fn duplicati_authid(
    header: Option<String>,
    form: &HashMap<String, String>,
    query: &HashMap<String, String>,
) -> String {
    header.or_else(|| form.get("authid").cloned()).or_else(|| query.get("authid").cloned()).unwrap_or_default()
}

/// A body over [`MAX_BODY`].
#[derive(Debug)]
struct TooLarge;

impl warp::reject::Reject for TooLarge {}

/// The request body, at most [`MAX_BODY`] bytes, with or without a
/// `Content-Length`; empty when there is none.
fn body() -> impl Filter<Extract = (Vec<u8>,), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and_then(|length: Option<u64>| async move {
            match length {
                Some(length) if length > MAX_BODY => Err(warp::reject::custom(TooLarge)),
                _ => Ok(()),
            }
        })
        .untuple_one()
        .and(warp::body::stream())
        .and_then(collect_limited)
}

async fn collect_limited<S, B>(stream: S) -> Result<Vec<u8>, warp::Rejection>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: warp::Buf,
{
    use futures_util::StreamExt;
    let mut stream = std::pin::pin!(stream);
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(|_| warp::reject::reject())?;
        if body.len() + chunk.remaining() > MAX_BODY as usize {
            return Err(warp::reject::custom(TooLarge));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let n = part.len();
            body.extend_from_slice(part);
            chunk.advance(n);
        }
    }
    Ok(body)
}

/// Body fields: a JSON object's string and number members, or form fields.
pub fn fields(body: &[u8]) -> HashMap<String, String> {
    let mut map = HashMap::new();
    if let Ok(serde_json::Value::Object(object)) = serde_json::from_slice::<serde_json::Value>(body) {
        for (k, v) in object {
            match v {
                serde_json::Value::String(s) => {
                    map.insert(k, s);
                }
                serde_json::Value::Number(n) => {
                    map.insert(k, n.to_string());
                }
                _ => {}
            }
        }
        return map;
    }
    for (k, v) in form_urlencoded::parse(body) {
        map.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    map
}

/// Every path the broker serves, with its label in the request metrics: the
/// route table's, for documentation and its tests (`docs/openapi.json`).
/// `{keyid}` stands for one path segment.
pub fn served_paths() -> Vec<(&'static str, &'static str)> {
    Route::ALL.iter().map(|route| (route.path(), route.label())).collect()
}

/// Every route.
pub fn routes(state: State) -> impl Filter<Extract = (impl warp::Reply,), Error = Infallible> + Clone {
    let metrics_state = Arc::clone(&state);
    let served =
        mount::served(state).or(warp::path::full().map(|path: warp::path::FullPath| unmatched(path.as_str()))).unify();
    warp::method().and(warp::path::full()).and(warp::any().map(Instant::now)).and(served).map(
        move |method: Method, path: warp::path::FullPath, started: Instant, response: Response| {
            metrics_state.metrics.answered(&method, path.as_str(), started, response)
        },
    )
}

/// `handler` with Duplicati's token request in the shape every client sends
/// it — `GET /refresh`, the AuthID in `X-AuthID`, no body — answered before
/// the route table: the same answer ([`duplicati::refresh_answer`]), limits,
/// counters and log line as through [`routes`], without warp's filter
/// chain, which cost about a fifth of the CPU of the broker's busiest
/// request (`benches/results/perf-product.txt`). Any other shape, a header
/// that is not visible ASCII included, goes through `handler`, which
/// answers it as before. `tests/duplicati.rs` checks that both ways answer
/// alike.
pub(crate) fn with_shortcut(state: State, handler: crate::connections::Handler) -> crate::connections::Handler {
    use warp::http::header::HeaderName;
    use warp::hyper::body::Body as _;
    // Named once: a name given as text is parsed at every lookup.
    const X_AUTHID: HeaderName = HeaderName::from_static("x-authid");
    Arc::new(move |request: warp::http::Request<crate::connections::RequestBody>, peer: SocketAddr| {
        let usual = request.method() == Method::GET
            && request.uri().path() == Route::Refresh.path()
            && request.body().is_end_stream();
        // The AuthID's value, looked up once. Its bytes stay in the buffer
        // hyper read the request into: the clone copies none of them.
        let authid = match request.headers().get(X_AUTHID) {
            Some(value) if usual && value.to_str().is_ok() => value.clone(),
            _ => return handler(request, peer),
        };
        let started = Instant::now();
        let ip = client_from(Some(peer), request.headers(), &state.proxies);
        let state = Arc::clone(&state);
        Box::pin(async move {
            let authid = authid.to_str().unwrap_or_default();
            let (response, keyid) = duplicati::refresh_answer(&state, authid, ip).await;
            let path = Route::Refresh.path();
            state.metrics.observe(&Method::GET, path, response.status(), started.elapsed(), keyid.as_ref());
            response
        })
    })
}

/// No route took the request: a known path with another method, or none.
fn unmatched(path: &str) -> Response {
    let failure = match routes::label(path) {
        "other" | "/static" => Failure::refused(Refusal::NoRoute, "no such endpoint"),
        _ => Failure::refused(Refusal::WrongMethod, "this endpoint does not take that method"),
    };
    reply::error(Surface::V1, &failure)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = reply::with_body(StatusCode::OK, content_type, body);
    response
        .headers_mut()
        .insert(warp::http::header::CACHE_CONTROL, warp::http::HeaderValue::from_static("public, max-age=3600"));
    response
}

/// Turns the rejections of a route that matched (body too large, a body
/// without length, a header that does not parse) into JSON errors in the
/// vocabulary of `surface` — Duplicati's routes answer with `X-Reason` as
/// their other errors do; the rest fall through to [`unmatched`].
fn recover_on(
    surface: Surface,
) -> impl Fn(warp::Rejection) -> std::future::Ready<Result<Response, warp::Rejection>> + Clone + Send + Sync {
    move |rejection| std::future::ready(recovered(surface, rejection))
}

fn recovered(surface: Surface, rejection: warp::Rejection) -> Result<Response, warp::Rejection> {
    let failure =
        if rejection.find::<TooLarge>().is_some() || rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
            Failure::refused(Refusal::TooLarge, "the request body is larger than 16 KiB")
        } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
            Failure::refused(Refusal::LengthRequired, "the request body needs a Content-Length")
        } else if rejection.find::<warp::reject::InvalidHeader>().is_some() {
            Failure::refused(Refusal::BadHeader, "a request header is malformed")
        } else {
            return Err(rejection);
        };
    Ok(reply::error(surface, &failure))
}
