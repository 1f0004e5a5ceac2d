//! Duplicati's helper protocol at the root: the picker, login and callback,
//! `/refresh`, the hand-off (`/fetch`, `/token-state`), revocation, the
//! personal-login-token flow, the device page, the privacy policy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use latchkey_core::engine::{Callback, Completed, HandoffFetch, HandoffState, LoginComplete};
use latchkey_core::{AuthIdError, EngineError, KeyId};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::front_door::{self, BrowserRequest};
use super::metrics::with_keyid;
use super::pages;
use super::reply::{
    Failure, Refusal, Surface, error, error_body, is_callback_name, json_reply, json_written, jsonp, page_status,
    push_json_str, redirect, slow_down_status, with_body,
};
use super::routes::Route;
use super::token_path::{Cost, Refused};
use super::{State, body, client_ip, duplicati_authid, fields, query, query_map, with_state};
use crate::audit;

/// Seconds reported for access tokens that never expire.
const NEVER_EXPIRES_SECS: u64 = 365 * 86_400;
/// Duplicati parses `expires` as a 32-bit integer: a larger value fails every request.
const MAX_EXPIRES_SECS: u64 = i32::MAX as u64;

/// `/refresh`, on its own: the busiest route, tried before every other.
/// The query and the body are kept raw: a request whose header carries the
/// AuthID (every Duplicati client's) never has them parsed.
pub(super) fn refresh_route(state: State) -> warp::filters::BoxedFilter<(Response,)> {
    Route::Refresh
        .filter()
        .and(warp::get().map(|| true).or(warp::post().map(|| false)).unify())
        .and(warp::header::optional::<String>("x-authid"))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(body())
        .and(client_ip(state.clone()))
        .and(with_state(state))
        .then(refresh)
        .boxed()
}

/// Every other route of Duplicati's protocol and the pages.
pub(super) fn routes(state: State) -> warp::filters::BoxedFilter<(Response,)> {
    let s = || with_state(state.clone());
    let ip = || client_ip(state.clone());
    let b = front_door::browser;
    let get = |route: Route| warp::get().and(route.filter());
    let post = |route: Route| warp::post().and(route.filter());
    let index = get(Route::Index).and(query()).and(b()).and(ip()).and(s()).then(index).boxed();
    let login = get(Route::Login).and(query()).and(b()).and(s()).then(login);
    let login_post = post(Route::Login).and(body()).and(b()).and(ip()).and(s()).then(login_post);
    let logged_in = get(Route::LoggedIn).and(query()).and(b()).and(ip()).and(s()).then(logged_in).boxed();
    let fetch = get(Route::Fetch).and(query()).and(ip()).and(s()).then(fetch).boxed();
    let token_state = get(Route::TokenState).and(query()).and(ip()).and(s()).then(token_state);
    let revoke = get(Route::Revoke).and(s()).map(|s: State| pages::revoke_form(&s.csp)).boxed();
    let revoked = post(Route::Revoked).and(body()).and(ip()).and(s()).then(revoked);
    let cli_token = get(Route::CliToken).and(query()).and(b()).and(s()).then(cli_token).boxed();
    let cli_login = post(Route::CliTokenLogin).and(body()).and(b()).and(ip()).and(s()).then(cli_token_login);
    let device = get(Route::Device).and(query()).and(b()).and(s()).then(device_page).boxed();
    let device_post = post(Route::Device).and(body()).and(b()).and(ip()).and(s()).then(device_post);
    let privacy = get(Route::PrivacyPolicy)
        .map(|| with_body(StatusCode::OK, "text/plain; charset=utf-8", pages::PRIVACY_POLICY))
        .boxed();
    index
        .or(login)
        .unify()
        .or(login_post)
        .unify()
        .or(logged_in)
        .unify()
        .or(fetch)
        .unify()
        .or(token_state)
        .unify()
        .or(revoke)
        .unify()
        .or(revoked)
        .unify()
        .or(cli_token)
        .unify()
        .or(cli_login)
        .unify()
        .or(device)
        .unify()
        .or(device_post)
        .unify()
        .or(privacy)
        .unify()
        .boxed()
}

fn error_page(state: &State, title: &str, e: &EngineError) -> Response {
    if let EngineError::Corrupt { detail } = e {
        // A record that fails its integrity check was written by someone
        // without the master key: the operator must hear of it.
        tracing::error!(detail = detail.as_str(), "a stored record cannot be used");
    }
    tracing::info!(code = e.code().as_str(), "page request failed");
    pages::error_page(page_status(e), &state.csp, title, &e.to_string())
}

