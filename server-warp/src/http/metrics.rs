//! Operations endpoints (`/healthz`, `/readyz`, `/metrics`) and the request
//! counters and log line behind them.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use latchkey_core::KeyId;
use latchkey_core::engine::LATENCY_BUCKETS_MS;
use serde_json::json;
use warp::Filter;
use warp::http::{Method, StatusCode};
use warp::reply::Response;

use super::reply::{self, json_reply, with_body};
use super::routes::{self, Route};
use super::{State, with_state};

/// Statuses 100–599 each have a counter; 600 and above share the last.
const STATUSES: usize = 501;
/// One row per route of the table, then `/static` (other paths under
/// `/static/`) and `other`.
const ROWS: usize = Route::ALL.len() + 2;

/// The key id a token request named, left on its response for the request
/// log line (a response extension; never sent to the client).
#[derive(Debug, Clone)]
pub(crate) struct LoggedKeyId(pub(crate) KeyId);

/// `response` with the key id of the AuthID it answered, for the request log.
pub(crate) fn logged_keyid(response: Response, authid: &latchkey_core::AuthId) -> Response {
    with_keyid(response, authid.keyid())
}

/// `response` with `keyid` for the request log.
pub(crate) fn with_keyid(mut response: Response, keyid: KeyId) -> Response {
    response.extensions_mut().insert(LoggedKeyId(keyid));
    response
}

/// Requests by route and status: one counter per (route, status), made up
/// front, so counting a request is an index and an atomic add — no map, no
/// lock, no formatting.
pub struct HttpMetrics {
    requests: Box<[AtomicU64]>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics { requests: (0..ROWS * STATUSES).map(|_| AtomicU64::new(0)).collect() }
    }
}

/// A request path's row, from its route (`Route::of(path)`).
fn row(route: Option<Route>, path: &str) -> usize {
    match route {
        Some(route) => Route::ALL.iter().position(|r| *r == route).unwrap_or(ROWS - 1),
        None if path.starts_with("/static/") => ROWS - 2,
        None => ROWS - 1,
    }
}

fn column(status: StatusCode) -> usize {
    usize::from(status.as_u16()).saturating_sub(100).min(STATUSES - 1)
}

impl HttpMetrics {
    /// Counts and logs one finished request: route, status, latency and, for
    /// requests that named an AuthID, its key id — never the query string,
    /// which may carry a hand-off token or a login state.
    pub(crate) fn observe(
        &self,
        method: &Method,
        path: &str,
        status: StatusCode,
        elapsed: Duration,
        keyid: Option<&KeyId>,
    ) {
        // The route is found once, for the counter and the log line.
        let found = Route::of(path);
        self.requests[row(found, path) * STATUSES + column(status)].fetch_add(1, Ordering::Relaxed);
        if !tracing::enabled!(tracing::Level::INFO) {
            return;
        }
        let route = routes::label_of(found, path);
        // Whole microseconds, which the log line writes without float formatting.
        let latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let latency_ms = crate::logging::micros_as_ms(latency_us);
        let status = status.as_u16();
        let line = crate::logging::RequestLine {
            target: module_path!(),
            method: method.as_str(),
            route,
            status,
            latency_us,
            keyid,
        };
        if !crate::logging::request_line(&line) {
            match keyid {
                Some(keyid) => tracing::info!(%method, route, status, latency_ms, %keyid, "request"),
                None => tracing::info!(%method, route, status, latency_ms, "request"),
            }
        }
    }

    /// [`HttpMetrics::observe`] for a finished `response`, with the key id a
    /// token request left on it; answers the response.
    pub(crate) fn answered(
        &self,
        method: &Method,
        path: &str,
        started: std::time::Instant,
        response: Response,
    ) -> Response {
        let keyid = response.extensions().get::<LoggedKeyId>().map(|logged| &logged.0);
        self.observe(method, path, response.status(), started.elapsed(), keyid);
        response
    }

    /// The non-zero counters by (route label, status), labels merged.
    fn snapshot(&self) -> std::collections::BTreeMap<(&'static str, u16), u64> {
        let mut counts = std::collections::BTreeMap::new();
        for (i, n) in self.requests.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            let (row, column) = (i / STATUSES, i % STATUSES);
            let label = match Route::ALL.get(row) {
                Some(route) => route.label(),
                None if row == ROWS - 2 => routes::label("/static/"),
                None => "other",
            };
            *counts.entry((label, 100 + column as u16)).or_default() += n;
        }
        counts
    }
}

pub(super) fn routes(state: State) -> warp::filters::BoxedFilter<(Response,)> {
    let healthz =
        warp::get().and(Route::Healthz.filter()).map(|| json_reply(StatusCode::OK, &json!({ "status": "ok" })));
    let readyz = warp::get().and(Route::Readyz.filter()).and(with_state(state.clone())).then(readyz);
    let metrics = warp::get().and(Route::Metrics.filter()).and(with_state(state)).map(render);
    healthz.or(readyz).unify().or(metrics).unify().boxed()
}

