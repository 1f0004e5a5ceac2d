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

use super::reply::{self, json_reply, with_body};
use super::routes::Route;
use super::{State, with_state};

/// Requests by route label (the route table's) and status.
#[derive(Default)]
pub struct HttpMetrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

impl HttpMetrics {
    /// Counts and logs one finished request: route, status, latency — never
    /// the query string, which may carry a hand-off token or a login state.
    pub fn observe(&self, info: warp::log::Info<'_>) {
        let route = super::routes::label(info.path());
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