/// A page for one of the front end's own refusals.
fn refusal_page(state: &State, refusal: Refusal, title: &str, message: &str) -> Response {
    pages::error_page(refusal.status(), &state.csp, title, message)
}

/// Whether `ip` may store one more record before anyone is authenticated
/// (and, with a user code, try one more code).
fn creation_allowed(state: &State, ip: IpAddr, user_code: bool) -> Result<(), std::time::Duration> {
    let now = Instant::now();
    if user_code {
        state.limiter.user_code_attempt(ip, now)?;
    }
    state.limiter.record_creation(ip, now)
}

/// The page of a request over a limit.
fn slow_down_page(state: &State, wait: std::time::Duration) -> Response {
    let message = format!("Too many attempts; try again in {} s.", wait.as_secs().max(1));
    pages::error_page(slow_down_status(), &state.csp, "Slow down", &message)
}

/// The front door refused a browser step: 403, a clear page, an audit line.
fn refused_page(route: &str, reason: &str, client: IpAddr, state: &State) -> Response {
    audit::browser_refused(route, reason, client);
    let message = format!(
        "This step was refused: {reason}. Logins continue only from this broker's own pages, in the browser that \
         began them. Go back to the program or link you started from and begin again."
    );
    refusal_page(state, Refusal::FrontDoor, "Refused", &message)
}

fn display_name(state: &State, service: &str) -> String {
    state.broker.catalogue().service(service).map(|s| s.display_name.clone()).unwrap_or_else(|| service.to_owned())
}

async fn index(q: HashMap<String, String>, browser: BrowserRequest, ip: IpAddr, state: State) -> Response {
    let token = q.get("token").map(String::as_str);
    if let Some(service) = q.get("redirect") {
        return confirm(&state, service, token, &browser).await;
    }
    if let Some(token) = token {
        if let Err(wait) = state.limiter.record_creation(ip, Instant::now()) {
            return slow_down_page(&state, wait);
        }
        if let Err(e) = state.broker.start_handoff(token).await {
            return error_page(&state, "Cannot start", &e);
        }
    }
    let catalogue = state.broker.catalogue();
    let services: Vec<(String, String)> = match q.get("type") {
        Some(id) => match catalogue.service(id) {
            Some(s) => vec![(s.id.clone(), s.display_name.clone())],
            None => {
                return unknown_service_page(&state);
            }
        },
        None => catalogue.listed_services().map(|s| (s.id.clone(), s.display_name.clone())).collect(),
    };
    let proof = front_door::page_proof(&state, &browser).await;
    front_door::with_cookie(pages::picker(&state.csp, &services, token, &proof), &state, &proof)
}

/// The confirmation page for one service: names it, starts nothing.
async fn confirm(state: &State, service: &str, token: Option<&str>, browser: &BrowserRequest) -> Response {
    if state.logs_in_with_token(service) {
        let mut target = format!("/cli-token?id={}", pages::q(service));
        if let Some(token) = token {
            target.push_str(&format!("&token={}", pages::q(token)));
        }
        return redirect(&target);
    }
    if state.broker.catalogue().service(service).is_none() {
        return unknown_service_page(state);
    }
    let proof = front_door::page_proof(state, browser).await;
    let page = pages::confirm_login(&state.csp, service, &display_name(state, service), token, &proof);
    front_door::with_cookie(page, state, &proof)
}

/// `GET /login`: never a provider redirect, only the confirmation page.
async fn login(q: HashMap<String, String>, browser: BrowserRequest, state: State) -> Response {
    let Some(service) = q.get("id") else {
        return refusal_page(&state, Refusal::Incomplete, "No service", "The login link names no service.");
    };
    confirm(&state, service, q.get("token").map(String::as_str), &browser).await
}