async fn readyz(state: State) -> Response {
    reply::readiness(state.store.ping().await.is_ok())
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

/// Escapes a Prometheus label value.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn render(state: State) -> Response {
    let mut out = String::new();
    let _ = writeln!(out, "# HELP latchkey_http_requests_total HTTP requests by route and status.");
    let _ = writeln!(out, "# TYPE latchkey_http_requests_total counter");
    for ((route, status), n) in state.metrics.snapshot() {
        let _ = writeln!(out, "latchkey_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
    }
    let engine = state.broker.metrics();
    let _ = writeln!(out, "# HELP latchkey_refreshes_total Provider refreshes by provider and outcome.");
    let _ = writeln!(out, "# TYPE latchkey_refreshes_total counter");
    for ((provider, outcome), n) in &engine.refreshes {
        let _ = writeln!(
            out,
            "latchkey_refreshes_total{{provider=\"{}\",outcome=\"{}\"}} {n}",
            label(provider),
            outcome.as_str()
        );
    }
    let _ = writeln!(
        out,
        "# HELP latchkey_rotation_mismatches_total Successful refreshes whose refresh token rotation contradicted \
         the catalogue's rotates_refresh_tokens, by provider and whether the provider rotated."
    );
    let _ = writeln!(out, "# TYPE latchkey_rotation_mismatches_total counter");
    for ((provider, rotated), n) in &engine.rotation_mismatches {
        let _ = writeln!(
            out,
            "latchkey_rotation_mismatches_total{{provider=\"{}\",rotated=\"{rotated}\"}} {n}",
            label(provider)
        );
    }
    counter(&mut out, "latchkey_cache_hits_total", "Token requests answered from the cache.", engine.cache_hits);
    counter(&mut out, "latchkey_cache_misses_total", "Token requests the cache could not answer.", engine.cache_misses);
    counter(
        &mut out,
        "latchkey_single_flight_joins_total",
        "Requests that joined a refresh in flight.",
        engine.single_flight_joins,
    );
    counter(&mut out, "latchkey_lease_waits_total", "Waits on another instance's refresh lease.", engine.lease_waits);
    counter(
        &mut out,
        "latchkey_lease_renewals_total",
        "Refresh leases renewed while a provider was slow to answer.",
        engine.lease_renewals,
    );
    counter(
        &mut out,
        "latchkey_adopted_tokens_total",
        "Stored tokens adopted instead of refreshing.",
        engine.adopted_tokens,
    );
    counter(
        &mut out,
        "latchkey_stale_served_total",
        "Stored tokens served while the provider failed.",
        engine.stale_served,
    );
    counter(&mut out, "latchkey_persist_failures_total", "Failed writes of refreshed grants.", engine.persist_failures);
    counter(&mut out, "latchkey_failed_secrets_total", "AuthIDs presented with a wrong secret.", engine.failed_secrets);
    counter(
        &mut out,
        "latchkey_swept_records_total",
        "Expired logins, hand-offs and device codes swept.",
        engine.swept_records,
    );
    counter(
        &mut out,
        "latchkey_notice_publish_failures_total",
        "Grant-changed notices (revocations) the store would not publish to other instances.",
        engine.notice_publish_failures,
    );
    counter(
        &mut out,
        "latchkey_log_lines_dropped_total",
        "Log lines dropped because the log output could not keep up (warnings, errors and audit lines are never \
         dropped).",
        crate::logging::dropped_lines(),
    );
    let conns = state.connections.counts();
    for (name, help, n) in [
        ("latchkey_connections_accepted_total", "Connections accepted on the main listener.", conns.accepted),
        (
            "latchkey_connections_shed_total",
            "Idle keep-alive connections closed to make room at the connection cap (max_open).",
            conns.shed,
        ),
        (
            "latchkey_connections_waited_at_cap_total",
            "Connections accepted only after waiting at the connection cap with every open connection busy.",
            conns.waited_at_cap,
        ),
        (
            "latchkey_connections_head_timeouts_total",
            "Connections closed because no request head arrived within header_timeout_secs (idle keep-alive \
             connections included).",
            conns.head_timeouts,
        ),
        (
            "latchkey_connections_body_timeouts_total",
            "Requests answered 408 because their body did not arrive within body_timeout_secs.",
            conns.body_timeouts,
        ),
        (
            "latchkey_connections_malformed_heads_total",
            "Request heads that did not parse or were too large (answered 400, 414 or 431 without a body).",
            conns.malformed_heads,
        ),
    ] {
        counter(&mut out, name, help, n);
    }
    gauge(&mut out, "latchkey_connections_open", "Connections open on the main listener.", conns.open);
    gauge(&mut out, "latchkey_pending_writes", "Refreshed grants waiting for the store.", engine.pending_writes);
    gauge(&mut out, "latchkey_cached_tokens", "Access tokens in the cache.", engine.cached_tokens);
    gauge(
        &mut out,
        "latchkey_refreshes_in_flight",
        "Provider refreshes running.",
        state.broker.refreshes_in_flight() as u64,
    );
    let _ = writeln!(out, "# HELP latchkey_provider_latency_seconds Latency of provider refresh calls.");
    let _ = writeln!(out, "# TYPE latchkey_provider_latency_seconds histogram");
    for (provider, h) in &engine.provider_latency {
        let provider = label(provider);
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS_MS.iter().enumerate() {
            cumulative += h.buckets[i];
            let le = *bound as f64 / 1000.0;
            let _ = writeln!(
                out,
                "latchkey_provider_latency_seconds_bucket{{provider=\"{provider}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "latchkey_provider_latency_seconds_bucket{{provider=\"{provider}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(
            out,
            "latchkey_provider_latency_seconds_sum{{provider=\"{provider}\"}} {}",
            h.sum_ms as f64 / 1000.0
        );
        let _ = writeln!(out, "latchkey_provider_latency_seconds_count{{provider=\"{provider}\"}} {}", h.count);
    }
    with_body(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", out)
}
