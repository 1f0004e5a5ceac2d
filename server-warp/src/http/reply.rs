//! Building responses: JSON, pages, and the error vocabulary on each surface.
//!
//! | code | Duplicati routes | `/v1` | `/oauth2/token` |
//! |---|---|---|---|
//! | `authid_invalid` | 401 | 401 | 400 `invalid_grant` |
//! | `authid_revoked` | 401 | 401 | 400 `invalid_grant` |
//! | `reauth_required` | 401 | 401 | 400 `invalid_grant` |
//! | `rate_limited` | 503 + `Retry-After` | 429 + `Retry-After` | 429 |
//! | `provider_unavailable` | 502 + `Retry-After` | 503 + `Retry-After` | 503 `temporarily_unavailable` |
//! | `store_unavailable` | 500 | 503 + `Retry-After` | 503 `temporarily_unavailable` |
//! | `provider_misconfigured` | 500 | 500 | 500 `server_error` |
//! | `bad_request` | 400 | 400 | 400 `invalid_request` |

use std::time::Duration;

use latchkey_core::{EngineError, ErrorCode};
use serde_json::{Value, json};
use warp::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, LOCATION, RETRY_AFTER};
use warp::http::{HeaderName, StatusCode};
use warp::reply::Response;

/// Which conventions an error follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Duplicati's helper protocol: `{"error", "code"}` and `X-Reason`.
    Duplicati,
    /// The `/v1` JSON API: `{"error": code, "error_description"}`.
    V1,
    /// RFC 6749: `{"error": oauth code, "error_description"}`.
    OAuth2,
}

/// An error as a front end says it: a code, one line of text, maybe a wait.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The vocabulary code.
    pub code: ErrorCode,
    /// One line for the person behind the client.
    pub text: String,
    /// When to retry, where that applies.
    pub retry_after: Option<Duration>,
}

impl Failure {
    /// A `bad_request`.
    pub fn bad_request(text: impl Into<String>) -> Self {
        Failure { code: ErrorCode::BadRequest, text: text.into(), retry_after: None }
    }

    /// A `rate_limited` with its wait.
    pub fn rate_limited(wait: Duration) -> Self {
        Failure {
            code: ErrorCode::RateLimited,
            text: format!("too many requests; retry in {} s", wait.as_secs().max(1)),
            retry_after: Some(wait),
        }
    }
}

impl From<&EngineError> for Failure {
    fn from(e: &EngineError) -> Self {
        Failure { code: e.code(), text: e.to_string(), retry_after: e.retry_after() }
    }
}

