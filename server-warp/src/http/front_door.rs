//! The browser side of the front door: no provider redirect without a click
//! on the broker's own page, and every login bound to the browser that
//! began it.
//!
//! Each page that leads to a login sets a proof cookie (HttpOnly,
//! SameSite=Lax, `__Host-` and `Secure` when the broker is served over
//! HTTPS) and repeats its value in a hidden form field. A POST that goes on
//! must be same-origin (`Sec-Fetch-Site`, else `Origin`, when the browser
//! sends them), carry the cookie, and repeat it in the form. The engine
//! checks the proof's MAC and age, lets one proof begin one login, and binds
//! the login to it: the provider's redirect completes only with the same
//! cookie.

use std::collections::HashMap;

use secrecy::ExposeSecret;
use warp::Filter;
use warp::http::HeaderValue;
use warp::http::header::SET_COOKIE;
use warp::reply::Response;

use super::State;

/// What a browser sent that the front door looks at.
#[derive(Debug, Clone, Default)]
pub struct BrowserRequest {
    /// `Cookie` header.
    cookie: Option<String>,
    /// `Sec-Fetch-Site` header.
    fetch_site: Option<String>,
    /// `Origin` header.
    origin: Option<String>,
}

/// The browser's request headers as a filter.
pub(super) fn browser() -> impl Filter<Extract = (BrowserRequest,), Error = std::convert::Infallible> + Clone {
    warp::header::optional::<String>("cookie")
        .and(warp::header::optional::<String>("sec-fetch-site"))
        .and(warp::header::optional::<String>("origin"))
        .map(|cookie, fetch_site, origin| BrowserRequest { cookie, fetch_site, origin })
        .or(warp::any().map(BrowserRequest::default))
        .unify()
}

/// Whether the broker is served over HTTPS: its cookie can then be `Secure`
/// and `__Host-` prefixed.
fn served_securely(state: &State) -> bool {
    state.public_url.starts_with("https://")
}

/// The proof cookie's name: `__Host-` needs a secure origin.
pub fn cookie_name(state: &State) -> &'static str {
    if served_securely(state) { "__Host-latchkey-login" } else { "latchkey-login" }
}

impl BrowserRequest {
    /// The proof cookie's value, if the browser sent one.
    pub fn proof(&self, state: &State) -> Option<String> {
        let name = cookie_name(state);
        self.cookie.as_deref()?.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name && !v.is_empty()).then(|| v.to_owned())
        })
    }

    /// Checks a POST that continues a login: same-origin, cookie present,
    /// and repeated in the form. Answers the proof, or why it was refused.
    pub fn check_post(&self, state: &State, form: &HashMap<String, String>) -> Result<String, &'static str> {
        if let Some(site) = self.fetch_site.as_deref() {
            // `none`: the user typed or bookmarked it; a form on our own page says `same-origin`.
            if site != "same-origin" && site != "none" {
                return Err("the form was sent from another site");
            }
        } else if let Some(origin) = self.origin.as_deref() {
            if !same_origin(origin, &state.public_url) {
                return Err("the form was sent from another site");
            }
        }
        let cookie = self.proof(state).ok_or("the browser sent no login cookie")?;
        let field = form.get("csrf").map(String::as_str).unwrap_or_default();
        if !bool::from(subtle::ConstantTimeEq::ct_eq(cookie.as_bytes(), field.as_bytes())) {
            return Err("the form does not match this browser's login cookie");
        }
        Ok(cookie)
    }
}

fn same_origin(origin: &str, public_url: &str) -> bool {
    match (url::Url::parse(origin), url::Url::parse(public_url)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

/// The proof a page embeds: the browser's own while it is still good for a
/// new login, else a fresh one.
pub async fn page_proof(state: &State, browser: &BrowserRequest) -> String {
    if let Some(proof) = browser.proof(state) {
        if state.broker.browser_proof_reusable(&proof).await {
            return proof;
        }
    }
    state.broker.new_browser_proof().expose_secret().to_owned()
}

/// Sets the proof cookie on a page.
pub fn with_cookie(mut response: Response, state: &State, proof: &str) -> Response {
    let secure = if served_securely(state) { "; Secure" } else { "" };
    let max_age = state.login_ttl.as_secs();
    let cookie = format!("{}={proof}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}", cookie_name(state));
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(SET_COOKIE, value);
    }
    response
}
