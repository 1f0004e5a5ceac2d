//! The HTTP side of the fake provider.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::state::{Code, Issued, PendingLogin};
use crate::{ClientAuth, FakeConfig, Fault, Recorded, Shared};

const MAX_BODY: usize = 64 * 1024;

/// Returned from a handler to drop the connection without an answer.
#[derive(Debug)]
pub(crate) struct Dropped;

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for Dropped {}

type Reply = Result<Response<Full<Bytes>>, Dropped>;

pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stopped: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                shared.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(Arc::clone(&shared), req));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        }
    }
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

fn json_reply(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", value.to_string())
}

fn oauth_error(status: StatusCode, error: &str) -> Response<Full<Bytes>> {
    json_reply(status, &json!({ "error": error, "error_description": format!("fake provider: {error}") }))
}

fn redirect(location: &str) -> Response<Full<Bytes>> {
    let mut response = respond(StatusCode::FOUND, "text/plain", "");
    if let Ok(value) = location.parse() {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

fn with_params(base: &str, params: &[(&str, &str)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        query.append_pair(k, v);
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{}", query.finish())
}

fn pairs(bytes: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(bytes).into_owned().collect()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = pairs(req.uri().query().unwrap_or_default().as_bytes());
    let authorization = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return Ok(oauth_error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request")),
    };
    let form = if method == Method::POST { pairs(&body) } else { Vec::new() };
    let recorded = Recorded { method: method.to_string(), path: path.clone(), query, form, authorization };
    shared.state().requests.push(recorded.clone());
    let config = shared.config();
    match (method, path.as_str()) {
        (Method::GET, "/authorize") => Ok(authorize(&shared, &config, &recorded)),
        (Method::POST, "/authorize/decide") => Ok(decide(&shared, &config, &recorded)),
        (Method::POST, "/token") => token(&shared, &config, &recorded).await,
        (Method::POST, "/revoke") => Ok(revoke(&shared, &config, &recorded)),
        (Method::POST, "/2/auth/token/revoke") => Ok(bearer_revoke(&shared, &recorded)),
        (Method::POST, "/introspect") => Ok(introspect(&shared, &recorded)),
        (Method::POST, "/device/code") => Ok(device_code(&shared, &config, &recorded)),
        _ => Ok(oauth_error(StatusCode::NOT_FOUND, "not_found")),
    }
}

/// The redirect back to the client after a decision at the provider.
fn finish_login(shared: &Shared, config: &FakeConfig, login: PendingLogin, approve: bool) -> Response<Full<Bytes>> {
    let state = login.state.clone().unwrap_or_default();
    let mut params: Vec<(&str, &str)> = Vec::new();
    if !state.is_empty() {
        params.push(("state", &state));
    }
    let code;
    if approve {
        code = shared.state().new_code(Code {
            redirect_uri: login.redirect_uri.clone(),
            challenge: login.challenge,
            scope: login.scope,
        });
        params.push(("code", &code));
    } else {
        params.push(("error", "access_denied"));
    }
    if let Some(issuer) = &config.issuer {
        params.push(("iss", issuer));
    }
    params.extend(config.extra_callback_params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    redirect(&with_params(&login.redirect_uri, &params))
}

fn authorize(shared: &Shared, config: &FakeConfig, r: &Recorded) -> Response<Full<Bytes>> {
    let Some(redirect_uri) = r.query("redirect_uri") else {
        return respond(StatusCode::BAD_REQUEST, "text/plain", "missing redirect_uri");
    };
    if r.query("client_id") != Some(config.client_id.as_str()) {
        return respond(StatusCode::BAD_REQUEST, "text/plain", "unknown client_id");
    }
    let state = r.query("state").map(str::to_owned);
    let fail = |error: &str| {
        let mut params = vec![("error", error)];
        if let Some(state) = &state {
            params.push(("state", state));
        }
        redirect(&with_params(redirect_uri, &params))
    };
    if r.query("response_type") != Some("code") {
        return fail("unsupported_response_type");
    }
    let challenge = r.query("code_challenge").map(str::to_owned);
    if challenge.is_some() && r.query("code_challenge_method") != Some("S256") {
        return fail("invalid_request");
    }
    if config.require_pkce && challenge.is_none() {
        return fail("invalid_request");
    }
    let login = PendingLogin {
        redirect_uri: redirect_uri.to_owned(),
        state,
        challenge,
        scope: r.query("scope").unwrap_or_default().to_owned(),
    };
    let deny = shared.state().deny_logins;
    if config.auto_approve || deny {
        return finish_login(shared, config, login, !deny);
    }
    let id = {
        let mut state = shared.state();
        let id = state.fresh("login");
        state.logins.insert(id.clone(), login);
        id
    };
    let page = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Fake provider login</title></head><body>\
         <h1>Fake provider</h1><p>An application asks for access to your files.</p>\
         <form method=post action=/authorize/decide><input type=hidden name=login value=\"{id}\">\
         <button name=decision value=approve id=approve>Allow</button> \
         <button name=decision value=deny id=deny>Deny</button></form></body></html>"
    );
    respond(StatusCode::OK, "text/html; charset=utf-8", page)
}

fn decide(shared: &Shared, config: &FakeConfig, r: &Recorded) -> Response<Full<Bytes>> {
    let login = r.form("login").and_then(|id| shared.state().logins.remove(id));
    match login {
        Some(login) => finish_login(shared, config, login, r.form("decision") == Some("approve")),
        None => respond(StatusCode::BAD_REQUEST, "text/plain", "unknown or used login"),
    }
}

fn percent_decode(value: &str) -> String {
    form_urlencoded::parse(format!("v={value}").as_bytes()).next().map(|(_, v)| v.into_owned()).unwrap_or_default()
}

/// Checks client authentication as RFC 6749 §2.3.1 describes it.
fn client_ok(config: &FakeConfig, r: &Recorded) -> bool {
    let basic = r
        .authorization
        .as_deref()
        .and_then(|h| h.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(id, secret)| (percent_decode(id), percent_decode(secret))));
    let posted_secret = r.form("client_secret");
    if config.client_secrets.is_empty() {
        return basic.is_none() && posted_secret.is_none() && r.form("client_id") == Some(config.client_id.as_str());
    }
    let (id, secret) = match (basic, posted_secret, config.client_auth) {
        (Some(_), Some(_), _) => return false,
        (Some(pair), None, ClientAuth::Basic | ClientAuth::Any) => pair,
        (None, Some(secret), ClientAuth::Post | ClientAuth::Any) => {
            (r.form("client_id").unwrap_or_default().to_owned(), secret.to_owned())
        }
        _ => return false,
    };
    id == config.client_id && config.client_secrets.contains(&secret)
}

fn id_token(config: &FakeConfig, issued: &Issued) -> Option<String> {
    if !issued.scope.split(' ').any(|s| s == "openid") {
        return None;
    }
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let mut claims = json!({ "sub": format!("user-{}", issued.family), "aud": config.client_id });
    if let Some(iss) = &config.issuer {
        claims["iss"] = json!(iss);
    }
    Some(format!("{header}.{}.", URL_SAFE_NO_PAD.encode(claims.to_string())))
}

fn token_response(config: &FakeConfig, issued: &Issued) -> Response<Full<Bytes>> {
    let mut body = Map::new();
    body.insert("access_token".into(), json!(issued.access_token));
    body.insert("token_type".into(), json!("Bearer"));
    if let Some(lifetime) = config.access_lifetime {
        body.insert("expires_in".into(), json!(lifetime.as_secs()));
    }
    if let Some(refresh) = &issued.refresh_token {
        body.insert("refresh_token".into(), json!(refresh));
    }
    if !issued.scope.is_empty() {
        body.insert("scope".into(), json!(issued.scope));
    }
    if let Some(id_token) = id_token(config, issued) {
        body.insert("id_token".into(), json!(id_token));
    }
    for (k, v) in &config.extra_token_fields {
        body.insert(k.clone(), json!(v));
    }
    let mut response = json_reply(StatusCode::OK, &Value::Object(body));
    response.headers_mut().insert("cache-control", hyper::header::HeaderValue::from_static("no-store"));
    response
}

async fn token(shared: &Shared, config: &FakeConfig, r: &Recorded) -> Reply {
    let fault = {
        let mut state = shared.state();
        state.token_requests += 1;
        let n = state.token_requests;
        state.faults.remove(&n)
    };
    if !config.latency.is_zero() {
        tokio::time::sleep(config.latency).await;
    }
    match fault {
        Some(Fault::ServerError) => {
            return Ok(respond(StatusCode::INTERNAL_SERVER_ERROR, "text/html", "<html><body>500 oops</body></html>"));
        }
        Some(Fault::RateLimited { retry_after_secs }) => {
            let mut response = oauth_error(StatusCode::TOO_MANY_REQUESTS, "slow_down");
            if let Ok(value) = retry_after_secs.to_string().parse() {
                response.headers_mut().insert(RETRY_AFTER, value);
            }
            return Ok(response);
        }
        Some(Fault::Hang) => {
            shared.shutdown.notified().await;
            return Err(Dropped);
        }
        Some(Fault::Malformed) => return Ok(respond(StatusCode::OK, "text/html", "<html>not a token</html>")),
        Some(Fault::Oversized) => return Ok(respond(StatusCode::OK, "application/json", vec![b' '; 2 << 20])),
        Some(Fault::InvalidGrant) => return Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_grant")),
        Some(Fault::DropAfterCommit) | None => {}
    }
    let answer = grant(shared, config, r);
    if fault == Some(Fault::DropAfterCommit) {
        return Err(Dropped);
    }
    Ok(answer)
}

fn grant(shared: &Shared, config: &FakeConfig, r: &Recorded) -> Response<Full<Bytes>> {
    if !client_ok(config, r) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let mut state = shared.state();
    let issued = match r.form("grant_type") {
        Some("authorization_code") => {
            let Some(code) = r.form("code").and_then(|c| state.take_code(c)) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            };
            if r.form("redirect_uri") != Some(code.redirect_uri.as_str()) {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            }
            let verified = match (&code.challenge, r.form("code_verifier")) {
                (None, None) => true,
                (Some(challenge), Some(verifier)) => URL_SAFE_NO_PAD.encode(Sha256::digest(verifier)) == *challenge,
                _ => false,
            };
            if !verified {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            }
            Ok(state.issue_new(&code.scope, config.issue_refresh_tokens))
        }
        Some("refresh_token") => match r.form("refresh_token") {
            Some(token) => state.refresh(token, config.rotate, config.strict_reuse),
            None => Err("invalid_request"),
        },
        Some("password") => {
            let login = (r.form("username").unwrap_or_default(), r.form("password").unwrap_or_default());
            if config.password_logins.iter().any(|(u, p)| (u.as_str(), p.as_str()) == login) {
                Ok(state.issue_new(r.form("scope").unwrap_or_default(), config.issue_refresh_tokens))
            } else {
                Err("invalid_grant")
            }
        }
        Some("urn:ietf:params:oauth:grant-type:device_code") => match r.form("device_code") {
            Some(code) => state.device_token(code, config.issue_refresh_tokens),
            None => Err("invalid_request"),
        },
        _ => Err("unsupported_grant_type"),
    };
    drop(state);
    match issued {
        Ok(issued) => token_response(config, &issued),
        Err(error) => oauth_error(StatusCode::BAD_REQUEST, error),
    }
}

fn revoke(shared: &Shared, config: &FakeConfig, r: &Recorded) -> Response<Full<Bytes>> {
    if !client_ok(config, r) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    match r.form("token") {
        Some(token) => {
            shared.state().revoke(token);
            respond(StatusCode::OK, "text/plain", "")
        }
        None => oauth_error(StatusCode::BAD_REQUEST, "invalid_request"),
    }
}

fn bearer_revoke(shared: &Shared, r: &Recorded) -> Response<Full<Bytes>> {
    let token = r.authorization.as_deref().and_then(|h| h.strip_prefix("Bearer "));
    match token {
        Some(token) if shared.state().is_active(token) => {
            shared.state().revoke(token);
            json_reply(StatusCode::OK, &Value::Null)
        }
        _ => oauth_error(StatusCode::UNAUTHORIZED, "invalid_access_token"),
    }
}

fn introspect(shared: &Shared, r: &Recorded) -> Response<Full<Bytes>> {
    let active = r.form("token").is_some_and(|t| shared.state().is_active(t));
    json_reply(StatusCode::OK, &json!({ "active": active }))
}

fn device_code(shared: &Shared, config: &FakeConfig, r: &Recorded) -> Response<Full<Bytes>> {
    if r.form("client_id") != Some(config.client_id.as_str()) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let (device_code, user_code) = shared.state().new_device(r.form("scope").unwrap_or_default());
    json_reply(
        StatusCode::OK,
        &json!({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": format!("{}/device", shared.base_url),
            "expires_in": 600,
            "interval": 1,
        }),
    )
}
