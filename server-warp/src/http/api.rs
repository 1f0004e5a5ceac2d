//! The `/v1` JSON API (AuthID as a bearer token) and the RFC 6749
//! `/oauth2/token` facade (AuthID as the refresh token).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use latchkey_core::engine::{DevicePoll, GrantRevocation, HandleInfo, MintedHandle, ProviderRevocation};
use latchkey_core::{AuthId, EngineError, KeyId, Timestamp};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::metrics::logged_keyid;
use super::pages::provider_outcome;
use super::reply::{Failure, Surface, error, json_reply, oauth_error};
use super::routes::Route;
use super::token_path::{Cost, Refused};
use super::{State, body, client_ip, fields, with_state};
use crate::audit;

pub(super) fn routes(state: State) -> warp::filters::BoxedFilter<(Response,)> {
    let s = || with_state(state.clone());
    let ip = || client_ip(state.clone());
    let bearer = || warp::header::optional::<String>("authorization");
    let get = |route: Route| warp::get().and(route.filter());
    let post = |route: Route| warp::post().and(route.filter());
    let token = post(Route::V1Token).and(bearer()).and(body()).and(ip()).and(s()).then(v1_token).boxed();
    let list = get(Route::V1Handles).and(bearer()).and(ip()).and(s()).then(list_handles);
    let mint = post(Route::V1Handles).and(bearer()).and(body()).and(ip()).and(s()).then(mint).boxed();
    let rotate = post(Route::V1HandlesRotate).and(bearer()).and(ip()).and(s()).then(rotate);
    let delete = warp::delete()
        .and(Route::V1Handle.filter_with_param())
        .and(bearer())
        .and(ip())
        .and(s())
        .then(delete_handle)
        .boxed();
    let revoke = post(Route::V1GrantRevoke).and(bearer()).and(ip()).and(s()).then(revoke);
    let device_code = post(Route::V1DeviceCode).and(body()).and(ip()).and(s()).then(device_code).boxed();
    let device_token = post(Route::V1DeviceToken).and(body()).and(ip()).and(s()).then(device_token);
    let services = get(Route::V1Services).and(s()).map(services).boxed();
    let oauth2 = post(Route::OAuth2Token)
        .and(body())
        .and(ip())
        .and(s())
        .then(oauth2_token)
        .recover(super::recover_on(Surface::OAuth2))
        .unify();
    token
        .or(list)
        .unify()
        .or(rotate)
        .unify()
        .or(mint)
        .unify()
        .or(delete)
        .unify()
        .or(revoke)
        .unify()
        .or(device_code)
        .unify()
        .or(device_token)
        .unify()
        .or(services)
        .unify()
        .or(oauth2)
        .unify()
        .boxed()
}

fn unix(t: Timestamp) -> u64 {
    t.unix_secs()
}

/// The AuthID of a `/v1` request: `Authorization: Bearer <AuthID>`.
fn bearer(header: Option<&str>) -> Option<&str> {
    let (scheme, rest) = header?.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(rest)
}

/// Runs `op` on a `/v1` request's bearer AuthID through the token path; a
/// refusal is answered in the `/v1` vocabulary.
async fn with_bearer<T>(
    state: &State,
    header: Option<String>,
    ip: IpAddr,
    cost: Cost,
    op: impl AsyncFnOnce(&AuthId) -> Result<T, EngineError>,
) -> Result<(AuthId, T), Response> {
    let raw = bearer(header.as_deref());
    state.with_authid(raw.unwrap_or_default(), ip, cost, op).await.map_err(|refused| {
        let mut failure = refused.failure();
        if raw.is_none() && matches!(refused, Refused::Malformed(_)) {
            failure.text = "send the AuthID as `Authorization: Bearer <AuthID>`".into();
        }
        error(Surface::V1, &failure)
    })
}

/// `min_validity`: seconds, at most a day.
fn min_validity(form: &HashMap<String, String>) -> Result<Option<Duration>, EngineError> {
    match form.get("min_validity").map(|v| v.parse::<u64>()) {
        None => Ok(None),
        Some(Ok(secs)) if secs <= 86_400 => Ok(Some(Duration::from_secs(secs))),
        Some(_) => Err(EngineError::BadRequest("min_validity must be a number of seconds up to 86400".into())),
    }
}