/// `POST /login` from the broker's own page: the click that goes to the provider.
async fn login_post(body: Vec<u8>, browser: BrowserRequest, ip: IpAddr, state: State) -> Response {
    let form = fields(&body);
    let proof = match browser.check_post(&state, &form) {
        Ok(proof) => proof,
        Err(reason) => return refused_page("/login", reason, ip, &state),
    };
    if let Err(wait) = creation_allowed(&state, ip, form.contains_key("user_code")) {
        return slow_down_page(&state, wait);
    }
    let started = if let Some(user_code) = form.get("user_code") {
        state.broker.begin_device_login(user_code, &proof).await
    } else {
        let service = form.get("id").map(String::as_str).unwrap_or_default();
        let token = form.get("token").map(String::as_str).filter(|t| !t.is_empty());
        state.broker.begin_login(service, token, &proof).await
    };
    match started {
        Ok(start) => see_other(&start.authorization_url),
        Err(EngineError::Forbidden(reason)) => refused_page("/login", &reason, ip, &state),
        Err(e) => error_page(&state, "Cannot start the login", &e),
    }
}

async fn logged_in(q: HashMap<String, String>, browser: BrowserRequest, ip: IpAddr, state: State) -> Response {
    let Some(login_state) = q.get("state") else {
        let message = "The provider's answer carries no state. Start the login again.";
        return refusal_page(&state, Refusal::Incomplete, "Login failed", message);
    };
    const KNOWN: [&str; 5] = ["state", "code", "error", "error_description", "iss"];
    let params: Vec<(String, String)> =
        q.iter().filter(|(k, _)| !KNOWN.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    let proof = browser.proof(&state);
    let callback = Callback {
        state: login_state,
        code: q.get("code").map(String::as_str),
        error: q.get("error").map(String::as_str),
        iss: q.get("iss").map(String::as_str),
        service: None,
        params: &params,
        browser: proof.as_deref(),
    };
    match state.broker.complete_login_any(&callback).await {
        Ok(Completed::Grant(done)) => login_done(&state, &done, ip),
        Ok(Completed::Token(token)) => {
            audit::access_token_handed_out(&token.service, token.handed_off, ip);
            let name = display_name(&state, &token.service);
            pages::token_page(&state.csp, &token, &name, &state.openers)
        }
        Err(EngineError::Forbidden(reason)) => refused_page("/logged-in", &reason, ip, &state),
        Err(e) => error_page(&state, "Login failed", &e),
    }
}

/// The AuthID page after a login, with its audit lines.
fn login_done(state: &State, done: &LoginComplete, ip: IpAddr) -> Response {
    audit::login_completed(&done.service, &done.grant_id, &done.authid.keyid(), done.handed_off, ip);
    if done.handoff_refused {
        audit::handoff_refused(&done.service, &done.grant_id, ip);
    }
    let name = display_name(state, &done.service);
    let text = done.authid.expose_text();
    pages::authid_page(&state.csp, &text, &name, &state.openers, done.handed_off, done.handoff_refused)
}

/// 303: the browser follows with a GET (the provider's authorization endpoint).
fn see_other(location: &str) -> Response {
    let mut response = redirect(location);
    *response.status_mut() = StatusCode::SEE_OTHER;
    response
}

/// The Duplicati failure for a refused `/refresh`; `reauth_required` and an
/// AuthID from another OAuth service name the login link.
fn duplicati_failure(state: &State, refused: &Refused) -> Failure {
    let mut failure = refused.failure();
    match refused.engine_error() {
        Some(EngineError::ReauthRequired { service }) => {
            failure.text = format!(
                "The provider no longer accepts this login; log in again at {} and use the new AuthID",
                state.login_link(service)
            );
        }
        Some(EngineError::AuthIdMalformed(AuthIdError::IssuedElsewhere | AuthIdError::DuplicatiV2)) => {
            failure.text = format!(
                "This AuthID was issued by another OAuth service, not by this one; log in again at {}/ and use the \
                 new AuthID",
                state.public_url
            );
        }
        _ => {}
    }
    failure
}

/// `/refresh`'s answer.
#[cfg_attr(test, derive(serde::Serialize))]
struct RefreshAnswer<'a> {
    access_token: &'a str,
    expires: u64,
    #[cfg_attr(test, serde(rename = "type"))]
    service: &'a str,
}

