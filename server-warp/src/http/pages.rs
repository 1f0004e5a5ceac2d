//! Server-rendered pages: a little CSS, one small script (served as a file,
//! so the Content-Security-Policy needs no inline allowance), and the
//! security headers on every page.

use warp::http::StatusCode;
use warp::http::header::{HeaderName, HeaderValue};
use warp::reply::Response;

use super::reply::with_body;

/// The stylesheet.
pub const STYLE_CSS: &str = include_str!("../../static/style.css");
/// The AuthID page's script.
pub const AUTHID_JS: &str = include_str!("../../static/authid.js");

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query value.
pub fn q(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// Adds the page security headers to a response.
pub fn secure(mut response: Response, csp: &str) -> Response {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(csp) {
        headers.insert(HeaderName::from_static("content-security-policy"), value);
    }
    headers.insert(HeaderName::from_static("x-frame-options"), HeaderValue::from_static("DENY"));
    headers.insert(HeaderName::from_static("referrer-policy"), HeaderValue::from_static("no-referrer"));
    headers.insert(HeaderName::from_static("x-content-type-options"), HeaderValue::from_static("nosniff"));
    response
}

/// A whole page.
pub fn page(status: StatusCode, csp: &str, title: &str, body: &str, script: bool) -> Response {
    let script = if script { r#"<script src="/static/authid.js" defer></script>"# } else { "" };
    let html = format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width, initial-scale=1\">\
         <title>{title} · latchkey</title><link rel=stylesheet href=\"/static/style.css\">{script}</head>\
         <body><main>{body}<footer>latchkey OAuth broker · <a href=\"/privacy-policy\">privacy</a></footer></main></body></html>",
        title = escape(title),
    );
    secure(with_body(status, "text/html; charset=utf-8", html), csp)
}

/// An error page: what happened and what to do, never a provider's raw body.
pub fn error_page(status: StatusCode, csp: &str, title: &str, message: &str) -> Response {
    let body = format!(
        "<div class=\"card error\"><h1>{}</h1><p>{}</p><p><a href=\"/\">Start again</a></p></div>",
        escape(title),
        escape(message)
    );
    page(status, csp, title, &body, false)
}

/// The hidden fields every form that continues a login carries.
fn login_fields(proof: &str, token: Option<&str>) -> String {
    let token = token.map(|t| format!("<input type=hidden name=token value=\"{}\">", escape(t))).unwrap_or_default();
    format!("<input type=hidden name=csrf value=\"{}\">{token}", escape(proof))
}

/// What a page says when a program waits for the login's AuthID.
const WAITING_PROGRAM: &str = "<p class=warning><strong>A program is waiting for this login.</strong> \
    It will receive the AuthID by itself. Continue only if you started this yourself, just now, from your own \
    backup or sync program; if a web page or a message sent you here, close this tab.</p>";

/// The service picker: every way onward is a button that posts to `/login`.
pub fn picker(csp: &str, services: &[(String, String)], token: Option<&str>, proof: &str) -> Response {
    let items: String = services
        .iter()
        .map(|(id, name)| {
            format!(
                "<li><form method=post action=\"/login\"><input type=hidden name=id value=\"{}\">{}\
                 <button type=submit>{}</button></form></li>",
                escape(id),
                login_fields(proof, token),
                escape(name)
            )
        })
        .collect();
    let list = if items.is_empty() {
        "<p>No service is configured on this broker yet.</p>".to_owned()
    } else {
        format!("<ul class=services>{items}</ul>")
    };
    let waiting = if token.is_some() { WAITING_PROGRAM } else { "" };
    let body = format!(
        "<div class=card><h1>Connect a storage account</h1>{waiting}\
         <p>Pick the service your backup or sync program should reach. You will log in at the provider; \
         this broker never sees your password.</p>{list}</div>\
         <p class=muted>A program that cannot show a browser can use the <a href=\"/device\">device page</a>.</p>"
    );
    page(StatusCode::OK, csp, "Connect", &body, false)
}

/// The confirmation a login link leads to: it names the service and starts
/// nothing until the user clicks.
pub fn confirm_login(csp: &str, service: &str, display: &str, token: Option<&str>, proof: &str) -> Response {
    let waiting = if token.is_some() { WAITING_PROGRAM } else { "" };
    let body = format!(
        "<div class=card><h1>Log in to {display}</h1>{waiting}\
         <p>You will be sent to {display} to log in and allow access. This broker never sees your password.</p>\
         <form method=post action=\"/login\"><input type=hidden name=id value=\"{service}\">{fields}\
         <button type=submit id=continue>Continue to {display}</button></form></div>",
        display = escape(display),
        service = escape(service),
        fields = login_fields(proof, token),
    );
    page(StatusCode::OK, csp, "Log in", &body, false)
}

/// The credential element `authid.js` copies and posts to the allowed openers.
fn credential(text: &str, openers: &[String]) -> String {
    format!(
        "<code id=authid data-authid=\"{id}\" data-openers=\"{openers}\">{id}</code>",
        id = escape(text),
        openers = escape(&openers.join(" ")),
    )
}

/// What became of the hand-off a waiting program named, if any.
fn handoff_notice((article, what): (&str, &str), handed_off: bool, refused: bool, advice: &str) -> String {
    if handed_off {
        format!("<p>Your program has been sent this {what} and will pick it up by itself.</p>")
    } else if refused {
        format!(
            "<p class=warning>The program that waited for this login had already received {article} {what} from another \
             login, so it was not sent this one.{advice}</p>"
        )
    } else {
        String::new()
    }
}

/// The AuthID page, shown once after a login.
pub fn authid_page(
    csp: &str,
    authid: &str,
    service: &str,
    openers: &[String],
    handed_off: bool,
    handoff_refused: bool,
) -> Response {
    let handed = handoff_notice(
        ("an", "AuthID"),
        handed_off,
        handoff_refused,
        " If you did not make that other login, revoke it and check your program's settings.",
    );
    let body = format!(
        "<div class=card><h1>Your AuthID for {service}</h1>{handed}\
         <p>Paste this AuthID into your backup or sync program (in Duplicati: the <em>AuthID</em> field of the \
         storage settings). Keep it secret: it is the key to this login, and this page is the only time it is shown.</p>\
         {code}<button id=copy type=button>Copy AuthID</button> <span id=copy-status class=muted role=status></span></div>\
         <div class=card><p class=muted>Lost it, or no longer need it? <a href=\"/revoke\">Revoke an AuthID</a>. \
         Programs can also use it as an OAuth2 refresh token at <code>/oauth2/token</code>.</p></div>",
        service = escape(service),
        code = credential(authid, openers),
    );
    page(StatusCode::OK, csp, "Your AuthID", &body, true)
}

/// The page of a service that hands out the provider's access token itself
/// (pCloud): the token, the API host, and that the broker keeps nothing.
pub fn token_page(
    csp: &str,
    token: &latchkey_core::engine::TokenHandout,
    service: &str,
    openers: &[String],
) -> Response {
    use secrecy::ExposeSecret;
    let handed = handoff_notice(("a", "token"), token.handed_off, token.handoff_refused, "");
    let host = token
        .api_host
        .as_deref()
        .map(|h| format!("<p>API host for this account: <code id=api-host>{}</code></p>", escape(h)))
        .unwrap_or_default();
    let body = format!(
        "<div class=card><h1>Your access token for {service}</h1>{handed}\
         <p>{service} hands out access tokens that do not expire, so this is <strong>the token itself</strong>, \
         not an AuthID: paste it into your program's <em>AuthID</em> field. This broker keeps nothing of it: \
         it cannot refresh or revoke it for you, and this page is the only time it is shown. To revoke it, \
         remove this app's access in your {service} account settings.</p>\
         {code}{host}\
         <button id=copy type=button>Copy token</button> <span id=copy-status class=muted role=status></span></div>",
        service = escape(service),
        code = credential(token.access_token.expose_secret(), openers),
    );
    page(StatusCode::OK, csp, "Your access token", &body, true)
}

/// The revoke form.
pub fn revoke_form(csp: &str) -> Response {
    let body = "<div class=card><h1>Revoke an AuthID</h1>\
        <p>Paste the AuthID to revoke. Programs using it stop working at once. The next page lists the other AuthIDs \
        of the same login and lets you revoke the whole login; revoking the last AuthID of a login also revokes the \
        login at the provider where it allows that.</p>\
        <form method=post action=\"/revoked\"><label for=authid-input>AuthID</label>\
        <input type=text id=authid-input name=authid autocomplete=off required>\
        <input type=submit value=\"Revoke\"></form></div>";
    page(StatusCode::OK, csp, "Revoke", body, false)
}

/// One of a login's other AuthIDs, as the revoke page lists it.
pub struct SiblingRow {
    /// Its keyid (public).
    pub keyid: String,
    /// Its label.
    pub label: String,
    /// When it was made.
    pub created: String,
    /// When it was last used.
    pub last_used: String,
}

/// The result of revoking an AuthID: the login's other AuthIDs and, while
/// there are any, a button that revokes the whole login.
pub fn revoked_page(csp: &str, grant_revoked: Option<&str>, siblings: &[SiblingRow], ticket: Option<&str>) -> Response {
    let extra = match grant_revoked {
        Some(provider) => format!(
            "<p>That was the last AuthID of its login, so the login itself was revoked ({}).</p>",
            escape(provider)
        ),
        None => String::new(),
    };
    let others = if siblings.is_empty() {
        String::new()
    } else {
        let rows: String = siblings
            .iter()
            .map(|s| {
                format!(
                    "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&s.keyid),
                    escape(&s.label),
                    escape(&s.created),
                    escape(&s.last_used)
                )
            })
            .collect();
        let button = ticket
            .map(|t| {
                format!(
                    "<form method=post action=\"/revoked\"><input type=hidden name=ticket value=\"{}\">\
                     <button type=submit id=revoke-login>Revoke the whole login</button></form>\
                     <p class=muted>This revokes every AuthID listed here and the login at the provider. \
                     It works for ten minutes.</p>",
                    escape(t)
                )
            })
            .unwrap_or_default();
        format!(
            "<div class=card><h2>Other AuthIDs of this login still work</h2>\
             <p>If you do not recognise them all, someone may have used your AuthID to make more: revoke the \
             whole login.</p><table id=siblings><thead><tr><th>Key id</th><th>Label</th><th>Created</th>\
             <th>Last used</th></tr></thead><tbody>{rows}</tbody></table>{button}</div>"
        )
    };
    let body = format!("<div class=card><h1>Revoked</h1><p>The AuthID no longer works.</p>{extra}</div>{others}");
    page(StatusCode::OK, csp, "Revoked", &body, false)
}

/// The result of revoking a whole login from the revoke page.
pub fn login_revoked_page(csp: &str, handles: usize, provider: &str) -> Response {
    let body = format!(
        "<div class=card><h1>Login revoked</h1><p>{handles} more AuthID(s) revoked; none of this login's AuthIDs \
         works any more. At the provider: {}.</p></div>",
        escape(provider)
    );
    page(StatusCode::OK, csp, "Login revoked", &body, false)
}

/// The device page: where a user types the code a headless program shows.
pub fn device_form(csp: &str, prefill: Option<&str>, proof: &str) -> Response {
    let body = format!(
        "<div class=card><h1>Connect a device</h1><p>Type the code your program shows.</p>\
         <form method=post action=\"/device\"><label for=user-code>Code</label>\
         <input type=text id=user-code name=user_code value=\"{}\" autocomplete=off autocapitalize=characters required>\
         {}<input type=submit value=\"Continue\"></form></div>",
        escape(prefill.unwrap_or_default()),
        login_fields(proof, None),
    );
    page(StatusCode::OK, csp, "Connect a device", &body, false)
}

/// What a typed device code asks for, before the user continues (RFC 8628 §5.4).
pub fn device_confirm(csp: &str, display: &str, label: &str, user_code: &str, proof: &str) -> Response {
    let body = format!(
        "<div class=card><h1>Connect {label} to {display}?</h1>\
         <p class=warning><strong>A program is waiting for this login:</strong> <em>{label}</em> asked for access to \
         your {display} account with the code <code>{code}</code>. Continue only if you started this yourself on \
         your own device; if someone sent you this code, close this tab.</p>\
         <form method=post action=\"/login\"><input type=hidden name=user_code value=\"{code}\">{fields}\
         <button type=submit id=continue>Continue to {display}</button></form></div>",
        display = escape(display),
        label = escape(label),
        code = escape(user_code),
        fields = login_fields(proof, None),
    );
    page(StatusCode::OK, csp, "Connect a device", &body, false)
}

/// The personal-login-token form (Jottacloud).
pub fn login_token_form(csp: &str, service: &str, display: &str, token: Option<&str>, proof: &str) -> Response {
    let waiting = if token.is_some() { WAITING_PROGRAM } else { "" };
    let body = format!(
        "<div class=card><h1>Log in to {display}</h1>{waiting}<p>Create a personal login token in your {display} \
         account settings and paste it here. It is used once to log in and is not kept.</p>\
         <form method=post action=\"/cli-token-login\"><input type=hidden name=id value=\"{service}\">{fields}\
         <label for=login-token>Personal login token</label><textarea id=login-token name=login_token required></textarea>\
         <input type=submit value=\"Log in\"></form></div>",
        display = escape(display),
        service = escape(service),
        fields = login_fields(proof, token),
    );
    page(StatusCode::OK, csp, "Log in", &body, false)
}

/// What became of a grant at its provider, in words.
pub fn provider_outcome(outcome: &latchkey_core::engine::ProviderRevocation) -> &'static str {
    use latchkey_core::engine::ProviderRevocation;
    match outcome {
        ProviderRevocation::Revoked => "at the provider as well",
        ProviderRevocation::Unsupported => "the provider offers no revocation",
        ProviderRevocation::NoToken => "there was no token to revoke",
        ProviderRevocation::Failed(_) => "the provider could not be reached",
    }
}

/// A time as people read it: `2026-11-29 23:38 UTC`.
pub fn utc_minute(at: latchkey_core::Timestamp) -> String {
    let u = at.utc();
    format!("{:04}-{:02}-{:02} {:02}:{:02} UTC", u.year, u.month, u.day, u.hour, u.minute)
}

/// The privacy policy, as plain text.
pub const PRIVACY_POLICY: &str = "latchkey privacy policy

This broker stores, for each login you make through it:
- the refresh token and the latest access token the provider issued, encrypted
  under a key that only your AuthID unlocks (and, again, under the operator's
  master key);
- the service name, timestamps of creation and last use, and the labels you
  give your AuthIDs (encrypted).

It never sees or stores your provider password, and it does not keep your
AuthID: only you hold it. The operator cannot read your tokens from the
database alone.

Your tokens are used only to obtain fresh access tokens for the program that
presents your AuthID. Revoke an AuthID at /revoke at any time; revoking the
last AuthID of a login deletes the tokens and, where the provider supports it,
revokes them at the provider. Logins unused for a long time are deleted.
";
