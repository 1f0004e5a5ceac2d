//! Duplicati's helper protocol at the root: the picker, login and callback,
//! `/refresh`, the hand-off (`/fetch`, `/token-state`), revocation, the
//! personal-login-token flow, the device page, the privacy policy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use latchkey_core::engine::{Callback, HandoffFetch, HandoffState};
use latchkey_core::{AuthId, Clock, EngineError, ErrorCode, SystemClock};
use secrecy::ExposeSecret;
use serde_json::json;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::pages;
use super::reply::{Failure, Surface, error, json_reply, redirect, with_body};
use super::{State, body, client_ip, duplicati_authid, fields, query, with_state};

/// Seconds reported for access tokens that never expire.
const NEVER_EXPIRES_SECS: u64 = 365 * 86_400;

/// `/refresh`, on its own: the busiest route, tried before every other.
pub(super) fn refresh_route(state: State) -> warp::filters::BoxedFilter<(Response,)> {
    warp::path!("refresh")
        .and(warp::get().or(warp::post()).unify())
        .and(warp::header::optional::<String>("x-authid"))
        .and(query())
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
    let index = warp::get().and(warp::path::end()).and(query()).and(s()).then(index).boxed();
    let login = warp::get().and(warp::path!("login")).and(query()).and(s()).then(login);
    let logged_in = warp::get().and(warp::path!("logged-in")).and(query()).and(s()).then(logged_in).boxed();
    let fetch = warp::get().and(warp::path!("fetch")).and(query()).and(ip()).and(s()).then(fetch).boxed();
    let token_state = warp::get().and(warp::path!("token-state")).and(query()).and(ip()).and(s()).then(token_state);
    let revoke = warp::get().and(warp::path!("revoke")).and(s()).map(|s: State| pages::revoke_form(&s.csp)).boxed();
    let revoked = warp::post().and(warp::path!("revoked")).and(body()).and(ip()).and(s()).then(revoked);
    let cli_token = warp::get().and(warp::path!("cli-token")).and(query()).and(s()).then(cli_token).boxed();
    let cli_login = warp::post().and(warp::path!("cli-token-login")).and(body()).and(s()).then(cli_token_login);
    let device = warp::get()
        .and(warp::path!("device"))
        .and(query())
        .and(s())
        .map(|q: HashMap<String, String>, s: State| pages::device_form(&s.csp, q.get("user_code").map(String::as_str)))
        .boxed();
    let device_post = warp::post().and(warp::path!("device")).and(body()).and(s()).then(device_login);
    let privacy = warp::get()
        .and(warp::path!("privacy-policy"))
        .map(|| with_body(StatusCode::OK, "text/plain; charset=utf-8", pages::PRIVACY_POLICY))
        .boxed();
    index
        .or(login)
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

/// The status a page shows for an engine error.
fn page_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::AuthIdInvalid | ErrorCode::AuthIdRevoked | ErrorCode::ReauthRequired => StatusCode::UNAUTHORIZED,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::ProviderUnavailable => StatusCode::BAD_GATEWAY,
        ErrorCode::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::ProviderMisconfigured => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
    }
}

fn error_page(state: &State, title: &str, e: &EngineError) -> Response {
    tracing::info!(code = e.code().as_str(), "page request failed");
    pages::error_page(page_status(e.code()), &state.csp, title, &e.to_string())
}

fn display_name(state: &State, service: &str) -> String {
    state.broker.catalogue().service(service).map(|s| s.display_name.clone()).unwrap_or_else(|| service.to_owned())
}

async fn index(q: HashMap<String, String>, state: State) -> Response {
    let token = q.get("token").map(String::as_str);
    if let Some(service) = q.get("redirect") {
        let mut target = format!("/login?id={}", pages::q(service));
        if let Some(token) = token {
            target.push_str(&format!("&token={}", pages::q(token)));
        }
        return redirect(&target);
    }
    if let Some(token) = token {
        if let Err(e) = state.broker.start_handoff(token).await {
            return error_page(&state, "Cannot start", &e);
        }
    }
    let catalogue = state.broker.catalogue();
    let services: Vec<(String, String)> = match q.get("type") {
        Some(id) => match catalogue.service(id) {
            Some(s) => vec![(s.id.clone(), s.display_name.clone())],
            None => {
                let message = "This broker does not offer that service. Check the link, or pick another service.";
                return pages::error_page(StatusCode::NOT_FOUND, &state.csp, "Unknown service", message);
            }
        },
        None => catalogue.listed_services().map(|s| (s.id.clone(), s.display_name.clone())).collect(),
    };
    pages::picker(&state.csp, &services, token)
}