impl RefreshAnswer<'_> {
    /// The JSON body, written by hand into one buffer: the busiest answer
    /// the broker gives (its test compares it with serde's). The buffer is
    /// exactly as long as the answer when neither string needs escaping
    /// (tokens and service ids never do), so the response body takes it
    /// over without a second allocation (`Bytes` from a `Vec` allocates one
    /// when its capacity is larger than its length).
    fn body(&self) -> Vec<u8> {
        let digits = self.expires.checked_ilog10().map_or(1, |d| d as usize + 1);
        let fixed = br#"{"access_token":"","expires":,"type":""}"#.len();
        let mut out = Vec::with_capacity(fixed + self.access_token.len() + digits + self.service.len());
        out.extend_from_slice(b"{\"access_token\":");
        push_json_str(&mut out, self.access_token);
        out.extend_from_slice(b",\"expires\":");
        crate::logging::digits(&mut out, self.expires, 1);
        out.extend_from_slice(b",\"type\":");
        push_json_str(&mut out, self.service);
        out.push(b'}');
        out
    }
}

async fn refresh(
    get: bool,
    header: Option<String>,
    raw_query: String,
    body: Vec<u8>,
    ip: IpAddr,
    state: State,
) -> Response {
    let raw = match header {
        Some(header) => header,
        None => {
            let q = query_map(raw_query.as_bytes());
            let raw = duplicati_authid(None, &fields(&body), &q);
            // Duplicati's new web UI opens an `--oauth-url` ending in
            // `/refresh` in its login popup, with the service as `type`:
            // that is a login link.
            if get && raw.trim().is_empty() {
                if let Some(service) = q.get("type") {
                    return redirect(&format!("/?type={}", pages::q(service)));
                }
            }
            raw
        }
    };
    match refresh_answer(&state, &raw, ip).await {
        (response, Some(keyid)) => with_keyid(response, keyid),
        (response, None) => response,
    }
}

/// The answer to a `/refresh` for the AuthID `raw` from `ip`, however it
/// came: through the route above, or Duplicati's usual shape straight from
/// the accept loop ([`super::with_shortcut`]); with the key id it named,
/// for the request log, when it was served.
pub(super) async fn refresh_answer(state: &State, raw: &str, ip: IpAddr) -> (Response, Option<KeyId>) {
    let served =
        state.with_authid(raw, ip, Cost::TokenRequest, async |authid| state.broker.shared_token(authid, None).await);
    match served.await {
        Ok((authid, token)) => {
            let expires =
                state.broker.expires_in(&token).map_or(NEVER_EXPIRES_SECS, |left| left.as_secs()).min(MAX_EXPIRES_SECS);
            let answer =
                RefreshAnswer { access_token: token.access_token.expose_secret(), expires, service: &token.service };
            (json_written(StatusCode::OK, answer.body()), Some(authid.keyid()))
        }
        Err(refused) => (error(Surface::Duplicati, &duplicati_failure(state, &refused)), None),
    }
}

/// How a hand-off poll wants its answer: JSON, or JSONP (`callback=` or
/// `jsonp=`) as Duplicati's classic web UI polls through AngularJS's
/// `$http.jsonp`. A callback that is not a plain dotted name is refused.
fn jsonp_callback(q: &HashMap<String, String>) -> Result<Option<&str>, Failure> {
    match q.get("callback").or_else(|| q.get("jsonp")) {
        None => Ok(None),
        Some(name) if is_callback_name(name) => Ok(Some(name)),
        Some(_) => Err(Failure::bad_request("callback must be a JavaScript name such as angular.callbacks._0")),
    }
}

/// A hand-off answer in the format asked for. JSONP answers every outcome
/// with 200 (a script cannot read a status) and the same JSON body.
fn handoff_answer(callback: Option<&str>, outcome: Result<Value, Failure>) -> Response {
    match (callback, outcome) {
        (Some(callback), Ok(value)) => jsonp(callback, &value),
        (Some(callback), Err(failure)) => jsonp(callback, &error_body(Surface::Duplicati, &failure)),
        (None, Ok(value)) => json_reply(StatusCode::OK, &value),
        (None, Err(failure)) => error(Surface::Duplicati, &failure),
    }
}