async fn v1_token(header: Option<String>, body: Vec<u8>, ip: IpAddr, state: State) -> Response {
    let form = fields(&body);
    let served = with_bearer(&state, header, ip, Cost::TokenRequest, async |authid| {
        state.broker.shared_token(authid, min_validity(&form)?).await
    });
    match served.await {
        Ok((authid, token)) => logged_keyid(
            json_reply(
                StatusCode::OK,
                &json!({
                    "access_token": token.access_token.expose_secret(),
                    "token_type": "Bearer",
                    "expires_in": state.broker.expires_in(&token).map(|left| left.as_secs()),
                    "expires_at": token.expires_at.map(unix),
                    "service": token.service,
                    "scope": token.scopes.join(" "),
                    "refresh_deadline": token.refresh_deadline.map(unix),
                }),
            ),
            &authid,
        ),
        Err(response) => response,
    }
}

fn handle_json(h: &HandleInfo) -> Value {
    json!({
        "keyid": h.keyid.to_string(),
        "label": h.label,
        "created_at": unix(h.created_at),
        "last_used_at": unix(h.last_used_at),
        "revoked_at": h.revoked_at.map(unix),
        "current": h.is_caller,
    })
}

fn minted_json(m: &MintedHandle) -> Value {
    json!({
        "authid": m.authid.expose_text().as_str(),
        "keyid": m.authid.keyid().to_string(),
        "label": m.label,
        "created_at": unix(m.created_at),
    })
}

fn revocation_json(r: &GrantRevocation) -> Value {
    let (provider, detail) = match &r.provider {
        ProviderRevocation::Revoked => ("revoked", None),
        ProviderRevocation::Unsupported => ("unsupported", None),
        ProviderRevocation::NoToken => ("no_token", None),
        ProviderRevocation::Failed(why) => ("failed", Some(why.clone())),
    };
    json!({ "grant_revoked": true, "handles_revoked": r.handles_revoked, "provider": provider, "provider_error": detail })
}

async fn list_handles(header: Option<String>, ip: IpAddr, state: State) -> Response {
    match with_bearer(&state, header, ip, Cost::Free, async |authid| state.broker.list_handles(authid).await).await {
        Ok((_, handles)) => {
            json_reply(StatusCode::OK, &json!({ "handles": handles.iter().map(handle_json).collect::<Vec<_>>() }))
        }
        Err(response) => response,
    }
}

async fn mint(header: Option<String>, body: Vec<u8>, ip: IpAddr, state: State) -> Response {
    let label = fields(&body).remove("label").unwrap_or_default();
    let minted =
        with_bearer(&state, header, ip, Cost::Free, async |authid| state.broker.mint_handle(authid, &label).await);
    match minted.await {
        Ok((authid, minted)) => {
            audit::authid_minted(&authid.keyid(), &minted.authid.keyid(), ip);
            json_reply(StatusCode::CREATED, &minted_json(&minted))
        }
        Err(response) => response,
    }
}

async fn rotate(header: Option<String>, ip: IpAddr, state: State) -> Response {
    match with_bearer(&state, header, ip, Cost::Free, async |authid| state.broker.rotate_handle(authid).await).await {
        Ok((authid, minted)) => {
            audit::authid_rotated(&authid.keyid(), &minted.authid.keyid(), ip);
            json_reply(StatusCode::OK, &minted_json(&minted))
        }
        Err(response) => response,
    }
}

async fn delete_handle(keyid: String, header: Option<String>, ip: IpAddr, state: State) -> Response {
    let revoked = with_bearer(&state, header, ip, Cost::Free, async |authid| {
        let target =
            KeyId::parse(&keyid).map_err(|_| EngineError::BadRequest("the key id in the path is malformed".into()))?;
        Ok((target, state.broker.revoke_handle(authid, target).await?))
    });
    match revoked.await {
        Ok((authid, (target, grant))) => {
            audit::authid_revoked(&authid.keyid(), &target, ip);
            if let Some(grant) = &grant {
                audit::grant_revoked("last AuthID", grant.handles_revoked, provider_outcome(&grant.provider), ip);
            }
            let mut body = json!({ "revoked": target.to_string(), "grant_revoked": grant.is_some() });
            if let Some(grant) = grant {
                body["grant"] = revocation_json(&grant);
            }
            json_reply(StatusCode::OK, &body)
        }
        Err(response) => response,
    }
}

