//! Operations endpoints (`/healthz`, `/readyz`, `/metrics`) and the request
//! counters and log line behind them.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use latchkey_core::engine::LATENCY_BUCKETS_MS;
use serde_json::json;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::reply::{json_reply, with_body};
use super::{State, with_state};

/// Requests by route and status.
#[derive(Default)]
pub struct HttpMetrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

/// The route a path belongs to: a fixed label, so neither ids nor tokens
/// reach the metrics or the log.
pub(crate) fn route_label(path: &str) -> &'static str {
    const ROUTES: [&str; 23] = [
        "/",
        "/login",
        "/logged-in",
        "/refresh",
        "/fetch",
        "/token-state",
        "/revoke",
        "/revoked",
        "/cli-token",
        "/cli-token-login",
        "/device",
        "/privacy-policy",
        "/v1/token",
        "/v1/handles",
        "/v1/handles/rotate",
        "/v1/grant/revoke",
        "/v1/device/code",
        "/v1/device/token",
        "/v1/services",
        "/oauth2/token",
        "/healthz",
        "/readyz",
        "/metrics",
    ];
    if let Some(route) = ROUTES.iter().find(|r| **r == path) {
        return route;
    }
    if path.starts_with("/v1/handles/") {
        "/v1/handles/{keyid}"
    } else if path.starts_with("/static/") || path == "/favicon.ico" {
        "/static"
    } else {
        "other"
    }
}

impl HttpMetrics {
    /// Counts and logs one finished request: route, status, latency — never
    /// the query string, which may carry a hand-off token or a login state.
    pub fn observe(&self, info: warp::log::Info<'_>) {
        let route = route_label(info.path());
        let status = info.status().as_u16();
        *self.requests.lock().unwrap_or_else(|p| p.into_inner()).entry((route, status)).or_default() += 1;
        tracing::info!(
            method = %info.method(),
            route,
            status,
            latency_ms = info.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }

    fn snapshot(&self) -> BTreeMap<(&'static str, u16), u64> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub(super) fn routes(state: State) -> warp::filters::BoxedFilter<(Response,)> {
    let healthz =
        warp::get().and(warp::path!("healthz")).map(|| json_reply(StatusCode::OK, &json!({ "status": "ok" })));
    let readyz = warp::get().and(warp::path!("readyz")).and(with_state(state.clone())).then(readyz);
    let metrics = warp::get().and(warp::path!("metrics")).and(with_state(state)).map(render);
    healthz.or(readyz).unify().or(metrics).unify().boxed()
}

async fn readyz(state: State) -> Response {
    match state.store.ping().await {
        Ok(()) => json_reply(StatusCode::OK, &json!({ "status": "ready" })),
        Err(_) => json_reply(StatusCode::SERVICE_UNAVAILABLE, &json!({ "status": "store_unavailable" })),
    }
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