async fn fetch(q: HashMap<String, String>, ip: IpAddr, state: State) -> Response {
    let callback = match jsonp_callback(&q) {
        Ok(callback) => callback,
        Err(refused) => return error(Surface::Duplicati, &refused),
    };
    if let Err(wait) = state.limiter.fetch_request(ip, Instant::now()) {
        return handoff_answer(callback, Err(Failure::rate_limited(wait)));
    }
    let token = q.get("token").map(String::as_str).unwrap_or_default();
    let outcome = match state.broker.fetch_handoff(token).await {
        Ok(HandoffFetch::Ready(authid)) => {
            audit::handoff_delivered(&authid.keyid(), ip);
            Ok(json!({ "authid": authid.expose_text().as_str() }))
        }
        // A handed-out access token goes where the AuthID would: Duplicati's
        // pCloud backend takes its "AuthID" as the token.
        Ok(HandoffFetch::Token(token)) => Ok(json!({ "authid": token.expose_secret() })),
        Ok(HandoffFetch::Pending) => Ok(json!({ "wait": "Not ready" })),
        Ok(HandoffFetch::Denied) => Err(Failure::bad_request("the login was refused at the provider; start again")),
        Ok(HandoffFetch::Gone) => Err(Failure::refused(
            Refusal::HandoffGone,
            "unknown, expired or already fetched token; start the login again",
        )),
        Err(e) => Err(Failure::from(&e)),
    };
    handoff_answer(callback, outcome)
}

async fn token_state(q: HashMap<String, String>, ip: IpAddr, state: State) -> Response {
    let callback = match jsonp_callback(&q) {
        Ok(callback) => callback,
        Err(refused) => return error(Surface::Duplicati, &refused),
    };
    if let Err(wait) = state.limiter.fetch_request(ip, Instant::now()) {
        return handoff_answer(callback, Err(Failure::rate_limited(wait)));
    }
    let token = q.get("token").map(String::as_str).unwrap_or_default();
    let outcome = match state.broker.handoff_state(token).await {
        Ok(HandoffState::Pending) => Ok(json!({ "wait": "Not ready" })),
        Ok(HandoffState::Ready | HandoffState::Delivered) => Ok(json!({ "success": true })),
        Ok(HandoffState::Denied | HandoffState::Unknown) => Ok(json!({ "success": false })),
        Err(e) => Err(Failure::from(&e)),
    };
    handoff_answer(callback, outcome)
}

async fn revoked(body: Vec<u8>, ip: IpAddr, state: State) -> Response {
    let form = fields(&body);
    if let Some(ticket) = form.get("ticket") {
        if let Err(wait) = state.limiter.token_request(ip, Instant::now()) {
            return slow_down_page(&state, wait);
        }
        return match state.broker.revoke_grant_with_ticket(ticket).await {
            Ok(revocation) => {
                let provider = pages::provider_outcome(&revocation.provider);
                audit::grant_revoked("revoke page", revocation.handles_revoked, provider, ip);
                pages::login_revoked_page(&state.csp, revocation.handles_revoked, provider)
            }
            Err(e) => error_page(&state, "Cannot revoke", &e),
        };
    }
    let raw = form.get("authid").map(String::as_str).unwrap_or_default();
    let revoked = state.with_authid(raw, ip, Cost::Free, async |authid| state.broker.revoke_for_page(authid).await);
    match revoked.await {
        Ok((authid, done)) => {
            let keyid = authid.keyid();
            audit::authid_revoked(&keyid, &keyid, ip);
            let provider = done.grant.as_ref().map(|g| pages::provider_outcome(&g.provider));
            if let (Some(grant), Some(provider)) = (&done.grant, provider) {
                audit::grant_revoked("last AuthID", grant.handles_revoked, provider, ip);
            }
            let rows: Vec<pages::SiblingRow> = done
                .siblings
                .iter()
                .map(|h| pages::SiblingRow {
                    keyid: h.keyid.to_string(),
                    label: h.label.clone(),
                    created: pages::utc_minute(h.created_at),
                    last_used: pages::utc_minute(h.last_used_at),
                })
                .collect();
            let ticket = done.ticket.as_ref().map(|t| t.expose_secret());
            pages::revoked_page(&state.csp, provider, &rows, ticket)
        }
        Err(Refused::Limited(wait)) => slow_down_page(&state, wait),
        Err(Refused::Malformed(e) | Refused::Engine(e)) => error_page(&state, "Cannot revoke", &e),
    }
}

fn no_login_token_page(state: &State) -> Response {
    let message = "This service does not log in with a login token here.";
    refusal_page(state, Refusal::UnknownService, "Unknown service", message)
}

fn unknown_service_page(state: &State) -> Response {
    let message = "This broker does not offer that service. Check the link, or pick another service.";
    refusal_page(state, Refusal::UnknownService, "Unknown service", message)
}

