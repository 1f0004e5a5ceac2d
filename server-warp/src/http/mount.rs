//! The broker inside another warp application: every route, under the path
//! of `public_url`, and no catch-all.
//!
//! [`routes`](super::routes) serves the broker at the root of its host and
//! answers every request, a 404 for those no route takes. [`mount`] serves
//! the same routes under the path `public_url` names (`/oauth` for
//! `https://app.example.org/oauth`) and rejects what lies outside it, so an
//! application puts its own routes beside it:
//!
//! * Paths under the prefix are the broker's: a request no route takes there
//!   gets the broker's own 404 (or 405 for a known path and another method).
//!   Outside it, requests are rejected and the application answers them.
//!   Mounted with no path (`public_url` at the host's root) nothing is
//!   answered that no route takes.
//! * The pages are written for the root of the host: their links, forms,
//!   script and stylesheet, and the broker's redirects to its own pages
//!   (`/?type=`, `/cli-token`), are moved under the prefix here, in one
//!   place, so each page keeps a single source. Provider redirects, the
//!   redirect URI (`<public_url>/logged-in`), login links and the device
//!   page's URL come from `public_url` and carry the prefix already.
//! * The proof cookie keeps `Path=/`: over https it is a `__Host-` cookie,
//!   which browsers accept only with `Path=/` (and no `Domain`), the
//!   strongest binding a cookie has to its origin. The broker shares the
//!   origin with the application anyway, so a narrower path would hide the
//!   cookie from nothing; the application should not use a cookie named
//!   `latchkey-login` (or `__Host-latchkey-login`) of its own.
//! * Requests the broker answers are counted by route and status and logged
//!   one line each, as at the root, labelled by their path under the prefix
//!   (`/refresh`, not `/oauth/refresh`).

use std::sync::Arc;
use std::time::Instant;

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::header::{CONTENT_TYPE, LOCATION};
use warp::http::{HeaderValue, Method, StatusCode};
use warp::hyper::body::Body as _;
use warp::reply::Response;

use super::reply::Surface;
use super::routes::Route;
use super::{State, api, asset, duplicati, metrics, pages, recover_on, unmatched};

/// The path browsers reach the broker under: `public_url`'s, without a
/// trailing slash (`""` at the root of the host).
pub fn base_path(public_url: &str) -> String {
    url::Url::parse(public_url).map(|url| url.path().trim_end_matches('/').to_owned()).unwrap_or_default()
}

/// Every route of the broker, under the path of `public_url`, for an
/// application's own warp filter: `my_routes.or(mount(state))`. Requests
/// outside that path (or, with no path, that no route takes) are rejected.
pub fn mount(state: State) -> BoxedFilter<(Response,)> {
    let base: Arc<str> = base_path(&state.public_url).into();
    let prefix = base
        .split('/')
        .filter(|segment| !segment.is_empty())
        .fold(warp::any().boxed(), |filter, segment| filter.and(warp::path(segment.to_owned())).boxed());
    let metrics_state = Arc::clone(&state);
    let broker = served(state);
    let inside = if base.is_empty() {
        broker
    } else {
        // Under the prefix the broker answers for itself, as at the root.
        broker
            .or(warp::path::tail().map(|tail: warp::path::Tail| unmatched(&format!("/{}", tail.as_str()))))
            .unify()
            .boxed()
    };
    let at = Arc::clone(&base);
    let answered = prefix.and(inside).then(move |response| under(Arc::clone(&at), response));
    warp::method()
        .and(warp::path::full())
        .and(warp::any().map(Instant::now))
        .and(answered)
        .map(move |method: Method, full: warp::path::FullPath, started: Instant, response: Response| {
            // Labelled as at the root: the path under the prefix.
            let path = full.as_str().strip_prefix(&*base).unwrap_or(full.as_str());
            let path = if path.is_empty() { "/" } else { path };
            metrics_state.metrics.answered(&method, path, started, response)
        })
        .boxed()
}

/// Every route group, the token routes first (they carry nearly all the
/// traffic), without a catch-all: [`routes`](super::routes) adds its 404,
/// [`mount`] its prefix. `tests/mount.rs` checks that every path of the
/// route table answers here.
pub(super) fn served(state: State) -> BoxedFilter<(Response,)> {
    let statics = warp::get()
        .and(Route::StyleCss.filter())
        .map(|| asset("text/css; charset=utf-8", pages::STYLE_CSS))
        .or(warp::get().and(Route::AuthidJs.filter()).map(|| asset("text/javascript; charset=utf-8", pages::AUTHID_JS)))
        .unify()
        // Browsers ask for it on every first visit; an empty answer keeps their consoles clean.
        .or(warp::get().and(Route::Favicon.filter()).map(|| asset("image/x-icon", "")))
        .unify();
    // Each group's rejections in its own vocabulary (the `/v1` routes',
    // and what is left, at the end); a rejection for a path the group does
    // not serve goes on to the next.
    duplicati::refresh_route(Arc::clone(&state))
        .recover(recover_on(Surface::Duplicati))
        .unify()
        .or(api::routes(Arc::clone(&state)))
        .unify()
        .or(duplicati::routes(Arc::clone(&state)).recover(recover_on(Surface::Duplicati)).unify())
        .unify()
        .or(metrics::routes(Arc::clone(&state)))
        .unify()
        .or(statics)
        .unify()
        .recover(recover_on(Surface::V1))
        .unify()
        .boxed()
}

/// A response as a browser under `base` needs it: the broker's redirects to
/// its own pages, and its pages' own links, moved under `base`.
async fn under(base: Arc<str>, mut response: Response) -> Response {
    if base.is_empty() {
        return response;
    }
    let location = response.headers().get(LOCATION).and_then(|v| v.to_str().ok());
    if let Some(location) = location.filter(|l| l.starts_with('/') && !l.starts_with("//")) {
        if let Ok(moved) = HeaderValue::from_str(&format!("{base}{location}")) {
            response.headers_mut().insert(LOCATION, moved);
        }
    }
    let content_type = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    if !content_type.is_some_and(|t| t.starts_with("text/html")) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let mut body = std::pin::pin!(body);
    let mut html = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        match frame {
            Ok(frame) => html.extend_from_slice(frame.data_ref().map(|d| d.as_ref()).unwrap_or_default()),
            Err(_) => {
                // A page is one in-memory buffer; this does not happen.
                let mut failed = Response::new("the page could not be read".into());
                *failed.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                return failed;
            }
        }
    }
    // Only the pages' own attributes start with `="/`: text and values the
    // pages show are HTML-escaped, so their quotes are `&quot;`.
    let mut html = String::from_utf8_lossy(&html).into_owned();
    for attribute in ["href", "action", "src"] {
        html = html.replace(&format!("{attribute}=\"/"), &format!("{attribute}=\"{base}/"));
    }
    Response::from_parts(parts, html.into())
}