async fn revoke(header: Option<String>, ip: IpAddr, state: State) -> Response {
    match with_bearer(&state, header, ip, Cost::Free, async |authid| state.broker.revoke_grant(authid).await).await {
        Ok((_, report)) => {
            audit::grant_revoked("/v1/grant/revoke", report.handles_revoked, provider_outcome(&report.provider), ip);
            json_reply(StatusCode::OK, &revocation_json(&report))
        }
        Err(response) => response,
    }
}

async fn device_code(body: Vec<u8>, ip: IpAddr, state: State) -> Response {
    if let Err(wait) = state.limiter.record_creation(ip, Instant::now()) {
        return error(Surface::V1, &Failure::rate_limited(wait));
    }
    let mut form = fields(&body);
    let service = form.remove("service").unwrap_or_default();
    // RFC 8628 has no name for the program; `label` (or `client_name`) is shown on the device page.
    let label = form.remove("label").or_else(|| form.remove("client_name"));
    match state.broker.begin_device(&service, label.as_deref()).await {
        Ok(start) => json_reply(
            StatusCode::OK,
            &json!({
                "device_code": start.device_code.expose_secret(),
                "user_code": start.user_code,
                "verification_uri": start.verification_uri,
                "verification_uri_complete": start.verification_uri_complete,
                "expires_in": start.expires_in.as_secs(),
                "interval": start.interval.as_secs(),
            }),
        ),
        Err(e) => error(Surface::V1, &Failure::from(&e)),
    }
}

async fn device_token(body: Vec<u8>, ip: IpAddr, state: State) -> Response {
    if let Err(wait) = state.limiter.fetch_request(ip, Instant::now()) {
        return error(Surface::V1, &Failure::rate_limited(wait));
    }
    // A poll without the field is a malformed request, not an unknown code.
    let Some(device_code) = fields(&body).remove("device_code").filter(|code| !code.is_empty()) else {
        return error(Surface::V1, &Failure::bad_request("device_code is missing"));
    };
    let pending = oauth_error;
    match state.broker.poll_device(&device_code).await {
        Ok(DevicePoll::Ready(authid)) => {
            audit::handoff_delivered(&authid.keyid(), ip);
            json_reply(
                StatusCode::OK,
                &json!({ "authid": authid.expose_text().as_str(), "keyid": authid.keyid().to_string() }),
            )
        }
        Ok(DevicePoll::Pending) => pending("authorization_pending", "the user has not finished logging in"),
        Ok(DevicePoll::SlowDown) => pending("slow_down", "poll no faster than the interval"),
        Ok(DevicePoll::Expired) => pending("expired_token", "the device code expired or was used; start again"),
        Ok(DevicePoll::Denied) => pending("access_denied", "the user refused access at the provider"),
        Ok(DevicePoll::Invalid) => pending("invalid_grant", "unknown device code"),
        Err(e) => error(Surface::V1, &Failure::from(&e)),
    }
}

fn services(state: State) -> Response {
    let list: Vec<Value> = state
        .broker
        .catalogue()
        .listed_services()
        .map(|s| json!({ "id": s.id, "display_name": s.display_name, "login_url": state.login_link(&s.id) }))
        .collect();
    json_reply(StatusCode::OK, &json!({ "services": list }))
}

async fn oauth2_token(body: Vec<u8>, ip: IpAddr, state: State) -> Response {
    let form = fields(&body);
    match form.get("grant_type").map(String::as_str) {
        Some("refresh_token") => {}
        Some(_) => return oauth_error("unsupported_grant_type", "only refresh_token is supported"),
        None => return error(Surface::OAuth2, &Failure::bad_request("grant_type is missing")),
    }
    let raw = form.get("refresh_token").map(String::as_str).unwrap_or_default();
    let served =
        state.with_authid(raw, ip, Cost::TokenRequest, async |authid| state.broker.shared_token(authid, None).await);
    match served.await {
        Ok((authid, token)) => {
            let mut body = json!({
                "access_token": token.access_token.expose_secret(),
                "token_type": "Bearer",
                "refresh_token": authid.expose_text().as_str(),
                "scope": token.scopes.join(" "),
            });
            if let Some(left) = state.broker.expires_in(&token) {
                body["expires_in"] = json!(left.as_secs());
            }
            logged_keyid(json_reply(StatusCode::OK, &body), &authid)
        }
        Err(refused) => error(Surface::OAuth2, &refused.failure()),
    }
}