async fn cli_token(q: HashMap<String, String>, browser: BrowserRequest, state: State) -> Response {
    // Without an id: the first service that logs in this way (Jottacloud in the built-in catalogue).
    let first = || state.broker.catalogue().services().find(|s| state.logs_in_with_token(&s.id)).map(|s| s.id.clone());
    let service = q.get("id").cloned().or_else(first).unwrap_or_default();
    let service = service.as_str();
    if !state.logs_in_with_token(service) {
        return no_login_token_page(&state);
    }
    let token = q.get("token").map(String::as_str);
    let proof = front_door::page_proof(&state, &browser).await;
    let page = pages::login_token_form(&state.csp, service, &display_name(&state, service), token, &proof);
    front_door::with_cookie(page, &state, &proof)
}

async fn cli_token_login(body: Vec<u8>, browser: BrowserRequest, ip: IpAddr, state: State) -> Response {
    let form = fields(&body);
    let proof = match browser.check_post(&state, &form) {
        Ok(proof) => proof,
        Err(reason) => return refused_page("/cli-token-login", reason, ip, &state),
    };
    if let Err(wait) = creation_allowed(&state, ip, false) {
        return slow_down_page(&state, wait);
    }
    let service = form.get("id").map(String::as_str).unwrap_or_default();
    if !state.logs_in_with_token(service) {
        return no_login_token_page(&state);
    }
    let login_token = form.get("login_token").map(String::as_str).unwrap_or_default();
    let handoff = form.get("token").map(String::as_str).filter(|t| !t.is_empty());
    match state.broker.login_with_token(service, login_token, handoff, &proof).await {
        Ok(done) => login_done(&state, &done, ip),
        Err(EngineError::Forbidden(reason)) => refused_page("/cli-token-login", &reason, ip, &state),
        Err(e) => error_page(&state, "Login failed", &e),
    }
}

async fn device_page(q: HashMap<String, String>, browser: BrowserRequest, state: State) -> Response {
    let proof = front_door::page_proof(&state, &browser).await;
    let page = pages::device_form(&state.csp, q.get("user_code").map(String::as_str), &proof);
    front_door::with_cookie(page, &state, &proof)
}

/// `POST /device`: the typed code, from our own page; shows what asks before anything starts.
async fn device_post(body: Vec<u8>, browser: BrowserRequest, ip: IpAddr, state: State) -> Response {
    let form = fields(&body);
    let proof = match browser.check_post(&state, &form) {
        Ok(proof) => proof,
        Err(reason) => return refused_page("/device", reason, ip, &state),
    };
    if let Err(wait) = state.limiter.user_code_attempt(ip, Instant::now()) {
        return slow_down_page(&state, wait);
    }
    let code = form.get("user_code").map(String::as_str).unwrap_or_default();
    match state.broker.device_confirmation(code).await {
        Ok(shown) => {
            let name = display_name(&state, &shown.service);
            pages::device_confirm(&state.csp, &name, &shown.label, &shown.user_code, &proof)
        }
        Err(e) => error_page(&state, "Cannot connect the device", &e),
    }
}

#[cfg(test)]
mod tests {
    use super::RefreshAnswer;

    #[test]
    fn the_refresh_answer_written_by_hand_is_serdes() {
        let awkward = [
            "ya29.a0AfB_byC-token",
            "",
            "quote\" backslash\\ slash/",
            "\u{0}\u{1f}\n\t\r\u{8}\u{c}\u{7f}",
            "é ünï 🦀 \u{2028}",
            // Each alone, and DEL, which JSON leaves as it is.
            "del\u{7f}",
            " ",
            "\u{1f}",
            "\"",
            "\\",
        ];
        for access_token in awkward {
            for service in ["onedrivev2", "box.com", "x\"y"] {
                for expires in [0, 7, 3599, u64::from(u32::MAX), u64::MAX] {
                    let answer = RefreshAnswer { access_token, expires, service };
                    let body = answer.body();
                    let plain = |s: &str| !s.chars().any(|c| c < ' ' || c == '"' || c == '\\');
                    if plain(access_token) && plain(service) {
                        assert_eq!(body.capacity(), body.len(), "{access_token:?} {service:?} {expires}");
                    }
                    let by_hand = String::from_utf8(body).unwrap();
                    assert_eq!(by_hand, serde_json::to_string(&answer).unwrap());
                    let parsed: serde_json::Value = serde_json::from_str(&by_hand).unwrap();
                    assert_eq!(parsed["access_token"], access_token);
                    assert_eq!(parsed["type"], service);
                    assert_eq!(parsed["expires"], expires);
                }
            }
        }
    }
}