/// A response with a body and a content type; never cached.
pub fn with_body(status: StatusCode, content_type: &'static str, body: impl Into<String>) -> Response {
    let body: String = body.into();
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A JSON response.
pub fn json_reply(status: StatusCode, value: &Value) -> Response {
    with_body(status, "application/json", value.to_string())
}

/// A 302 redirect.
pub fn redirect(location: &str) -> Response {
    let mut response = with_body(StatusCode::FOUND, "text/plain; charset=utf-8", "");
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

/// The longest JSONP callback name taken.
const MAX_CALLBACK_LEN: usize = 128;

/// Whether `name` is a plain dotted JavaScript identifier path
/// (`angular.callbacks._0`): the only thing a JSONP answer ever echoes.
pub fn is_callback_name(name: &str) -> bool {
    let ident = |part: &str| {
        let mut chars = part.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
    };
    !name.is_empty() && name.len() <= MAX_CALLBACK_LEN && name.split('.').all(ident)
}

/// A JSONP answer: `<callback>(<json>);`, always 200 (a script tag cannot
/// read a status), never sniffed as anything else, never cached.
/// `callback` must have passed [`is_callback_name`].
pub fn jsonp(callback: &str, value: &Value) -> Response {
    // JSON is JavaScript except for U+2028/U+2029 in older engines.
    let json = value.to_string().replace('\u{2028}', "\\u2028").replace('\u{2029}', "\\u2029");
    let mut response =
        with_body(StatusCode::OK, "application/javascript; charset=utf-8", format!("{callback}({json});"));
    response
        .headers_mut()
        .insert(HeaderName::from_static("x-content-type-options"), HeaderValue::from_static("nosniff"));
    response
}

/// One printable ASCII line: a header value can carry no CR/LF and nothing
/// a proxy might mangle.
pub fn one_line(text: &str) -> String {
    let line: String =
        text.chars().map(|c| if c.is_ascii() && !c.is_ascii_control() { c } else { ' ' }).take(300).collect();
    line.trim().to_owned()
}

fn status_for(surface: Surface, code: ErrorCode) -> StatusCode {
    use ErrorCode::*;
    match (surface, code) {
        (Surface::OAuth2, AuthIdInvalid | AuthIdRevoked | ReauthRequired | BadRequest) => StatusCode::BAD_REQUEST,
        (_, AuthIdInvalid | AuthIdRevoked | ReauthRequired) => StatusCode::UNAUTHORIZED,
        (Surface::Duplicati, RateLimited) => StatusCode::SERVICE_UNAVAILABLE,
        (_, RateLimited) => StatusCode::TOO_MANY_REQUESTS,
        (Surface::Duplicati, ProviderUnavailable) => StatusCode::BAD_GATEWAY,
        (_, ProviderUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
        (Surface::Duplicati, StoreUnavailable) => StatusCode::INTERNAL_SERVER_ERROR,
        (_, StoreUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
        (_, ProviderMisconfigured) => StatusCode::INTERNAL_SERVER_ERROR,
        (_, BadRequest) => StatusCode::BAD_REQUEST,
    }
}

fn oauth_code(code: ErrorCode) -> &'static str {
    use ErrorCode::*;
    match code {
        AuthIdInvalid | AuthIdRevoked | ReauthRequired => "invalid_grant",
        RateLimited => "slow_down",
        ProviderUnavailable | StoreUnavailable => "temporarily_unavailable",
        ProviderMisconfigured => "server_error",
        BadRequest => "invalid_request",
    }
}

/// The JSON body of an error on `surface`.
pub fn error_body(surface: Surface, failure: &Failure) -> Value {
    let text = one_line(&failure.text);
    match surface {
        Surface::Duplicati => json!({ "error": text, "code": failure.code.as_str() }),
        Surface::V1 => json!({ "error": failure.code.as_str(), "error_description": text }),
        Surface::OAuth2 => json!({ "error": oauth_code(failure.code), "error_description": text }),
    }
}

/// The error response for `failure` on `surface`.
pub fn error(surface: Surface, failure: &Failure) -> Response {
    let text = one_line(&failure.text);
    let status = status_for(surface, failure.code);
    let mut response = json_reply(status, &error_body(surface, failure));
    let headers = response.headers_mut();
    if surface == Surface::Duplicati {
        if let Ok(value) = HeaderValue::from_str(&text) {
            headers.insert(HeaderName::from_static("x-reason"), value);
        }
    }
    if let Some(wait) = failure.retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(wait.as_secs().max(1)));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_table_holds_on_every_surface() {
        use ErrorCode::*;
        let rows = [
            (AuthIdInvalid, 401, 401, 400),
            (AuthIdRevoked, 401, 401, 400),
            (ReauthRequired, 401, 401, 400),
            (RateLimited, 503, 429, 429),
            (ProviderUnavailable, 502, 503, 503),
            (StoreUnavailable, 500, 503, 503),
            (ProviderMisconfigured, 500, 500, 500),
            (BadRequest, 400, 400, 400),
        ];
        for (code, duplicati, v1, oauth2) in rows {
            let got = [Surface::Duplicati, Surface::V1, Surface::OAuth2].map(|s| status_for(s, code).as_u16());
            assert_eq!(got, [duplicati, v1, oauth2], "{code:?}");
        }
    }

    /// What Duplicati's `OAuthHelper` does with a failed answer (read in its
    /// client code): a 4xx is final after one try; a 5xx is retried, five
    /// times with back-off, except a 503 carrying `X-Reason`, which fails at once.
    fn duplicati_retries(status: StatusCode, has_reason: bool) -> bool {
        status.is_server_error() && !(status == StatusCode::SERVICE_UNAVAILABLE && has_reason)
    }

    #[test]
    fn duplicati_retries_exactly_the_failures_that_can_pass() {
        use ErrorCode::*;
        // (code, status Duplicati sees, does its client retry)
        let rows = [
            (AuthIdInvalid, 401, false),
            (AuthIdRevoked, 401, false),
            (ReauthRequired, 401, false),
            (RateLimited, 503, false), // fail fast: retrying sooner only extends the limit
            (ProviderUnavailable, 502, true),
            (StoreUnavailable, 500, true),
            (ProviderMisconfigured, 500, true),
            (BadRequest, 400, false),
        ];
        for (code, status, retried) in rows {
            let failure = Failure { code, text: "why".into(), retry_after: None };
            let response = error(Surface::Duplicati, &failure);
            let has_reason = response.headers().contains_key("x-reason");
            assert!(has_reason, "{code:?}: every Duplicati failure says why");
            assert_eq!(response.status().as_u16(), status, "{code:?}");
            assert_eq!(duplicati_retries(response.status(), has_reason), retried, "{code:?}");
        }
    }

    #[test]
    fn only_plain_dotted_names_are_jsonp_callbacks() {
        for good in ["angular.callbacks._0", "cb", "$jsonp_12", "a.b.c.d", "_"] {
            assert!(is_callback_name(good), "{good}");
        }
        let long = "a".repeat(200);
        for bad in ["", "alert(1)", "a]b", "a..b", ".a", "a.", "1a", "a b", "a;b", "a-b", "ä", "a\u{2028}", &long] {
            assert!(!is_callback_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn x_reason_is_one_printable_line() {
        let failure = Failure::bad_request("bad\r\nInjected: header\u{7f} ünïcode");
        let response = error(Surface::Duplicati, &failure);
        let reason = response.headers()["x-reason"].to_str().unwrap();
        assert!(!reason.contains('\r') && !reason.contains('\n'), "{reason}");
        assert!(reason.is_ascii());
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
    }
}