async fn login(q: HashMap<String, String>, state: State) -> Response {
    let Some(service) = q.get("id") else {
        return pages::error_page(
            StatusCode::BAD_REQUEST,
            &state.csp,
            "No service",
            "The login link names no service.",
        );
    };
    let token = q.get("token").map(String::as_str);
    if state.login_token_services.contains(service) {
        let mut target = format!("/cli-token?id={}", pages::q(service));
        if let Some(token) = token {
            target.push_str(&format!("&token={}", pages::q(token)));
        }
        return redirect(&target);
    }
    match state.broker.begin_login(service, token).await {
        Ok(start) => redirect(&start.authorization_url),
        Err(e) => error_page(&state, "Cannot start the login", &e),
    }
}

async fn logged_in(q: HashMap<String, String>, state: State) -> Response {
    let Some(login_state) = q.get("state") else {
        let message = "The provider's answer carries no state. Start the login again.";
        return pages::error_page(StatusCode::BAD_REQUEST, &state.csp, "Login failed", message);
    };
    const KNOWN: [&str; 5] = ["state", "code", "error", "error_description", "iss"];
    let params: Vec<(String, String)> =
        q.iter().filter(|(k, _)| !KNOWN.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    let callback = Callback {
        state: login_state,
        code: q.get("code").map(String::as_str),
        error: q.get("error").map(String::as_str),
        iss: q.get("iss").map(String::as_str),
        service: None,
        params: &params,
    };
    match state.broker.complete_login(&callback).await {
        Ok(done) => {
            let name = display_name(&state, &done.service);
            pages::authid_page(&state.csp, &done.authid.expose_text(), &name, &state.openers, done.handed_off)
        }
        Err(e) => error_page(&state, "Login failed", &e),
    }
}

/// The Duplicati failure for an engine error; `reauth_required` names the login link.
fn duplicati_failure(state: &State, e: &EngineError) -> Failure {
    let mut failure = Failure::from(e);
    if let EngineError::ReauthRequired { service } = e {
        failure.text = format!(
            "The provider no longer accepts this login; log in again at {} and use the new AuthID",
            state.login_link(service)
        );
    }
    failure
}

async fn refresh(
    header: Option<String>,
    q: HashMap<String, String>,
    body: Vec<u8>,
    ip: IpAddr,
    state: State,
) -> Response {
    let raw = duplicati_authid(header, &fields(&body), &q);
    let parsed = AuthId::parse(&raw);
    if let Err(wait) = state.limiter.token_request(parsed.as_ref().ok().map(AuthId::keyid), ip, Instant::now()) {
        return error(Surface::Duplicati, &Failure::rate_limited(wait));
    }
    let authid = match parsed {
        Ok(authid) => authid,
        Err(e) => return error(Surface::Duplicati, &Failure::from(&EngineError::from(e))),
    };
    match state.broker.token(&authid, None).await {
        Ok(token) => {
            state.note_success(&authid);
            let expires =
                token.expires_at.map(|at| at.duration_since(SystemClock.now()).as_secs()).unwrap_or(NEVER_EXPIRES_SECS);
            json_reply(
                StatusCode::OK,
                &json!({ "access_token": token.access_token.expose_secret(), "expires": expires, "type": token.service }),
            )
        }
        Err(e) => {
            state.note_failure(&authid, &e);
            error(Surface::Duplicati, &duplicati_failure(&state, &e))
        }
    }
}

async fn fetch(q: HashMap<String, String>, ip: IpAddr, state: State) -> Response {
    if let Err(wait) = state.limiter.fetch_request(ip, Instant::now()) {
        return error(Surface::Duplicati, &Failure::rate_limited(wait));
    }
    let token = q.get("token").map(String::as_str).unwrap_or_default();
    match state.broker.fetch_handoff(token).await {
        Ok(HandoffFetch::Ready(authid)) => {
            json_reply(StatusCode::OK, &json!({ "authid": authid.expose_text().as_str() }))
        }
        Ok(HandoffFetch::Pending) => json_reply(StatusCode::OK, &json!({ "wait": "Not ready" })),
        Ok(HandoffFetch::Denied) => {
            error(Surface::Duplicati, &Failure::bad_request("the login was refused at the provider; start again"))
        }
        Ok(HandoffFetch::Gone) => {
            let mut response = error(
                Surface::Duplicati,
                &Failure::bad_request("unknown, expired or already fetched token; start the login again"),
            );
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
        Err(e) => error(Surface::Duplicati, &Failure::from(&e)),
    }
}

async fn token_state(q: HashMap<String, String>, ip: IpAddr, state: State) -> Response {
    if let Err(wait) = state.limiter.fetch_request(ip, Instant::now()) {
        return error(Surface::Duplicati, &Failure::rate_limited(wait));
    }
    let token = q.get("token").map(String::as_str).unwrap_or_default();
    match state.broker.handoff_state(token).await {
        Ok(HandoffState::Pending) => json_reply(StatusCode::OK, &json!({ "wait": "Not ready" })),
        Ok(HandoffState::Ready | HandoffState::Delivered) => json_reply(StatusCode::OK, &json!({ "success": true })),
        Ok(HandoffState::Denied | HandoffState::Unknown) => json_reply(StatusCode::OK, &json!({ "success": false })),
        Err(e) => error(Surface::Duplicati, &Failure::from(&e)),
    }
}

async fn revoked(body: Vec<u8>, ip: IpAddr, state: State) -> Response {
    let form = fields(&body);
    let parsed = AuthId::parse(form.get("authid").map(String::as_str).unwrap_or_default());
    if let Err(wait) = state.limiter.token_request(parsed.as_ref().ok().map(AuthId::keyid), ip, Instant::now()) {
        let message = format!("Too many attempts; try again in {} s.", wait.as_secs().max(1));
        return pages::error_page(StatusCode::TOO_MANY_REQUESTS, &state.csp, "Slow down", &message);
    }
    let authid = match parsed {
        Ok(authid) => authid,
        Err(e) => return error_page(&state, "Cannot revoke", &EngineError::from(e)),
    };
    match state.broker.revoke_handle(&authid, authid.keyid()).await {
        Ok(grant) => {
            let provider = grant.map(|g| match g.provider {
                latchkey_core::engine::ProviderRevocation::Revoked => "at the provider as well",
                latchkey_core::engine::ProviderRevocation::Unsupported => "the provider offers no revocation",
                latchkey_core::engine::ProviderRevocation::NoToken => "there was no token to revoke",
                latchkey_core::engine::ProviderRevocation::Failed(_) => "the provider could not be reached",
            });
            pages::revoked_page(&state.csp, provider)
        }
        Err(e) => {
            state.note_failure(&authid, &e);
            error_page(&state, "Cannot revoke", &e)
        }
    }
}

async fn cli_token(q: HashMap<String, String>, state: State) -> Response {
    let service = q.get("id").map(String::as_str).unwrap_or("jottacloud");
    if !state.login_token_services.contains(service) || state.broker.catalogue().service(service).is_none() {
        let message = "This service does not log in with a login token here.";
        return pages::error_page(StatusCode::NOT_FOUND, &state.csp, "Unknown service", message);
    }
    let token = q.get("token").map(String::as_str);
    pages::login_token_form(&state.csp, service, &display_name(&state, service), token)
}

async fn cli_token_login(body: Vec<u8>, state: State) -> Response {
    let form = fields(&body);
    let service = form.get("id").map(String::as_str).unwrap_or_default();
    if !state.login_token_services.contains(service) {
        let message = "This service does not log in with a login token here.";
        return pages::error_page(StatusCode::NOT_FOUND, &state.csp, "Unknown service", message);
    }
    let login_token = form.get("login_token").map(String::as_str).unwrap_or_default();
    let handoff = form.get("token").map(String::as_str).filter(|t| !t.is_empty());
    match state.broker.login_with_token(service, login_token, handoff).await {
        Ok(done) => {
            let name = display_name(&state, &done.service);
            pages::authid_page(&state.csp, &done.authid.expose_text(), &name, &state.openers, done.handed_off)
        }
        Err(e) => error_page(&state, "Login failed", &e),
    }
}

async fn device_login(body: Vec<u8>, state: State) -> Response {
    let form = fields(&body);
    let code = form.get("user_code").map(String::as_str).unwrap_or_default();
    match state.broker.begin_device_login(code).await {
        Ok(start) => redirect(&start.authorization_url),
        Err(e) => error_page(&state, "Cannot connect the device", &e),
    }
}
